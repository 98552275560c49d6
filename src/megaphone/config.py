"""Settings: one place, validated.

Sources, highest precedence first: command-line flags (passed as init kwargs), environment variables
``megaphone_<key>`` (case-insensitive), then the first of ``megaphone.toml``, ``megaphone.yaml``,
``megaphone.yml``, ``megaphone.json`` found in the working directory (or the file named by
``--config``). Unknown keys in a file are rejected.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
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
    virtual: dict[str, Literal[AgentMode.MASTER, AgentMode.REPLICA]]


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hook: Literal["on-channel-deleted"]
    endpoint: str


def default_agent_name() -> str:
    """The host name sanitised to ``[A-Za-z0-9_-]``; never empty."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-")
    return name or "megaphone"


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="megaphone_",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    address: str = "0.0.0.0:3000"
    grpc_address: str = "0.0.0.0:3001"
    mng_socket_path: str = "/run/megaphone.sock"
    agent: str | VirtualAgents = Field(default_factory=default_agent_name)
    agent_warmup_secs: float = Field(default=0, ge=0)
    poll_duration_millis: int = Field(default=20_000, gt=0)
    sse_window_millis: int = Field(default=120_000, gt=0)
    websocket_window_millis: int = Field(default=120_000, gt=0)
    heartbeat_millis: int = Field(default=15_000, gt=0)
    sse_retry_millis: int = Field(default=1_000, ge=0)
    write_timeout_millis: int = Field(default=10_000, ge=0)
    channel_ttl_millis: int = Field(default=60_000, gt=0)
    sweep_interval_millis: int = Field(default=10_000, gt=0)
    channel_buffer_size: int = Field(default=100, gt=0)
    channel_buffer_bytes: int = Field(default=1_048_576, gt=0)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_stream_id_length: int = Field(default=1024, gt=0)
    max_header_bytes: int = Field(default=16_384, ge=1024)
    max_url_bytes: int = Field(default=8_192, ge=256)
    request_timeout_millis: int = Field(default=30_000, gt=0)
    keepalive_timeout_millis: int = Field(default=75_000, gt=0)
    webhook_timeout_millis: int = Field(default=5_000, gt=0)
    replay_window_size: int = Field(default=1_000, ge=0)
    replay_window_bytes: int = Field(default=1_048_576, gt=0)
    max_pending_bytes: int = Field(default=134_217_728, gt=0)
    max_channels: int = Field(default=500_000, gt=0)
    max_batch_messages: int = Field(default=1_000, gt=0)
    max_batch_channels: int = Field(default=1_000, gt=0)
    max_batch_writes: int = Field(default=10_000, gt=0)
    max_connections: int = Field(default=10_000, gt=0)
    max_pipeline_bytes: int = Field(default=1_048_576, gt=0)
    max_buffered_request_bytes: int = Field(default=67_108_864, gt=0)
    gc_freeze_interval_millis: int = Field(default=1_000, ge=0)
    producer_token: SecretStr | None = None
    cors_allowed_origins: list[str] = Field(default_factory=lambda: ["*"])
    shutdown_grace_millis: int = Field(default=10_000, ge=0)
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "megaphone:"
    redis_lease_margin_millis: int = Field(default=5_000, ge=0)
    redis_poll_millis: int = Field(default=5_000, gt=0)
    redis_max_connections: int = Field(default=256, gt=0)
    redis_timeout_millis: int = Field(default=5_000, gt=0)
    webhooks: dict[str, Webhook] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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
        return value

    @field_validator("producer_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # an empty token means "no token"
        return value

    @property
    def agents(self) -> dict[str, AgentMode]:
        if isinstance(self.agent, str):
            return {self.agent: AgentMode.MASTER}
        return {name: AgentMode(mode) for name, mode in self.agent.virtual.items()}

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.address)

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
            suffix = path.suffix.lower()
            if suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)


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
