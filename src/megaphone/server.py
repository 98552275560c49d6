"""Wiring: settings → agents, store, broker, webhooks, the public HTTP server; start and stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack, suppress
from typing import Any, TypeVar

from megaphone.config import Settings
from megaphone.core.agents import Agent, AgentRegistry
from megaphone.core.broker import Broker
from megaphone.core.transports import Transport
from megaphone.errors import ShuttingDown
from megaphone.gcpolicy import GcPolicy
from megaphone.http.app import Api
from megaphone.http.connection import HttpLimits, HttpProtocol, HttpServerState
from megaphone.http.state import ReadOptions
from megaphone.metrics import Metrics
from megaphone.mgmt import listener
from megaphone.mgmt.api import MgmtApi
from megaphone.store.base import ChannelStore
from megaphone.store.memory import MemoryStore
from megaphone.webhooks import WebhookNotifier

log = logging.getLogger("megaphone.server")
T = TypeVar("T")


def build_store(settings: Settings, metrics: Metrics) -> ChannelStore:
    """The channel store the settings ask for; an engine's library is imported only when used."""
    if settings.store == "redis":
        from megaphone.store.redis import RedisStore

        return RedisStore(
            url=settings.redis_url,
            metrics=metrics,
            prefix=settings.redis_prefix,
            capacity=settings.channel_buffer_size,
            capacity_bytes=settings.channel_buffer_bytes,
            replay_size=settings.replay_window_size,
            replay_bytes=settings.replay_window_bytes,
            ttl=settings.channel_ttl_millis / 1000,
            # renewed at every poll tick: a crashed node's reads lapse after this, not a window
            lease=(settings.redis_poll_millis + settings.redis_lease_margin_millis) / 1000,
            poll=settings.redis_poll_millis / 1000,
            timeout=settings.redis_timeout_millis / 1000,
        )
    return MemoryStore(
        metrics=metrics,
        capacity=settings.channel_buffer_size,
        capacity_bytes=settings.channel_buffer_bytes,
        replay_size=settings.replay_window_size,
        replay_bytes=settings.replay_window_bytes,
        budget_bytes=settings.max_pending_bytes,
        ttl=settings.channel_ttl_millis / 1000,
    )


def read_options(settings: Settings) -> ReadOptions:
    poll = settings.poll_duration_millis / 1000
    return ReadOptions(
        windows={
            Transport.NDJSON: poll,
            Transport.LONG_POLL: poll,
            Transport.SSE: settings.sse_window_millis / 1000,
            Transport.WEBSOCKET: settings.websocket_window_millis / 1000,
        },
        heartbeat=settings.heartbeat_millis / 1000,
        sse_retry_millis=settings.sse_retry_millis,
    )


class MegaphoneServer:
    """One broker node. ``await start()``, then ``await aclose()``; closing twice is harmless."""

    def __init__(
        self,
        settings: Settings,
        *,
        port: int | None = None,
        reuse_port: bool = False,
        listening: str = "megaphone listening",
    ) -> None:
        """``port`` replaces the port of ``settings.address``; ``reuse_port`` listens with
        ``SO_REUSEPORT`` beside other processes (a worker, see :mod:`megaphone.workers`), which
        log ``listening`` instead of "megaphone listening" (the supervisor says that once)."""
        self.settings = settings
        self._port = port
        self._reuse_port = reuse_port
        self._listening = listening
        self.metrics = Metrics()
        self.registry = AgentRegistry()
        self.store = build_store(settings, self.metrics)
        self.webhooks = WebhookNotifier(settings.webhooks, settings.webhook_timeout_millis / 1000)
        self.broker = Broker(
            settings, self.store, self.registry, self.metrics, self.webhooks.channels_deleted
        )
        self.http = HttpServerState(
            Api(
                self.broker,
                self.metrics,
                producer_token=(
                    settings.producer_token.get_secret_value() if settings.producer_token else None
                ),
                cors_origins=settings.cors_allowed_origins,
            ),
            HttpLimits(
                max_url=settings.max_url_bytes,
                max_headers=settings.max_header_bytes,
                max_body=settings.max_body_bytes,
                request_timeout=settings.request_timeout_millis / 1000,
                keepalive_timeout=settings.keepalive_timeout_millis / 1000,
                max_connections=settings.max_connections,
                max_pipeline_bytes=settings.max_pipeline_bytes,
                max_buffered=settings.max_buffered_request_bytes,
            ),
            read_options(settings),
            inline=self.store.runs_inline,
            metrics=self.metrics,
        )
        # the management API: the same connection layer and limits, its own router and state
        self.mgmt = HttpServerState(
            MgmtApi(self.broker, warmup_secs=settings.agent_warmup_secs, on_added=self._announce),
            self.http.limits,
            read_options(settings),
            inline=self.store.runs_inline,
            metrics=self.metrics,
        )
        self.mgmt_path: str | None = None  # the socket file, once bound
        self._ready_timers: list[asyncio.TimerHandle] = []  # "agent ready" after a warm-up
        self._mgmt_server: asyncio.Server | None = None
        self.gc_policy = GcPolicy(settings.gc_freeze_interval_millis / 1000)
        self._gauges()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.port = 0

    def _gauges(self) -> None:
        """The gauges: what each budget of issue #9 holds, and what the node serves (issue #12),
        read on scrape."""
        http, gauge = self.http, self.metrics.gauge
        if isinstance(self.store, MemoryStore):
            memory = self.store
            budget = memory.budget
            gauge(
                "pending_bytes",
                "Bytes of pending and unconfirmed events held (budget: max_pending_bytes)",
                lambda: budget.used,
            )
            gauge(
                "pending_events",
                "Events written and not yet sent, on this node (memory store)",
                lambda: memory.backlog()[0],
            )
            gauge(
                "blocked_writers",
                "Writes waiting for room in a full channel, on this node (memory store)",
                lambda: memory.backlog()[1],
            )
        channels = [0]

        async def count_channels() -> None:
            channels[0] = await self.store.count()

        self.metrics.refreshers.append(count_channels)
        gauge(
            "channels",
            "Channels (memory store: on this node; Redis store: in the whole cluster)",
            lambda: channels[0],
        )
        self.metrics.gauges(
            "attached_readers",
            "Reads attached on this node, by transport",
            ["transport"],
            lambda: self.readers_by_transport(),
        )
        gauge(
            "buffered_io_bytes",
            "Request bodies and answers held for slow clients, in bytes "
            "(budget: max_buffered_request_bytes)",
            lambda: http.buffered_request_bytes + http.held_output_bytes,
        )
        gauge(
            "open_connections",
            "Connections served (budget: max_connections)",
            lambda: len(http.connections),
        )
        gauge(
            "refused_connections",
            "Connections refused at max_connections since the start",
            lambda: http.refused_connections,
        )
        gauge(
            "gc_frozen_objects",
            "Objects frozen out of the garbage collector's full collections",
            gc.get_freeze_count,
        )

    def _announce(self, agent: Agent) -> None:
        """Log "agent ready" when a warming-up agent starts hosting new channels."""
        if agent.warmup_secs <= 0:
            return
        loop = asyncio.get_running_loop()
        self._ready_timers.append(
            loop.call_later(
                agent.warmup_secs,
                lambda: log.info("agent ready", extra={"agent": agent.name, "mode": agent.mode}),
            )
        )

    def readers_by_transport(self) -> dict[str, float]:
        counts = dict.fromkeys((t.label for t in Transport), 0.0)
        for connection in self.http.connections:
            stream = connection.stream
            if stream is not None and stream.subscription is not None:
                counts[stream.transport.label] += 1
        return counts

    async def start(self) -> None:
        """Start, or fail having closed what was opened (the store's connections, the
        listeners): a half-started node leaks nothing."""
        if self._closed:
            raise RuntimeError("server is closed")
        try:
            await self._start()
        except BaseException:
            await self.aclose(grace=0)
            raise

    async def _start(self) -> None:
        settings = self.settings
        shared = await self.store.agent_keys(list(settings.agents))
        for name, mode in settings.agents.items():
            key = shared[name] if shared is not None else None
            self.registry.add(name, mode, settings.agent_warmup_secs, key=key)
        for agent in self.registry.agents.values():
            self._announce(agent)
        if shared is not None:  # any node serves any agent whose key the store shares
            self.registry.lookup = self.store.agent_key
            self.store.on_agent_key(self.registry.replace_key)
        await self.store.start()
        host, port = self.settings.host_port
        if self._port is not None:
            port = self._port
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self.http),
            host,
            port,
            backlog=4096,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        await self._start_mgmt()
        self._sweeper = loop.create_task(self.broker.run_sweeper())
        self.metrics.watch_gc()
        self.gc_policy.start()
        log.info(
            self._listening,
            extra={"address": f"{host}:{self.port}", "agents": ",".join(self.settings.agents)},
        )

    async def _start_mgmt(self) -> None:
        """Listen on ``mng_socket_path`` ("" turns it off). A path set explicitly must work, or
        the start fails with one clear line; the built-in default (``/run/megaphone.sock``) is
        skipped with a warning when it cannot be used (a non-root user, a second node), so that
        ``megaphone`` alone always starts."""
        path = self.settings.mng_socket_path
        if not path:
            return
        try:
            self._mgmt_server = await listener.listen(path, lambda: HttpProtocol(self.mgmt))
        except (listener.SocketPathError, OSError) as exc:
            if "mng_socket_path" in self.settings.model_fields_set:
                raise listener.SocketPathError(str(exc)) from None
            log.warning("management API off: %s", exc, extra={"path": path})
            return
        self.mgmt_path = path
        log.info("management API listening", extra={"path": path})

    async def aclose(self, grace: float | None = None) -> None:
        """Stop accepting, end open reads cleanly, let in-flight requests finish (``grace`` s)."""
        if self._closed:
            return
        self._closed = True
        self.metrics.unwatch_gc()
        self.gc_policy.close()
        for timer in self._ready_timers:
            timer.cancel()
        if grace is None:
            grace = self.settings.shutdown_grace_millis / 1000
        self.http.shutting_down = True
        self.broker.draining = True
        # writes waiting for room are answered now, not after their whole write timeout
        self.store.stop_waiting(ShuttingDown("the server is shutting down; retry elsewhere"))
        if self._server is not None:
            self._server.close()
        if self._mgmt_server is not None:
            self._mgmt_server.close()
        for state in (self.http, self.mgmt):
            for connection in list(state.connections):
                connection.shutdown()
        await self.http.wait_closed(grace)
        await self.mgmt.wait_closed(0.5)
        for state in (self.http, self.mgmt):
            for connection in [*state.connections, *state.refused]:
                if connection.transport is not None:
                    connection.transport.abort()
            state.close_timers()
        if self.mgmt_path is not None:
            listener.remove(self.mgmt_path)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
        async with AsyncExitStack() as closing:  # each runs even when one before it fails
            for server in (self._server, self._mgmt_server):
                if server is not None:
                    closing.push_async_callback(server.wait_closed)
            closing.push_async_callback(self.store.aclose)
            closing.push_async_callback(self.webhooks.aclose)  # callbacks run last-in first


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_until(server: MegaphoneServer, stop: asyncio.Event) -> None:
    """Serve (started) until ``stop`` is set, then shut down gracefully, logging both."""
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        started = time.monotonic()
        await server.aclose()
        log.info("shutdown finished", extra={"seconds": round(time.monotonic() - started, 3)})


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    server = MegaphoneServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # before the start, so that a signal as soon as "listening" is logged stops it gracefully
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await serve_until(server, stop)
