"""Real peers the tests start: ``megaphone`` subprocesses, redis-server, webhook receivers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

MEGAPHONE = str(Path(sys.executable).parent / "megaphone")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``megaphone_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("megaphone_")}
    env.update(extra)
    return env


class MegaphoneProcess:
    """``megaphone`` as a real subprocess; its URL comes from its "listening" log line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        if "--mng-socket-path" not in args and not any(
            k.lower() == "megaphone_mng_socket_path" for k in env
        ):
            args = [*args, "--mng-socket-path", ""]  # never the machine's /run/megaphone.sock
        self.process = subprocess.Popen(
            [MEGAPHONE, *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        self.terminated = False
        self.lines: list[str] = []
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r'msg="megaphone listening" address=([\d.]+):(\d+)', line)
            if match:
                self.url = f"http://{match[1]}:{match[2]}"
                break
        else:
            raise AssertionError("megaphone did not start:\n" + "".join(self.lines))
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def terminate(self) -> None:
        """One SIGTERM (a second one during shutdown would rightly kill the process)."""
        if not self.terminated:
            self.terminated = True
            self.signal(signal.SIGTERM)

    def terminate_mid_read(self) -> None:
        """Write an event, read it on a streaming read, SIGTERM while that read is open, and
        check the read then ends cleanly (its last chunk, no error)."""
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as http:
            channel = http.post("/create").json()
            http.post(f"/write/{channel['producerAddress']}/s", json=1)
            with http.stream("GET", f"/read/{channel['consumerAddress']}") as stream:
                lines = stream.iter_lines()
                assert json.loads(next(lines))["body"] == 1
                self.terminate()
                assert list(lines) == []

    def wait(self) -> int:
        """Wait for the exit (blocking: from async code, call it through a thread)."""
        return self.process.wait(timeout=15)

    def stop(self) -> int:
        """SIGTERM, wait, close; the exit code."""
        self.terminate()
        code = self.wait()
        self.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._drain.join(timeout=5)
        assert self.process.stderr is not None
        self.process.stderr.close()


class RedisServer:
    """A real redis-server on a free loopback port (``extra`` arguments appended)."""

    def __init__(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = free_port()
        self.args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--loglevel", "warning", *extra,
        ]  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """A clean shutdown (an append-only file, if any, is flushed); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class WebhookReceiver:
    """A real HTTP server in a thread that records the JSON bodies it is posted."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.bodies: list[Any] = []
        self.status = status
        self.delay = delay
        self.answered = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                time.sleep(outer.delay)
                outer.answered += 1
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def posted(self) -> list[str]:
        """Every consumer address posted so far, in order."""
        return [address for body in list(self.bodies) for address in body["channels"]]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
