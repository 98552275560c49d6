"""Megaphone benchmark, with nchan (nginx, C) and pushpin (GRIP proxy) as baselines, in one command.

    python3 bench/run.py [--quick] [--duration 10]
        [--targets megaphone,megaphone-redis,megaphone-redis-2n,nchan,pushpin]
        [--workloads throughput,latency,idle,batch,create,scale,sweep,resume,churn,sse,websocket]
        [--repeat 3]
    python3 bench/run.py --workloads limits [--quick]     # bench/limits.py: issue #9's attacks

Targets: megaphone on its memory store; megaphone on the Redis store, one node
(``megaphone-redis``), two nodes on one Redis (``megaphone-redis-2n``: writes on node A, reads on
node B) and one node with ``workers = 2`` (``megaphone-redis-w2``: its two worker processes may run
on both CPUs, the load generator's too); nchan; pushpin with a minimal GRIP origin
(``bench/grip_origin.py``). For every target and workload (and every phase of the phased workloads)
fresh servers are started pinned to CPU 0 (``taskset``; the Redis targets' own redis-server and
pushpin's processes and origin too), the load generator (``bench/loadgen.py``) runs pinned to CPU
1, the servers are stopped by PID. The results are printed as a markdown table and written to
``bench/results/latest.json``. See bench/README.md.

This module is the command line and the orchestration; the targets are started by ``targets.py``,
the workloads' jobs are planned in ``workloads.py`` and the table is built in ``report.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import (
    NOISY_PCT,
    PHASE_RATIOS,
    add_vs_memory,
    all_rows,
    anomalies,
    dig,
    median_merge,
    table,
    transport_summary,
)
from targets import (
    LOADGEN_CPU,
    NCHAN_TARGETS,
    REDIS_BACKED,
    REDIS_MAPPING,
    REDIS_SERVER,
    REDIS_TARGETS,
    RESULTS,
    SERVER_CPU,
    TARGETS,
    Deployment,
    Server,
    Starter,
    command_output,
    cpu_model,
    ensure_nchan,
    ensure_pushpin,
    ensure_redis,
    git_state,
    machine_busy_pct,
    megaphone_executable,
    pinned,
    raise_nofile,
    stop,
    target_starters,
)
from workloads import WORKLOADS, Plan, run_loadgen

QUIET_PCT = 15.0  # background load under which the machine counts as quiet enough to start
QUIET_WAIT_TOTAL = 60.0  # seconds of such waiting allowed over a whole run


# --- orchestration --------------------------------------------------------------------------


class QuietGate:
    """Before each workload, wait a little for other processes to leave the CPUs.

    At most ``per_workload`` seconds each time and ``total`` seconds over the whole run, so a
    machine that never calms down delays the run by a bounded amount.
    """

    def __init__(self, per_workload: float, total: float, retries: int = 0) -> None:
        self.per_workload = per_workload
        self.remaining = total
        self.retries = retries  # re-runs allowed for a workload disturbed by other processes

    def wait(self) -> float:
        """The background load (% of one core) seen last, after waiting."""
        busy = machine_busy_pct(0.5)
        budget = min(self.per_workload, self.remaining)
        if busy < QUIET_PCT or budget <= 0:
            return busy
        print(f"  machine busy ({busy:.0f}% of one core), waiting ...", file=sys.stderr)
        started = time.monotonic()
        while busy >= QUIET_PCT and time.monotonic() - started < budget:
            busy = machine_busy_pct(0.5)
        self.remaining -= time.monotonic() - started
        return busy


def run_target(
    target: str, start: Starter, plan: Plan, gate: QuietGate
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for workload, params in plan.jobs(target).items():
        if "phases" not in params:
            out[workload] = run_workload(target, start, workload, params, gate)
            continue
        phases = {
            phase: (
                {"skipped": phase_params["skip"]}
                if phase_params.get("skip")
                else run_workload(target, start, workload, phase_params, gate, phase)
            )
            for phase, phase_params in params["phases"].items()
        }
        ratios_of = PHASE_RATIOS.get(workload)
        ratios = ratios_of(phases) if ratios_of is not None else {}
        out[workload] = {"phases": phases, "ratios": ratios}
    return out


def run_workload(
    target: str,
    start: Starter,
    workload: str,
    params: dict[str, Any],
    gate: QuietGate,
    phase: str | None = None,
) -> dict[str, Any]:
    """One workload (or one phase of it) against a fresh server; with ``--retry-noisy N``, run
    again (up to N more times) while other processes took too much CPU, and keep the quietest."""
    name = f"{workload}/{phase}" if phase else workload
    attempts: list[dict[str, Any]] = []
    for attempt in range(gate.retries + 1):
        if attempt:
            print(
                f"  other processes took {noise(attempts[-1]):.0f}% of one core: again",
                file=sys.stderr,
            )
        attempts.append(run_once(target, start, workload, params, gate, name))
        if noise(attempts[-1]) < NOISY_PCT:
            break
    best = min(attempts, key=noise)
    if len(attempts) > 1:
        best["attempts_other_cpu_pct"] = [round(noise(a), 1) for a in attempts]
    return best


def noise(result: dict[str, Any]) -> float:
    """The CPU share other processes took during a result's measured window(s)."""
    if "error" in result:
        return float("inf")
    values = [dig("other_cpu_pct")(result), dig("fanout", "other_cpu_pct")(result)]
    return max((float(v) for v in values if isinstance(v, int | float)), default=0.0)


def run_once(
    target: str,
    start: Starter,
    workload: str,
    params: dict[str, Any],
    gate: QuietGate,
    name: str,
) -> dict[str, Any]:
    background = gate.wait()
    print(f"[{target}] {name} ...", file=sys.stderr, flush=True)
    params = dict(params)
    server_args: list[str] = params.pop("server_args", [])
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-{target}-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        result: dict[str, Any] = {"error": "interrupted"}
        started: list[Server] = []
        deployment: Deployment | None = None
        try:
            deployment = start(workdir, server_args, started)
            job = {**params, "workload": workload, "host": "127.0.0.1", **deployment.job()}
            result = run_loadgen(job)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            problems: list[str] = []
            stop_s = 0.0
            for server in reversed(started):  # the nodes first, then their redis-server
                found, took = stop(server)
                problems += found
                stop_s += took
            result["server_problems"], result["server_stop_s"] = problems, stop_s
            if deployment is not None:
                result.update(deployment.describe())
            result["server_args"] = server_args
    result["background_cpu_pct_before"] = background
    result["took_s"] = round(time.monotonic() - began, 2)  # server start to stop, all included
    return result


# --- main -----------------------------------------------------------------------------------


def sizes_arg(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()}))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("comma-separated positive numbers")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 3 s, 2 s phases, 1,000 idle readers, scale/sweep to 10,000 channels",
    )
    parser.add_argument("--duration", type=float, default=None, help="throughput seconds (10)")
    parser.add_argument(
        "--readers",
        type=sizes_arg,
        default=None,
        help="idle workload sizes, comma-separated (1000,10000,50000; quick: 1000)",
    )
    parser.add_argument(
        "--redis-readers",
        type=int,
        default=1_000,
        help="largest idle size on the Redis targets (1,000: each idle reader polls Redis)",
    )
    parser.add_argument(
        "--channels",
        type=sizes_arg,
        default=None,
        help="scale workload sizes, channels in all (1000,10000,100000; quick: 1000,10000)",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install nginx/nchan or redis-server if missing",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="passes over every target and workload; the table shows the median (1)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each workload wait up to this many seconds (60 s per run in all) for other "
        "load to stop (15)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        help=f"run a workload again, up to N more times, while other processes took "
        f"{NOISY_PCT:.0f}%% of a core or more during it; the quietest attempt counts (0)",
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help=f"comma-separated, from {','.join(WORKLOADS)} (all that each target can run; "
        "megaphone-redis-2n: not scale, sweep, resume, churn, megaphone-redis: not resume, "
        "churn, unless named here); or `limits` alone: bench/limits.py (issue #9's attacks)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    args.workloads_named = args.workloads is not None
    if args.workloads is None:
        args.workloads = ",".join(WORKLOADS)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown_workloads = set(args.workloads) - set(WORKLOADS)
    if unknown_workloads or not args.workloads:
        parser.error(
            f"unknown workloads {sorted(unknown_workloads)}; choose from {', '.join(WORKLOADS)}"
        )
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.retry_noisy < 0:
        parser.error("--retry-noisy must be 0 or more")
    return args


def limits_only(argv: list[str] | None) -> list[str] | None:
    """``--workloads limits`` (alone): issue #9's attacks, run by ``bench/limits.py`` with its
    own servers and table; the arguments to pass it, else None."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--workloads")
    early.add_argument("--quick", action="store_true")
    early.add_argument("--output")
    known, _ = early.parse_known_args(argv)
    if known.workloads != "limits":
        return None
    return ["--quick"] * known.quick + (["--output", known.output] if known.output else [])


def make_plan(args: argparse.Namespace, nofile: int) -> Plan:
    """The plan the command line asks for (``--quick``'s shorter phases and fewer sizes)."""
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    quick = args.quick
    plan = Plan(
        duration=duration,
        idle_sizes=args.readers or ((1_000,) if quick else (1_000, 10_000, 50_000)),
        redis_readers=args.redis_readers,
        create_duration=min(duration, 2.0 if quick else 5.0),
        phase_duration=min(duration, 2.0 if quick else 5.0),
        nofile=nofile,
        workloads=tuple(w for w in WORKLOADS if w in args.workloads),
        all_named=args.workloads_named,
        batch_rounds=3 if quick else 5,
        scale_sizes=args.channels or ((1_000, 10_000) if quick else (1_000, 10_000, 100_000)),
    )
    if quick:
        plan.sweep_phases = tuple(p for p in plan.sweep_phases if p[1] <= 10_000)
    return plan


def warn_setup(plan: Plan) -> float:
    """Warn about what will weaken the figures (no pinning, idle sizes past the file descriptor
    limit, a busy machine); the background load before the run (% of one core)."""
    if not pinned(0):
        print("warning: no CPU pinning (needs taskset and 2+ CPUs)", file=sys.stderr)
    for size in plan.idle_sizes:
        reason = plan.too_big("megaphone", readers=size)
        if reason:
            print(f"warning: idle workload, {size:,} readers {reason}", file=sys.stderr)

    background = machine_busy_pct()
    if background > 10:
        print(
            f"warning: the machine is already {background:.0f}% busy (of one core) before the "
            "run; other processes will disturb the figures",
            file=sys.stderr,
        )
    return background


def skipped_targets(args: argparse.Namespace, plan: Plan) -> dict[str, str]:
    """The targets asked for that will not run, and why (no workload applies; nginx/nchan,
    redis-server or pushpin missing and not installed)."""
    skipped: dict[str, str] = {}
    for target in args.targets:
        if not plan.jobs(target):
            skipped[target] = f"none of the workloads {', '.join(plan.workloads)} applies to it"
    for nchan_target in NCHAN_TARGETS:
        if nchan_target in args.targets and nchan_target not in skipped:
            reason = ensure_nchan(install=not args.no_install)
            if reason:
                skipped[nchan_target] = reason
                print(f"skipping {nchan_target}: {reason}", file=sys.stderr)
    wants_redis = [t for t in args.targets if t in REDIS_BACKED and t not in skipped]
    if wants_redis:
        reason = ensure_redis(install=not args.no_install)
        if reason:
            for target in wants_redis:
                skipped[target] = reason
            print(f"skipping {', '.join(wants_redis)}: {reason}", file=sys.stderr)
    if "pushpin" in args.targets and "pushpin" not in skipped:
        reason = ensure_pushpin(install=not args.no_install)
        if reason:
            skipped["pushpin"] = reason
            print(f"skipping pushpin: {reason}", file=sys.stderr)
    return skipped


Passes = dict[str, list[dict[str, dict[str, Any]]]]  # target -> one result per pass, by workload


def run_passes(ran: list[str], plan: Plan, args: argparse.Namespace) -> Passes:
    """``--repeat`` passes over every target and its workloads."""
    starters = target_starters()
    passes: Passes = {t: [] for t in ran}
    gate = QuietGate(args.quiet_wait, total=QUIET_WAIT_TOTAL, retries=args.retry_noisy)
    for number in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"pass {number}/{args.repeat}", file=sys.stderr)
        for target in ran:  # passes interleave targets, so slow drifts hit both alike
            passes[target].append(run_target(target, starters[target], plan, gate))
    return passes


def environment(
    ran: list[str], nofile: tuple[int, int], background: float, source_at_start: str
) -> dict[str, Any]:
    """The machine, the versions of what ran, the source's state: the JSON's ``environment``."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "megaphone_source": git_state(),
        "megaphone_source_at_start": source_at_start,
        "background_cpu_pct_before_run": round(background, 1),
        "python": platform.python_version(),
        "megaphone": command_output([megaphone_executable(), "--version"]),
        "nginx": command_output(["nginx", "-v"]) if set(NCHAN_TARGETS) & set(ran) else None,
        "nchan": (
            command_output(["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"])
            if set(NCHAN_TARGETS) & set(ran)
            else None
        ),
        "pushpin": command_output(["pushpin", "--version"]) if "pushpin" in ran else None,
        "redis_server": (
            command_output([REDIS_SERVER, "--version"])
            if any(t in REDIS_BACKED for t in ran)
            else None
        ),
        "hiredis": command_output(
            [sys.executable, "-c", "import hiredis; print(hiredis.__version__)"]
        )
        if any(t in REDIS_TARGETS for t in ran)
        else None,
        "rlimit_nofile": list(nofile),
        "server_cpu": SERVER_CPU if pinned(0) else None,
        "loadgen_cpu": LOADGEN_CPU if pinned(0) else None,
    }


def print_report(
    report: dict[str, Any],
    plan: Plan,
    ran: list[str],
    args: argparse.Namespace,
    background: float,
    elapsed: float,
) -> None:
    """The run's line (machine, plan, source), the table, the transports' summary, the skipped
    targets and the anomalies, on stdout."""
    env, results = report["environment"], report["results"]
    redis_note = ""
    if any(t in REDIS_BACKED for t in ran):
        redis_note = (
            f"Redis targets: at most {plan.redis_readers:,} idle readers and "
            f"{plan.redis_max_channels:,} channels, {env['redis_server'].split(' sha=')[0]} · "
        )
    print(
        f"\n{report['started']} · nproc {env['nproc']} · {env['cpu_model']} · "
        f"server on CPU {env['server_cpu']}, load generator on CPU {env['loadgen_cpu']} · "
        f"workloads {','.join(plan.workloads)} · throughput {plan.duration:g} s · "
        f"idle readers {','.join(f'{n:,}' for n in plan.idle_sizes)} · "
        f"scale/resume/churn phases {plan.phase_duration:g} s · "
        f"{redis_note}"
        f"{'median of ' + str(args.repeat) + ' passes · ' if args.repeat > 1 else ''}"
        f"run took {elapsed:.0f} s · megaphone {env['megaphone_source']} · "
        f"background load before the run {background:.0f}% of one core\n"
    )
    if env["megaphone_source"] != env["megaphone_source_at_start"]:
        print(
            f"warning: megaphone's source changed during the run (at the start: "
            f"{env['megaphone_source_at_start']}); the servers started later ran the newer code\n"
        )
    print(table(results, ran, all_rows(plan)))
    summary = transport_summary(results, plan)
    if summary:
        print("\nBrowser transports (issue #11: each within the NDJSON ratio to nchan):\n")
        print(summary)
    for target, reason in report["skipped"].items():
        print(f"\n{target} skipped: {reason}")
    if report["anomalies"]:
        print("\nAnomalies:")
        for line in report["anomalies"]:
            print(f"- {line}")
    print(f"\nfull results: {args.output}")


def main(argv: list[str] | None = None) -> int:
    limits_args = limits_only(argv)
    if limits_args is not None:
        import limits  # beside this file

        return limits.main(limits_args)
    args = parse_args(argv)
    nofile = raise_nofile()
    plan = make_plan(args, nofile[0])
    background = warn_setup(plan)
    started = dt.datetime.now(dt.UTC)
    source_at_start = git_state()
    skipped = skipped_targets(args, plan)
    ran = [t for t in TARGETS if t in args.targets and t not in skipped]
    passes = run_passes(ran, plan, args)
    add_vs_memory(passes)
    results = {
        target: {workload: median_merge([run[workload] for run in runs]) for workload in runs[0]}
        for target, runs in passes.items()
    }
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "environment": environment(ran, nofile, background, source_at_start),
        "plan": {**vars(plan), "repeat": args.repeat},
        "redis_mapping": REDIS_MAPPING,
        "skipped": skipped,
        "results": results,  # the median over the passes, number by number
        "passes": passes,
        "anomalies": list(anomalies(passes)),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, plan, ran, args, background, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
