"""The ``megaphone`` command as a real subprocess: config sources, serving, SIGTERM."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import MEGAPHONE, MegaphoneProcess, clean_env


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
    with httpx.Client(base_url=node.url, timeout=30) as http:
        channel = http.post("/create").json()
        http.post(f"/write/{channel['producerAddress']}/s", json=1)
        with http.stream("GET", f"/read/{channel['consumerAddress']}") as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["body"] == 1
            node.terminate()
            assert list(lines) == []  # the stream ends cleanly (last chunk), no error
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
