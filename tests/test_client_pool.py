"""megaphone.client's own HTTP/1.1 pools: keep-alive, stale connections, TLS, back-off options,
and when httpx carries the requests instead."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ServerFactory, base_url
from megaphone.client import AsyncMegaphone, ChannelNotFoundError, Event, Megaphone
from megaphone.client._httpx import AsyncHttpxPool, HttpxPool
from megaphone.client._pool_async import AsyncPool
from megaphone.client._pool_sync import SyncPool
from megaphone.server import MegaphoneServer


class Forwarder:
    """A TCP forwarder to the server that counts connections; with ``tls``, it terminates TLS."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [cwriter, swriter]
        copies = [
            asyncio.create_task(self._copy(creader, swriter)),
            asyncio.create_task(self._copy(sreader, cwriter)),
        ]
        self._tasks.update(copies)
        await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        for writer in (cwriter, swriter):
            writer.transport.abort()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def take(stream: Any, count: int) -> list[Any]:
    items: list[Any] = []
    async with aclosing(stream):
        async for item in stream:
            items.append(item)
            if len(items) == count:
                break
    return items


# -- which pool --------------------------------------------------------------------------------


async def test_own_pool_unless_a_transport_or_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    async with AsyncMegaphone("http://megaphone.test") as mp:
        assert isinstance(mp._http, AsyncPool)
    with Megaphone("https://megaphone.test") as sync:
        assert isinstance(sync._http, SyncPool)
    async with AsyncMegaphone("http://x.test", transport=httpx.AsyncHTTPTransport()) as mp:
        assert isinstance(mp._http, AsyncHttpxPool)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "bypassed.test")
    async with AsyncMegaphone("http://megaphone.test") as mp:
        assert isinstance(mp._http, AsyncHttpxPool)  # httpx honours the proxy
    async with AsyncMegaphone("http://bypassed.test") as mp:
        assert isinstance(mp._http, AsyncPool)
    with Megaphone("http://megaphone.test") as sync:
        assert isinstance(sync._http, HttpxPool)


async def test_base_url_path_prefix_and_bad_urls() -> None:
    assert AsyncPool("http://h:8080/mp/", {}).origin.prefix == "/mp"
    assert AsyncPool("https://[::1]/", {}).origin.host_header == b"[::1]"
    assert AsyncPool("http://h:80", {}).origin.host_header == b"h"
    with pytest.raises(ValueError, match="http"):
        AsyncMegaphone("ftp://h")


# -- keep-alive --------------------------------------------------------------------------------


async def test_one_connection_carries_every_request(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=300, replay_window_size=4)
    forwarder = Forwarder(node.port)
    port = await forwarder.start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with AsyncMegaphone(url) as mp:
            channel = await mp.create()
            for n in range(20):
                await mp.write(channel.producer_address, "s", n)
            # 20 events in windows of 4: five reads or more, on the writes' connection
            events = await take(mp.read(channel.consumer_address), 20)
            assert forwarder.connections == 1
            await mp.write(channel.producer_address, "s", 20)  # the read was left: a new one
        assert forwarder.connections == 2

        def sync_run() -> list[Event]:
            with Megaphone(url) as sync:
                for n in range(21, 25):
                    sync.write(channel.producer_address, "s", n)
                stream = sync.read(channel.consumer_address)
                items = [next(stream) for _ in range(5)]
                assert forwarder.connections == 3
                stream.close()
                sync.write(channel.producer_address, "s", 25)
                return [item for item in items if isinstance(item, Event)]

        more = await asyncio.to_thread(sync_run)
    finally:
        await forwarder.stop()
    assert [e.body for e in events] == list(range(20))
    assert [e.body for e in more] == list(range(20, 25))
    assert forwarder.connections == 4


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    server_factory: ServerFactory,
) -> None:
    node = await server_factory(keepalive_timeout_millis=100)
    async with AsyncMegaphone(base_url(node)) as mp:
        channel = await mp.create()
        await asyncio.sleep(0.4)
        await mp.write(channel.producer_address, "s", 1)

    def sync_run() -> None:
        with Megaphone(base_url(node)) as sync:
            sync.write(channel.producer_address, "s", 2)
            time.sleep(0.4)
            sync.write(channel.producer_address, "s", 3)

    await asyncio.to_thread(sync_run)
    async with AsyncMegaphone(base_url(node)) as mp:
        events = await take(mp.read(channel.consumer_address), 3)
    assert [e.body for e in events] == [1, 2, 3]


# -- TLS ---------------------------------------------------------------------------------------


async def test_https_through_the_own_pool(
    server: MegaphoneServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    forwarder = Forwarder(server.port, tls)
    port = await forwarder.start()
    url = f"https://localhost:{port}"
    try:
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
        async with AsyncMegaphone(url, timeout=5) as untrusted:
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.create()
        monkeypatch.delenv("SSL_CERT_DIR")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted as httpx would trust it
        async with AsyncMegaphone(url) as mp:
            assert isinstance(mp._http, AsyncPool)
            channel = await mp.create()
            for n in range(3):
                await mp.write(channel.producer_address, "s", n)
            events = await take(mp.read(channel.consumer_address), 3)

        def sync_run() -> list[Event]:
            with Megaphone(url) as sync:
                sync.write(channel.producer_address, "s", 3)
                stream = sync.read(channel.consumer_address)
                item = next(stream)
                stream.close()
                assert isinstance(item, Event)
                return [item]

        more = await asyncio.to_thread(sync_run)
    finally:
        await forwarder.stop()
    assert [e.body for e in events + more] == [0, 1, 2, 3]


# -- back-off options --------------------------------------------------------------------------


async def test_backoff_options() -> None:
    for bad in ({"backoff_initial": 0}, {"backoff_initial": 2.0, "backoff_max": 1.0}):
        with pytest.raises(ValueError, match="back-off"):
            AsyncMegaphone("http://h", **bad)
        with pytest.raises(ValueError, match="back-off"):
            Megaphone("http://h", **bad)

    busy = {"code": "BUSY", "message": "x"}
    calls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 6:
            return httpx.Response(409, json=busy)
        return httpx.Response(404, json={"code": "NOT_FOUND", "message": "gone"})

    transport = httpx.MockTransport(answer)
    async with AsyncMegaphone(
        "http://megaphone.test", transport=transport, backoff_initial=0.001, backoff_max=0.002
    ) as mp:
        with pytest.raises(ChannelNotFoundError):
            await take(mp.read("agent.c.1"), 1)
    assert len(calls) == 6
    assert calls[-1] - calls[0] < 0.5  # the default (50 ms doubling) would take ~0.6 s or more

    calls.clear()
    sync_transport = httpx.MockTransport(answer)
    with (
        Megaphone(
            "http://megaphone.test", transport=sync_transport, backoff_initial=0.2, backoff_max=0.2
        ) as sync,
        pytest.raises(ChannelNotFoundError),
    ):
        next(sync.read("agent.c.1"))
    assert len(calls) == 6
    assert calls[-1] - calls[0] >= 5 * 0.1  # each delay at least half of 0.2 s


async def test_a_header_no_request_can_carry_is_refused_not_retried(
    server: MegaphoneServer,
) -> None:
    url = base_url(server)
    async with AsyncMegaphone(url, token="bad\r\ntoken") as mp:
        with pytest.raises(ValueError, match="cannot send"):
            await mp.create()
        with pytest.raises(ValueError, match="cannot send"):
            await take(mp.read("agent.c.1", after="bad\r\ncursor"), 1)

    def sync_run() -> None:
        with Megaphone(url) as sync, pytest.raises(ValueError, match="cannot send"):
            next(sync.read("agent.c.1", after="bad\ncursor"))

    await asyncio.to_thread(sync_run)
