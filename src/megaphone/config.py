"""Settings: one place, validated.

Sources, highest precedence first: command-line flags (passed as init kwargs), environment variables
``megaphone_<key>`` (case-insensitive), then the first of ``megaphone.toml``, ``megaphone.yaml``,
``megaphone.yml``, ``megaphone.json`` found in the working directory (or the file named by
``--config``). Unknown keys in a file are rejected. A setting comes whole from the highest source
that sets it: dicts (``webhooks``, an ``agent`` map) and lists are replaced, never merged.

Each field's ``description`` (and ``default_text`` where the default is not a plain value) is the
one source of ``megaphone --help`` and of the README's configuration table
(``python -m megaphone.config --markdown`` prints it). :func:`startup_problems` holds the checks
that need the machine (the listen address, the management socket's directory); the server and
``--check`` both run them.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import socket
import stat
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

AGENT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # with fullmatch ("$" allows a final newline)
CONFIG_FILE_NAMES = ("megaphone.toml", "megaphone.yaml", "megaphone.yml", "megaphone.json")


class AgentMode(StrEnum):
    MASTER = "MASTER"
    REPLICA = "REPLICA"
    PIPED = "PIPED"


class VirtualAgents(BaseModel):
    """The map form of ``agent``: ``{"virtual": {name: MASTER|REPLICA}}``."""

    model_config = ConfigDict(extra="forbid")
    virtual: dict[str, Literal["MASTER", "REPLICA"]]


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hook: Literal["on-channel-deleted"]
    endpoint: str

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


def default_agent_name() -> str:
    """The host name sanitised to ``[A-Za-z0-9_-]``; never empty."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-")
    return name or "megaphone"


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    if int(port) > 65535:
        raise ValueError(f"port must be 0-65535, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="megaphone_",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    address: str = Field(
        default="0.0.0.0:3000",
        description="public HTTP listen address (`127.0.0.1:0` picks a free port)",
    )
    agent: str | VirtualAgents = Field(
        default_factory=default_agent_name,
        description='one MASTER agent by name, or `{"virtual": {name: "MASTER"|"REPLICA"}}` '
        "(at least one MASTER)",
        json_schema_extra={"default_text": "host name, sanitised to `[A-Za-z0-9_-]`"},
    )
    agent_warmup_secs: float = Field(
        default=0, ge=0, description="an agent hosts new channels only after this many seconds"
    )
    poll_duration_millis: int = Field(
        default=20_000, gt=0, description="how long a read stays open (NDJSON, long-poll)"
    )
    sse_window_millis: int = Field(
        default=120_000,
        gt=0,
        description="how long an SSE read stays open (EventSource reconnects cheaply)",
    )
    websocket_window_millis: int = Field(
        default=120_000, gt=0, description="how long a WebSocket read stays open"
    )
    heartbeat_millis: int = Field(
        default=15_000,
        gt=0,
        description="SSE comment / WebSocket ping interval (and NDJSON's with `?heartbeat=1`)",
    )
    sse_retry_millis: int = Field(
        default=1_000,
        ge=0,
        description="the `retry:` an SSE stream opens with (EventSource's reconnection delay)",
    )
    write_timeout_millis: int = Field(
        default=10_000, ge=0, description="how long a write waits for room in a full channel"
    )
    channel_ttl_millis: int = Field(
        default=60_000,
        gt=0,
        description="channel lifetime after its last read ended (or creation)",
    )
    sweep_interval_millis: int = Field(
        default=10_000, gt=0, description="how often expired channels are deleted"
    )
    channel_buffer_size: int = Field(default=100, gt=0, description="pending events per channel")
    channel_buffer_bytes: int = Field(
        default=1_048_576,
        gt=0,
        description="pending bytes per channel (one event always fits an empty buffer)",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="largest request body (`413`)")
    max_stream_id_length: int = Field(
        default=1024, gt=0, description="longest stream id, in characters (`400`)"
    )
    max_header_bytes: int = Field(
        default=16_384,
        ge=1024,
        description="largest request head: request target + headers (`431`)",
    )
    max_url_bytes: int = Field(default=8_192, ge=256, description="longest request target (`414`)")
    request_timeout_millis: int = Field(
        default=30_000,
        gt=0,
        description="a request must arrive completely within this (`408`); also the drain limit "
        "of a closing connection",
    )
    keepalive_timeout_millis: int = Field(
        default=75_000, gt=0, description="idle keep-alive connections are closed after this"
    )
    webhook_timeout_millis: int = Field(default=5_000, gt=0, description="per webhook POST")
    webhooks: dict[str, Webhook] = Field(
        default_factory=dict,
        description='`{name: {"hook": "on-channel-deleted", "endpoint": URL}}`; env or file only',
    )
    replay_window_size: int = Field(
        default=1_000,
        ge=0,
        description="unconfirmed sent events kept per channel; a read ends once it has delivered "
        "this many (`0` = no resume)",
    )
    replay_window_bytes: int = Field(
        default=1_048_576, gt=0, description="the same window in bytes"
    )
    max_pending_bytes: int = Field(
        default=134_217_728,
        gt=0,
        description="memory store: pending, unconfirmed and waiting events of all channels "
        "together; a write past it is `503 TIMEOUT` at once",
    )
    max_channels: int = Field(
        default=500_000,
        gt=0,
        description="channels per node; `/create` beyond it is `503 CHANNEL_LIMIT`",
    )
    max_batch_messages: int = Field(
        default=1_000, gt=0, description="messages per write-batch (`413 BATCH_TOO_LARGE`)"
    )
    max_batch_channels: int = Field(
        default=1_000, gt=0, description="channels per write-batch (`413 BATCH_TOO_LARGE`)"
    )
    max_batch_writes: int = Field(
        default=10_000,
        gt=0,
        description="distinct channels × messages per write-batch (`413 BATCH_TOO_LARGE`): "  # noqa: RUF001
        "bounds its answer",
    )
    max_connections: int = Field(
        default=10_000,
        gt=0,
        description="connections served at once; one more gets `503 OVERLOADED` and is closed "
        "(a rate-limited WARNING)",
    )
    max_pipeline_bytes: int = Field(
        default=1_048_576,
        gt=0,
        description="requests queued on one connection behind the one being served; over it the "
        "connection stops reading until they are answered",
    )
    max_buffered_request_bytes: int = Field(
        default=67_108_864,
        gt=0,
        description="request bodies held by all connections, plus write-batch answers being "
        "built and output held for clients that stopped reading (`503 OVERLOADED`)",
    )
    gc_freeze_interval_millis: int = Field(
        default=1_000,
        ge=0,
        description="how often long-lived objects are frozen out of full GC collections "
        "(`0` = never)",
    )
    producer_token: SecretStr | None = Field(
        default=None,
        description="when set, `/create`, `/write`, `/write-batch`, `/channelsExists` need "
        "`Authorization: Bearer <token>` (compared in constant time); `/read` stays "
        "capability-based. Env or file only, never a flag",
        json_schema_extra={"default_text": "unset"},
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="origins allowed to call the API from a browser (`*` = any, without "
        "credentials); `[]` = no CORS headers; env or file only",
    )
    shutdown_grace_millis: int = Field(
        default=10_000,
        ge=0,
        description="on SIGTERM, how long in-flight requests get before connections are cut",
    )
    store: Literal["memory", "redis"] = Field(
        default="memory",
        description="`memory` (zero setup, one node) or `redis` (any node serves any channel; "
        "restarts lose nothing)",
    )
    workers: int | Literal["auto"] = Field(
        default=1,
        description="processes serving the one public port (`SO_REUSEPORT`), supervised; `auto` "
        "= one per usable core. Redis store only (the memory store keeps channels in one "
        "process: run one node per core behind routing instead, see Deployment)",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="the Redis server of the `redis` store: `redis://`, `unix://`, or `rediss://` "
        "(TLS; options `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, "
        "`ssl_check_hostname`, see [docs/redis.md](docs/redis.md))",
    )
    redis_prefix: str = Field(
        default="megaphone:",
        description="key prefix: nodes sharing a Redis and a prefix form one broker",
    )
    redis_lease_margin_millis: int = Field(
        default=5_000,
        ge=0,
        description="a reader's lease lasts `redis_poll_millis` plus this, renewed at every poll "
        "tick, so a crashed node's reader frees the channel after at most that",
    )
    redis_poll_millis: int = Field(
        default=5_000,
        gt=0,
        description="every reader re-checks its channel this often even without a notification "
        "(a safety net: a notification reconnect already wakes every reader)",
    )
    redis_max_connections: int = Field(
        default=256,
        gt=0,
        description="accepted and ignored since issue #13: a node's commands share one pipelined "
        "connection (plus one for notifications)",
    )
    redis_timeout_millis: int = Field(
        default=5_000,
        gt=0,
        description="one Redis call or pipeline; a Redis that does not answer within it is "
        "`503 STORE_UNAVAILABLE` (the call may still have been applied)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="`debug`, `info`, `warning`, `error`; logs are logfmt lines on stderr",
    )
    grpc_address: str = Field(
        default="0.0.0.0:3001",
        description="reserved for the sync service (not served yet)",
    )
    mng_socket_path: str = Field(
        default="/run/megaphone.sock",
        description='the management API\'s Unix socket (mode 0600; `""` = off). The default is '
        "skipped with a warning when it cannot be used; a path set explicitly must work",
    )

    @field_validator("address", "grpc_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("agent")
    @classmethod
    def _check_agent(cls, value: str | VirtualAgents) -> str | VirtualAgents:
        names = [value] if isinstance(value, str) else list(value.virtual)
        if not names:
            raise ValueError("at least one agent is required")
        for name in names:
            if not AGENT_NAME_RE.fullmatch(name):
                raise ValueError(f"agent name {name!r} must match [A-Za-z0-9_-]+")
        if not isinstance(value, str) and AgentMode.MASTER not in value.virtual.values():
            raise ValueError(
                "at least one MASTER agent is required (REPLICA agents host no channels)"
            )
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> Any:
        """One line for any mistake (not one per member of the union)."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = 0
        if isinstance(value, bool) or count < 1 or (count != value and str(count) != value):
            raise ValueError(f"must be a whole number from 1, or auto; got {value!r}")
        return count

    @field_validator("producer_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # an empty token means "no token"
        return value

    @model_validator(mode="after")
    def _check_redis_url(self) -> Settings:
        if self.store == "redis":
            check_redis_url(self.redis_url)
        return self

    @property
    def agents(self) -> dict[str, AgentMode]:
        if isinstance(self.agent, str):
            return {self.agent: AgentMode.MASTER}
        return {name: AgentMode(mode) for name, mode in self.agent.virtual.items()}

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.address)

    @property
    def worker_count(self) -> int:
        """``workers`` with ``auto`` resolved: the cores this process may run on."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get("path")
        if path is not None:
            sources.append(_file_source(settings_cls, path))
        return (_WholeValues(settings_cls, sources),)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The config file's source (read now); a file that does not parse, or whose top level is
    not a table of settings, is a ValueError of one line naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return TomlConfigSettingsSource(settings_cls, toml_file=path)
        if suffix in (".yaml", ".yml"):
            return YamlConfigSettingsSource(settings_cls, yaml_file=path)
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    except Exception as exc:  # tomllib, json, yaml and pydantic-settings' own errors
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, (TypeError, AttributeError)) or "update sequence" in detail:
            detail = "the top level must be a table of settings (key = value)"
        raise ValueError(f"config file {str(path)!r}: {detail}") from None


class _WholeValues(PydanticBaseSettingsSource):
    """The sources, highest precedence first, layered by whole values: pydantic-settings would
    deep-merge dicts (an environment ``webhooks`` next to a file's would post to both, an ``agent``
    map would gain the file's agents); here the highest source that sets a key gives all of it."""

    def __init__(
        self, settings_cls: type[BaseSettings], sources: list[PydanticBaseSettingsSource]
    ) -> None:
        super().__init__(settings_cls)
        self.sources = sources

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ gives the whole mapping

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for source in self.sources:
            for key, value in source().items():
                values.setdefault(key, value)
        return values


REDIS_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
REDIS_TLS_FLAGS = ("ssl_check_hostname",)


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def check_redis_url(url: str) -> None:
    """Raise ValueError (one line, naming ``redis_url``) for an address the ``redis`` store
    cannot use: ``redis://``, ``rediss://`` (TLS) or ``unix://``, a numeric port and database,
    and no options but ``db`` and the TLS ones of ``rediss://`` (a typo must not silently turn
    verification off)."""
    shown = hide_password(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis_url must be redis://, rediss:// or unix://, got {shown!r}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError:
        raise ValueError(f"redis_url port must be a number in 0-65535, got {shown!r}") from None
    if parts.scheme == "unix" and not parts.path.strip("/"):
        raise ValueError(f"redis_url unix:// needs a socket path, got {shown!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    db = options.pop("db", None)
    if parts.scheme != "unix" and parts.path.strip("/"):
        db = parts.path.strip("/")
    if db is not None and not db.isdigit():
        raise ValueError(f"redis_url database must be a number, got {db!r}")
    tls = {k: options.pop(k) for k in list(options) if k in REDIS_TLS_OPTIONS + REDIS_TLS_FLAGS}
    if options:
        raise ValueError(f"unknown redis_url options: {', '.join(sorted(options))}")
    if tls and parts.scheme != "rediss":
        raise ValueError("redis_url ssl_* options need a rediss:// address")
    reqs = tls.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "optional", "none"):
        raise ValueError(
            f"redis_url ssl_cert_reqs must be required, optional or none, got {reqs!r}"
        )
    flag = tls.get("ssl_check_hostname", "true").lower()
    if flag not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"redis_url ssl_check_hostname must be true or false, got {flag!r}")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in tls and not os.access(tls[key], os.R_OK):
            raise ValueError(f"redis_url {key}: cannot read {tls[key]!r}")
    from megaphone.store.redis.url import RedisAddress  # the store's own parser, as at start-up

    try:
        RedisAddress.parse(url)  # e.g. a certificate file that is no certificate
    except (ValueError, OSError) as exc:
        message = str(exc).replace(url, shown)
        raise ValueError(message if "redis_url" in message else f"redis_url: {message}") from None


_CONFIG_FILE: dict[str, Path | None] = {}


def find_config_file(directory: Path | None = None) -> Path | None:
    base = directory or Path.cwd()
    for name in CONFIG_FILE_NAMES:
        candidate = base / name
        if candidate.is_file():
            return candidate
    return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (``overrides``), environment and the config file."""
    path = config_file if config_file is not None else find_config_file()
    if path is not None and path.suffix.lower() not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must be .toml, .yaml, .yml or .json")
    _CONFIG_FILE["path"] = path
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE.pop("path", None)


def default_text(name: str) -> str:
    """How the default of setting ``name`` reads in ``--help`` and the README."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "default_text" in extra:
        return str(extra["default_text"])
    value = field.get_default(call_default_factory=True)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def markdown_table() -> str:
    """The README's configuration table, from the fields' descriptions and defaults."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra
        shown = default_text(name)
        if not (isinstance(extra, dict) and "default_text" in extra):
            shown = f"`{shown}`"  # a plain value; a default_text is prose
        cells = [f"`{name}`", shown, field.description or ""]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def mng_socket_problem(path: str) -> str | None:
    """Why ``path`` cannot become the management socket (one line), or None. A socket file
    already there is fine: a stale one is replaced, and a live one is reported by the server."""
    where = Path(path)
    directory = where.parent
    if len(os.fsencode(path)) > 107:
        return f"mng_socket_path {path!r} is longer than a Unix socket path may be"
    if not directory.is_dir():
        return f"mng_socket_path: directory {str(directory)!r} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"mng_socket_path: directory {str(directory)!r} is not writable"
    try:
        mode = where.lstat().st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        return f"mng_socket_path {path!r} exists and is not a socket"
    return None


def address_problem(address: str, *, in_use_ok: bool) -> str | None:
    """Why the server could not listen on ``address`` (one line), or None. ``in_use_ok``: a port
    held by another process is no configuration mistake (``--check`` next to a running node)."""
    host, port = parse_host_port(address)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
        )
    except socket.gaierror as exc:
        return f"address {address!r}: cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and in_use_ok:
                continue
            return f"address {address!r}: cannot listen: {exc.strerror or exc}"
    return None


def env_typos(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``megaphone_*`` variables that are no setting but look like one (the
    environment source ignores them; other tools' variables such as ``MEGAPHONE_URL`` look like
    none and are not reported)."""
    warnings = []
    for variable in sorted(environ):
        key = variable.lower().removeprefix("megaphone_")
        if not variable.lower().startswith("megaphone_") or key in Settings.model_fields:
            continue
        close = difflib.get_close_matches(key, list(Settings.model_fields), n=1, cutoff=0.8)
        if close:
            warnings.append(
                f"{variable} is no setting (ignored); did you mean megaphone_{close[0]}?"
            )
    return warnings


def startup_problems(settings: Settings, *, check_only: bool = False) -> list[str]:
    """What the server would refuse at start-up beyond the values themselves, one line each.

    ``check_only`` (``--check``): a port already in use is not reported. The management socket
    is checked when ``mng_socket_path`` is set explicitly and not ``""`` (off); the built-in
    default is skipped by the server with a warning when it cannot be used."""
    problems = []
    problem = address_problem(settings.address, in_use_ok=check_only)
    if problem:
        problems.append(problem)
    path = settings.mng_socket_path
    if path and "mng_socket_path" in settings.model_fields_set:
        problem = mng_socket_problem(path)
        if problem:
            problems.append(problem)
    if settings.store == "memory" and settings.worker_count > 1:
        problems.append(
            f"workers: {settings.worker_count} needs store = redis (the memory store keeps "
            "channels in one process; run one node per core behind prefix routing instead)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m megaphone.config --markdown``: print the README's configuration table."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--markdown"]:
        print("usage: python -m megaphone.config --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
