"""The ``megaphone`` command as a real subprocess: config sources, serving, SIGTERM."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import MEGAPHONE, MegaphoneProcess, clean_env, free_port


@pytest.fixture
def nodes() -> Iterator[list[MegaphoneProcess]]:
    started: list[MegaphoneProcess] = []
    yield started
    for node in started:
        node.close()


def test_serves_with_file_env_and_flags(tmp_path: Path, nodes: list[MegaphoneProcess]) -> None:
    (tmp_path / "megaphone.toml").write_text('agent = "from-file"\npoll_duration_millis = 60000\n')
    node = MegaphoneProcess(
        ["--address", "127.0.0.1:0", "--poll-duration-millis", "500"],
        tmp_path,
        clean_env(megaphone_agent="from-env"),
    )
    nodes.append(node)
    with httpx.Client(base_url=node.url) as http:
        channel = http.post("/create").json()
        assert channel["agentName"] == "from-env"  # env beats file
        assert http.post(f"/write/{channel['producerAddress']}/s", json={"x": 1}).status_code == 201
        reply = http.get(f"/read/{channel['consumerAddress']}")  # flag: a 500 ms window
        assert [json.loads(line)["body"] for line in reply.text.splitlines()] == [{"x": 1}]
    assert node.stop() == 0


def test_sigterm_ends_open_reads_and_exits(tmp_path: Path, nodes: list[MegaphoneProcess]) -> None:
    node = MegaphoneProcess(["--address", "127.0.0.1:0"], tmp_path, clean_env())
    nodes.append(node)
    node.terminate_mid_read()
    assert node.stop() == 0
    assert any("shutting down" in line for line in node.lines)


def test_check_reports_the_embedded_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [MEGAPHONE, "--check"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["address"] == "0.0.0.0:3000"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", settings["agent"])


def test_invalid_configuration_exits_2(tmp_path: Path) -> None:
    (tmp_path / "megaphone.yaml").write_text("agent: 'not valid!'\n")
    result = subprocess.run(
        [MEGAPHONE, "--check"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "agent" in result.stderr
    assert "Traceback" not in result.stderr


def test_choice_settings_are_flags(tmp_path: Path) -> None:
    """Settings with a fixed set of values (``store``, ``log_level``) are flags too, and a value
    outside the set is refused with exit code 2 and no traceback."""
    args = [MEGAPHONE, "--check", "--store", "redis", "--log-level", "warning"]
    result = subprocess.run(args, cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert (settings["store"], settings["log_level"]) == ("redis", "warning")
    result = subprocess.run(
        [MEGAPHONE, "--check", "--store", "disk"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "disk" in result.stderr
    assert "Traceback" not in result.stderr


def run_megaphone(
    args: list[str], cwd: Path, timeout: float = 20, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEGAPHONE, *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_shows_each_settings_meaning_and_default(tmp_path: Path) -> None:
    """Every setting's description and default from the Settings fields (the README table's
    source): a flag's help, or the list of env/file-only settings after the options."""
    from megaphone.config import Settings, default_text

    result = run_megaphone(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "setting `" not in result.stdout
    squeezed = re.sub(r"\s+", "", result.stdout)  # the help is wrapped, words cut at hyphens
    for name, field in Settings.model_fields.items():
        text = f"{field.description}[default:{default_text(name)}]".replace("`", "")
        flag = f"--{name.replace('_', '-')}"
        assert re.sub(r"\s+", "", text) in squeezed, name
        assert flag in result.stdout or f"{name}:" in result.stdout, name
    assert "--producer-token" not in result.stdout  # a secret is never a flag
    assert "how long a read stays open (NDJSON," in result.stdout


CONFIG_MISTAKES = [
    pytest.param(
        ["--store", "redis", "--redis-url", "http://x"],
        {},
        "redis_url must be redis://, rediss:// or unix://, got 'http://x'",
        id="redis-url",
    ),
    pytest.param(
        [],
        {"megaphone_agent": '{"virtual": {"r1": "REPLICA"}}'},
        "agent: at least one MASTER agent is required (REPLICA agents host no channels)",
        id="no-master",
    ),
    pytest.param(
        ["--mng-socket-path", "/nonexistent-dir/megaphone.sock"],
        {},
        "mng_socket_path: directory '/nonexistent-dir' does not exist",
        id="socket-dir",
    ),
    pytest.param(
        ["--address", "nohost.invalid:3000"],
        {},
        "address 'nohost.invalid:3000': cannot resolve 'nohost.invalid'",
        id="address-host",
    ),
    pytest.param(
        ["--address", "127.0.0.1:99999"],
        {},
        "address: port must be 0-65535, got '127.0.0.1:99999'",
        id="address-port",
    ),
    pytest.param(
        [],
        {"megaphone_webhooks": '{"a": {"hook": "on-channel-deleted", "endpoint": "x"}}'},
        "webhooks.a.endpoint: must be an http:// or https:// URL, got 'x'",
        id="webhook-endpoint",
    ),
]


@pytest.mark.parametrize(("args", "env", "message"), CONFIG_MISTAKES)
def test_check_and_server_reject_the_same_mistake_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    """What the server would refuse at start-up, ``--check`` refuses first, with the same line;
    the server itself prints that line and exits 2 (never a traceback, never a silent start)."""
    args = ["--address", "127.0.0.1:0", *args]
    checked = run_megaphone(["--check", *args], tmp_path, **env)
    served = run_megaphone(args, tmp_path, **env)
    for result in (checked, served):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("megaphone: invalid configuration: " + message), lines[0]
        assert result.stdout == ""
    assert checked.stderr == served.stderr


def test_a_taken_port_fails_the_start_not_the_check(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        checked = run_megaphone(["--check", "--address", address], tmp_path)
        assert checked.returncode == 0, checked.stderr  # e.g. next to the running node
        served = run_megaphone(["--address", address], tmp_path)
    assert served.returncode == 2
    assert served.stderr.splitlines() == [
        f"megaphone: invalid configuration: address '{address}': cannot listen: "
        "Address already in use"
    ]


def test_env_and_flag_dicts_replace_the_files(tmp_path: Path) -> None:
    (tmp_path / "megaphone.toml").write_text(
        '[webhooks.file]\nhook = "on-channel-deleted"\nendpoint = "http://127.0.0.1:9/file"\n'
        '[agent.virtual]\nfile-agent = "MASTER"\n'
    )
    env_hooks = '{"env": {"hook": "on-channel-deleted", "endpoint": "http://127.0.0.1:9/env"}}'
    result = run_megaphone(
        ["--check", "--agent", "flag-agent"], tmp_path, megaphone_webhooks=env_hooks
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert list(settings["webhooks"]) == ["env"]  # not both: the file's hook is not posted
    assert settings["agent"] == "flag-agent"


def test_check_hides_secrets(tmp_path: Path) -> None:
    result = run_megaphone(
        ["--check", "--store", "redis", "--redis-url", "redis://:hunter2@127.0.0.1:6379/0"],
        tmp_path,
        megaphone_producer_token="t0ken",
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "t0ken" not in result.stdout
    assert json.loads(result.stdout)["redis_url"] == "redis://:***@127.0.0.1:6379/0"


def test_mng_socket_path_can_be_turned_off(tmp_path: Path) -> None:
    result = run_megaphone(["--check", "--mng-socket-path", ""], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mng_socket_path"] == ""


def test_an_unreachable_redis_is_one_line_at_start(tmp_path: Path) -> None:
    """Not a mistake ``--check`` can see (Redis may just be down), but the start fails with one
    line naming the address (without its password), not a traceback."""
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    args = ["--address", "127.0.0.1:0", "--store", "redis", "--redis-url", url]
    assert run_megaphone(["--check", *args], tmp_path).returncode == 0
    result = run_megaphone(args, tmp_path, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("megaphone: cannot start: "), result.stderr
    assert last.endswith(f"(redis_url 'redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}')")


def test_a_held_management_socket_fails_the_start_not_the_check(
    tmp_path: Path, nodes: list[MegaphoneProcess]
) -> None:
    path = str(tmp_path / "mng.sock")
    args = ["--address", "127.0.0.1:0", "--mng-socket-path", path]
    first = MegaphoneProcess(args, tmp_path, clean_env())
    nodes.append(first)
    if not any("management API listening" in line for line in first.lines):
        pytest.skip("this build does not serve the management API yet")
    assert run_megaphone(["--check", *args], tmp_path).returncode == 0
    second = run_megaphone(args, tmp_path)
    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    assert second.stderr.splitlines()[-1] == (
        f"megaphone: cannot start: mng_socket_path {path!r} is in use by a running server"
    )


@pytest.mark.parametrize(
    ("name", "text", "detail"),
    [
        ("megaphone.toml", "address = \n", "Invalid value"),
        ("megaphone.yaml", "address: [\n", "expected the node content"),
        ("megaphone.json", '{"address": ', "Expecting value"),
        ("megaphone.json", "[1, 2]", "the top level must be a table of settings"),
        ("megaphone.yaml", "- 1\n", "the top level must be a table of settings"),
        ("megaphone.yaml", "just a string\n", "the top level must be a table of settings"),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(
    tmp_path: Path, name: str, text: str, detail: str
) -> None:
    (tmp_path / name).write_text(text)
    for args in (["--check"], ["--address", "127.0.0.1:0"]):
        result = run_megaphone(args, tmp_path)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"megaphone: invalid configuration: config file {str(tmp_path / name)!r}: "
        )
        assert detail in lines[0]


def test_a_misspelt_environment_variable_is_a_warning(tmp_path: Path) -> None:
    result = run_megaphone(["--check"], tmp_path, megaphone_pol_duration_millis="5")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "megaphone: warning: megaphone_pol_duration_millis is no setting (ignored); "
        "did you mean megaphone_poll_duration_millis?"
    ]
    assert json.loads(result.stdout)["poll_duration_millis"] == 20000
