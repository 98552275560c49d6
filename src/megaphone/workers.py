"""``workers = N`` (issue #14): N processes serve one public port, under a supervisor.

The supervisor is the ``megaphone`` process itself when ``workers`` > 1 (Redis store only: the
memory store keeps channels in one process). It *reserves* the port: a socket bound with
``SO_REUSEPORT`` that never listens, so the kernel hands it no connection, ``127.0.0.1:0`` learns
its real port, and the port stays held while a worker restarts. It then starts the workers with
``multiprocessing``'s *spawn* (a fresh interpreter each, nothing inherited but the settings), each a
normal :class:`~megaphone.server.MegaphoneServer` listening on that port with ``SO_REUSEPORT``: the
kernel spreads new connections over them. On Redis any worker serves any channel, as any node does.

- **Start**: each worker answers "ready" or its one-line error through a pipe. The first error
  stops the others and ``megaphone`` exits 2 with it (``megaphone: cannot start: ...``); once all
  are ready the supervisor logs "megaphone listening" once, with the address and ``workers``.
- **Crash**: a worker that dies after that is started again (a WARNING), after a back-off that
  doubles while it keeps dying young (:data:`RESTART_MIN` to :data:`RESTART_MAX`), so a crash loop
  does not spin.
- **SIGTERM / SIGINT**: SIGTERM to every worker, each shuts down gracefully as one node does
  (``shutdown_grace_millis``); a worker still running :data:`KILL_MARGIN` s after that is killed;
  exit 0. A worker dies with the supervisor (``PR_SET_PDEATHSIG``), even a SIGKILLed one.
- **Management API**: only worker 0 opens ``mng_socket_path``.
- **Metrics**: each worker listens on a private Unix socket, ``<i>.sock`` in a directory the
  supervisor makes (mode 0700, removed on exit); a connection gets the worker's
  :meth:`~megaphone.metrics.Metrics.snapshot`, pickled (only this user can reach the directory),
  and is closed. The worker that answers ``/metrics`` gathers its siblings' figures (at most
  :data:`SIBLING_TIMEOUT` s; one that does not answer is left out and counted in
  ``megaphone_workers_unreachable``) and renders them all, each sample labelled ``worker="i"``.

Log lines of a worker carry ``worker=i`` (:func:`megaphone.logs.setup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from megaphone import logs
from megaphone.config import Settings, hide_password
from megaphone.errors import MegaphoneError, StoreUnavailable
from megaphone.metrics import Metrics, Snapshot, render_workers
from megaphone.server import MegaphoneServer, run, serve_until

log = logging.getLogger("megaphone.workers")

RESTART_MIN = 0.25  # seconds before restarting a worker that died
RESTART_MAX = 10.0  # the back-off's ceiling while a worker keeps dying young
STABLE_SECONDS = 10.0  # a worker that ran this long is restarted after RESTART_MIN again
KILL_MARGIN = 5.0  # seconds past shutdown_grace_millis before a worker is killed
SIBLING_TIMEOUT = 1.0  # seconds a scrape waits for a sibling's figures
PR_SET_PDEATHSIG = 1


class StartFailed(Exception):
    """A worker could not start: the message is its one line."""


def start_error(exc: BaseException, settings: Settings) -> str:
    """The one line that says why a start failed (after ``megaphone: cannot start: ``)."""
    line = str(exc)
    if isinstance(exc, StoreUnavailable):
        line += f" (redis_url {hide_password(settings.redis_url)!r})"
    return line


# --- a worker -------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux), so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl
        sys.exit(0)


def _worker_main(
    settings: Settings,
    index: int,
    count: int,
    port: int,
    directory: str,
    parent: int,
    ready: Connection,
) -> None:
    """A worker process's entry point (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which sends TERM
    _die_with_parent(parent)
    logs.setup(settings.log_level, worker=index)
    sys.exit(run(_worker(settings, index, count, port, directory, ready)))


async def _worker(
    settings: Settings, index: int, count: int, port: int, directory: str, ready: Connection
) -> int:
    if index != 0:  # the management API is worker 0's
        settings = settings.model_copy(update={"mng_socket_path": ""})
    server = MegaphoneServer(settings, port=port, reuse_port=True, listening="worker listening")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server.metrics.cluster = lambda: _gather(server.metrics, index, count, directory)
    try:
        figures = await _serve_figures(server.metrics, _socket_path(directory, index))
        await server.start()
    except (MegaphoneError, OSError, ValueError) as exc:  # what a start-up refuses, one line
        ready.send(("error", start_error(exc, settings)))
        return 2
    except BaseException as exc:
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    ready.send(("ready", server.port))
    ready.close()
    try:
        await serve_until(server, stop)
    finally:
        figures.close()
    return 0


def _socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"{index}.sock")


async def _serve_figures(metrics: Metrics, path: str) -> asyncio.Server:
    """Answer every connection to ``path`` with this worker's figures, pickled, then close."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(MegaphoneError):  # the channel count may be stale
                await metrics.refresh()
            writer.write(pickle.dumps(metrics.snapshot()))
            await writer.drain()
        except OSError:
            pass  # the asking sibling gave up
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a previous run of this worker's
    return await asyncio.start_unix_server(answer, path)


async def _ask(path: str) -> Snapshot | None:
    """A sibling's figures, or None when it does not answer in time."""
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                data = await reader.read()
            finally:
                writer.close()
        snapshot: Snapshot = pickle.loads(data)
    except (OSError, TimeoutError, EOFError, pickle.UnpicklingError) as exc:
        log.debug("a sibling's figures are missing", extra={"path": path, "error": repr(exc)})
        return None
    return snapshot


async def _gather(metrics: Metrics, index: int, count: int, directory: str) -> bytes:
    """Every worker's figures, for ``/metrics`` (this worker's are already refreshed)."""
    others = [i for i in range(count) if i != index]
    answers = await asyncio.gather(*(_ask(_socket_path(directory, i)) for i in others))
    snapshots = {index: metrics.snapshot()}
    snapshots.update({i: answer for i, answer in zip(others, answers, strict=True) if answer})
    return render_workers(snapshots, unreachable=count - len(snapshots))


# --- the supervisor -------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker's place: its current process and how it has been faring."""

    index: int
    process: BaseProcess | None = None
    pipe: Connection | None = None  # until the process said "ready" (or failed)
    started: float = 0.0
    failures: int = 0  # deaths in a row, each before STABLE_SECONDS
    restart_at: float | None = None


class Supervisor:
    """Runs ``settings.worker_count`` workers on one port until SIGTERM/SIGINT (:meth:`run`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.worker_count
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(self.count)]
        self.port = 0
        self.directory = ""
        self._wakeup, self._wakeup_writer = socket.socketpair()
        self._stopping = False

    def run(self) -> None:
        """Start the workers, supervise them until a signal, stop them. Raises
        :class:`StartFailed` (the workers already stopped) when one cannot start, ``OSError``
        when the port cannot be reserved."""
        host, port = self.settings.host_port
        reserved = self._reserve(host, port)
        self.directory = tempfile.mkdtemp(prefix="megaphone-workers-")
        previous = self._catch_signals()
        try:
            for slot in self.slots:
                self._spawn(slot)
            failure = self._wait_ready()
            if failure is not None:
                self._stop()
                raise StartFailed(failure)
            if not self._stopping:
                log.info(
                    "megaphone listening",
                    extra={
                        "address": f"{host}:{self.port}",
                        "workers": self.count,
                        "agents": ",".join(self.settings.agents),
                    },
                )
                self._supervise()
            log.info("shutting down")
            started = time.monotonic()
            self._stop()
            log.info("shutdown finished", extra={"seconds": round(time.monotonic() - started, 3)})
        finally:
            for slot in self.slots:  # only after an unexpected error
                if slot.process is not None and slot.process.is_alive():
                    slot.process.kill()
            self._release_signals(previous)
            reserved.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _reserve(self, host: str, port: int) -> socket.socket:
        """Bind (no listen) the public address with SO_REUSEPORT: the port is the group's."""
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio's listeners
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    def _catch_signals(self) -> tuple[int, list[Any]]:
        """SIGTERM/SIGINT wake :func:`wait` through the wakeup socket (their number in it)."""

        def note(signum: int, frame: FrameType | None) -> None:
            self._stopping = True

        self._wakeup.setblocking(False)
        self._wakeup_writer.setblocking(False)
        fd = signal.set_wakeup_fd(self._wakeup_writer.fileno())
        handlers = [signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)]
        return fd, handlers

    def _release_signals(self, previous: tuple[int, list[Any]]) -> None:
        fd, handlers = previous
        for sig, handler in zip((signal.SIGTERM, signal.SIGINT), handlers, strict=True):
            signal.signal(sig, handler)
        signal.set_wakeup_fd(fd)
        self._wakeup.close()
        self._wakeup_writer.close()

    def _spawn(self, slot: _Slot) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            args=(
                self.settings,
                slot.index,
                self.count,
                self.port,
                self.directory,
                os.getpid(),
                writer,
            ),
            name=f"megaphone-worker-{slot.index}",
            daemon=True,
        )
        process.start()
        writer.close()
        slot.process, slot.pipe, slot.started, slot.restart_at = (
            process,
            reader,
            time.monotonic(),
            None,
        )

    def _message(self, slot: _Slot) -> tuple[str, object] | None:
        """The worker's word on its start ("ready" or "error"), or None if it died silent."""
        assert slot.pipe is not None
        message: tuple[str, object] | None
        try:
            message = slot.pipe.recv() if slot.pipe.poll() else None
        except (EOFError, OSError):
            message = None
        if message is not None or slot.process is None or not slot.process.is_alive():
            slot.pipe.close()
            slot.pipe = None
        return message

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wakeup.recv(64):
                pass

    def _wait_ready(self) -> str | None:
        """Until every worker is ready (None), one fails (its line) or a signal comes (None)."""
        while any(slot.pipe is not None for slot in self.slots):
            waiting = [slot for slot in self.slots if slot.pipe is not None]
            objects: list[object] = [self._wakeup]
            for slot in waiting:
                assert slot.process is not None
                objects += [slot.pipe, slot.process.sentinel]
            wait(objects)  # type: ignore[arg-type]
            self._drain_wakeup()
            if self._stopping:
                return None
            for slot in waiting:
                assert slot.process is not None
                if slot.pipe is None or not (slot.pipe.poll() or not slot.process.is_alive()):
                    continue
                message = self._message(slot)
                if message is None:
                    slot.process.join()
                    return (
                        f"worker {slot.index} exited with code {slot.process.exitcode} "
                        "while starting"
                    )
                kind, value = message
                if kind == "error":
                    return str(value)
                slot.pipe = None  # ready
        return None

    def _supervise(self) -> None:
        """Restart the workers that die, until a signal."""
        while not self._stopping:
            now = time.monotonic()
            due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            objects: list[object] = [self._wakeup]
            for slot in self.slots:
                if slot.process is not None:
                    objects.append(slot.process.sentinel)
                if slot.pipe is not None:
                    objects.append(slot.pipe)
            wait(objects, timeout)  # type: ignore[arg-type]
            self._drain_wakeup()
            if self._stopping:
                return
            now = time.monotonic()
            for slot in self.slots:
                self._check(slot, now)

    def _check(self, slot: _Slot, now: float) -> None:
        """Act on what happened to one worker: a word on its restart, its death, its turn."""
        process = slot.process
        if slot.pipe is not None and (
            slot.pipe.poll() or process is None or not process.is_alive()
        ):
            message = self._message(slot)
            if message is not None and message[0] == "error":
                log.warning(
                    "worker cannot start", extra={"worker": slot.index, "error": message[1]}
                )
            elif message is not None:
                log.info("worker restarted", extra={"worker": slot.index})
        if process is not None and not process.is_alive():
            process.join()
            if now - slot.started >= STABLE_SECONDS:
                slot.failures = 0
            delay = min(RESTART_MAX, RESTART_MIN * 2**slot.failures)
            slot.failures += 1
            log.warning(
                "worker exited",
                extra={"worker": slot.index, "code": process.exitcode, "restart_in": delay},
            )
            if slot.pipe is not None:
                slot.pipe.close()
            slot.process, slot.pipe, slot.restart_at = None, None, now + delay
        if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
            self._spawn(slot)

    def _stop(self) -> None:
        """SIGTERM every worker; kill those still running after the grace and a margin."""
        live = [slot.process for slot in self.slots if slot.process is not None]
        for process in live:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + self.settings.shutdown_grace_millis / 1000 + KILL_MARGIN
        for slot in self.slots:
            straggler = slot.process
            if straggler is None:
                continue
            straggler.join(max(0.0, deadline - time.monotonic()))
            if straggler.is_alive():
                log.warning("worker killed after the grace period", extra={"worker": slot.index})
                straggler.kill()
                straggler.join()
            if slot.pipe is not None:
                slot.pipe.close()
                slot.pipe = None
