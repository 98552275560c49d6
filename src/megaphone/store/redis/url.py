"""Redis addresses: ``redis://``, ``rediss://`` (TLS) and ``unix://``, parsed once.

``redis[s]://[[user]:password@]host[:port][/db][?option=value...]`` and
``unix://[[user]:password@]/path[?db=N]``. TLS options (``rediss://`` only), as redis-py names
them: ``ssl_cert_reqs`` (``required`` (default), ``optional``, ``none``), ``ssl_ca_certs`` (a CA
bundle file), ``ssl_certfile`` / ``ssl_keyfile`` (a client certificate, for mutual TLS),
``ssl_check_hostname`` (``true`` by default when certificates are required). Anything else is
refused, so a typo does not silently turn verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

TLS_OPTIONS = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


@dataclass(frozen=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must be redis://, rediss:// or unix://, got {url!r}")
        options = dict(parse_qsl(parts.query))
        db_text = options.pop("db", None)
        if parts.scheme != "unix" and parts.path.strip("/"):
            db_text = parts.path.strip("/")
        tls_options = {k: options.pop(k) for k in list(options) if k in TLS_OPTIONS}
        if options:
            raise ValueError(f"unknown redis_url options: {', '.join(sorted(options))}")
        if tls_options and parts.scheme != "rediss":
            raise ValueError("ssl_* options need a rediss:// address")
        try:
            db = int(db_text) if db_text else 0
        except ValueError:
            raise ValueError(f"redis_url database must be a number, got {db_text!r}") from None
        common = {
            "db": db,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
        }
        if parts.scheme == "unix":
            return cls(path=unquote(parts.path), **common)  # type: ignore[arg-type]
        tls = tls_context(tls_options) if parts.scheme == "rediss" else None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=tls,
            **common,  # type: ignore[arg-type]
        )


def tls_context(options: dict[str, str]) -> ssl.SSLContext:
    """The client-side TLS context of a ``rediss://`` address's options."""
    reqs_name = options.get("ssl_cert_reqs", "required").lower()
    if reqs_name not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be required, optional or none, got {reqs_name!r}")
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if "ssl_certfile" in options:
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = CERT_REQS[reqs_name]
    check = options.get("ssl_check_hostname", "true" if reqs == ssl.CERT_REQUIRED else "false")
    context.check_hostname = check.lower() in ("1", "true", "yes") and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    return context
