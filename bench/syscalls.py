"""System calls per 1,000 events: what a server asks of the kernel under one benchmark workload.

    python3 bench/syscalls.py                                    # megaphone and nchan, latency
    python3 bench/syscalls.py --targets megaphone --workload throughput
    python3 bench/syscalls.py --tool trace                       # perf trace -s (or strace)

The target is started and loaded exactly as ``bench/run.py`` does (same starters, same load
generator job, server on CPU 0, load on CPU 1, like ``bench/profile.py``); ``perf stat`` on the
``syscalls:sys_enter_*`` tracepoints (or ``perf trace -s``, or ``strace -c -f``) counts the system
calls of the server's processes, all threads. Paced
(``latency``): the first third of the measured window is not traced (user and system CPU and
context switches per 1,000 events, from ``/proc``), the rest is; counts are divided by the rate
asked times the traced seconds (the load generator's figures show whether the server kept up).
Saturated (``throughput``): any tracer slows the server a little, so it covers the whole window
and the counts are divided by that window's deliveries (an estimate: the tracer attaches during
the warm-up). ``perf stat`` counts in the kernel and costs little; ``perf trace`` costs a few
microseconds per call and ``strace`` tens, enough to change how a saturated server batches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the benchmark's own starters, plan and number format (beside this file)
import report
import targets
import workloads

CLK_TCK = os.sysconf("SC_CLK_TCK")
TRACED = ("megaphone", "megaphone-redis", "nchan", "pushpin")
# perf stat -x,: "1234,,syscalls:sys_enter_write,..."
STAT_ROW = re.compile(r"^(\d+),[^,]*,syscalls:sys_enter_([a-z_0-9]+),")
# perf trace -s: "   epoll_wait   1234   0   56.789 ..." under a "syscall calls errors" header
PERF_ROW = re.compile(r"^\s+([a-z_0-9]+)\s+(\d+)\s+(\d+)\s+[\d.]+")
# strace -c: "% time seconds usecs/call calls errors syscall"
STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d*)\s*([a-z_0-9]+)\s*$")


def parse_stat(text: str) -> Counter[str]:
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        found = STAT_ROW.match(line)
        if found and int(found[1]):
            calls[found[2]] += int(found[1])
    return calls


def parse_perf(text: str) -> Counter[str]:
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        found = PERF_ROW.match(line)
        if found:
            calls[found[1]] += int(found[2])
    return calls


def parse_strace(text: str) -> Counter[str]:
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        found = STRACE_ROW.match(line)
        if found and found[3] != "total":
            calls[found[3]] += int(found[1])
    return calls


def proc_times(pids: list[int]) -> tuple[float, float, int, int]:
    """User and system CPU seconds, context switches (voluntary and not) and minor page faults
    of ``pids``, all their threads."""
    user = system = 0.0
    switches = faults = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            faults += int(fields[7])
            user += int(fields[11]) / CLK_TCK
            system += int(fields[12]) / CLK_TCK
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
    return user, system, switches, faults


def untraced(pids: list[int], warmup: float, seconds: float) -> dict[str, float]:
    """User and system CPU, context switches and page faults over ``seconds`` without any
    tracer, after the load generator's warm-up."""
    time.sleep(warmup + 0.5)
    u0, s0, c0, f0 = proc_times(pids)
    began = time.monotonic()
    time.sleep(seconds)
    u1, s1, c1, f1 = proc_times(pids)
    return {
        "seconds": time.monotonic() - began,
        "user_s": u1 - u0,
        "system_s": s1 - s0,
        "switches": c1 - c0,
        "faults": f1 - f0,
    }


def trace(tool: str, pids: list[int], out: Path, seconds: float) -> float:
    """Count the system calls of ``pids`` for ``seconds``; the seconds actually traced."""
    listed = ",".join(map(str, pids))
    if tool == "stat":
        events = "syscalls:sys_enter_*"
        cmd = ["perf", "stat", "-x,", "-e", events, "-p", listed, "-o", str(out)]
    elif tool == "trace":
        cmd = ["perf", "trace", "-s", "-p", listed, "-o", str(out)]
    else:
        cmd = ["strace", "-c", "-f", "-o", str(out), *(f"-p{pid}" for pid in pids)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)  # attached (strace attaches to each thread; perf opens its events)
    began = time.monotonic()
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)  # counting stops here; perf may take a while to exit
    traced = time.monotonic() - began
    _, err = proc.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"{tool} wrote nothing: {err.decode(errors='replace')[-500:]}")
    return traced


def measure(target: str, workload: str, duration: float, tool: str) -> dict[str, Any]:
    params, server_args = workloads.one_job(target, workload, duration)
    with tempfile.TemporaryDirectory(prefix=f"syscalls-{target}-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        started: list[targets.Server] = []
        try:
            deployment = targets.target_starters()[target](workdir, server_args, started)
            job = {**params, "workload": workload, "host": "127.0.0.1", **deployment.job()}
            pids = deployment.server_pids()
            out = workdir / "trace.txt"
            warmup = float(params.get("warmup_s", 1.0))
            paced = bool(params.get("write_rate"))

            def both() -> tuple[dict[str, float] | None, float]:
                if not paced:
                    # saturated: the tracer slows the server, so it covers the whole measured
                    # window, whose delivery rate divides the counts
                    time.sleep(max(warmup - 0.4, 0.0))
                    return None, trace(tool, pids, out, duration - 0.2)
                # paced: the first part of the window untraced (CPU, context switches), then
                # the tracer; the rate is the one asked
                plain_s = max((duration - 2.0) / 3, 1.0)
                split = untraced(pids, warmup, plain_s)
                return split, trace(tool, pids, out, max(duration - plain_s - 3.0, 2.0))

            with ThreadPoolExecutor(1) as pool:
                tracing = pool.submit(both)
                result = workloads.run_loadgen(job)
                split, traced = tracing.result()
            text = out.read_text()
        finally:
            for server in reversed(started):
                targets.stop(server)
    calls = {"stat": parse_stat, "trace": parse_perf, "strace": parse_strace}[tool](text)
    rate = float(params.get("write_rate") or result.get("delivered_per_s") or 0.0)
    events = rate * traced
    untraced_figures = None
    if split is not None:
        plain_events = rate * split["seconds"]
        untraced_figures = {
            **split,
            "user_ms_per_1k_events": 1e6 * split["user_s"] / plain_events,
            "system_ms_per_1k_events": 1e6 * split["system_s"] / plain_events,
            "switches_per_1k_events": 1e3 * split["switches"] / plain_events,
            "faults_per_1k_events": 1e3 * split["faults"] / plain_events,
        }
    return {
        "target": target,
        "workload": workload,
        "tool": tool,
        "traced_s": round(traced, 2),
        "events_traced": round(events),
        "untraced": untraced_figures,
        "calls": dict(calls.most_common()),
        "per_1k_events": {
            name: round(1e3 * count / events, 1) if events else None
            for name, count in calls.most_common()
        },
        "loadgen": result,
    }


def render(found: list[dict[str, Any]], limit: int) -> str:
    names = Counter[str]()
    for item in found:
        for name, per in item["per_1k_events"].items():
            names[name] = max(names[name], per or 0)
    shown = [name for name, per in names.most_common() if per >= 0.5][:limit]
    head = ["system call", *(f"{item['target']}" for item in found)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in shown:
        cells = [f"`{name}`"]
        for item in found:
            per = item["per_1k_events"].get(name)
            cells.append(report.fmt(per, 1) if per is not None else "0")
        lines.append("| " + " | ".join(cells) + " |")
    totals = ["**all**"]
    for item in found:
        totals.append(f"**{report.fmt(sum(v or 0 for v in item['per_1k_events'].values()), 1)}**")
    lines.append("| " + " | ".join(totals) + " |")
    notes = []
    for item in found:
        res = item["loadgen"]
        notes.append(
            f"- {item['target']}: {item['tool']} over {item['traced_s']:g} s "
            f"(~{item['events_traced']:,} events) · delivered/s "
            f"{report.fmt(res.get('delivered_per_s'), 0)} · server CPU per 1,000 events "
            f"{report.fmt(res.get('server_cpu_ms_per_1k_events'), 1)} ms (tracing included) · "
            f"publish→deliver p50 {report.fmt((res.get('latency') or {}).get('p50_ms'), 2)} ms"
        )
    for name, key, decimals in (
        ("user CPU ms (untraced)", "user_ms_per_1k_events", 1),
        ("system CPU ms (untraced)", "system_ms_per_1k_events", 1),
        ("context switches (untraced)", "switches_per_1k_events", 0),
        ("minor page faults (untraced)", "faults_per_1k_events", 0),
    ):
        if not all(item["untraced"] for item in found):
            break  # saturated: the whole window was traced
        cells = [name, *(report.fmt(item["untraced"][key], decimals) for item in found)]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({item["workload"] for item in found})
    title = f"System calls per 1,000 events delivered ({', '.join(kinds)} workload)"
    return "\n".join([title, "", *lines, "", *notes, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="megaphone,nchan", help="comma-separated")
    parser.add_argument("--workload", choices=("throughput", "latency"), default="latency")
    parser.add_argument("--duration", type=float, default=14.0, help="measured window, seconds")
    parser.add_argument("--tool", choices=("stat", "trace", "strace"), default="stat")
    parser.add_argument("--rows", type=int, default=20, help="system calls shown at most")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TRACED]
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TRACED)}")
    program = "strace" if args.tool == "strace" else "perf"
    if shutil.which(program) is None:
        package = "strace" if program == "strace" else "linux-perf"
        print(f"{program} is not installed (apt-get install -y {package})", file=sys.stderr)
        return 2
    targets.raise_nofile()
    found = [measure(target, args.workload, args.duration, args.tool) for target in names]
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))
    print(render(found, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
