"""A small multi-room chat on Megaphone: one command, a browser page per participant.

    python examples/chat/app.py            # then open http://127.0.0.1:8000 in two tabs

The backend creates one channel per participant (``POST /join``) and fans every message out to the
room with one ``write-batch`` (``POST /say``), through the project's Python client. The page reads
its channel straight from the broker, with the browser's native ``EventSource`` (SSE) or a
WebSocket (``?transport=ws``): the backend never holds a reader's connection.

Without ``--broker`` it starts a broker (``megaphone``, memory store) beside itself on
``--broker-port`` and stops it on exit. The backend is the standard library's HTTP server and
the blocking client (``Megaphone``), to stay dependency-free; a real one would use its framework.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from megaphone.client import Megaphone, MegaphoneClientError

PAGE = Path(__file__).with_name("index.html")
MAX_TEXT = 2_000
MAX_NAME = 40


class Rooms:
    """Who is in which room: name → producer address, per room."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[str, dict[str, str]] = {}

    def join(self, room: str, name: str, producer: str) -> None:
        with self._lock:
            self._rooms.setdefault(room, {})[name] = producer

    def producers(self, room: str) -> dict[str, str]:
        with self._lock:
            return dict(self._rooms.get(room, {}))

    def drop(self, room: str, producers: set[str]) -> None:
        """Forget participants whose channel is gone (expired: their page closed)."""
        with self._lock:
            members = self._rooms.get(room, {})
            for name, producer in list(members.items()):
                if producer in producers:
                    del members[name]


class ChatBackend:
    def __init__(self, broker_url: str, public_broker_url: str) -> None:
        self.client = Megaphone(broker_url)
        self.public = public_broker_url.rstrip("/")
        self.rooms = Rooms()

    def join(self, room: str, name: str) -> dict[str, Any]:
        channel = self.client.create()
        self.rooms.join(room, name, channel.producer_address)
        self.say(room, "", f"{name} joined")
        return {
            "consumerAddress": channel.consumer_address,
            "readUrl": f"{self.public}/read/{channel.consumer_address}",
        }

    def say(self, room: str, name: str, text: str) -> int:
        members = self.rooms.producers(room)
        if not members:
            return 0
        message = {"id": uuid.uuid4().hex, "from": name, "text": text}
        failures = self.client.write_batch(members.values(), [("chat", message)])
        gone = {f.channel for f in failures if f.reason == "NOT_FOUND"}
        if gone:
            self.rooms.drop(room, gone)
        return len(members) - len(gone)


def handler_for(backend: ChatBackend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: one line per request is noise in a demo

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.send_header("cache-control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, orjson.dumps({"error": message}))

        def do_GET(self) -> None:
            if self.path.split("?")[0] in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such page")

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > 16_384:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "message too long")
                return
            try:
                body = orjson.loads(self.rfile.read(length))
                room = str(body["room"])[:MAX_NAME] or "lobby"
                name = str(body["name"])[:MAX_NAME]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self._error(HTTPStatus.BAD_REQUEST, "expected JSON with room and name")
                return
            if not name:
                self._error(HTTPStatus.BAD_REQUEST, "a name is required")
                return
            try:
                if self.path == "/join":
                    self._send(200, orjson.dumps(backend.join(room, name)))
                elif self.path == "/say":
                    text = str(body.get("text", ""))[:MAX_TEXT]
                    self._send(200, orjson.dumps({"delivered": backend.say(room, name, text)}))
                else:
                    self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            except MegaphoneClientError as exc:
                self._error(HTTPStatus.BAD_GATEWAY, f"broker: {exc}")

    return Handler


@contextlib.contextmanager
def broker_beside(port: int) -> Iterator[str]:
    """A broker subprocess on ``port`` (memory store) until the block ends."""
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "megaphone", "--address", f"127.0.0.1:{port}", "--agent", "chat"]
    )
    try:
        with Megaphone(url) as probe:
            for _ in range(100):
                if process.poll() is not None:
                    raise SystemExit(f"the broker exited with {process.returncode}")
                try:
                    probe.create()
                    break
                except MegaphoneClientError:
                    time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="the chat page and backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--broker", help="a running broker's URL (default: start one)")
    parser.add_argument("--broker-port", type=int, default=3000)
    parser.add_argument("--public-broker", help="the broker's URL as browsers reach it")
    args = parser.parse_args(argv)
    # SIGTERM ends the server like Ctrl-C, so that the broker beside it is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.ExitStack() as stack:
        broker = args.broker or stack.enter_context(broker_beside(args.broker_port))
        backend = ChatBackend(broker, args.public_broker or broker)
        stack.callback(backend.client.close)
        server = ThreadingHTTPServer((args.host, args.port), handler_for(backend))
        server.daemon_threads = True
        print(f"chat on http://{args.host}:{server.server_port} (broker {broker})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
