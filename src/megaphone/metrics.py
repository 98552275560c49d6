"""Every Prometheus instrument of the broker, in one place.

The counters keep the original's names exactly (``megaphone_channel_created``, not ``..._total``),
so dashboards written for megaphone-broker 0.10.5 keep working; they are plain integers on the hot
path and rendered in the Prometheus text format on scrape. The histograms use prometheus-client;
the exposition has no ``_created`` series.

Garbage-collector pauses are measured once per process, whatever the number of servers in it: a
single ``gc.callbacks`` hook times every collection, installed while at least one server holds it
(:meth:`Metrics.watch_gc` / :meth:`Metrics.unwatch_gc`), and every server's ``/metrics`` shows the
same two process-wide series, ``megaphone_gc_pause_seconds`` (histogram) and
``megaphone_gc_longest_pause_seconds`` (gauge), both by generation, counted since the hook was
first installed.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from time import perf_counter
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = tuple(float(80 * 2**i) for i in range(9))  # 80, 160, ..., 20480
GC_PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
LATENCY_SAMPLE = 64  # one event in this many has its write→deliver latency observed

# a process's figures: its counters (rendered by hand) and its registry's families
Snapshot = tuple[dict[str, int], list[Metric]]

_COUNTERS = {
    "channel_created": "Channels created",
    "channel_disposed": "Channels deleted (expired or disposed)",
    "messages_received": "Events accepted by write or write-batch",
    "messages_read": "Events sent to readers",
    "messages_replayed": "Sent events sent again to a resuming reader",
    "messages_unroutable": "Events written to an unknown channel",
    "messages_lost": "Events deleted with their channel before being read",
}


class _Registry(CollectorRegistry):
    """A registry whose exposition leaves out the ``_created`` samples (per registry, unlike
    prometheus-client's process-wide ``disable_created_metrics()``)."""

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


class GcWatch:
    """The process's one ``gc.callbacks`` hook: every collection's pause, by generation.

    Reference-counted: installed by the first :meth:`acquire`, removed by the last
    :meth:`release`, so servers sharing a process neither count a pause twice nor remove each
    other's hook. The instruments are not bound to a registry; every :class:`Metrics` registers
    them in its own.
    """

    def __init__(self) -> None:
        self.pause = Histogram(
            "megaphone_gc_pause_seconds",
            "Garbage-collection pauses by generation, in seconds",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=None,
        )
        self.longest = Gauge(
            "megaphone_gc_longest_pause_seconds",
            "Longest garbage-collection pause by generation, in seconds",
            ["generation"],
            registry=None,
        )
        generations = range(len(gc.get_threshold()))
        self._pauses = [self.pause.labels(str(g)) for g in generations]
        self._longest = [self.longest.labels(str(g)) for g in generations]
        self._max = [0.0 for _ in generations]
        self._lock = threading.Lock()
        self._users = 0
        self._started = 0.0

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                gc.callbacks.append(self._on_gc)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap (the interpreter runs one at a time), so one start time does.
        if phase == "start":
            self._started = perf_counter()
            return
        pause = perf_counter() - self._started
        generation = info["generation"]
        while generation >= len(self._pauses):  # an interpreter with more generations
            self._pauses.append(self.pause.labels(str(len(self._pauses))))
            self._longest.append(self.longest.labels(str(len(self._longest))))
            self._max.append(0.0)
        self._pauses[generation].observe(pause)
        if pause > self._max[generation]:
            self._max[generation] = pause
            self._longest[generation].set(pause)


GC_WATCH = GcWatch()


class _Collect:
    """A collector from a function (families computed on scrape)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


class Metrics:
    __slots__ = (
        "_gc_watched",
        "_registry",
        "channel_created",
        "channel_disposed",
        "channel_duration",
        "cluster",
        "delivery_latency",
        "latency_countdown",
        "messages_lost",
        "messages_read",
        "messages_received",
        "messages_replayed",
        "messages_unroutable",
        "refreshers",
        "requests",
    )

    def __init__(self) -> None:
        self.channel_created = 0
        self.channel_disposed = 0
        self.messages_received = 0
        self.messages_read = 0
        self.messages_replayed = 0
        self.messages_unroutable = 0
        self.messages_lost = 0
        self._registry = _Registry(auto_describe=True)
        self.channel_duration = Histogram(
            "megaphone_channel_duration",
            "Lifetime of deleted channels, in seconds",
            buckets=DURATION_BUCKETS,
            registry=self._registry,
        )
        self._registry.register(GC_WATCH.pause)
        self._registry.register(GC_WATCH.longest)
        self._gc_watched = False
        # write → deliver, sampled (see sample_latency): the hot path pays one decrement
        self.delivery_latency = Histogram(
            "megaphone_delivery_latency_seconds",
            "Time from an event's write (its ts) to its delivery to a reader's socket, in seconds "
            f"(one delivery in {LATENCY_SAMPLE} sampled, by its last event)",
            buckets=LATENCY_BUCKETS,
            registry=self._registry,
        )
        self.latency_countdown = LATENCY_SAMPLE
        # (endpoint, status) → requests answered: plain integers on the hot path
        self.requests: dict[tuple[str, int], int] = {}
        self.collector(self._collect_requests)
        ProcessCollector(namespace="megaphone", registry=self._registry)
        # awaited before each scrape: figures that need a store round trip (Redis)
        self.refreshers: list[Callable[[], Awaitable[None]]] = []
        # set in a worker process: renders every worker's figures (after refresh)
        self.cluster: Callable[[], Awaitable[bytes]] | None = None

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read on scrape (``megaphone_<name>``): the budgets and what uses them."""
        Gauge(f"megaphone_{name}", help_text, registry=self._registry).set_function(read)

    def gauges(
        self, name: str, help_text: str, labels: list[str], read: Callable[[], dict[Any, float]]
    ) -> None:
        """A gauge with labels read on scrape: ``read()`` maps label values to the figure."""

        def collect() -> Iterable[Metric]:
            family = GaugeMetricFamily(f"megaphone_{name}", help_text, labels=labels)
            for values, figure in read().items():
                family.add_metric(list(values) if isinstance(values, tuple) else [values], figure)
            yield family

        self.collector(collect)

    def collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._registry.register(_Collect(collect))

    def _collect_requests(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "megaphone_http_requests",
            "Requests answered, by endpoint and status (reads: counted when they attach)",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(self.requests.items()):
            family.add_metric([endpoint, str(status)], count)
        yield family

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def sample_latency(self, line: bytes) -> None:
        """Observe the write→deliver latency of one event in LATENCY_SAMPLE (its ``ts``, the
        writing node's wall clock, against ours)."""
        self.latency_countdown -= 1
        if self.latency_countdown > 0:
            return
        self.latency_countdown = LATENCY_SAMPLE
        start = line.find(b',"ts":"')
        if start < 0:
            return
        start += 7
        try:
            written = datetime.fromisoformat(line[start : line.index(b'"', start)].decode())
        except ValueError:
            return
        self.delivery_latency.observe(max(0.0, time.time() - written.timestamp()))

    async def refresh(self) -> None:
        for refresh in self.refreshers:
            await refresh()

    def watch_gc(self) -> None:
        """Time garbage collections from now on (the process-wide hook); repeating is harmless."""
        if not self._gc_watched:
            self._gc_watched = True
            GC_WATCH.acquire()

    def unwatch_gc(self) -> None:
        """Give back this server's hold on the hook; repeating is harmless."""
        if self._gc_watched:
            self._gc_watched = False
            GC_WATCH.release()

    async def exposition(self) -> bytes:
        """What ``/metrics`` answers: this process's figures or, when ``cluster`` is set (a
        worker, ``workers`` > 1), every worker's (see :mod:`megaphone.workers`)."""
        await self.refresh()
        if self.cluster is not None:
            return await self.cluster()
        return self.render()

    def snapshot(self) -> Snapshot:
        """This process's figures as plain (picklable) values: the counters and the families."""
        counters = {name: getattr(self, name) for name in _COUNTERS}
        families = []
        for family in self._registry.collect():
            plain = Metric(family.name, family.documentation, family.type, family.unit)
            plain.samples = list(family.samples)
            families.append(plain)
        return counters, families

    def render(self) -> bytes:
        lines = []
        for name, help_text in _COUNTERS.items():
            full = f"megaphone_{name}"
            lines.append(f"# HELP {full} {help_text}\n# TYPE {full} counter\n")
            lines.append(f"{full} {getattr(self, name)}\n")
        return "".join(lines).encode() + generate_latest(self._registry)


def render_workers(snapshots: dict[int, Snapshot], unreachable: int) -> bytes:
    """Every worker's figures in one exposition, each sample labelled ``worker="i"``, plus
    ``megaphone_workers_unreachable``: the workers whose figures are missing from it."""
    lines = []
    for name, help_text in _COUNTERS.items():
        full = f"megaphone_{name}"
        lines.append(f"# HELP {full} {help_text}\n# TYPE {full} counter\n")
        for index, (counters, _) in sorted(snapshots.items()):
            lines.append(f'{full}{{worker="{index}"}} {counters.get(name, 0)}\n')
    merged: dict[str, Metric] = {}
    for index, (_, families) in sorted(snapshots.items()):
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            worker = str(index)
            into.samples += [
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            ]
    missing = GaugeMetricFamily(
        "megaphone_workers_unreachable",
        "Workers that did not answer this scrape in time (their series are missing from it)",
        value=unreachable,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collect(lambda: [*merged.values(), missing]))
    return "".join(lines).encode() + generate_latest(registry)
