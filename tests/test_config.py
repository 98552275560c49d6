"""Settings: file < environment < flags; embedded default; validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from megaphone.config import AgentMode, default_agent_name, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.lower().startswith("megaphone_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_embedded_default_needs_no_file() -> None:
    settings = load_settings()
    assert settings.address == "0.0.0.0:3000"
    assert settings.agents == {default_agent_name(): AgentMode.MASTER}
    assert settings.agent_warmup_secs == 0
    assert (
        settings.poll_duration_millis,
        settings.write_timeout_millis,
        settings.channel_ttl_millis,
        settings.sweep_interval_millis,
        settings.channel_buffer_size,
        settings.max_body_bytes,
        settings.max_stream_id_length,
    ) == (20_000, 10_000, 60_000, 10_000, 100, 1_048_576, 1024)


def test_default_agent_name_is_sanitised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "web-01.prod.example.com")
    assert default_agent_name() == "web-01-prod-example-com"
    monkeypatch.setattr("socket.gethostname", lambda: "..")
    assert default_agent_name() == "megaphone"


@pytest.mark.parametrize("suffix", ["toml", "yaml", "json"])
def test_file_then_env_then_flags(
    suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "poll_duration_millis": 1111,
        "channel_ttl_millis": 2222,
        "write_timeout_millis": 3333,
    }
    text = {
        "toml": "\n".join(f"{k} = {v}" for k, v in values.items()),
        "yaml": "\n".join(f"{k}: {v}" for k, v in values.items()),
        "json": json.dumps(values),
    }[suffix]
    (tmp_path / f"megaphone.{suffix}").write_text(text)
    monkeypatch.setenv("megaphone_channel_ttl_millis", "5000")
    monkeypatch.setenv("MEGAPHONE_WRITE_TIMEOUT_MILLIS", "6000")
    settings = load_settings(write_timeout_millis=7000)
    assert settings.poll_duration_millis == 1111  # file
    assert settings.channel_ttl_millis == 5000  # env beats file
    assert settings.write_timeout_millis == 7000  # flag beats env


def test_agent_map_and_webhooks_from_toml(tmp_path: Path) -> None:
    (tmp_path / "megaphone.toml").write_text(
        """
address = "127.0.0.1:4000"
agent_warmup_secs = 5

[agent.virtual]
a1 = "MASTER"
a2 = "REPLICA"

[webhooks.audit]
hook = "on-channel-deleted"
endpoint = "http://127.0.0.1:9/hook"
"""
    )
    settings = load_settings()
    assert settings.agents == {"a1": AgentMode.MASTER, "a2": AgentMode.REPLICA}
    assert settings.webhooks["audit"].endpoint == "http://127.0.0.1:9/hook"
    assert settings.host_port == ("127.0.0.1", 4000)


def test_agent_from_env_as_name_or_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("megaphone_agent", "edge_1")
    assert load_settings().agents == {"edge_1": AgentMode.MASTER}
    monkeypatch.setenv("megaphone_agent", '{"virtual": {"x": "MASTER"}}')
    assert load_settings().agents == {"x": AgentMode.MASTER}


@pytest.mark.parametrize(
    "bad",
    [
        {"agent": "bad name"},
        {"agent": "dots.not.allowed"},
        {"address": "no-port"},
        {"poll_duration_millis": 0},
        {"channel_buffer_size": -1},
    ],
)
def test_invalid_values_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(**bad)


def test_unknown_keys_in_file_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "megaphone.toml").write_text("poll_duration = 5\n")
    with pytest.raises(ValidationError, match="poll_duration"):
        load_settings()


def test_unknown_replica_mode_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "megaphone.json").write_text(json.dumps({"agent": {"virtual": {"a": "PIPED"}}}))
    with pytest.raises(ValidationError):
        load_settings()
