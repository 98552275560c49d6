"""Settings: file < environment < flags (whole values); embedded default; validation; the
start-up checks; descriptions as the one source of the README table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from megaphone.config import (
    AgentMode,
    Settings,
    address_problem,
    default_agent_name,
    default_text,
    env_typos,
    hide_password,
    load_settings,
    markdown_table,
    mng_socket_problem,
    startup_problems,
)


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


WEBHOOK_TOML = """
cors_allowed_origins = ["https://file.example"]

[agent.virtual]
from-file = "MASTER"

[webhooks.audit]
hook = "on-channel-deleted"
endpoint = "http://127.0.0.1:9/file"
"""


def test_env_dicts_replace_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting comes whole from the highest source: an environment map or list replaces the
    file's (pydantic-settings would deep-merge, so the file's webhook would still be posted)."""
    (tmp_path / "megaphone.toml").write_text(WEBHOOK_TOML)
    monkeypatch.setenv(
        "megaphone_webhooks",
        json.dumps({"other": {"hook": "on-channel-deleted", "endpoint": "http://127.0.0.1:9/env"}}),
    )
    monkeypatch.setenv("megaphone_agent", json.dumps({"virtual": {"from-env": "MASTER"}}))
    monkeypatch.setenv("megaphone_cors_allowed_origins", '["https://env.example"]')
    settings = load_settings()
    assert list(settings.webhooks) == ["other"]
    assert settings.agents == {"from-env": AgentMode.MASTER}
    assert settings.cors_allowed_origins == ["https://env.example"]


def test_flags_replace_env_and_file_dicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "megaphone.toml").write_text(WEBHOOK_TOML)
    monkeypatch.setenv("megaphone_agent", json.dumps({"virtual": {"from-env": "MASTER"}}))
    settings = load_settings(agent={"virtual": {"flag": "MASTER"}}, webhooks={})
    assert settings.agents == {"flag": AgentMode.MASTER}
    assert settings.webhooks == {}


def test_unset_keys_still_come_from_lower_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "megaphone.toml").write_text(WEBHOOK_TOML)
    monkeypatch.setenv("megaphone_poll_duration_millis", "1234")
    settings = load_settings(address="127.0.0.1:0")
    assert (settings.address, settings.poll_duration_millis) == ("127.0.0.1:0", 1234)
    assert list(settings.webhooks) == ["audit"]
    assert settings.agents == {"from-file": AgentMode.MASTER}
    assert settings.model_fields_set >= {"address", "poll_duration_millis", "webhooks", "agent"}
    assert "mng_socket_path" not in settings.model_fields_set


def test_agent_map_needs_a_master() -> None:
    with pytest.raises(ValidationError, match="at least one MASTER agent is required"):
        load_settings(agent={"virtual": {"r1": "REPLICA", "r2": "REPLICA"}})
    assert load_settings(agent={"virtual": {"m": "MASTER", "r": "REPLICA"}}).agents == {
        "m": AgentMode.MASTER,
        "r": AgentMode.REPLICA,
    }


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://x", "redis_url must be redis://, rediss:// or unix://, got 'http://x'"),
        ("redis://h:abc/0", "redis_url port must be a number in 0-65535"),
        ("redis://h:70000/0", "redis_url port must be a number in 0-65535"),
        ("redis://h/zero", "redis_url database must be a number, got 'zero'"),
        ("unix:///tmp/r.sock?db=x", "redis_url database must be a number, got 'x'"),
        ("unix://", "redis_url unix:// needs a socket path"),
        ("redis://h/0?socket_timout=3", "unknown redis_url options: socket_timout"),
        ("redis://h/0?ssl_cert_reqs=none", "redis_url ssl_\\* options need a rediss:// address"),
        ("rediss://h/0?ssl_cert_reqs=never", "ssl_cert_reqs must be required, optional or none"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs: cannot read"),
    ],
)
def test_bad_redis_urls_are_rejected(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_settings(store="redis", redis_url=url)
    load_settings(store="memory", redis_url=url)  # not used: not checked


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:s3cret@redis.internal",
        "redis://user:pw@[::1]:6380/2",
        "rediss://redis.internal:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
        "unix:///run/redis.sock?db=3",
    ],
)
def test_good_redis_urls_are_accepted(url: str) -> None:
    assert load_settings(store="redis", redis_url=url).redis_url == url


def test_redis_url_is_checked_by_the_stores_own_parser_too(tmp_path: Path) -> None:
    """What only the store's parser sees (a CA file that holds no certificate) is refused by
    the settings too, so ``--check`` and the server's start-up say the same."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match=r"redis_url: .*no certificate"):
        load_settings(store="redis", redis_url=f"rediss://h/0?ssl_ca_certs={bogus}")


def test_redis_url_errors_hide_the_password() -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(store="redis", redis_url="redis://me:hunter2@h:port/0")
    message = caught.value.errors()[0]["msg"]  # what megaphone prints (not the input)
    assert "hunter2" not in message
    assert "redis://me:***@h:port/0" in message
    assert hide_password("rediss://:pw@h/0") == "rediss://:***@h/0"
    assert hide_password("redis://h/0") == "redis://h/0"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"address": "127.0.0.1:99999"}, "port must be 0-65535"),
        ({"grpc_address": "0.0.0.0:65536"}, "port must be 0-65535"),
        (
            {"webhooks": {"a": {"hook": "on-channel-deleted", "endpoint": "backend/hook"}}},
            "must be an http:// or https:// URL",
        ),
    ],
)
def test_values_the_server_would_misuse_are_rejected(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_settings(**bad)


def test_mng_socket_path_problems(tmp_path: Path) -> None:
    assert mng_socket_problem(str(tmp_path / "m.sock")) is None
    assert mng_socket_problem(str(tmp_path / "missing" / "m.sock")) == (
        f"mng_socket_path: directory {str(tmp_path / 'missing')!r} does not exist"
    )
    (tmp_path / "file").write_text("")
    assert mng_socket_problem(str(tmp_path / "file")) == (
        f"mng_socket_path {str(tmp_path / 'file')!r} exists and is not a socket"
    )
    long_path = "/tmp/" + "x" * 120 + ".sock"
    problem = mng_socket_problem(long_path)
    assert problem is not None
    assert "longer than a Unix socket path may be" in problem
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    assert mng_socket_problem(str(stale)) is None  # a stale socket file is replaced


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_mng_socket_directory_must_be_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert mng_socket_problem(str(locked / "m.sock")) == (
        f"mng_socket_path: directory {str(locked)!r} is not writable"
    )


def test_startup_problems_check_an_explicit_socket_path_only(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing" / "m.sock")
    assert startup_problems(load_settings(address="127.0.0.1:0", mng_socket_path=missing)) == [
        f"mng_socket_path: directory {str(tmp_path / 'missing')!r} does not exist"
    ]
    assert startup_problems(load_settings(address="127.0.0.1:0", mng_socket_path="")) == []
    # the built-in default is skipped by the server (with a warning) when it cannot be used
    assert startup_problems(load_settings(address="127.0.0.1:0")) == []


def test_address_problems() -> None:
    problem = address_problem("nohost.invalid:3000", in_use_ok=False)
    assert problem is not None
    assert problem.startswith("address 'nohost.invalid:3000': cannot resolve 'nohost.invalid'")
    problem = address_problem("192.0.2.1:3000", in_use_ok=False)  # TEST-NET: not ours
    assert problem is not None
    assert "cannot listen" in problem
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        problem = address_problem(address, in_use_ok=False)
        assert problem is not None
        assert "in use" in problem
        assert address_problem(address, in_use_ok=True) is None  # --check next to a running node
    assert address_problem("127.0.0.1:0", in_use_ok=False) is None


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert "`" not in default_text(name) or name == "agent"


def test_readme_table_is_generated_from_the_settings() -> None:
    """The README's configuration table is ``python -m megaphone.config --markdown``: every
    setting, its default and its description, one source with ``megaphone --help``."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("| key | default | meaning |\n")
    end = readme.index("\n\n", start) + 1
    assert readme[start:end] == markdown_table(), (
        "README.md's configuration table is stale: "
        "replace it with the output of `python -m megaphone.config --markdown`"
    )
    rows = markdown_table().splitlines()[2:]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == list(Settings.model_fields)


def test_markdown_table_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "megaphone.config", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == markdown_table()
    assert "| `redis_url` | `redis://127.0.0.1:6379/0` |" in result.stdout
    assert "| `producer_token` | unset |" in result.stdout


def test_env_typos_are_reported_other_tools_variables_are_not() -> None:
    environ = {
        "megaphone_pol_duration_millis": "5",
        "MEGAPHONE_REDIS_UR": "redis://h/0",
        "MEGAPHONE_URL": "http://localhost:3000",  # megaphone-client's
        "MEGAPHONE_TOKEN": "t",
        "megaphone_address": "127.0.0.1:0",
        "HOME": "/root",
    }
    assert env_typos(environ) == [
        "MEGAPHONE_REDIS_UR is no setting (ignored); did you mean megaphone_redis_url?",
        "megaphone_pol_duration_millis is no setting (ignored); "
        "did you mean megaphone_poll_duration_millis?",
    ]
