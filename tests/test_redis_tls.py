"""The Redis store over TLS (``rediss://``) on its one transport, against a real redis-server
started with ``--tls-port`` and certificates made here (a CA, and a server certificate it signs
for 127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import base_url, create_channel, make_settings, read_events
from megaphone.errors import StoreUnavailable
from megaphone.metrics import Metrics
from megaphone.server import MegaphoneServer
from megaphone.store.redis import RedisStore
from megaphone.store.redis.url import RedisAddress
from support import RedisServer, free_port


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("megaphone test CA"))
        .issuer_name(_name("megaphone test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(files["key"], server_key)
    return files


class TlsRedis:
    def __init__(self, folder: Path) -> None:
        self.files = make_certificates(folder)
        self.tls_port = free_port()
        self.server = RedisServer(
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(self.files["cert"]),
            "--tls-key-file", str(self.files["key"]),
            "--tls-ca-cert-file", str(self.files["ca"]),
            "--tls-auth-clients", "no",
        )  # fmt: skip
        self.url = f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.files['ca']}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    made = TlsRedis(tmp_path_factory.mktemp("tls"))
    yield made
    made.server.stop()


@pytest.fixture
async def tls_node(tls_redis: TlsRedis) -> AsyncIterator[MegaphoneServer]:
    node = MegaphoneServer(
        make_settings(
            store="redis",
            redis_url=tls_redis.url,
            redis_prefix=f"tls{uuid.uuid4().hex}:",
            poll_duration_millis=1000,
        )
    )
    await node.start()
    yield node
    await node.aclose(grace=1.0)


async def test_a_node_on_tls_redis_serves_every_rule(tls_node: MegaphoneServer) -> None:
    """Create, write, a live read woken by a notification, resume: all over TLS."""
    async with httpx.AsyncClient(base_url=base_url(tls_node), timeout=30) as http:
        channel = await create_channel(http)
        producer, consumer = channel["producerAddress"], channel["consumerAddress"]
        for n in range(3):
            reply = await http.post(f"/write/{producer}/s", json=n)
            assert reply.status_code == 201, reply.text
        first = await read_events(http, consumer, 3)
        assert [e["body"] for e in first] == [0, 1, 2]
        async with http.stream(
            "GET", f"/read/{consumer}", headers={"Last-Event-ID": first[1]["eid"]}
        ) as reading:
            assert reading.headers["megaphone-resume"] == "resumed"
            lines = reading.aiter_lines()
            assert b'"body":2' in (await anext(lines)).encode()
            await http.post(f"/write/{producer}/s", json="live")  # wakes the reader
            assert b'"body":"live"' in (await anext(lines)).encode()
    assert (await http_ready(tls_node)) == 200


async def http_ready(node: MegaphoneServer) -> int:
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        return (await http.get("/readyz")).status_code


async def test_a_certificate_the_store_does_not_trust_is_refused(tls_redis: TlsRedis) -> None:
    """Without the CA, the server's certificate does not verify: 503, not a silent downgrade;
    with ``ssl_cert_reqs=none`` (explicitly) it connects."""
    untrusted = f"rediss://127.0.0.1:{tls_redis.tls_port}/0"
    store = RedisStore(url=untrusted, metrics=Metrics(), prefix="tls-refused:")
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.aclose()
    store = RedisStore(url=untrusted + "?ssl_cert_reqs=none", metrics=Metrics(), prefix="t:")
    try:
        await store.ping()
    finally:
        await store.aclose()


def test_tls_options_come_from_the_url(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    address = RedisAddress.parse(f"rediss://:pw@localhost:6380/2?ssl_ca_certs={files['ca']}")
    assert (address.host, address.port, address.db, address.password) == (
        "localhost",
        6380,
        2,
        "pw",
    )
    assert address.tls is not None
    assert address.tls.verify_mode == ssl.CERT_REQUIRED
    assert address.tls.check_hostname
    relaxed = RedisAddress.parse("rediss://h?ssl_cert_reqs=none")
    assert relaxed.tls is not None
    assert relaxed.tls.verify_mode == ssl.CERT_NONE
    assert RedisAddress.parse("redis://h").tls is None
    assert RedisAddress.parse("unix:///tmp/r.sock?db=3").path == "/tmp/r.sock"
    for bad in ("redis://h?ssl_ca_certs=x", "rediss://h?sslcertreqs=none", "http://h"):
        with pytest.raises(ValueError, match=r"redis|ssl_|options"):
            RedisAddress.parse(bad)
