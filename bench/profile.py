"""Where the server's time goes under one benchmark workload: ``perf`` shares by process and
by library, and the hottest symbols.

    python3 bench/profile.py                                  # megaphone, throughput, 8 s
    python3 bench/profile.py --target megaphone-redis         # megaphone and its redis-server
    python3 bench/profile.py --target nchan --workload latency

The target is started and loaded exactly as ``bench/run.py`` does (same starters, same load
generator job, server on CPU 0, load on CPU 1); ``perf record`` samples the server's processes
(for the Redis targets, redis-server too) for the middle of the measured window. Python 3.11 has
no perf map, so all of the interpreter's work is one library (``libpython``, or ``python3.11``
for a static build): its share is the cost of running our Python, the rest is the kernel
(``[kernel.kallsyms]``: system calls, TCP on loopback), uvloop/libuv, httptools, orjson, libc.
The load generator's own figures (events/s, server CPU per 1,000 events) are printed too, so a
profile can be matched with a benchmark row. perf's sampling costs a few per cent of CPU: read the
shares, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the benchmark's own starters, plan and number format (beside this file)
import report
import targets
import workloads

PROFILED = ("megaphone", "megaphone-redis", "nchan", "pushpin")


def perf_report(data: Path, sort: str, limit: int) -> list[tuple[float, str]]:
    """``perf report`` rows as (percent, key), the largest first."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: list[tuple[float, str]] = []
    for line in out.splitlines():
        parts = line.split()
        if not parts or not parts[0].endswith("%"):
            continue  # call-graph lines and blanks
        try:
            share = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        rows.append((share, " ".join(parts[1:])))
    rows.sort(reverse=True)
    return rows[:limit]


def record_perf(pids: list[int], data: Path, warmup: float, seconds: float) -> None:
    """Sample ``pids`` for ``seconds`` into ``data``, starting once the load generator has
    connected and warmed up: the middle of its measured window."""
    time.sleep(warmup + 1.5)
    subprocess.run(
        [
            *("perf", "record", "-q", "-F", "499", "-g", "-o", str(data)),
            *("-p", ",".join(str(pid) for pid in pids), "--", "sleep", str(seconds)),
        ],
        check=True,
        capture_output=True,
    )


def profile(target: str, workload: str, duration: float) -> dict[str, Any]:
    params, server_args = workloads.one_job(target, workload, duration)
    with tempfile.TemporaryDirectory(prefix=f"profile-{target}-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        started: list[targets.Server] = []
        try:
            deployment = targets.target_starters()[target](workdir, server_args, started)
            job = {**params, "workload": workload, "host": "127.0.0.1", **deployment.job()}
            pids = deployment.server_pids()
            if deployment.redis is not None:
                pids += deployment.redis.pids
            data = workdir / "perf.data"
            record = max(duration - 3.0, 2.0)
            with ThreadPoolExecutor(1) as pool:  # perf samples while the load runs
                warmup = float(params.get("warmup_s", 1.0))
                recording = pool.submit(record_perf, pids, data, warmup, record)
                result = workloads.run_loadgen(job)
                recording.result()  # perf's own failure, if any
            return {
                "target": target,
                "workload": workload,
                "recorded_s": record,
                "by_process_and_library": perf_report(data, "comm,dso", 12),
                "symbols": perf_report(data, "comm,dso,sym", 20),
                "loadgen": result,
            }
        finally:
            for server in reversed(started):
                targets.stop(server)


def render(found: dict[str, Any]) -> str:
    res = found["loadgen"]
    figures = [
        f"events delivered/s {report.fmt(res.get('delivered_per_s'), 1)}",
        f"server CPU per 1,000 events {report.fmt(res.get('server_cpu_ms_per_1k_events'), 1)} ms",
    ]
    if res.get("redis_cpu_ms_per_1k_events") is not None:
        figures.append(f"redis-server {report.fmt(res['redis_cpu_ms_per_1k_events'], 1)} ms")
    figures.append(
        f"load generator CPU {report.fmt(res.get('loadgen_cpu_pct'), 1)} % "
        "(perf's sampling included)"
    )
    lines = [
        f"## {found['target']}, {found['workload']} workload "
        f"({found['recorded_s']:.0f} s of perf samples)",
        "",
        " · ".join(figures),
        "",
        "| share | process, library |",
        "|---|---|",
        *(f"| {share:.1f} % | {key} |" for share, key in found["by_process_and_library"]),
        "",
        "| share | process, library, symbol |",
        "|---|---|",
        *(f"| {share:.1f} % | `{key}` |" for share, key in found["symbols"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=PROFILED, default="megaphone")
    parser.add_argument("--workload", choices=("throughput", "latency"), default="throughput")
    parser.add_argument("--duration", type=float, default=8.0, help="measured window, seconds")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (apt-get install -y linux-perf)", file=sys.stderr)
        return 2
    targets.raise_nofile()
    found = profile(args.target, args.workload, args.duration)
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))
    print(render(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
