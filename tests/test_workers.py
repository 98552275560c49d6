"""``workers = N`` (issue #14): real ``megaphone`` subprocesses on a real redis-server, N worker
processes on one port under a supervisor (``megaphone.workers``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from megaphone.config import Settings
from megaphone.metrics import Metrics, render_workers
from support import MEGAPHONE, MegaphoneProcess, RedisServer, clean_env, free_port


@pytest.fixture
def nodes() -> Iterator[list[MegaphoneProcess]]:
    started: list[MegaphoneProcess] = []
    yield started
    for node in started:
        node.close()


def redis_args(redis: RedisServer) -> list[str]:
    prefix = f"w{uuid.uuid4().hex[:12]}:"
    return ["--store", "redis", "--redis-url", redis.url, "--redis-prefix", prefix]


def start(
    nodes: list[MegaphoneProcess], tmp_path: Path, redis: RedisServer, *extra: str
) -> MegaphoneProcess:
    args = ["--address", "127.0.0.1:0", "--workers", "2", "--log-level", "info"]
    node = MegaphoneProcess([*args, *redis_args(redis), *extra], tmp_path, clean_env())
    nodes.append(node)
    return node


def fresh(url: str) -> httpx.Client:
    """A client whose every request opens a new connection (the kernel picks a worker)."""
    return httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def by_worker(url: str, name: str) -> dict[str, float]:
    """One metric's samples (summed over other labels) by ``worker`` label ("" without)."""
    with fresh(url) as http:
        text = http.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, name + "_total"):  # the parser adds it to counters
                worker = sample.labels.get("worker", "")
                out[worker] = out.get(worker, 0.0) + sample.value
    return out


def both(url: str, name: str) -> bool:
    """Whether both workers count some of ``name``."""
    counts = by_worker(url, name)
    return counts.get("0", 0) > 0 and counts.get("1", 0) > 0


def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(b")", 1)[1].split()[1]) == supervisor and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_two_workers_serve_one_port_and_one_broker(
    tmp_path: Path, nodes: list[MegaphoneProcess], redis_server: RedisServer
) -> None:
    node = start(nodes, tmp_path, redis_server)
    listening = [line for line in node.lines if "megaphone listening" in line]
    assert len(listening) == 1
    assert "workers=2" in listening[0]
    with fresh(node.url) as http:
        channel = http.post("/create").json()
        sent = 0
        # events written through both workers ...
        while not both(node.url, "megaphone_messages_received") or sent < 4:
            assert sent < 200, "one worker got every connection"
            reply = http.post(f"/write/{channel['producerAddress']}/s", json=sent)
            assert reply.status_code == 201, reply.text
            sent += 1
    received = by_worker(node.url, "megaphone_messages_received")
    assert set(received) == {"0", "1"}
    assert sum(received.values()) == sent
    # ... are read, in order, through one
    bodies = []
    with (
        httpx.Client(base_url=node.url, timeout=10) as http,
        http.stream("GET", f"/read/{channel['consumerAddress']}") as stream,
    ):
        for line in stream.iter_lines():
            bodies.append(json.loads(line)["body"])
            if len(bodies) == sent:
                break
    assert bodies == list(range(sent))
    channels = by_worker(node.url, "megaphone_channels")
    assert channels == {"0": 1.0, "1": 1.0}  # cluster-wide: the same on every worker
    assert by_worker(node.url, "megaphone_workers_unreachable") == {"": 0.0}
    assert node.stop() == 0


def test_sigterm_ends_every_worker_and_open_reads_cleanly(
    tmp_path: Path, nodes: list[MegaphoneProcess], redis_server: RedisServer
) -> None:
    node = start(nodes, tmp_path, redis_server)
    workers = worker_pids(node.process.pid)
    assert len(workers) == 2
    node.terminate_mid_read()
    assert node.stop() == 0
    finished = [line for line in node.lines if "shutdown finished" in line]
    assert len(finished) == 3  # each worker, then the supervisor
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_a_killed_worker_is_replaced(
    tmp_path: Path, nodes: list[MegaphoneProcess], redis_server: RedisServer
) -> None:
    node = start(nodes, tmp_path, redis_server)
    before = worker_pids(node.process.pid)
    os.kill(before[0], signal.SIGKILL)
    until(lambda: any("worker restarted" in line for line in node.lines))
    exited = next(line for line in node.lines if "worker exited" in line)
    assert "level=warning" in exited
    assert "code=-9" in exited
    after = worker_pids(node.process.pid)
    assert len(after) == 2
    assert before[0] not in after
    assert before[1] in after
    with fresh(node.url) as http:
        for _ in range(200):  # the port keeps serving; the new worker gets its share
            assert http.post("/create").status_code == 200
            if both(node.url, "megaphone_channel_created"):
                break
    assert both(node.url, "megaphone_channel_created")
    assert node.stop() == 0


def megaphone(
    cwd: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 20,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``megaphone`` (after ``prefix``: taskset) run to its end: a failing start, ``--check``."""
    return subprocess.run(
        [*prefix, MEGAPHONE, *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_failing_start_stops_the_others_and_is_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    args = ["--address", "127.0.0.1:0", "--mng-socket-path", "", "--workers", "2"]
    result = megaphone(tmp_path, *args, "--store", "redis", "--redis-url", url, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"megaphone: cannot start: redis unavailable: RespConnectionError (redis_url {url!r})"
    ]


def test_several_workers_need_the_redis_store(tmp_path: Path) -> None:
    args = ["--address", "127.0.0.1:0", "--mng-socket-path", "", "--workers", "2"]
    line = (
        "megaphone: invalid configuration: workers: 2 needs store = redis (the memory store "
        "keeps channels in one process; run one node per core behind prefix routing instead)"
    )
    for extra in (["--check"], []):
        result = megaphone(tmp_path, *args, *extra)
        assert (result.returncode, result.stderr.splitlines()) == (2, [line])


def test_auto_is_one_worker_per_usable_core(tmp_path: Path) -> None:
    assert Settings(workers="auto").worker_count == len(os.sched_getaffinity(0))
    assert Settings(workers="3").worker_count == 3
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0))[:2])
    result = megaphone(
        tmp_path,
        "--check",
        "--workers",
        "auto",
        env=clean_env(megaphone_mng_socket_path=""),
        prefix=("taskset", "-c", cores),
    )
    if "," in cores:  # two usable cores: auto = 2, which the memory store refuses
        assert result.returncode == 2
        assert "workers: 2 needs store = redis" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["workers"] == "auto"


@pytest.mark.parametrize("option", ["0", "two", "-1"])
def test_a_bad_count_is_one_line(tmp_path: Path, option: str) -> None:
    result = megaphone(tmp_path, "--check", "--workers", option)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "megaphone: invalid configuration: workers: must be a whole number from 1, or auto; "
        f"got {option!r}"
    ]


def test_worker_0_serves_the_management_api(
    tmp_path: Path, nodes: list[MegaphoneProcess], redis_server: RedisServer
) -> None:
    """megactl works as with one process; an agent it adds (on worker 0) is served by both."""
    sock_dir = Path(tempfile.mkdtemp(prefix="mng", dir="/tmp"))
    try:
        path = sock_dir / "mng.sock"
        node = start(nodes, tmp_path, redis_server, "--mng-socket-path", str(path))
        until(lambda: any("management API listening" in line for line in node.lines))
        mgmt = [line for line in node.lines if "management API listening" in line]
        assert len(mgmt) == 1
        assert "worker=0" in mgmt[0]
        megactl = [sys.executable, "-m", "megaphone.mgmt.cli", "-p", str(path), "-o", "json"]
        added = subprocess.run(
            [*megactl, "add-agent", "-n", "extra"], capture_output=True, text=True, timeout=20
        )
        assert added.returncode == 0, added.stderr
        listed = subprocess.run(
            [*megactl, "list-agents"], capture_output=True, text=True, timeout=20, check=True
        )
        assert "extra" in listed.stdout
        with fresh(node.url) as http:
            channel: dict[str, str] = {}
            for _ in range(200):  # worker 0 hosts new channels on it, half of the time
                channel = http.post("/create").json()
                if channel["agentName"] == "extra":
                    break
            assert channel["agentName"] == "extra"
            before = by_worker(node.url, "megaphone_messages_received")
            for _ in range(40):  # through both workers (1 - 2⁻⁴⁰)
                reply = http.post(f"/write/{channel['producerAddress']}/s", json=1)
                assert reply.status_code == 201, reply.text
        after = by_worker(node.url, "megaphone_messages_received")
        assert all(after[w] > before.get(w, 0) for w in ("0", "1")), (before, after)
        assert node.stop() == 0
        assert not path.exists()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_every_workers_figures_with_their_label() -> None:
    """The exposition of a worker's ``/metrics`` (in process): each sample labelled, counters
    included, a sibling that did not answer counted."""
    first, second = Metrics(), Metrics()
    first.messages_received, second.messages_received = 3, 4
    second.count_request("write", 201)
    text = render_workers({0: first.snapshot(), 2: second.snapshot()}, unreachable=1).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("megaphone_messages_received_total", (("worker", "0"),))] == 3
    assert samples[("megaphone_messages_received_total", (("worker", "2"),))] == 4
    key = (("endpoint", "write"), ("status", "201"), ("worker", "2"))
    assert samples[("megaphone_http_requests_total", key)] == 1
    assert samples[("megaphone_workers_unreachable", ())] == 1
    assert "worker=" not in first.render().decode()  # one process: no label


async def test_siblings_missing_or_silent_are_left_out_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape's gathering: a sibling with no socket, and one whose socket never answers (cut
    at the timeout), are left out of the figures and counted as unreachable."""
    import asyncio

    from megaphone import workers

    monkeypatch.setattr(workers, "SIBLING_TIMEOUT", 0.2)
    mine = Metrics()
    mine.messages_received = 5

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    server = await asyncio.start_unix_server(silent, workers._socket_path(str(tmp_path), 1))
    try:  # worker 1 is silent, worker 2 has no socket at all
        text = (await workers._gather(mine, 0, 3, str(tmp_path))).decode()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("megaphone_messages_received_total", (("worker", "0"),))] == 5
    assert samples[("megaphone_workers_unreachable", ())] == 2
    assert not [labels for _, labels in samples if ("worker", "1") in labels]
