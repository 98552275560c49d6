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
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = tuple(float(80 * 2**i) for i in range(9))  # 80, 160, ..., 20480
GC_PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

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


class Metrics:
    __slots__ = (
        "_gc_watched",
        "_registry",
        "channel_created",
        "channel_disposed",
        "channel_duration",
        "messages_lost",
        "messages_read",
        "messages_received",
        "messages_replayed",
        "messages_unroutable",
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

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read on scrape (``megaphone_<name>``): the budgets and what uses them."""
        Gauge(f"megaphone_{name}", help_text, registry=self._registry).set_function(read)

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

    def render(self) -> bytes:
        lines = []
        for name, help_text in _COUNTERS.items():
            full = f"megaphone_{name}"
            lines.append(f"# HELP {full} {help_text}\n# TYPE {full} counter\n")
            lines.append(f"{full} {getattr(self, name)}\n")
        return "".join(lines).encode() + generate_latest(self._registry)
