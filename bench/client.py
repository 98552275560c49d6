"""What the Python client costs on top of the wire (issue #10's benchmark).

One megaphone node (default settings, memory store, pinned to CPU 0); this process (pinned to
CPU 1) drives it three ways in the same run, ``--duration`` seconds a phase, the three phases of
each figure one after the other, ``--repeat`` times (the table gives the medians):

* **writes/s**: ``--concurrency`` closed-loop writers into 100 channels (each read by a raw
  reader, so no write waits for room), through one ``AsyncMegaphone`` (tasks sharing its
  connection pool): on its own HTTP/1.1 pool (h11), then on httpx (``transport=``, what the client
  was built on first); then through the raw load generator (``loadgen.closed_loop``: hand-made
  requests on as many keep-alive connections);
* **events/s one reader sustains**: the raw load generator writes into one channel as fast as it
  is answered, and one reader follows it: ``AsyncMegaphone.read`` (reconnects, resume,
  de-duplication, JSON decoding of every event) on its own pool, then on httpx, then the raw
  ``loadgen.StreamReader`` (dechunking and line splitting only).

The ratios (client ÷ raw) say what the client's convenience costs on this machine. They depend
on how the one core is shared between the client and the raw generator beside it; ``--cpu`` also
measures what the client alone costs: microseconds of this process's CPU per write and per event
read, own pool and httpx, while the raw generator (the readers of the written channels, the writer
of the read one) runs in another process, pinned beside the server.

    python3 bench/client.py [--duration 5] [--concurrency 8] [--repeat 3] [--cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import limits
import loadgen
import targets
from megaphone.client import AsyncMegaphone

HOST = limits.HOST
WAYS = ("own", "httpx")  # the client's own pool, then httpx under the same client


def client(url: str, way: str) -> AsyncMegaphone:
    if way == "own":
        return AsyncMegaphone(url)
    pool = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    return AsyncMegaphone(url, transport=httpx.AsyncHTTPTransport(limits=pool))


def write_request(producer: str, seq: int) -> bytes:
    return limits.request_bytes("POST", f"/write/{producer}/s", b'{"seq":%d}' % seq)


async def client_writes(
    url: str, way: str, producers: list[str], concurrency: int, seconds: float
) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with client(url, way) as mp:

        async def writer(number: int) -> None:
            nonlocal done
            seq = number
            while time.monotonic() < stop:
                await mp.write(producers[seq % len(producers)], "s", {"seq": seq})
                done += 1
                seq += concurrency

        started = time.monotonic()
        await asyncio.gather(*(writer(n) for n in range(concurrency)))
        return done / (time.monotonic() - started)


async def follow(url: str, way: str, consumer: str, seconds: float) -> int:
    """Events one client reader takes in ``seconds``."""
    received = 0
    stop = time.monotonic() + seconds
    async with client(url, way) as mp:
        reading = mp.read(consumer)
        try:
            async for _ in reading:
                received += 1
                if time.monotonic() >= stop:
                    break
        finally:
            await reading.aclose()
    return received


def helper(*args: str) -> subprocess.Popen[bytes]:
    """This script in another process beside the server (``--drain`` or ``--flood``)."""
    command = [*targets.pinned(targets.SERVER_CPU), sys.executable, __file__, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE)


async def cpu_per_op(url: str, port: int, way: str, concurrency: int, seconds: float) -> Any:
    """Microseconds of this process's CPU per write and per event read, the raw load generator
    (readers of the written channels, the writer of the read one) in another process."""
    channels = await limits.create_channels(port, 101)
    producers = [limits.producer_of(c) for c in channels[:100]]
    drain = helper(
        "--drain", str(port), str(seconds + 2), *(c["consumerAddress"] for c in channels)
    )
    assert drain.stdout is not None
    await asyncio.to_thread(drain.stdout.readline)  # its readers are attached
    started = time.process_time()
    rate = await client_writes(url, way, producers, concurrency, seconds)
    per_write = (time.process_time() - started) / (rate * seconds) * 1e6
    drain.terminate()
    drain.wait()
    read = channels[100]
    flood = helper("--flood", str(port), str(seconds + 1), limits.producer_of(read))
    started = time.process_time()
    received = await follow(url, way, read["consumerAddress"], seconds)
    per_event = (time.process_time() - started) / max(received, 1) * 1e6
    flood.terminate()
    flood.wait()
    return per_write, per_event


async def drain_forever(port: int, seconds: float, consumers: list[str]) -> None:
    paths = [f"/read/{c}".encode() for c in consumers]
    readers = await loadgen.open_readers(
        HOST, port, paths, lambda r, lines, t: None, len(paths), read_again=True
    )
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    loadgen.close_all(readers)


async def raw_writes(port: int, producers: list[str], concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    seq = 0

    def source() -> loadgen.Request | None:
        nonlocal seq
        if time.monotonic() >= stop:
            return None
        seq += 1
        return write_request(producers[seq % len(producers)], seq), seq

    def sink(status: int, tag: int, body: bytes, rtt: float) -> None:
        nonlocal done
        done += status == 201

    started = time.monotonic()
    await loadgen.closed_loop(HOST, port, concurrency, source, sink)
    return done / (time.monotonic() - started)


async def one_reader(
    url: str, port: int, channel: dict[str, Any], seconds: float, way: str
) -> float:
    """Events/s one reader takes while the raw load generator writes as fast as it can."""
    producer, consumer = limits.producer_of(channel), channel["consumerAddress"]
    received = 0
    stop = time.monotonic() + seconds
    writing = asyncio.ensure_future(raw_writes(port, [producer], 8, seconds))
    started = time.monotonic()
    if way == "raw":

        def on_lines(reader: loadgen.StreamReader, lines: list[bytes], t: float) -> None:
            nonlocal received
            received += len(lines)

        (reader,) = await loadgen.open_readers(
            HOST, port, [f"/read/{consumer}".encode()], on_lines, 1, read_again=True
        )
        await asyncio.sleep(max(0.0, stop - time.monotonic()))
        loadgen.close_all([reader])
    else:
        received = await follow(url, way, consumer, seconds)
    elapsed = time.monotonic() - started
    await writing
    return received / elapsed


async def measure(duration: float, concurrency: int, repeat: int, cpu: bool) -> dict[str, Any]:
    """Each figure's phases in turn (own pool, httpx, raw), ``repeat`` times: the medians."""
    runs: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    with limits.fresh_node() as (node, problems):
        url = f"http://{HOST}:{node.port}"
        channels = await limits.create_channels(node.port, 100)
        producers = [limits.producer_of(c) for c in channels]
        # every written channel has a (raw) reader, so writes never wait for room
        paths = [f"/read/{c['consumerAddress']}".encode() for c in channels]
        readers = await loadgen.open_readers(
            HOST, node.port, paths, lambda r, lines, t: None, 100, read_again=True
        )
        for _ in range(repeat):
            for way in WAYS:
                note(
                    f"{way}_writes", await client_writes(url, way, producers, concurrency, duration)
                )
            note("raw_writes", await raw_writes(node.port, producers, concurrency, duration))
        loadgen.close_all(readers)
        for _ in range(repeat):
            for way in (*WAYS, "raw"):
                (channel,) = await limits.create_channels(node.port, 1)
                note(f"{way}_reader", await one_reader(url, node.port, channel, duration, way))
        for _ in range(repeat if cpu else 0):
            for way in WAYS:
                per_write, per_event = await cpu_per_op(url, node.port, way, concurrency, duration)
                note(f"{way}_cpu_write", per_write)
                note(f"{way}_cpu_event", per_event)
    out: dict[str, Any] = {name: statistics.median(values) for name, values in runs.items()}
    out["runs"] = runs
    out["problems"] = problems
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the phases N times")
    parser.add_argument(
        "--cpu", action="store_true", help="also the client's CPU per write and per event"
    )
    parser.add_argument("--drain", nargs="+", help=argparse.SUPPRESS)  # PORT SECONDS CONSUMER...
    parser.add_argument("--flood", nargs=3, help=argparse.SUPPRESS)  # PORT SECONDS PRODUCER
    args = parser.parse_args()
    targets.raise_nofile()
    if args.drain:  # a helper of --cpu, pinned beside the server
        port, seconds, *consumers = args.drain
        asyncio.run(drain_forever(int(port), float(seconds), consumers))
        return 0
    if args.flood:
        port, seconds, producer = args.flood
        asyncio.run(raw_writes(int(port), [producer], 8, float(seconds)))
        return 0
    if targets.pinned(targets.LOADGEN_CPU):
        os.sched_setaffinity(0, {targets.LOADGEN_CPU})
    out = asyncio.run(measure(args.duration, args.concurrency, args.repeat, args.cpu))
    print("| figure | own pool | httpx | raw load generator | own ÷ raw | httpx ÷ raw |")
    print("|---|---|---|---|---|---|")
    figures = {
        "writes": f"writes/s, {args.concurrency} writers, one client",
        "reader": "events/s one reader takes",
    }
    for key, label in figures.items():
        own, via, raw = (out[f"{way}_{key}"] for way in (*WAYS, "raw"))
        ratios = f"{own / raw:.2f} | {via / raw:.2f}"
        print(f"| {label} | {own:,.0f} | {via:,.0f} | {raw:,.0f} | {ratios} |")
    if args.cpu:
        own_w, via_w = out["own_cpu_write"], out["httpx_cpu_write"]
        own_e, via_e = out["own_cpu_event"], out["httpx_cpu_event"]
        print(f"| µs of client CPU per write | {own_w:.0f} | {via_w:.0f} | | | |")
        print(f"| µs of client CPU per event read | {own_e:.1f} | {via_e:.1f} | | | |")
    if args.repeat > 1:
        for name, values in out["runs"].items():
            print(f"- {name}: " + ", ".join(f"{v:,.0f}" for v in values))
    for problem in out["problems"]:
        print(f"- {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
