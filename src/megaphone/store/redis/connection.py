"""The store's Redis connections: commands packed by hand, replies parsed by hiredis.

One transport for everything, plain TCP, TLS (``rediss://``) or a unix socket: a
:class:`RespClient` carries every command of a store (its Lua script calls and the few plain
commands) on one connection, in order; a :class:`RespSubscriber` holds the notification
connection. redis-py is not used at run time: its pipeline machinery cost about two thirds of the
server's CPU per event (packing each argument through its encoder, a pool checkout, a retry
wrapper, the reply layers; cProfile of the throughput workload, 2026-12-01), and a second client
meant a second code path for TLS. Here a command is packed by hand (RESP commands are
length-prefixed strings), the commands of one turn of the event loop go out in one ``send``, and
the replies, parsed by hiredis (the C parser redis-py itself uses), resolve the callers' futures
in order. A dropped connection fails what it carried; the next call opens another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import hiredis

from megaphone.store.redis.url import RedisAddress

CONNECT_TIMEOUT = 2.0
CLIENT_NAME = "megaphone-scripts"
SUBSCRIBER_NAME = "megaphone-notifications"
log = logging.getLogger("megaphone.store.redis")

Arg = str | bytes | int


class RespConnectionError(ConnectionError):
    """The connection failed, broke, or was closed: what it carried is lost (maybe applied)."""


class ResponseError(Exception):
    """Redis answered a command with an error (the connection is fine)."""


class NoScriptError(ResponseError):
    """``NOSCRIPT``: Redis does not hold the script (restarted, or ``SCRIPT FLUSH``)."""


def pack(parts: list[Arg] | tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(parts) + bulks(parts)


def bulk(part: Arg) -> bytes:
    """One argument as a RESP bulk string: a command is the array header ``*N`` and N of these,
    so the parts that do not change between calls can be packed once (see pipeliner.py)."""
    if isinstance(part, str):
        part = part.encode()
    elif isinstance(part, int):
        part = b"%d" % part
    return b"$%d\r\n%b\r\n" % (len(part), part)


def bulks(parts: list[Arg] | tuple[Arg, ...]) -> bytes:
    """Arguments as consecutive RESP bulk strings (:func:`bulk` inlined: this is per call)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif isinstance(part, int):
            part = b"%d" % part
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return b"".join(out)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class RespProtocol(asyncio.Protocol):
    """One connection: commands out in order, replies in the same order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, commands: list[bytes]) -> list[asyncio.Future[Any]]:
        if self.lost is not None or self.transport is None:
            raise RespConnectionError("connection to redis lost")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.waiting.extend(futures)
        self.transport.write(commands[0] if len(commands) == 1 else b"".join(commands))
        return futures

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                future = waiting.popleft()
                if future.done():  # its caller gave up (timeout, cancellation)
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_result(_error(reply))  # an answer, not a broken connection
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # not Redis talking, or out of step
            self.abort(RespConnectionError(f"bad reply from redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RespConnectionError(f"connection to redis lost: {exc or 'closed'}"))

    def abort(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)
                # a batch awaits its replies in order and stops at the first failure: the rest
                # are never awaited, which asyncio would log as "exception never retrieved"
                future.exception()
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    """The command connection of one store: connected on first use, replaced when lost."""

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._protocol: RespProtocol | None = None
        self._connecting: asyncio.Task[RespProtocol] | None = None
        self._closed = False

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send packed ``commands`` in one write; their replies (a ``ResponseError`` for a
        command Redis refused). Raises ``RespConnectionError`` for the whole batch when the
        connection fails, ``TimeoutError`` when Redis does not answer within ``timeout`` (the
        connection is then dropped: it may be half-open)."""
        protocol: RespProtocol | None = None
        try:
            async with asyncio.timeout(self.timeout):
                protocol = await self._connection()
                futures = protocol.send(commands)
                return [await future for future in futures]
        except TimeoutError:
            if protocol is not None:
                protocol.abort(RespConnectionError("redis did not answer in time"))
            raise

    async def command(self, *parts: Arg) -> Any:
        """One command's reply; a refusal raises its ``ResponseError``."""
        [reply] = await self.execute([pack(parts)])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _connection(self) -> RespProtocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._closed:
            raise RespConnectionError("the store is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _connect(self) -> RespProtocol:
        protocol = await connect(self.address, RespProtocol, CLIENT_NAME)
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.abort(RespConnectionError("the store is closed"))


P = TypeVar("P", bound=RespProtocol)


async def connect(address: RedisAddress, factory: Callable[[], P], name: str) -> P:
    """Open a connection (TCP, TLS or a unix socket), authenticate, select the database, name it.

    Whatever ends the attempt early (a refusal, the timeout, the caller's cancellation while the
    setup replies are awaited) closes the half-made connection: a transport left open would hold
    the event loop's close forever (uvloop waits for every handle it could not close)."""
    loop = asyncio.get_running_loop()
    protocol: P | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            if address.path is not None:
                _, protocol = await loop.create_unix_connection(factory, address.path)
            elif address.tls is not None:
                _, protocol = await loop.create_connection(
                    factory,
                    address.host,
                    address.port,
                    ssl=address.tls,
                    server_hostname=address.host,
                    ssl_handshake_timeout=CONNECT_TIMEOUT,
                )
            else:
                _, protocol = await loop.create_connection(factory, address.host, address.port)
            setup: list[bytes] = []  # its replies are checked; a refusal fails the connect
            if address.password is not None:
                auth = (
                    ("AUTH", address.username, address.password)
                    if address.username
                    else ("AUTH", address.password)
                )
                setup.append(pack(auth))
            if address.db:
                setup.append(pack(("SELECT", address.db)))
            setup.append(pack(("CLIENT", "SETNAME", name)))  # for CLIENT LIST
            for reply in [await f for f in protocol.send(setup)]:
                if isinstance(reply, ResponseError):
                    raise RespConnectionError(f"redis refused the connection: {reply}")
    except BaseException as exc:
        if protocol is not None:
            protocol.abort(RespConnectionError(f"connection abandoned: {exc!r}"))
        if isinstance(exc, TimeoutError):
            raise RespConnectionError("could not connect to redis in time") from None
        if isinstance(exc, OSError) and not isinstance(exc, RespConnectionError):
            raise RespConnectionError(f"could not connect to redis: {exc}") from exc
        raise
    return protocol


class PushProtocol(RespProtocol):
    """A subscribed connection: after its setup replies, everything Redis sends is a push."""

    def __init__(self) -> None:
        super().__init__()
        self.on_push: Callable[[list[Any]], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.waiting:  # the setup (AUTH, SELECT, SETNAME) is still being answered
            super().data_received(data)
            return
        reader = self.reader
        reader.feed(data)
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if self.waiting:  # (only during setup)
                    self.waiting.popleft().set_result(reply)
                elif self.on_push is not None and isinstance(reply, list):
                    self.on_push(reply)
        except hiredis.ProtocolError as exc:
            self.abort(RespConnectionError(f"bad reply from redis: {exc}"))

    def abort(self, error: BaseException) -> None:
        super().abort(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def command(self, *parts: Arg) -> None:
        if self.lost is None and self.transport is not None:
            self.transport.write(pack(parts))


class RespSubscriber:
    """The notification connection of one store: ``SUBSCRIBE``/``UNSUBSCRIBE`` on one
    connection, in order (so no lock and no lazily opened extra connections), each message
    handed to ``on_message(channel, data)``. It reconnects by itself; after each (re)connect it
    subscribes again to every channel wanted and calls ``on_connect``, since whatever was
    published while it was down is lost. ``on_subscribed(channel)`` is called when Redis
    confirms a subscription: only from then on does a ``PUBLISH`` reach this node, so a reader
    must look once more then (a write between its first look and the confirmation published to
    nobody)."""

    def __init__(
        self,
        address: RedisAddress,
        on_message: Callable[[bytes, bytes], None],
        on_connect: Callable[[], None],
        on_subscribed: Callable[[bytes], None] | None = None,
    ) -> None:
        self.address = address
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_subscribed = on_subscribed
        self.channels: set[str] = set()
        self.protocol: PushProtocol | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        if self.protocol is not None:
            self.protocol.command("SUBSCRIBE", channel)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self.protocol is not None:
            self.protocol.command("UNSUBSCRIBE", channel)

    def _push(self, reply: list[Any]) -> None:
        if len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                self.on_message(reply[1], reply[2])
            elif kind == b"subscribe" and self.on_subscribed is not None:
                self.on_subscribed(reply[1])

    async def _run(self) -> None:
        delay = 0.05
        interrupted = False
        while True:
            try:
                protocol = await connect(self.address, PushProtocol, SUBSCRIBER_NAME)
            except RespConnectionError as exc:
                log.warning("redis notifications interrupted", extra={"error": str(exc)})
                interrupted = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if interrupted:
                log.info("store reconnected", extra={"connection": "notifications"})
            interrupted = True  # from now on, a new connection is a reconnection
            delay = 0.05
            protocol.on_push = self._push
            self.protocol = protocol
            if self.channels:
                protocol.command("SUBSCRIBE", *self.channels)
            self.on_connect()
            await protocol.closed
            self.protocol = None
            log.warning("redis notifications interrupted", extra={"error": "connection lost"})

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.protocol is not None:
            self.protocol.abort(RespConnectionError("the store is closed"))
