"""Issue #9's attacks on one megaphone node with its default settings: the ``limits`` workload.

    python3 bench/limits.py                       # every scenario, ~10 min
    python3 bench/limits.py --quick               # counts ÷ 10, ~4 min (the expiry wait stays)
    python3 bench/limits.py --scenarios amplification,slow
    python3 bench/run.py --workloads limits [--quick]   # the same, through the benchmark's CLI

Every scenario gets a fresh ``megaphone --address 127.0.0.1:<free port>`` (nothing else set; the
slow-reader case on Redis adds ``store`` and ``redis_url`` in a config file, with its own
redis-server), pinned to CPU 0; this process attacks it from CPU 1. Meanwhile a thread samples
the server's ``VmRSS`` every 10 ms (with ``VmHWM``, reset through ``clear_refs`` between phases)
and another times ``GET /healthz`` every 20 ms on its own keep-alive connection. The longest
garbage-collection pause is the server's own ``megaphone_gc_longest_pause_seconds``. The table
puts each figure next to the one measured on ``main`` when issue #9 was filed. See
bench/README.md, "limits".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # the load generator's closed loops (beside this file)
import targets  # the benchmark's process helpers (beside this file)

HOST = "127.0.0.1"
MiB = 1 << 20
GiB = 1 << 30
KEEP = 4096  # bytes of an answer body kept to show (all of it is counted)
PIECE = 4096  # the slow reader takes this much at a time, then pauses
PAUSE = 0.002  # seconds
SCENARIOS = ("amplification", "flood", "gc", "big", "pipeline", "slow")

# --- "before": measured on main when issue #9 was filed (quoted from the issue) -------------
BEFORE_AMP_STATUS = "201"
BEFORE_AMP_ANSWER = "~1 GB"  # the failure list for 1,000 made-up channels x 1,000 messages
BEFORE_AMP_RSS_PEAK = "1.94 GiB"
BEFORE_AMP_HEALTHZ = "2.5 s"  # /healthz stalled while the answer was built
BEFORE_FULL_ANSWER = "97 MB"  # a 0.1 MB write-batch on real, full channels
BEFORE_FULL_SIX_HELD = "1.35 GiB"  # six such requests at once: RSS held afterwards
BEFORE_FLOOD_CREATED = "1,000,000"  # 1M channels from one client, all created
BEFORE_FLOOD_SECONDS = "38 s"
BEFORE_FLOOD_RSS_PEAK = "2.93 GiB"
BEFORE_FLOOD_PER_CHANNEL = "3.0 KiB"
BEFORE_FLOOD_RSS_EXPIRED = "1.7 GiB"  # RSS once every channel had expired
BEFORE_FLOOD_GC = "1,315 ms"  # longest full collection, with 600k live channels
BEFORE_FLOOD_HEALTHZ = "2 s"
BEFORE_BIG_GROWTH = "+1 GiB in 2 s"  # 10 channels x 100 x 1 MiB events, all accepted
BEFORE_PIPELINE_GROWTH = "+1 GiB"  # 30 connections queueing 1 MiB writes behind a read
BEFORE_SLOW_LOST = {
    "memory, 10,000 x 200 B": "8,480 / 10,000",
    "memory, 10,000 x 20 KB": "3,899 / 10,000",
    "redis, 5,000 x 200 B": "2,743 / 5,000",
}

now = time.monotonic


# --- the server -----------------------------------------------------------------------------


@dataclass
class Node:
    """One megaphone subprocess (and its redis-server), with its effective settings."""

    server: targets.Server
    redis: targets.Server | None
    settings: dict[str, Any]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.proc.pid


def start_node(workdir: Path, store: str = "memory", extra: Sequence[str] = ()) -> Node:
    """``megaphone --address 127.0.0.1:<port>`` in ``workdir`` (no config file, no
    ``megaphone_*`` variable); on Redis, ``store`` and ``redis_url`` in ``megaphone.toml``."""
    redis: targets.Server | None = None
    args: list[str] = []
    if store == "redis":
        redis = targets.start_redis(workdir)
        targets.wait_ready(redis)
        config = workdir / "megaphone.toml"
        config.write_text(f'store = "redis"\nredis_url = "redis://{HOST}:{redis.port}/0"\n')
        args = ["--config", str(config)]
    port = targets.free_port()
    args = ["--address", f"{HOST}:{port}", *args, *extra]
    command = [targets.megaphone_executable(), *args]
    env = targets.clean_env()
    checked = subprocess.run(
        [*command, "--check"], cwd=workdir, env=env, capture_output=True, text=True, check=True
    )
    settings: dict[str, Any] = json.loads(checked.stdout)
    log = workdir / "megaphone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*targets.pinned(targets.SERVER_CPU), *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    server = targets.Server("megaphone", "megaphone", proc, port, [proc.pid], log, "unknown")
    node = Node(server, redis, settings)
    try:
        targets.wait_ready(server)
    except BaseException:
        stop_node(node)
        raise
    return node


def stop_node(node: Node) -> list[str]:
    """SIGTERM (SIGKILL after 10 s), redis-server last; the log lines at WARNING and above."""
    problems, _ = targets.stop(node.server)
    problems = [p for p in problems if not run_stop_log_line(p)]
    problems.extend(log_warnings(node.server.log))
    if node.redis is not None:
        problems.extend(targets.stop(node.redis)[0])
    return problems


def run_stop_log_line(problem: str) -> bool:
    """``targets.stop``'s summary of the log: it counts every line, and megaphone logs at INFO here
    (``log_warnings`` keeps what matters)."""
    return problem.startswith("megaphone log")


def log_warnings(log: Path) -> list[str]:
    """megaphone's WARNING/ERROR lines by message, counted (its default level logs INFO too)."""
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if any(f"level={level}" in line for level in ("warning", "error", "critical")):
                kinds[line.split(" ", 1)[1][:300] if " " in line else line] += 1
    return [f"logged {n:,}x: {message}" for message, n in kinds.most_common(6)]


@contextlib.contextmanager
def fresh_node(
    store: str = "memory", extra: Sequence[str] = ()
) -> Iterator[tuple[Node, list[str]]]:
    """A node in its own temporary directory; its problems are appended to the list on exit."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="megaphone-limits-") as tmp:
        node = start_node(Path(tmp), store, extra)
        try:
            yield node, problems
        finally:
            problems.extend(stop_node(node))


# --- watching the server: RSS and /healthz, each in its own thread -----------------------------


def status_kib(pid: int, field_name: bytes) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


class RssWatch(threading.Thread):
    """The server's resident set: sampled every 10 ms, plus the kernel's own peak (``VmHWM``),
    which :meth:`mark` resets (``clear_refs``) so each phase has its own peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss")
        self.pid = pid
        self.current = status_kib(pid, b"VmRSS:")
        self.sampled_peak = self.current
        self.hwm_valid = True  # the process's whole life is one phase until the first mark
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.01):
            try:
                self.current = status_kib(self.pid, b"VmRSS:")
            except OSError:
                return
            self.sampled_peak = max(self.sampled_peak, self.current)

    def mark(self) -> int:
        """Start a new phase; the RSS now (KiB)."""
        self.current = status_kib(self.pid, b"VmRSS:")
        self.sampled_peak = self.current
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_valid = True
        except OSError:
            self.hwm_valid = False
        return self.current

    def peak(self) -> int:
        """The phase's peak RSS (KiB)."""
        peak = self.sampled_peak
        if self.hwm_valid:
            with contextlib.suppress(OSError):
                peak = max(peak, status_kib(self.pid, b"VmHWM:"))
        return peak

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole ``Content-Length`` response."""
    end = answer.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in answer[:end].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(answer) >= end + 4 + int(line[15:])
    return True


class HealthProbe(threading.Thread):
    """``GET /healthz`` every 20 ms on a keep-alive connection (a new one after an error); each
    probe's start time and latency. A blocking socket in a thread, so a busy attacker loop does
    not delay it (the GIL may, by up to its 5 ms switch interval)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="healthz")
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (started, seconds)
        self.failures = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        sock: socket.socket | None = None
        request = b"GET /healthz HTTP/1.1\r\nHost: limits\r\n\r\n"
        while not self.stopped.wait(0.02):
            started = now()
            try:
                if sock is None:
                    sock = socket.create_connection((HOST, self.port), timeout=60)
                sock.sendall(request)
                answer = b""
                while not complete(answer):
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionError("closed")
                    answer += data
                self.samples.append((started, now() - started))
                if not answer.startswith(b"HTTP/1.1 200"):
                    self.failures += 1
                    sock.close()
                    sock = None
            except OSError:
                self.samples.append((started, now() - started))
                self.failures += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Latency of the probes sent in [start, end] (and of one still waiting at the end)."""
        waits = [s for t, s in list(self.samples) if start <= t <= end]
        if not waits:
            return {"probes": 0, "max_ms": None, "p99_ms": None}
        waits.sort()
        return {
            "probes": len(waits),
            "max_ms": round(waits[-1] * 1000, 1),
            "p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))] * 1000, 1),
            "p50_ms": round(statistics.median(waits) * 1000, 2),
        }

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=70)


@contextlib.contextmanager
def watched(node: Node) -> Iterator[tuple[RssWatch, HealthProbe]]:
    rss = RssWatch(node.pid)
    probe = HealthProbe(node.port)
    rss.start()
    probe.start()
    try:
        yield rss, probe
    finally:
        probe.stop()
        rss.stop()


# --- a small HTTP/1.1 client on asyncio streams ----------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes  # the first KEEP bytes
    size: int  # body bytes in all (chunk framing not counted)

    def code(self) -> str:
        """The error body's ``code`` (or the status alone)."""
        with contextlib.suppress(ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            return f"{self.status} {orjson.loads(self.body)['code']}"
        return str(self.status)


class Http:
    """One keep-alive connection. ``reset_on_close``: SO_LINGER 0, so closing it sends a reset
    and throws away whatever the kernel still held for it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, reset_on_close: bool = False, limit: int = 1 << 16) -> Http:
        sock = socket.socket()
        sock.setblocking(False)
        if reset_on_close:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    async def pieces(self, headers: dict[bytes, bytes], most: int = MiB) -> AsyncIterator[bytes]:
        """The body in pieces of at most ``most`` bytes (a chunked body: never two chunks in
        one)."""
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailer fields
                    return
                while size > 0:
                    piece = await self.reader.readexactly(min(size, most))
                    size -= len(piece)
                    yield piece
                await self.reader.readexactly(2)
        elif b"content-length" in headers:
            left = int(headers[b"content-length"])
            while left > 0:
                piece = await self.reader.read(min(left, most))
                if not piece:
                    raise ConnectionError("closed inside a body")
                left -= len(piece)
                yield piece
        else:  # close-delimited
            while piece := await self.reader.read(most):
                yield piece

    async def answer(self, keep: int | None = KEEP) -> Answer:
        """The next answer; of its body, the first ``keep`` bytes (all: None) and the size."""
        status, headers = await self.head()
        kept = bytearray()
        size = 0
        async for piece in self.pieces(headers):
            size += len(piece)
            if keep is None:
                kept += piece
            elif len(kept) < keep:
                kept += piece[: keep - len(kept)]
        return Answer(status, headers, bytes(kept), size)

    async def request(
        self, method: str, path: str, body: bytes = b"", extra: str = "", keep: int | None = KEEP
    ) -> Answer:
        await self.send(request_bytes(method, path, body, extra))
        return await self.answer(keep)

    def reset(self) -> None:
        self.writer.transport.abort()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def request_bytes(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: limits\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def scrape(port: int) -> dict[str, float]:
    """``GET /metrics`` as {series (with its labels): value}."""
    http = await Http.open(port)
    try:
        answer = await http.request("GET", "/metrics", keep=None)
    finally:
        await http.aclose()
    out: dict[str, float] = {}
    for line in answer.body.decode().splitlines():
        if line.startswith("megaphone_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def gc_figures(metrics: dict[str, float]) -> dict[str, Any]:
    """The longest collection (any generation) and how many took over 50 ms; None on a server
    without these series (main before issue #9)."""
    longest = [v for k, v in metrics.items() if k.startswith("megaphone_gc_longest_pause_seconds")]
    if not longest:
        return {"gc_longest_ms": None, "gc_over_50ms": None, "gc_collections": None}
    counts = {k: v for k, v in metrics.items() if k.startswith("megaphone_gc_pause_seconds_count")}
    under = sum(
        v
        for k, v in metrics.items()
        if k.startswith("megaphone_gc_pause_seconds_bucket") and 'le="0.05"' in k
    )
    total = sum(counts.values())
    return {
        "gc_longest_ms": round(max(longest) * 1000, 1),
        "gc_over_50ms": int(total - under),
        "gc_collections": int(total),
    }


def producer_of(created: dict[str, Any]) -> str:
    return str(created["producerAddress"])


async def create_channels(port: int, count: int) -> list[dict[str, Any]]:
    """``count`` channels (32 keep-alive connections); their ``/create`` answers."""
    out: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    issued = 0
    request = request_bytes("POST", "/create")

    def source() -> loadgen.Request | None:
        nonlocal issued
        if issued >= count:
            return None
        issued += 1
        return request, issued

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        if status == 200:
            out.append(orjson.loads(body))
        else:
            loadgen.note_error(failures, status, body)

    await loadgen.closed_loop(HOST, port, min(32, count), source, sink)
    if failures:
        raise RuntimeError(f"channel creation failed: {dict(failures)}")
    return out


async def write_each(
    port: int, writes: Iterator[tuple[str, bytes]], connections: int = 64
) -> Counter[str]:
    """``POST /write/<producer>/s`` for every (producer, body), closed loop; answers by code."""
    counts: Counter[str] = Counter()

    def source() -> loadgen.Request | None:
        item = next(writes, None)
        if item is None:
            return None
        return request_bytes("POST", f"/write/{item[0]}/s", item[1]), 0

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        counts[Answer(status, {}, body, len(body)).code()] += 1

    await loadgen.closed_loop(HOST, port, connections, source, sink)
    return counts


def string_body(size: int) -> bytes:
    """A JSON string of exactly ``size`` bytes."""
    return b'"' + b"x" * (size - 2) + b'"'


def mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# --- (a) amplification ------------------------------------------------------------------------


async def timed_answer(port: int, data: bytes, within: float) -> dict[str, Any]:
    """Send one request on a new connection; status, code, body bytes, seconds."""
    started = now()
    http = await Http.open(port)
    try:
        async with asyncio.timeout(within):
            await http.send(data)
            answer = await http.answer()
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return {"status": None, "error": repr(exc), "seconds": round(now() - started, 2)}
    finally:
        http.reset()
    return {
        "status": answer.status,
        "code": answer.code(),
        "answer_bytes": answer.size,
        "seconds": round(now() - started, 2),
    }


async def amplification(quick: bool) -> dict[str, Any]:
    """One write-batch naming 1,000 made-up channels x 1,000 messages (~0.98 MB); then 1,000 real,
    full channels x 1,000 messages (~0.1 MB), alone and six at once."""
    out: dict[str, Any] = {}
    messages = [{"streamId": "s", "body": 0}] * 1000
    rng = random.Random(9)
    bare = len(orjson.dumps({"channels": [], "messages": messages}))
    each = (980_000 - bare) // 1000 - 3  # 1,000 quoted strings and their commas
    channels = [
        "x." + base64.urlsafe_b64encode(rng.randbytes(each)).decode()[: each - 2]
        for _ in range(1000)
    ]
    made_up = orjson.dumps({"channels": channels, "messages": messages})
    with fresh_node() as (node, problems), watched(node) as (rss, probe):
        base = rss.mark()
        started = now()
        answer = await timed_answer(node.port, request_bytes("POST", "/write-batch", made_up), 300)
        await asyncio.sleep(1)
        out["made_up"] = {
            "request_bytes": len(made_up),
            **answer,
            "rss_before_mib": mib(base),
            "rss_peak_mib": mib(rss.peak()),
            "rss_after_mib": mib(rss.current),
            "healthz": probe.window(started, now()),
        }
    out["made_up"]["problems"] = problems
    print(f"  made-up channels: {out['made_up']}", file=sys.stderr)

    with fresh_node() as (node, problems), watched(node) as (rss, probe):
        settings = node.settings
        real = await create_channels(node.port, 1000)
        fill = settings["channel_buffer_size"]
        event = b'{"fill":true}'
        filled = await write_each(
            node.port, ((producer_of(c), event) for c in real for _ in range(fill))
        )
        batch = orjson.dumps({"channels": [producer_of(c) for c in real], "messages": messages})
        request = request_bytes("POST", "/write-batch", batch)
        timeout = settings["write_timeout_millis"] / 1000 + 120
        base = rss.mark()
        started = now()
        one = await timed_answer(node.port, request, timeout)
        one_peak = rss.peak()
        one_window = probe.window(started, now())
        rss.mark()
        started = now()
        six = await asyncio.gather(*(timed_answer(node.port, request, timeout) for _ in range(6)))
        six_peak = rss.peak()
        six_window = probe.window(started, now())
        await asyncio.sleep(2)
        out["full"] = {
            "channels": len(real),
            "fill_answers": dict(filled),
            "request_bytes": len(batch),
            **one,
            "rss_before_mib": mib(base),
            "rss_peak_mib": mib(one_peak),
            "healthz": one_window,
            "six": {
                "statuses": dict(Counter(str(a.get("code", a.get("error"))) for a in six)),
                "answer_bytes_max": max((a.get("answer_bytes", 0) for a in six), default=0),
                "seconds": max(a["seconds"] for a in six),
                "rss_peak_mib": mib(six_peak),
                "rss_after_mib": mib(rss.current),
                "healthz": six_window,
            },
        }
    out["full"]["problems"] = problems
    print(f"  real, full channels: {out['full']}", file=sys.stderr)
    return out


# --- (b) flood ----------------------------------------------------------------------------------


async def flood_once(port: int, requests: int) -> dict[str, Any]:
    """``POST /create`` ``requests`` times, 32 keep-alive connections, closed loop."""
    statuses: Counter[str] = Counter()
    issued = 0
    request = request_bytes("POST", "/create")

    def source() -> loadgen.Request | None:
        nonlocal issued
        if issued >= requests:
            return None
        issued += 1
        return request, 0

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        statuses["200" if status == 200 else Answer(status, {}, body, len(body)).code()] += 1

    started = now()
    await loadgen.closed_loop(HOST, port, 32, source, sink)
    seconds = now() - started
    return {
        "requests": requests,
        "answers": dict(statuses),
        "created": statuses["200"],
        "seconds": round(seconds, 1),
        "per_s": round(requests / seconds),
    }


async def wait_expired(port: int, limit: float) -> tuple[bool, float, dict[str, float]]:
    """Until every channel created has been disposed (the server's counters), at most ``limit``."""
    started = now()
    metrics: dict[str, float] = {}
    while now() - started < limit:
        metrics = await scrape(port)
        created = metrics.get("megaphone_channel_created", 0.0)
        if metrics.get("megaphone_channel_disposed", 0.0) >= created:
            return True, now() - started, metrics
        await asyncio.sleep(2)
    return False, now() - started, metrics


async def flood(quick: bool) -> dict[str, Any]:
    """1M ``/create`` (quick: 100k); wait until every channel has expired; the same again."""
    requests = 100_000 if quick else 1_000_000
    out: dict[str, Any] = {}
    with fresh_node() as (node, problems), watched(node) as (rss, probe):
        settings = node.settings
        base = rss.mark()
        started = now()
        first = await flood_once(node.port, requests)
        first.update(
            rss_before_mib=mib(base),
            rss_peak_mib=mib(rss.peak()),
            healthz=probe.window(started, now()),
            **gc_figures(await scrape(node.port)),
        )
        created = first["created"]
        first["kib_per_channel"] = round((rss.peak() - base) / created, 2) if created else None
        print(f"  first flood: {first}", file=sys.stderr)
        limit = (settings["channel_ttl_millis"] + 3 * settings["sweep_interval_millis"]) / 1000
        started = now()
        expired, waited, metrics = await wait_expired(node.port, limit + 120)
        await asyncio.sleep(2)
        after = rss.mark()
        out["expiry"] = {
            "all_expired": expired,
            "waited_s": round(waited, 1),
            "disposed": metrics.get("megaphone_channel_disposed"),
            "rss_after_mib": mib(after),
            "healthz": probe.window(started, now()),
        }
        print(f"  expiry: {out['expiry']}", file=sys.stderr)
        started = now()
        second = await flood_once(node.port, requests)
        second.update(
            rss_peak_mib=mib(rss.peak()),
            healthz=probe.window(started, now()),
            **gc_figures(await scrape(node.port)),
        )
        print(f"  second flood: {second}", file=sys.stderr)
        # and once more: a leak would grow every time, reuse stays at the first peak
        await wait_expired(node.port, limit + 120)
        third = await flood_once(node.port, requests)
        third["rss_peak_mib"] = mib(rss.peak())
        print(f"  third flood: {third}", file=sys.stderr)
        out["first"] = first
        out["second"] = second
        out["third"] = third
    out["problems"] = problems
    return out


async def gc_million(quick: bool) -> dict[str, Any]:
    """Issue #9's GC target: 1M live channels (the one setting changed: ``max_channels``, whose
    default is 500,000), then the longest collection while they live, and a forced full one."""
    requests = 100_000 if quick else 1_000_000
    with (
        fresh_node(extra=["--max-channels", str(requests)]) as (node, problems),
        watched(node) as (rss, probe),
    ):
        base = rss.mark()
        started = now()
        out = await flood_once(node.port, requests)
        out.update(
            rss_before_mib=mib(base),
            rss_peak_mib=mib(rss.peak()),
            healthz=probe.window(started, now()),
            **gc_figures(await scrape(node.port)),
        )
        # idle with every channel alive: the policy's ticks and any automatic collection
        started = now()
        await asyncio.sleep(5)
        out["idle"] = {"healthz": probe.window(started, now())}
        out["idle"].update(gc_figures(await scrape(node.port)))
        out["frozen"] = (await scrape(node.port)).get("megaphone_gc_frozen_objects")
        print(f"  1M channels: {out}", file=sys.stderr)
    out["problems"] = problems
    return out


# --- (c) big events -----------------------------------------------------------------------------


async def one_write(port: int, data: bytes, within: float) -> str:
    """One request on its own connection; its answer's code, or what went wrong."""
    try:
        http = await Http.open(port)
    except OSError as exc:
        return f"connect failed: {type(exc).__name__}"
    try:
        async with asyncio.timeout(within):
            await http.send(data)
            return (await http.answer()).code()
    except TimeoutError:
        return "no answer in time"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"closed without an answer: {type(exc).__name__}"
    finally:
        http.reset()


async def big_events(quick: bool) -> dict[str, Any]:
    """10 channels x 100 writes of a 1 MiB body (quick: x 10), all at once, nobody reading."""
    per_channel = 10 if quick else 100
    with fresh_node() as (node, problems), watched(node) as (rss, probe):
        settings = node.settings
        channels = await create_channels(node.port, 10)
        body = string_body(settings["max_body_bytes"])
        timeout = 3 * settings["write_timeout_millis"] / 1000 + 300
        base = rss.mark()
        started = now()
        answers = await asyncio.gather(
            *(
                one_write(
                    node.port, request_bytes("POST", f"/write/{producer_of(c)}/s", body), timeout
                )
                for c in channels
                for _ in range(per_channel)
            )
        )
        seconds = now() - started
        counts = Counter(answers)
        out: dict[str, Any] = {
            "writes": len(answers),
            "body_bytes": len(body),
            "answers": dict(counts),
            "accepted": counts["201"],
            "seconds": round(seconds, 1),
            "rss_before_mib": mib(base),
            "rss_peak_mib": mib(rss.peak()),
            "rss_growth_mib": mib(rss.peak() - base),
            "healthz": probe.window(started, now()),
        }
    out["problems"] = problems
    print(f"  big events: {out}", file=sys.stderr)
    return out


# --- (d) pipelined queue ----------------------------------------------------------------------


async def pipelined(quick: bool) -> dict[str, Any]:
    """30 connections (quick: 3), each ``GET /read`` of its own channel followed, on the same
    connection, by 32 pipelined 1 MiB writes; held for the read's window + 10 s."""
    connections = 3 if quick else 30
    writes = 32
    with fresh_node() as (node, problems), watched(node) as (rss, probe):
        settings = node.settings
        channels = await create_channels(node.port, connections)
        body = string_body(settings["max_body_bytes"])
        hold = settings["poll_duration_millis"] / 1000 + 10
        sent = [0] * connections
        answers: Counter[str] = Counter()
        base = rss.mark()
        started = now()

        async def attack(number: int, channel: dict[str, Any]) -> None:
            http = await Http.open(node.port)
            write = request_bytes("POST", f"/write/{producer_of(channel)}/s", body)

            async def push() -> None:
                await http.send(request_bytes("GET", f"/read/{channel['consumerAddress']}"))
                for _ in range(writes):
                    await http.send(write)
                    sent[number] += len(write)

            async def pull() -> None:
                for _ in range(writes + 1):
                    answer = await http.answer()
                    answers[answer.code()] += 1

            try:
                async with asyncio.timeout(hold):
                    await asyncio.gather(push(), pull())
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                answers[f"ended: {type(exc).__name__}"] += 1
            finally:
                http.reset()

        await asyncio.gather(*(attack(n, c) for n, c in enumerate(channels)))
        out: dict[str, Any] = {
            "connections": connections,
            "writes_per_connection": writes,
            "mib_offered": round(connections * writes * len(body) / MiB),
            "mib_sent": round(sum(sent) / MiB, 1),
            "answers": dict(answers),
            "seconds": round(now() - started, 1),
            "rss_before_mib": mib(base),
            "rss_peak_mib": mib(rss.peak()),
            "rss_growth_mib": mib(rss.peak() - base),
            "healthz": probe.window(started, now()),
        }
    out["problems"] = problems
    print(f"  pipelined: {out}", file=sys.stderr)
    return out


# --- (e) slow reader ----------------------------------------------------------------------------


@dataclass
class SlowReader:
    """One channel, one writer (closed loop, retrying ``503 TIMEOUT``), one slow reader: it takes
    the body 4 KiB at a time and pauses 2 ms after each piece (~2 MB/s; its stream buffer stops
    reading the socket beyond 8 KiB, so the rest waits in the kernel's buffers), resets the
    connection (SO_LINGER 0) 0.25-0.75 s after each read opens, and then reads again with
    ``Last-Event-ID`` = the last event it received whole."""

    port: int
    producer: str
    consumer: str
    events: int
    size: int
    rng: random.Random = field(default_factory=lambda: random.Random(9))
    acked: set[int] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    writer_done: bool = False
    last_eid: str | None = None

    def body(self, seq: int) -> bytes:
        head = b'{"seq":%d,"pad":"' % seq
        return head + b"x" * max(0, self.size - len(head) - 2) + b'"}'

    async def write_all(self) -> None:
        http = await Http.open(self.port)
        seq = 0
        path = f"/write/{self.producer}/s"
        try:
            while seq < self.events:
                try:
                    answer = await http.request("POST", path, self.body(seq))
                except (OSError, asyncio.IncompleteReadError):
                    self.counts["writer reconnects"] += 1
                    http.reset()
                    http = await Http.open(self.port)
                    continue
                code = answer.code()
                if answer.status == 201:
                    self.acked.add(seq)
                    seq += 1
                elif code == "503 TIMEOUT":
                    self.counts["writes answered 503 TIMEOUT (retried)"] += 1
                else:
                    self.counts[f"writes answered {code}"] += 1
                    seq += 1
        finally:
            self.writer_done = True
            http.reset()

    def complete(self) -> bool:
        return self.writer_done and self.acked <= self.seen

    async def read_once(self) -> bool | None:
        """One read, until reset, ended by the server, or idle; whether it brought new events
        (None: the read was refused, e.g. 409 while the server has not seen the reset yet)."""
        extra = f"Last-Event-ID: {self.last_eid}\r\n" if self.last_eid else ""
        http = await Http.open(self.port, reset_on_close=True, limit=PIECE)
        before = len(self.seen)
        try:
            await http.send(request_bytes("GET", f"/read/{self.consumer}", extra=extra))
            status, headers = await http.head()
            if status != 200:
                self.counts[f"reads answered {status}"] += 1
                await asyncio.sleep(0.02)
                return None
            self.counts["reads"] += 1
            resume = headers.get(b"megaphone-resume", b"").decode()
            if resume:
                self.counts[f"resume: {resume}"] += 1
            reset_at = now() + self.rng.uniform(0.25, 0.75)
            partial = b""
            pieces = aiter(http.pieces(headers, PIECE))
            while True:
                idle = 1.0 if self.writer_done else 5.0
                try:
                    piece = await asyncio.wait_for(anext(pieces), idle)
                except StopAsyncIteration:
                    self.counts["reads ended by the server"] += 1
                    break
                except TimeoutError:
                    self.counts["reads idle, closed"] += 1
                    break
                await asyncio.sleep(PAUSE)
                lines = (partial + piece).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    if line:
                        self.take(line)
                if self.complete():
                    break
                if now() >= reset_at:
                    self.counts["resets"] += 1
                    break
        except (OSError, asyncio.IncompleteReadError):
            self.counts["reads broken"] += 1
        finally:
            http.reset()
        return len(self.seen) > before

    def take(self, line: bytes) -> None:
        event = orjson.loads(line)
        seq = event["body"]["seq"]
        if seq in self.seen:
            self.duplicates += 1
        self.seen.add(seq)
        self.last_eid = event["eid"]

    async def run(self, deadline: float) -> dict[str, Any]:
        started = now()
        writer = asyncio.ensure_future(self.write_all())
        fruitless = 0
        try:
            async with asyncio.timeout(deadline):
                while not self.complete() and fruitless < 3:
                    got = await self.read_once()
                    if got is not None:
                        fruitless = 0 if got or not self.writer_done else fruitless + 1
            timed_out = False
        except TimeoutError:
            timed_out = True
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        lost = self.acked - self.seen
        return {
            "events": self.events,
            "event_bytes": self.size,
            "acknowledged": len(self.acked),
            "lost": len(lost),
            "received": len(self.seen),
            "duplicates": self.duplicates,
            "seconds": round(now() - started, 1),
            "timed_out": timed_out,
            **dict(self.counts),
        }


async def slow_reader(quick: bool) -> dict[str, Any]:
    scale = 10 if quick else 1
    cases = (
        ("memory, 10,000 x 200 B", "memory", 10_000 // scale, 200),
        ("memory, 10,000 x 20 KB", "memory", 10_000 // scale, 20_000),
        ("redis, 5,000 x 200 B", "redis", 5_000 // scale, 200),
    )
    out: dict[str, Any] = {}
    for name, store, events, size in cases:
        with fresh_node(store) as (node, problems), watched(node) as (rss, probe):
            base = rss.mark()
            started = now()
            channel = (await create_channels(node.port, 1))[0]
            case = SlowReader(
                node.port, producer_of(channel), channel["consumerAddress"], events, size
            )
            result = await case.run(deadline=900)
            result.update(
                rss_before_mib=mib(base),
                rss_peak_mib=mib(rss.peak()),
                healthz=probe.window(started, now()),
            )
        result["problems"] = problems
        out[name] = result
        print(f"  slow reader, {name}: {result}", file=sys.stderr)
    return out


# --- report -------------------------------------------------------------------------------------


def fmt_mib(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:,.0f} MiB"


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "—"
    if value >= MiB:
        return f"{value:,} B ({value / MiB:,.0f} MiB)"
    return f"{value:,} B"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:,.0f} ms"


def fmt_answers(answers: dict[str, int]) -> str:
    return ", ".join(f"{n:,}x {code}" for code, n in sorted(answers.items(), key=lambda a: -a[1]))


def healthz(result: dict[str, Any]) -> str:
    window = result.get("healthz") or {}
    if window.get("probes") == 0:
        return "— (no probe in so short a phase)"
    return fmt_ms(window.get("max_ms"))


def rows(results: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(scenario, figure, before, now) rows of the scenarios that ran."""
    if "amplification" in results:
        made_up = results["amplification"]["made_up"]
        name = "a. write-batch, 1,000 made-up channels x 1,000 messages"
        req = fmt_bytes(made_up["request_bytes"])
        yield name, f"status ({req} request)", BEFORE_AMP_STATUS, str(made_up.get("code"))
        yield name, "answer bytes", BEFORE_AMP_ANSWER, fmt_bytes(made_up.get("answer_bytes"))
        yield name, "server RSS peak", BEFORE_AMP_RSS_PEAK, fmt_mib(made_up["rss_peak_mib"])
        yield name, "/healthz max latency", BEFORE_AMP_HEALTHZ, healthz(made_up)
        full = results["amplification"]["full"]
        name = "a. write-batch, 1,000 real full channels x 1,000 messages"
        req = fmt_bytes(full["request_bytes"])
        yield name, f"status ({req} request)", "201", str(full.get("code"))
        yield name, "answer bytes", BEFORE_FULL_ANSWER, fmt_bytes(full.get("answer_bytes"))
        yield name, "server RSS peak", "—", fmt_mib(full["rss_peak_mib"])
        six = full["six"]
        yield name, "six at once: answers", "6x 201", fmt_answers(six["statuses"])
        yield name, "six at once: RSS peak", "—", fmt_mib(six["rss_peak_mib"])
        yield (
            name,
            "six at once: RSS held afterwards",
            BEFORE_FULL_SIX_HELD,
            fmt_mib(six["rss_after_mib"]),
        )
        yield name, "/healthz max latency (six at once)", "—", healthz(six)
    if "flood" in results:
        f = results["flood"]
        first, second, expiry = f["first"], f["second"], f["expiry"]
        name = f"b. flood: {first['requests']:,} x POST /create, one client"
        yield name, "answers", f"{BEFORE_FLOOD_CREATED}x 200", fmt_answers(first["answers"])
        yield name, "time", BEFORE_FLOOD_SECONDS, f"{first['seconds']:.0f} s"
        yield name, "server RSS peak", BEFORE_FLOOD_RSS_PEAK, fmt_mib(first["rss_peak_mib"])
        per = first["kib_per_channel"]
        yield (
            name,
            "RSS per channel created",
            BEFORE_FLOOD_PER_CHANNEL,
            ("—" if per is None else f"{per:.2f} KiB"),
        )
        yield name, "longest GC pause", BEFORE_FLOOD_GC, fmt_ms(first["gc_longest_ms"])
        over = first["gc_over_50ms"]
        yield name, "GC pauses over 50 ms", "—", "—" if over is None else f"{over:,}"
        yield name, "/healthz max latency", BEFORE_FLOOD_HEALTHZ, healthz(first)
        expired = "all" if expiry["all_expired"] else "NOT all"
        after = f"{fmt_mib(expiry['rss_after_mib'])} ({expired} after {expiry['waited_s']:.0f} s)"
        yield name, "RSS once every channel expired", BEFORE_FLOOD_RSS_EXPIRED, after
        yield name, "/healthz max latency during the expiry sweeps", "—", healthz(expiry)
        yield name, "second flood: answers", "—", fmt_answers(second["answers"])
        grew = second["rss_peak_mib"] - first["rss_peak_mib"]
        verdict = "not above the first" if grew <= 0 else f"{grew:+.1f} MiB above the first"
        peak2 = f"{fmt_mib(second['rss_peak_mib'])} ({verdict})"
        yield name, "second flood: server RSS peak", "—", peak2
        yield (
            name,
            "second flood: longest GC pause (whole run)",
            "—",
            fmt_ms(second["gc_longest_ms"]),
        )
        yield name, "second flood: /healthz max latency", "—", healthz(second)
        third = f.get("third")
        if third is not None:
            grew = third["rss_peak_mib"] - second["rss_peak_mib"]
            verdict = "not above the second" if grew <= 0 else f"{grew:+.1f} MiB above the second"
            yield (
                name,
                "third flood: server RSS peak",
                "—",
                f"{fmt_mib(third['rss_peak_mib'])} ({verdict})",
            )
    if "gc" in results:
        g = results["gc"]
        name = f"b2. {g['created']:,} live channels (max_channels raised to that)"
        yield name, "answers", "—", fmt_answers(g["answers"])
        yield name, "server RSS peak", "—", fmt_mib(g["rss_peak_mib"])
        yield name, "longest GC pause, creating them", BEFORE_FLOOD_GC, fmt_ms(g["gc_longest_ms"])
        over = g["gc_over_50ms"]
        yield name, "GC pauses over 50 ms", "—", "—" if over is None else f"{over:,}"
        yield name, "/healthz max latency, creating them", "—", healthz(g)
        idle = g["idle"]
        yield name, "longest GC pause, whole run", "—", fmt_ms(idle["gc_longest_ms"])
        yield name, "/healthz max latency, 5 s idle after", "—", healthz(idle)
    if "big" in results:
        b = results["big"]
        name = f"c. {b['writes']:,} writes of {b['body_bytes']:,} B (1 MiB) into 10 channels"
        yield name, "answers", f"{b['writes']:,}x 201", fmt_answers(b["answers"])
        yield (
            name,
            "server RSS growth (peak)",
            BEFORE_BIG_GROWTH,
            f"+{fmt_mib(b['rss_growth_mib'])}",
        )
        yield name, "time", "2 s", f"{b['seconds']:.0f} s"
        yield name, "/healthz max latency", "—", healthz(b)
    if "pipeline" in results:
        p = results["pipeline"]
        name = (
            f"d. {p['connections']} connections x {p['writes_per_connection']} pipelined "
            "1 MiB writes behind a read"
        )
        yield (
            name,
            "server RSS growth (peak)",
            BEFORE_PIPELINE_GROWTH,
            (f"+{fmt_mib(p['rss_growth_mib'])}"),
        )
        yield (
            name,
            "MiB the server took in (of offered)",
            "—",
            (f"{p['mib_sent']:,.0f} of {p['mib_offered']:,}"),
        )
        yield name, "answers", "—", fmt_answers(p["answers"])
        yield name, "/healthz max latency", "—", healthz(p)
    if "slow" in results:
        for case, r in results["slow"].items():
            name = f"e. slow reader, {case}"
            yield (
                name,
                "events lost (acknowledged, never received)",
                BEFORE_SLOW_LOST.get(case, "—"),
                f"{r['lost']:,} / {r['acknowledged']:,}"
                + (" (timed out)" if r["timed_out"] else ""),
            )
            yield (
                name,
                "reads / resets / ended by the server",
                "—",
                (
                    f"{r.get('reads', 0):,} / {r.get('resets', 0):,} / "
                    f"{r.get('reads ended by the server', 0):,}"
                ),
            )
            unknown = r.get("resume: unknown-cursor", 0)
            yield (
                name,
                "unknown-cursor answers / duplicates",
                "—",
                (f"{unknown:,} / {r['duplicates']:,}"),
            )
            yield name, "time", "—", f"{r['seconds']:.0f} s"


def table(results: dict[str, Any], compare: dict[str, Any] | None = None) -> str:
    """The markdown table; with ``compare`` (another run's JSON report), its figures in a column
    beside the issue's."""
    head = "| scenario | figure | before (main, issue #9) |"
    rule = "|---|---|---|"
    theirs: dict[tuple[str, str], str] = {}
    if compare is not None:
        theirs = {(a, b): d for a, b, _, d in rows(compare["results"])}
        head += f" re-measured: {compare['megaphone_source']} |"
        rule += "---|"
    lines = [head + " now |", rule + "---|"]
    for a, b, c, d in rows(results):
        other = f" {theirs.get((a, b), '—')} |" if compare is not None else ""
        lines.append(f"| {a} | {b} | {c} |{other} {d} |")
    return "\n".join(lines)


def server_source() -> str:
    """Which megaphone the servers run: this checkout's (its git state), or the one a
    ``PYTHONPATH`` puts first (its path)."""
    where = subprocess.run(
        [sys.executable, "-c", "import megaphone; print(megaphone.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=targets.clean_env(),
    ).stdout.strip()
    here = targets.BENCH.parent / "src"
    if Path(where).resolve().is_relative_to(here.resolve()):
        return targets.git_state()
    return f"{Path(where).parent.parent} (not this checkout)"


# --- command line ---------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[bool], Awaitable[dict[str, Any]]]] = {
    "amplification": amplification,
    "flood": flood,
    "gc": gc_million,
    "big": big_events,
    "pipeline": pipelined,
    "slow": slow_reader,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="counts ÷ 10 (flood, big events, pipeline, slow)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (all)",
    )
    parser.add_argument("--output", type=Path, default=targets.RESULTS / "limits.json")
    parser.add_argument(
        "--reprint",
        type=Path,
        default=None,
        help="print the table of a saved run (its JSON) instead of running anything",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another run's JSON (e.g. of an older checkout, run with PYTHONPATH=<it>/src): "
        "its figures in a column of their own",
    )
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


async def run_all(scenarios: list[str], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        if name in scenarios:
            print(f"limits: {name}", file=sys.stderr)
            results[name] = await RUNNERS[name](quick)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compare = json.loads(args.compare.read_text()) if args.compare else None
    if args.reprint is not None:
        report(json.loads(args.reprint.read_text()), compare, args.reprint)
        return 0
    targets.raise_nofile()
    if targets.pinned(targets.LOADGEN_CPU):
        os.sched_setaffinity(0, {targets.LOADGEN_CPU})
    else:
        print("warning: no CPU pinning (needs taskset and 2+ CPUs)", file=sys.stderr)
    started = dt.datetime.now(dt.UTC)
    source = server_source()
    results = uvloop.run(run_all(args.scenarios, args.quick))
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    saved = {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "megaphone_source": source,
        "quick": args.quick,
        "machine": f"nproc {os.cpu_count()} · {targets.cpu_model()}",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(saved, indent=2) + "\n")
    report(saved, compare, args.output)
    return 0


def report(saved: dict[str, Any], compare: dict[str, Any] | None, path: Path) -> None:
    """The run's header line, its table and the server's problems, on stdout."""
    print(
        f"\n{saved['started']} · limits{' --quick (counts ÷ 10)' if saved['quick'] else ''} · "
        f"{saved.get('machine', '')} · server on CPU {targets.SERVER_CPU}, attacker on CPU "
        f"{targets.LOADGEN_CPU} · default settings · run took {saved['elapsed_s']:.0f} s · "
        f"megaphone {saved['megaphone_source']}\n"
    )
    print(table(saved["results"], compare))
    problems = [
        p
        for r in flatten(saved["results"])
        for p in r.get("problems", [])
        if not run_stop_log_line(p)
    ]
    if problems:
        print("\nServer problems (log lines at WARNING and above, exits):")
        for line in problems:
            print(f"- {line}")
    print(f"\nfull results: {path}")


def flatten(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every result dict, nested ones included."""
    for value in results.values():
        if isinstance(value, dict):
            yield value
            yield from flatten(value)


if __name__ == "__main__":
    sys.exit(main())
