"""The workloads: which ones each target runs, and the job of each workload (and each phase of
the phased ones) handed to the load generator (``loadgen.py``), which ``run_loadgen`` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from targets import BENCH, LOADGEN_CPU, REDIS_BACKED, REDIS_TARGETS, WANTED_NOFILE, pinned

WORKLOADS = (
    "throughput",
    "latency",
    "idle",
    "batch",
    "create",
    "scale",
    "sweep",
    "resume",
    "churn",
    "sse",
    "websocket",
)
# the browser transports (issue #11): throughput and idle readers, as the NDJSON workloads
TRANSPORT_WORKLOADS = ("sse", "websocket")
# what each target can run (why not: bench/README.md); megaphone's targets run everything
CAN_RUN = {
    "nchan": ("throughput", "latency", "idle", "batch", "churn", "sse", "websocket"),
    "nchan-redis": ("throughput", "latency", "idle", "batch"),
    "pushpin": ("throughput", "latency", "idle", "batch"),
}
# what a target runs when --workloads is not given (a full pass stays ~10 min)
DEFAULT_WORKLOADS = {
    "megaphone-redis": ("throughput", "latency", "idle", "batch", "create", "scale", "sweep"),
    "megaphone-redis-2n": ("throughput", "latency", "idle", "batch", "create"),
    "megaphone-redis-w2": ("throughput", "latency", "idle", "batch", "create"),
    "nchan-redis": ("throughput", "latency", "idle", "batch"),
}


@dataclass
class Plan:
    duration: float
    idle_sizes: tuple[int, ...]  # the idle workload's sizes (readers), one fresh server each
    redis_readers: int  # the largest idle size the Redis targets run
    create_duration: float
    phase_duration: float  # each resume phase, churn, each scale size
    nofile: int = WANTED_NOFILE  # the file descriptor limit the servers and load generator get
    workloads: tuple[str, ...] = WORKLOADS
    all_named: bool = False  # --workloads given: every target runs all of them it can
    pad_bytes: int = 160  # the body then weighs ~200 bytes
    latency_rate: float = 2_000.0  # latency: events/s over the 100 channels, paced
    batch_channels: int = 1_000
    batch_rounds: int = 5
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # channels in all; 100 are read
    redis_max_channels: int = 10_000  # the Redis targets' scale and sweep sizes stop here
    # sweep: (channels expiring in the window, channels in all)
    sweep_phases: tuple[tuple[int, int], ...] = (
        (0, 10_000),
        (1_000, 10_000),
        (0, 100_000),
        (1_000, 100_000),
        (10_000, 100_000),
    )
    sweep_interval_ms: int = 100
    sweep_window_s: float = 2.0
    resume_every_events: int = 1_000  # resume: a reader hangs up after this many events
    churn_channels: int = 1_000
    churn_rate: float = 5_000.0  # churn: events/s written over all channels
    churn_every_events: int = 5  # churn: hang up after 1..2n-1 events (mean n) ...
    churn_after_s: float = 1.0  # ... or after 0..2t seconds (mean t), whichever comes first
    hangup_linger_s: float = 0.01  # a hanging-up reader drops what arrives for this long
    transport_max_readers: int = 10_000  # sse, websocket: the idle sizes up to this many readers

    def runs(self, target: str) -> tuple[str, ...]:
        """The workloads ``target`` runs in this plan."""
        can = CAN_RUN.get(target, WORKLOADS)
        default = DEFAULT_WORKLOADS.get(target, can)
        return tuple(w for w in self.workloads if w in can and (self.all_named or w in default))

    def too_big(self, target: str, readers: int = 0, channels: int = 0) -> str | None:
        """Why a phase of that size is not run on ``target`` (None: it is)."""
        if readers and readers + 500 > self.nofile:
            return f"not run: needs ~{readers + 500:,} fds per side, RLIMIT_NOFILE {self.nofile:,}"
        if target in REDIS_BACKED and readers > self.redis_readers:
            return f"not run on Redis targets: --redis-readers {self.redis_readers:,}"
        if target in REDIS_BACKED and channels > self.redis_max_channels:
            return f"not run on Redis targets: more than {self.redis_max_channels:,} channels"
        return None

    def jobs(self, target: str) -> dict[str, dict[str, Any]]:
        """Every selected workload's load generator job; ``phases``: one fresh server each (a
        phase with ``skip`` is not run, the reason is shown instead)."""
        throughput = {
            "channels": 100,
            "writers": 32,
            "pad_bytes": self.pad_bytes,
            "warmup_s": 1.0,
            "duration_s": self.duration,
            "drain_s": 5.0,
        }
        paced = {  # churn: a fixed, moderate write rate over many channels
            "channels": self.churn_channels,
            "connect_concurrency": 256,
            "writers": 32,
            "write_rate": self.churn_rate,
            "pad_bytes": self.pad_bytes,
            "warmup_s": 1.0,
            "duration_s": self.phase_duration,
            "drain_s": 5.0,
        }

        def sized(job: dict[str, Any], readers: int = 0, channels: int = 0) -> dict[str, Any]:
            reason = self.too_big(target, readers, channels)
            return {**job, "skip": reason} if reason else job

        jobs: dict[str, dict[str, Any]] = {
            "throughput": throughput,
            "latency": {**throughput, "write_rate": self.latency_rate},
            "idle": {
                "phases": {
                    str(size): sized(
                        {
                            "readers": size,
                            "connect_concurrency": 256,
                            "settle_s": 1.0,
                            "writers": 64,
                            "pad_bytes": self.pad_bytes,
                            "fanout_timeout_s": 30.0,
                        },
                        readers=size,
                    )
                    for size in self.idle_sizes
                }
            },
            "batch": {
                "channels": self.batch_channels,
                "rounds": self.batch_rounds,
                "pad_bytes": self.pad_bytes,
                "timeout_s": 10.0,
            },
            "create": {
                "connections": 32,
                "warmup_s": 0.5,
                "duration_s": self.create_duration,
            },
            "scale": {
                "phases": {
                    str(size): sized(
                        {
                            **throughput,
                            "duration_s": self.phase_duration,
                            "idle_channels": size - throughput["channels"],
                        },
                        channels=size,
                    )
                    for size in self.scale_sizes
                }
            },
            "sweep": {
                "phases": {
                    f"{expiring}/{total}": sized(
                        {
                            "channels": total,
                            "expiring": expiring,
                            "ttl_s": self.sweep_ttl_s(target, total),
                            "sweep_interval_s": self.sweep_interval_ms / 1000,
                            "window_s": self.sweep_window_s,
                            "server_args": [
                                "--channel-ttl-millis",
                                str(round(1000 * self.sweep_ttl_s(target, total))),
                                "--sweep-interval-millis",
                                str(self.sweep_interval_ms),
                            ],
                        },
                        channels=total,
                    )
                    for expiring, total in self.sweep_phases
                }
            },
            "resume": {
                "phases": {
                    # the throughput workload, same client code as the next phase, no cursor
                    "plain": {**throughput, "duration_s": self.phase_duration, "cursor": "none"},
                    # every reader hangs up after every 1,000 events and resumes at once
                    "cursor": {
                        **throughput,
                        "duration_s": self.phase_duration,
                        "cursor": "mixed",  # even readers ?after=, odd ones Last-Event-ID
                        "reconnect_every_events": self.resume_every_events,
                        "hangup_linger_s": self.hangup_linger_s,
                    },
                    # the bookkeeping of the window itself: no window at all, no cursor
                    "nowindow": {
                        **throughput,
                        "duration_s": self.phase_duration,
                        "cursor": "none",
                        "server_args": ["--replay-window-size", "0"],
                    },
                }
            },
            "churn": {
                "phases": {
                    # the same writes and readers, nobody hangs up: the events' own cost
                    "steady": {**paced, "cursor": "none"},
                    "churn": {
                        **paced,
                        "cursor": "mixed",
                        "reconnect_every_events": self.churn_every_events,
                        "reconnect_jitter": True,
                        "reconnect_after_s": self.churn_after_s,
                        "hangup_linger_s": self.hangup_linger_s,
                    },
                }
            },
        }
        for transport in TRANSPORT_WORKLOADS:
            jobs[transport] = self.transport_job(target, transport, throughput, jobs["idle"])
        return {name: jobs[name] for name in self.runs(target)}

    def transport_sizes(self) -> tuple[int, ...]:
        return tuple(n for n in self.idle_sizes if n <= self.transport_max_readers)

    def transport_job(
        self,
        target: str,
        transport: str,
        throughput: dict[str, Any],
        idle: dict[str, Any],
    ) -> dict[str, Any]:
        """sse, websocket: the throughput workload and the idle sizes (up to
        ``transport_max_readers``) with every reader on that transport. megaphone keeps each read
        open as long as NDJSON's (``--poll-duration-millis 600000``, start_megaphone_node)."""
        extra: dict[str, Any] = {"transport": transport}
        if target.startswith("megaphone"):
            extra["server_args"] = [f"--{transport}-window-millis", "600000"]
        phases = {"throughput": {**throughput, **extra, "kind": "throughput"}}
        for size in self.transport_sizes():
            params = idle["phases"][str(size)]
            if not params.get("skip"):
                params = {**params, **extra, "kind": "idle"}
            phases[str(size)] = params
        return {"phases": phases}

    @staticmethod
    def sweep_ttl_s(target: str, total: int) -> float:
        """A TTL long enough to create every channel before the first ones expire (creating
        runs at ~25,000/s on the memory store, ~4,000/s on Redis)."""
        rate = 2_500 if target in REDIS_TARGETS else 20_000
        return 5.0 + total / rate


# --- the load generator ---------------------------------------------------------------------


def run_loadgen(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [*pinned(LOADGEN_CPU), sys.executable, str(BENCH / "loadgen.py"), json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if done.stderr.strip():
        result["loadgen_stderr"] = done.stderr[-2000:]
    return result


def one_job(target: str, workload: str, duration: float) -> tuple[dict[str, Any], list[str]]:
    """One workload's load-generator job on one target, as run.py gives it (for the tools that
    start a target themselves: profile.py, syscalls.py), and the server's extra arguments."""
    plan = Plan(
        duration=duration,
        idle_sizes=(1_000,),
        redis_readers=1_000,
        create_duration=min(duration, 5.0),
        phase_duration=min(duration, 5.0),
    )
    params = dict(plan.jobs(target)[workload])
    server_args: list[str] = params.pop("server_args", [])
    return params, server_args
