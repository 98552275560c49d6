"""The report: the ratios of the phased workloads, the table's rows (what each figure is, where
it is in a result), the markdown table and its ratio columns, the per-pass merge (medians, Redis ÷
memory) and the anomalies listed after the table."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from targets import REDIS_TARGETS
from workloads import TRANSPORT_WORKLOADS, WORKLOADS, Plan

HARNESS_BOUND_PCT = 90.0  # load generator CPU share from which the harness is likely the limit
NOISY_PCT = 10.0  # CPU share of other processes from which a figure is likely disturbed


Getter = Callable[[dict[str, Any]], Any]


def dig(*keys: str) -> Getter:
    def get(result: dict[str, Any]) -> Any:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get


def with_redis(server: Getter, redis: Getter) -> Getter:
    """All server-side CPU: the server's plus redis-server's (the server's alone without Redis)."""

    def get(result: dict[str, Any]) -> Any:
        mine, theirs = server(result), redis(result)
        if not isinstance(mine, int | float):
            return None
        return mine + (theirs if isinstance(theirs, int | float) else 0)

    return get


def by_node(*keys: str) -> Getter:
    """Each megaphone node's figure, "A 40 / B 30" (several nodes only)."""

    def get(result: dict[str, Any]) -> Any:
        nodes = dig(*keys)(result)
        if not isinstance(nodes, dict) or not nodes:
            return None
        return " / ".join(f"{name} {value:.0f}" for name, value in sorted(nodes.items()))

    return get


def fanout_per_1k(key: str) -> Getter:
    """Fan-out CPU (``fanout.<key>``, seconds) per 1,000 events received."""

    def get(result: dict[str, Any]) -> Any:
        cpu = dig("fanout", key)(result)
        received = result.get("fanout_received")
        if not isinstance(cpu, int | float) or not received:
            return None
        return float(1e6 * cpu / received)

    return get


def count_of(key: str) -> Getter:
    """The total of a ``{kind: count}`` figure (failed writes by status, refused reads ...)."""

    def get(result: dict[str, Any]) -> Any:
        counts = result.get(key)
        return sum(counts.values()) if isinstance(counts, dict) else None

    return get


RM = "Redis ÷ memory"
SR = "server + redis-server"
# (workload, label, getter, better: "up" | "down" | "" (no ratio), decimals)
Row = tuple[str, str, Getter, str, int]
ROWS: list[Row] = [
    ("throughput", "writes acknowledged /s", dig("acked_per_s"), "up", 0),
    ("throughput", "events delivered /s", dig("delivered_per_s"), "up", 0),
    (
        "throughput",
        f"{RM}: events delivered /s (issue #4: ≥ 0.50)",
        dig("vs_memory", "delivered_per_s"),
        "",
        2,
    ),
    ("throughput", "publish→deliver p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("throughput", "publish→deliver p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("throughput", "publish→deliver max (ms)", dig("latency", "max_ms"), "down", 2),
    ("throughput", "write ack round trip p50 (ms)", dig("ack_rtt", "p50_ms"), "down", 2),
    ("throughput", "events lost (acked, never delivered)", dig("lost"), "", 0),
    ("throughput", "write errors (non-2xx)", count_of("write_errors"), "", 0),
    ("throughput", "reads answered 5xx (opened again)", count_of("read_refused"), "", 0),
    ("throughput", "server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("throughput", "redis-server CPU (% of one core)", dig("redis_cpu_pct"), "", 0),
    ("throughput", "megaphone CPU by node (% of one core)", by_node("node_cpu_pct"), "", 0),
    ("throughput", "server CPU ms / 1,000 events", dig("server_cpu_ms_per_1k_events"), "down", 1),
    (
        "throughput",
        "redis-server CPU ms / 1,000 events",
        dig("redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "throughput",
        f"{SR} CPU ms / 1,000 events",
        with_redis(dig("server_cpu_ms_per_1k_events"), dig("redis_cpu_ms_per_1k_events")),
        "down",
        1,
    ),
    ("throughput", f"{RM}: {SR} CPU / event", dig("vs_memory", "cpu_per_event"), "", 2),
    ("throughput", "load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("throughput", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
    ("create", "channels created /s", dig("created_per_s"), "up", 0),
    ("create", f"{RM}: channels created /s", dig("vs_memory", "created_per_s"), "", 2),
    ("create", "create round trip p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("create", "create round trip p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("create", "server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("create", "redis-server CPU (% of one core)", dig("redis_cpu_pct"), "", 0),
    ("create", "server CPU ms / 1,000 creates", dig("server_cpu_ms_per_1k_creates"), "down", 1),
    (
        "create",
        "redis-server CPU ms / 1,000 creates",
        dig("redis_cpu_ms_per_1k_creates"),
        "down",
        1,
    ),
    (
        "create",
        f"{SR} CPU ms / 1,000 creates",
        with_redis(dig("server_cpu_ms_per_1k_creates"), dig("redis_cpu_ms_per_1k_creates")),
        "down",
        1,
    ),
    ("create", f"{RM}: {SR} CPU / create", dig("vs_memory", "cpu_per_create"), "", 2),
    ("create", "server RSS growth per channel (KiB)", dig("rss_per_channel_kib"), "down", 2),
    (
        "create",
        "redis-server RSS growth per channel (KiB)",
        dig("redis_rss_per_channel_kib"),
        "down",
        2,
    ),
    ("create", "load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("create", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
]


def in_phase(name: str, get: Getter) -> Getter:
    """A figure of one phase (None when the phase did not run)."""
    return lambda result: get(dig("phases", name)(result) or {})


def skipped_or(name: str, get: Getter) -> Getter:
    """A phase's figure, or why that phase was not run."""
    return lambda result: dig("phases", name, "skipped")(result) or in_phase(name, get)(result)


# the idle workload's rows, once per size: (label, getter, better, decimals)
IDLE_ROWS: list[tuple[str, Getter, str, int]] = [
    ("server RSS growth per reader (KiB)", dig("rss_per_reader_kib"), "down", 2),
    (
        "redis-server RSS growth per reader (KiB)",
        dig("redis_rss_per_reader_kib"),
        "down",
        2,
    ),
    ("time to open all readers (s)", dig("connect_s"), "down", 2),
    ("reads answered 5xx (opened again)", count_of("read_refused"), "", 0),
    ("server CPU while idle (% of one core)", dig("idle", "server_cpu_pct"), "", 1),
    (
        "redis-server CPU while idle (% of one core)",
        dig("idle", "redis_cpu_pct"),
        "",
        1,
    ),
    ("fan-out: every reader has its event (s)", dig("fanout_all_delivered_s"), "down", 3),
    ("fan-out writes answered non-2xx (written again)", count_of("write_errors"), "", 0),
    ("fan-out latency p50 (ms)", dig("fanout_latency", "p50_ms"), "down", 1),
    ("fan-out latency p99 (ms)", dig("fanout_latency", "p99_ms"), "down", 1),
    ("fan-out server CPU ms / 1,000 events", fanout_per_1k("server_cpu_s"), "down", 1),
    (
        "fan-out redis-server CPU ms / 1,000 events",
        fanout_per_1k("redis_cpu_s"),
        "down",
        1,
    ),
    (
        f"fan-out {SR} CPU ms / 1,000 events",
        with_redis(fanout_per_1k("server_cpu_s"), fanout_per_1k("redis_cpu_s")),
        "down",
        1,
    ),
    ("fan-out load generator CPU (% of one core)", dig("fanout", "loadgen_cpu_pct"), "", 0),
    ("fan-out other processes CPU (% of one core)", dig("fanout", "other_cpu_pct"), "", 0),
]


def idle_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        name = str(size)
        rows.append(
            (
                "idle",
                f"{size:,} readers: idle streaming readers",
                skipped_or(name, dig("readers")),
                "",
                0,
            )
        )
        rows += [
            ("idle", f"{size:,} readers: {label}", in_phase(name, get), better, decimals)
            for label, get, better, decimals in IDLE_ROWS
        ]
    return rows


def phase(name: str, *keys: str) -> Getter:
    return dig("phases", name, *keys)


def total(*getters: Getter) -> Getter:
    """The sum of several figures (None when none is there)."""

    def get(result: dict[str, Any]) -> Any:
        values = [g(result) for g in getters]
        numbers = [v for v in values if isinstance(v, int | float)]
        return sum(numbers) if numbers else None

    return get


def rss_growth_mib(result: dict[str, Any]) -> float | None:
    start, end = result.get("rss_start_kib"), result.get("rss_end_kib")
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return None
    return (end - start) / 1024


def max_other(result: dict[str, Any]) -> Any:
    """The noisiest phase's "other processes" CPU."""
    values = [p.get("other_cpu_pct") for p in result.get("phases", {}).values()]
    numbers = [v for v in values if isinstance(v, int | float)]
    return max(numbers) if numbers else None


def unknown_cursors(result: dict[str, Any]) -> Any:
    """Reads answered ``megaphone-resume: unknown-cursor`` (None: the header never came)."""
    headers = result.get("resume_headers")
    if not isinstance(headers, dict) or not set(headers) - {"(none)"}:
        return None
    return headers.get("unknown-cursor", 0)


P, C, W = "no cursor", "cursor", "window 0"
ROWS += [
    ("resume", f"{P}: events delivered /s", phase("plain", "delivered_per_s"), "up", 0),
    ("resume", f"{C}: events delivered /s", phase("cursor", "delivered_per_s"), "up", 0),
    ("resume", f"{C} ÷ {P}: events delivered /s", dig("ratios", "cursor_delivered"), "", 2),
    (
        "resume",
        f"{P}: server CPU ms / 1,000 events",
        phase("plain", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "resume",
        f"{C}: server CPU ms / 1,000 events",
        phase("cursor", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{C} ÷ {P}: server CPU / event", dig("ratios", "cursor_cpu_per_1k"), "", 2),
    (
        "resume",
        f"{P}: redis-server CPU ms / 1,000 events",
        phase("plain", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "resume",
        f"{C}: redis-server CPU ms / 1,000 events",
        phase("cursor", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{P}: publish→deliver p50 (ms)", phase("plain", "latency", "p50_ms"), "down", 2),
    ("resume", f"{C}: publish→deliver p50 (ms)", phase("cursor", "latency", "p50_ms"), "down", 2),
    ("resume", f"{P}: publish→deliver p99 (ms)", phase("plain", "latency", "p99_ms"), "down", 2),
    ("resume", f"{C}: publish→deliver p99 (ms)", phase("cursor", "latency", "p99_ms"), "down", 2),
    ("resume", f"{C}: reconnects /s", phase("cursor", "reconnects_per_s"), "", 0),
    (
        "resume",
        f"{C}: read-open p50 (ms)",
        phase("cursor", "open_latency", "p50_ms"),
        "down",
        2,
    ),
    (
        "resume",
        f"{C}: read-open p99 (ms)",
        phase("cursor", "open_latency", "p99_ms"),
        "down",
        2,
    ),
    ("resume", f"{C}: events replayed (server count)", phase("cursor", "server_replayed"), "", 0),
    (
        "resume",
        f"{C}: replays of events dropped at hang-up (client)",
        phase("cursor", "replays_seen"),
        "",
        0,
    ),
    (
        "resume",
        "duplicates (events received again after being taken)",
        total(phase("plain", "duplicates"), phase("cursor", "duplicates")),
        "",
        0,
    ),
    (
        "resume",
        "events lost (acked, never delivered)",
        total(phase("plain", "lost"), phase("cursor", "lost")),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: unknown-cursor answers",
        lambda r: (
            unknown_cursors(r["phases"]["cursor"]) if "cursor" in r.get("phases", {}) else None
        ),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: 409 busy answers to a reconnect (phase)",
        phase("cursor", "total_busy"),
        "",
        0,
    ),
    ("resume", f"{P}: server CPU (% of one core)", phase("plain", "server_cpu_pct"), "", 0),
    ("resume", f"{C}: server CPU (% of one core)", phase("cursor", "server_cpu_pct"), "", 0),
    (
        "resume",
        f"{P}: load generator CPU (% of one core)",
        phase("plain", "loadgen_cpu_pct"),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: load generator CPU (% of one core)",
        phase("cursor", "loadgen_cpu_pct"),
        "",
        0,
    ),
    ("resume", "other processes CPU, max of phases (% of one core)", max_other, "", 0),
    (
        "resume",
        f"{P}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("plain")(r) or {}),
        "",
        1,
    ),
    (
        "resume",
        f"{C}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("cursor")(r) or {}),
        "",
        1,
    ),
    ("resume", f"{W}: events delivered /s", phase("nowindow", "delivered_per_s"), "up", 0),
    (
        "resume",
        f"{W}: server CPU ms / 1,000 events",
        phase("nowindow", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{W} ÷ {P}: server CPU / event", dig("ratios", "nowindow_cpu_per_1k"), "", 2),
    (
        "resume",
        f"{W}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("nowindow")(r) or {}),
        "",
        1,
    ),
    ("churn", "readers (channels)", phase("churn", "channels"), "", 0),
    ("churn", "write rate asked (events/s)", phase("churn", "write_rate"), "", 0),
    ("churn", "writes acknowledged /s", phase("churn", "acked_per_s"), "up", 0),
    ("churn", "events delivered /s", phase("churn", "delivered_per_s"), "up", 0),
    ("churn", "reconnects /s", phase("churn", "reconnects_per_s"), "up", 0),
    ("churn", "read-open p50 (ms)", phase("churn", "open_latency", "p50_ms"), "down", 2),
    ("churn", "read-open p99 (ms)", phase("churn", "open_latency", "p99_ms"), "down", 2),
    ("churn", "409 busy answers to a reconnect /s", phase("churn", "busy_per_s"), "", 1),
    ("churn", "publish→deliver p50 (ms)", phase("churn", "latency", "p50_ms"), "down", 2),
    ("churn", "publish→deliver p99 (ms)", phase("churn", "latency", "p99_ms"), "down", 2),
    ("churn", "events replayed (server count)", phase("churn", "server_replayed"), "", 0),
    (
        "churn",
        "replays of events dropped at hang-up (client)",
        phase("churn", "replays_seen"),
        "",
        0,
    ),
    (
        "churn",
        "duplicates (received again after being taken)",
        total(phase("steady", "duplicates"), phase("churn", "duplicates")),
        "",
        0,
    ),
    (
        "churn",
        "events lost (acked, never delivered)",
        total(phase("steady", "lost"), phase("churn", "lost")),
        "",
        0,
    ),
    ("churn", "unknown-cursor answers", lambda r: unknown_cursors(phase("churn")(r) or {}), "", 0),
    ("churn", "server CPU (% of one core)", phase("churn", "server_cpu_pct"), "", 0),
    (
        "churn",
        "server CPU ms / 1,000 events",
        phase("churn", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("churn", "redis-server CPU (% of one core)", phase("churn", "redis_cpu_pct"), "", 0),
    (
        "churn",
        "redis-server CPU ms / 1,000 events",
        phase("churn", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "churn",
        f"{SR} CPU ms / 1,000 events",
        with_redis(
            phase("churn", "server_cpu_ms_per_1k_events"),
            phase("churn", "redis_cpu_ms_per_1k_events"),
        ),
        "down",
        1,
    ),
    (
        "churn",
        "server CPU ms / 1,000 reconnects (all CPU)",
        phase("churn", "server_cpu_ms_per_1k_reconnects"),
        "down",
        1,
    ),
    ("churn", "no hang-ups: server CPU (% of one core)", phase("steady", "server_cpu_pct"), "", 0),
    (
        "churn",
        "no hang-ups: server CPU ms / 1,000 events",
        phase("steady", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "churn",
        "server CPU ms / 1,000 reconnects, net of the events",
        dig("ratios", "net_cpu_ms_per_1k_reconnects"),
        "down",
        1,
    ),
    (
        "churn",
        "server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("churn")(r) or {}),
        "",
        1,
    ),
    (
        "churn",
        "no hang-ups: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("steady")(r) or {}),
        "",
        1,
    ),
    ("churn", "load generator CPU (% of one core)", phase("churn", "loadgen_cpu_pct"), "", 0),
    (
        "churn",
        "other processes CPU, max of phases (% of one core)",
        max_other,
        "",
        0,
    ),
]

# latency: the throughput rows, after the rate asked and how well the writers kept to it; the
# CPU per event at that rate says so in its label (issue #14: the figure real deployments see,
# quoted beside the saturated one)
PACED_LABELS = {
    "server CPU ms / 1,000 events": "server CPU ms / 1,000 events, paced (the rate asked above)",
}
LATENCY_ROWS: list[Row] = [
    ("latency", "write rate asked (events/s, paced, 100 channels)", dig("write_rate"), "", 0),
    ("latency", "writes sent > 1 ms behind schedule", dig("writes_late"), "", 0),
    *(
        ("latency", PACED_LABELS.get(row[1], row[1]), *row[2:])
        for row in ROWS
        if row[0] == "throughput"
    ),
]


def batch_rows() -> list[Row]:
    rows: list[Row] = [("batch", "channels, one streaming reader each", dig("channels"), "", 0)]
    for mode, what in (("batch", "one write to all"), ("single", "1,000 single writes")):
        rows += [
            ("batch", f"{what}: requests per round", dig(mode, "requests_per_round"), "", 0),
            (
                "batch",
                f"{what}: every reader has the event (s, median of rounds)",
                dig(mode, "all_delivered_s"),
                "down",
                3,
            ),
            ("batch", f"{what}: slowest round (s)", dig(mode, "all_delivered_max_s"), "down", 3),
            ("batch", f"{what}: latency p50 (ms)", dig(mode, "latency", "p50_ms"), "down", 1),
            ("batch", f"{what}: latency p99 (ms)", dig(mode, "latency", "p99_ms"), "down", 1),
            (
                "batch",
                f"{what}: server CPU ms / 1,000 events",
                dig(mode, "server_cpu_ms_per_1k_events"),
                "down",
                1,
            ),
            (
                "batch",
                f"{what}: redis-server CPU ms / 1,000 events",
                dig(mode, "redis_cpu_ms_per_1k_events"),
                "down",
                1,
            ),
        ]
    return [
        *rows,
        (
            "batch",
            "one write ÷ single writes: server CPU / event",
            dig("batch_vs_single_cpu"),
            "",
            2,
        ),
        (
            "batch",
            "writes answered non-2xx or with failures",
            count_of("write_error_bodies"),
            "",
            0,
        ),
        ("batch", "rounds not delivered to every reader in 10 s", dig("rounds_timed_out"), "", 0),
        ("batch", LOADGEN_ROW, dig("loadgen_cpu_pct"), "", 0),
        ("batch", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
    ]


def scale_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        name, what = str(size), f"{size:,} channels"
        rows += [
            (
                "scale",
                f"{what}: events delivered /s",
                skipped_or(name, dig("delivered_per_s")),
                "up",
                0,
            ),
            (
                "scale",
                f"{what}: server CPU ms / 1,000 events",
                in_phase(name, dig("server_cpu_ms_per_1k_events")),
                "down",
                1,
            ),
            (
                "scale",
                f"{what}: {SR} CPU ms / 1,000 events",
                in_phase(
                    name,
                    with_redis(
                        dig("server_cpu_ms_per_1k_events"), dig("redis_cpu_ms_per_1k_events")
                    ),
                ),
                "down",
                1,
            ),
            (
                "scale",
                f"{what}: publish→deliver p99 (ms)",
                in_phase(name, dig("latency", "p99_ms")),
                "down",
                2,
            ),
            (
                "scale",
                f"{what}: server RSS (MiB)",
                in_phase(name, lambda r: (r.get("server_rss_kib") or 0) / 1024 or None),
                "down",
                0,
            ),
        ]
    rows += [
        (
            "scale",
            f"{size:,} ÷ {sizes[0]:,} channels: server CPU / event (flat = 1.00)",
            dig("ratios", f"cpu_per_event_{size}"),
            "",
            2,
        )
        for size in sizes[1:]
    ]
    rows += [
        (
            "scale",
            "events lost (acked, never delivered), all sizes",
            total(*(in_phase(str(n), dig("lost")) for n in sizes)),
            "",
            0,
        ),
        ("scale", "other processes CPU, max of sizes (% of one core)", max_other, "", 0),
    ]
    return rows


def sweep_rows(phases: Sequence[tuple[int, int]]) -> list[Row]:
    rows: list[Row] = []
    for expiring, count in phases:
        name, what = f"{expiring}/{count}", f"{expiring:,} of {count:,} expire"
        rows += [
            ("sweep", f"{what}: channel TTL (s)", skipped_or(name, dig("ttl_s")), "", 1),
            (
                "sweep",
                f"{what}: disposed in the window (server count)",
                in_phase(name, dig("disposed_in_window")),
                "",
                0,
            ),
            (
                "sweep",
                f"{what}: server CPU in the window (ms)",
                in_phase(name, dig("server_cpu_ms")),
                "down",
                0,
            ),
            (
                "sweep",
                f"{what}: redis-server CPU in the window (ms)",
                in_phase(name, dig("redis_cpu_ms")),
                "down",
                0,
            ),
        ]
        if expiring:
            rows.append(
                (
                    "sweep",
                    f"{what}: server CPU ms / 1,000 expired, net of 0 of {count:,}",
                    dig("ratios", f"net_cpu_ms_per_1k_expired_{name}"),
                    "down",
                    1,
                )
            )
    rows.append(("sweep", "other processes CPU, max of phases (% of one core)", max_other, "", 0))
    return rows


# the sse and websocket workloads' rows from their throughput phase: (label, getter, better,
# decimals); their idle sizes get IDLE_ROWS
TRANSPORT_THROUGHPUT_ROWS: list[tuple[str, Getter, str, int]] = [
    ("events delivered /s", dig("delivered_per_s"), "up", 0),
    ("publish→deliver p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("publish→deliver p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("events lost (acked, never delivered)", dig("lost"), "", 0),
    ("write errors (non-2xx)", count_of("write_errors"), "", 0),
    ("server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("server CPU ms / 1,000 events", dig("server_cpu_ms_per_1k_events"), "down", 1),
    ("load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
]


def transport_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for workload in TRANSPORT_WORKLOADS:
        rows += [
            (workload, f"throughput: {label}", in_phase("throughput", get), better, decimals)
            for label, get, better, decimals in TRANSPORT_THROUGHPUT_ROWS
        ]
        rows += [(workload, *row[1:]) for row in idle_rows(sizes)]
    return rows


def transport_summary(results: dict[str, dict[str, dict[str, Any]]], plan: Plan) -> str | None:
    """Issue #11's target, one line per figure: megaphone ÷ nchan on each transport beside the
    NDJSON ratio (workloads throughput and idle), and whether each is within it (None: megaphone
    and nchan did not both run a browser transport)."""
    mine, base = results.get("megaphone", {}), results.get("nchan", {})
    ran = [t for t in TRANSPORT_WORKLOADS if t in mine and t in base]
    if not ran or not plan.transport_sizes():
        return None
    size = str(max(plan.transport_sizes()))
    figures: list[tuple[str, str, Getter, str, str]] = [  # label, phase, getter, better, format
        ("events delivered /s", "throughput", dig("delivered_per_s"), "up", ",.0f"),
        (
            "server CPU ms / 1,000 events",
            "throughput",
            dig("server_cpu_ms_per_1k_events"),
            "down",
            ".1f",
        ),
        (
            f"server RSS per idle reader, {int(size):,} readers (KiB)",
            size,
            dig("rss_per_reader_kib"),
            "down",
            ".2f",
        ),
        (
            f"fan-out to {int(size):,} idle readers (s)",
            size,
            dig("fanout_all_delivered_s"),
            "down",
            ".3f",
        ),
    ]

    def get(result: dict[str, Any] | None, workload: str, name: str, getter: Getter) -> Any:
        if not result or "error" in result:
            return None
        if workload in TRANSPORT_WORKLOADS:
            return in_phase(name, getter)(result)
        return getter(result) if name == "throughput" else in_phase(name, getter)(result)

    header = ["figure", "NDJSON ÷ nchan"]
    for t in ran:
        header += [f"{t}: megaphone", f"{t}: nchan", f"{t} ÷ nchan", "within?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, name, getter, better, spec in figures:
        nd_workload = "throughput" if name == "throughput" else "idle"
        nd = quotient(
            get(mine.get(nd_workload), nd_workload, name, getter),
            get(base.get(nd_workload), nd_workload, name, getter),
        )
        cells = [label, f"{nd:.2f}x" if nd is not None else "—"]
        for t in ran:
            a, b = get(mine.get(t), t, name, getter), get(base.get(t), t, name, getter)
            ratio = quotient(a, b)
            within = "—"
            if ratio is not None and nd is not None:
                within = "yes" if (ratio >= nd if better == "up" else ratio <= nd) else "no"
            cells += [
                format(a, spec) if isinstance(a, int | float) else "—",
                format(b, spec) if isinstance(b, int | float) else "—",
                f"{ratio:.2f}x" if ratio is not None else "—",
                within,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_rows(plan: Plan) -> list[Row]:
    """Every row of the table, in the order of WORKLOADS."""
    rows = [
        *ROWS,
        *LATENCY_ROWS,
        *idle_rows(plan.idle_sizes),
        *batch_rows(),
        *scale_rows(plan.scale_sizes),
        *sweep_rows(plan.sweep_phases),
        *transport_rows(plan.transport_sizes()),
    ]
    return sorted(rows, key=lambda row: WORKLOADS.index(row[0]))


LOADGEN_ROW = "load generator CPU (% of one core)"  # rows ending so get the harness-bound flag
NOISE_ROW = "(% of one core)"  # rows with "other processes CPU" and ending so get the noisy flag


def fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | int):
        return f"{value:,.{decimals}f}"
    return str(value)


# (column title, target, the target it is divided by)
RATIO_COLUMNS = (
    ("megaphone ÷ nchan", "megaphone", "nchan"),
    ("megaphone ÷ pushpin", "megaphone", "pushpin"),
    ("redis ÷ memory", "megaphone-redis", "megaphone"),
    ("redis-2n ÷ memory", "megaphone-redis-2n", "megaphone"),
    ("megaphone-redis ÷ nchan-redis", "megaphone-redis", "nchan-redis"),
)


def table(
    results: dict[str, dict[str, dict[str, Any]]], targets: list[str], rows: list[Row]
) -> str:
    ratios = [(title, a, b) for title, a, b in RATIO_COLUMNS if a in targets and b in targets]
    header = ["workload", "metric", *targets, *(title for title, _, _ in ratios)]
    if ratios:
        header.append("better")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload, label, get, better, decimals in rows:
        values: dict[str, Any] = {}
        for target in targets:
            result = results.get(target, {}).get(workload)
            values[target] = None if result is None or "error" in result else get(result)
        if all(v is None for v in values.values()):
            continue
        cells = [workload, label]
        for target in targets:
            cell = fmt(values[target], decimals)
            if label.endswith(LOADGEN_ROW) and (values[target] or 0) >= HARNESS_BOUND_PCT:
                cell += " ⚠ harness-bound"
            noise = "other processes CPU" in label and label.endswith(NOISE_ROW)
            if noise and (values[target] or 0) >= NOISY_PCT:
                cell += " ⚠ noisy"
            cells.append(cell)
        for _, mine_target, base_target in ratios:
            mine, base = values.get(mine_target), values.get(base_target)
            ratio = "—"
            if better and isinstance(mine, int | float) and isinstance(base, int | float) and base:
                ratio = f"{mine / base:.2f}x"
            cells.append(ratio)
        if ratios:
            cells.append({"up": "higher", "down": "lower"}.get(better, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_vs_memory(passes: dict[str, list[dict[str, dict[str, Any]]]]) -> None:
    """Each Redis target's pass against the memory store's pass of the same number: events
    delivered /s and all server-side CPU per event (megaphone + redis-server), creations alike.
    Stored as ``vs_memory`` in the Redis target's workload result (the table shows the median)."""
    memory = passes.get("megaphone") or []
    for target in REDIS_TARGETS:
        for number, workloads in enumerate(passes.get(target) or []):
            if number >= len(memory):
                break
            base = memory[number]
            for workload, rate, cpu, redis_cpu, out_rate, out_cpu in (
                (
                    "throughput",
                    "delivered_per_s",
                    "server_cpu_ms_per_1k_events",
                    "redis_cpu_ms_per_1k_events",
                    "delivered_per_s",
                    "cpu_per_event",
                ),
                (
                    "create",
                    "created_per_s",
                    "server_cpu_ms_per_1k_creates",
                    "redis_cpu_ms_per_1k_creates",
                    "created_per_s",
                    "cpu_per_create",
                ),
            ):
                mine, theirs = workloads.get(workload), base.get(workload)
                if not mine or not theirs or "error" in mine or "error" in theirs:
                    continue
                all_cpu = with_redis(dig(cpu), dig(redis_cpu))
                mine["vs_memory"] = {
                    out_rate: quotient(mine.get(rate), theirs.get(rate)),
                    out_cpu: quotient(all_cpu(mine), all_cpu(theirs)),
                }


def quotient(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return float(a / b)
    return None


def median_merge(values: list[Any]) -> Any:
    """Merge the passes of one workload: the median of every number, recursively."""
    ok = [v for v in values if not (isinstance(v, dict) and "error" in v)] or values
    if all(isinstance(v, dict) for v in ok):
        keys = dict.fromkeys(k for v in ok for k in v)
        return {k: median_merge([v[k] for v in ok if k in v]) for k in keys}
    numbers = [v for v in ok if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(ok):
        return statistics.median(numbers)
    if all(isinstance(v, list) for v in ok):
        return [item for v in ok for item in v]
    return next((v for v in ok if v is not None), None)


def anomalies(passes: dict[str, list[dict[str, dict[str, Any]]]]) -> Iterator[str]:
    for target, runs in passes.items():
        for number, workloads in enumerate(runs, 1):
            yield from pass_anomalies(
                target, workloads, f" (pass {number})" if len(runs) > 1 else ""
            )


def pass_anomalies(target: str, workloads: dict[str, dict[str, Any]], tag: str) -> Iterator[str]:
    for workload, result in workloads.items():
        phases = result.get("phases")
        if isinstance(phases, dict):
            for name, r in phases.items():
                yield from result_anomalies(f"{target}/{workload}/{name}{tag}", workload, r)
        else:
            yield from result_anomalies(f"{target}/{workload}{tag}", workload, result)


def result_anomalies(where: str, workload: str, r: dict[str, Any]) -> Iterator[str]:
    if "error" in r:
        yield f"{where}: workload failed: {r['error']}"
    for problem in r.get("server_problems", []):
        yield f"{where}: {problem}"
    for key in (
        "lost",
        "duplicates",
        "misrouted",
        "unparseable",
        "delivered_but_not_acked",
    ):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    for key in ("write_errors", "failures", "open_failures", "ws_closes"):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    for key, what in (
        ("write_error_bodies", "writes answered"),
        ("failure_bodies", "creates answered"),
        ("read_refused", "reads answered (opened again)"),
    ):
        for answer, count in (r.get(key) or {}).items():
            yield f"{where}: {count:.0f} {what} {answer}"
    for key in ("readers_ended_or_lost", "early_lines", "extra_lines", "readers_reopened_at_end"):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    if r.get("fanout_timed_out"):
        yield (
            f"{where}: fan-out timed out, {r.get('fanout_received')} of "
            f"{r.get('readers')} readers got their event"
        )
    headers = r.get("resume_headers") or {}
    if headers.get("unknown-cursor"):
        yield f"{where}: {headers['unknown-cursor']} reads answered unknown-cursor"
    if r.get("cursors_sent") and not headers.get("resumed") and where.startswith("megaphone"):
        yield f"{where}: {r['cursors_sent']} cursors sent, no read answered resumed ({headers})"
    if r.get("dropped_never_replayed"):
        yield (
            f"{where}: {r['dropped_never_replayed']} events dropped at a hang-up were never "
            "received again"
        )
    metrics = r.get("server_metrics") or {}
    if r.get("rounds_timed_out"):
        yield f"{where}: {r['rounds_timed_out']} rounds not delivered to every reader in 10 s"
    if r.get("setup_late"):
        yield (
            f"{where}: creating the channels took too long for the TTL (expiring ones "
            f"{r.get('create_expiring_s', 0):.2f} s, all {r.get('create_all_s', 0):.2f} s of "
            f"{r.get('ttl_s')} s): the window may miss expiries or include creations"
        )
    disposed = r.get("disposed_in_window")
    if workload == "sweep" and disposed is not None and disposed != r.get("expiring"):
        yield f"{where}: {disposed:.0f} channels disposed in the window, not {r.get('expiring')}"
    # scale: the server also counted the idle channels' writes
    throughput_like = workload in ("throughput", "latency", "resume", "churn")
    if (throughput_like or r.get("kind") == "throughput") and metrics:
        received = metrics.get("megaphone_messages_received")
        read = metrics.get("megaphone_messages_read")
        acked, delivered = r.get("total_acked"), r.get("total_delivered")
        if received is not None and received != acked:
            yield f"{where}: server counted {received:.0f} received, client {acked} acked"
        # messages_read counts first sends only (replays are messages_replayed)
        if read is not None and read != delivered:
            yield f"{where}: server counted {read:.0f} read, client {delivered} delivered"
    if r.get("loadgen_stderr"):
        yield f"{where}: load generator stderr: {r['loadgen_stderr'][:300]}"


# --- the phased workloads' ratios -----------------------------------------------------------


def resume_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """resume: the reconnecting phase (and the one without a window) over the plain one."""

    def ratio(phase: str, *keys: str) -> float | None:
        mine, base = dig(*keys)(phases.get(phase, {})), dig(*keys)(phases.get("plain", {}))
        if isinstance(mine, int | float) and isinstance(base, int | float) and base:
            return float(mine / base)
        return None

    return {
        "cursor_delivered": ratio("cursor", "delivered_per_s"),
        "cursor_cpu_per_1k": ratio("cursor", "server_cpu_ms_per_1k_events"),
        "cursor_p50": ratio("cursor", "latency", "p50_ms"),
        "cursor_p99": ratio("cursor", "latency", "p99_ms"),
        "nowindow_delivered": ratio("nowindow", "delivered_per_s"),
        "nowindow_cpu_per_1k": ratio("nowindow", "server_cpu_ms_per_1k_events"),
    }


def churn_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """churn: server CPU per reconnect net of the events' own cost (the steady phase's)."""
    churn, steady = phases.get("churn", {}), phases.get("steady", {})
    rate = churn.get("reconnects_per_s")
    cpu, base = churn.get("server_cpu_pct"), steady.get("server_cpu_pct")
    if not rate or not isinstance(cpu, int | float) or not isinstance(base, int | float):
        return {"net_cpu_ms_per_1k_reconnects": None}
    # % of one core = 10 ms of CPU per second
    return {"net_cpu_ms_per_1k_reconnects": float(10 * (cpu - base) / rate * 1000)}


def scale_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """scale: server CPU per event at each size over the smallest size's (flat = 1.00)."""
    sizes = sorted(phases, key=int)
    cpu = {size: dig("server_cpu_ms_per_1k_events")(phases[size]) for size in sizes}
    return {f"cpu_per_event_{size}": quotient(cpu[size], cpu[sizes[0]]) for size in sizes[1:]}


def sweep_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """sweep: server CPU per 1,000 expired channels, net of the phase with as many channels and
    none expiring (its sweeps, scrapes and idle loop)."""
    out: dict[str, float | None] = {}
    for name, result in phases.items():
        expiring, total = name.split("/")
        base = phases.get(f"0/{total}", {})
        cpu, base_cpu = result.get("server_cpu_ms"), base.get("server_cpu_ms")
        if expiring == "0" or not isinstance(cpu, int | float):
            continue
        if isinstance(base_cpu, int | float):
            out[f"net_cpu_ms_per_1k_expired_{name}"] = 1000 * (cpu - base_cpu) / int(expiring)
    return out


PHASE_RATIOS: dict[str, Callable[[dict[str, dict[str, Any]]], dict[str, float | None]]] = {
    "resume": lambda phases: resume_ratios(phases),
    "churn": lambda phases: churn_ratios(phases),
    "scale": scale_ratios,
    "sweep": sweep_ratios,
}
