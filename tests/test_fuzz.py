"""Property-based fuzzing of the public HTTP API (hypothesis).

Random bytes, unicode and huge values go into every endpoint's request line, path, query string,
headers and body, mixed with valid structure (a real producer address with random stream ids and
bodies, valid JSON of random shape, deeply nested JSON, bodies and targets around the size limits,
random header names and values with non-ASCII bytes, raw byte strings on a socket). Properties,
checked for every example:

* never a 5xx (but the 501/505 the oracle predicts); every 4xx carries the ``{"code","message"}``
  JSON body; a 405 says ``Allow``;
* a complete request always gets an answer before the connection closes, and an invalid one gets
  a 4xx (then the close). The client half-closes after sending, so the server may close without a
  word only on a request that is incomplete. What is complete or invalid is decided by parsing the
  bytes we send with httptools, the server's own parser (:class:`Oracle`);
* the server keeps serving: ``POST /create`` → 200 after each example; at the end of each test,
  nothing reached the server's stderr (errors, tracebacks, event-loop exceptions);
* a refused write writes nothing: each test keeps one real channel, records what every accepted
  write (``201``) put into it, and reads it back at the end: exactly those events, in order.

Each test starts one server, in a subprocess, that all its examples share; they talk to it with a
sync ``httpx.Client`` and raw sockets. ``MEGAPHONE_FUZZ_EXAMPLES=N`` runs N examples per test (the
defaults keep the file at about 15 s); runs are derandomized and keep no example database, so CI
is deterministic. The bugs fuzzing found keep a regression test each, at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import string
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

import httptools
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

T = TypeVar("T")

MAX_BODY = 8192
MAX_SID = 64
MAX_URL = 1024
MAX_HEADERS = 2048
WAIT = 10.0  # upper bound for anything we wait on; never a performance assertion
EXAMPLES = int(os.environ.get("MEGAPHONE_FUZZ_EXAMPLES") or 0)
SERVER_SETTINGS: dict[str, Any] = {
    "poll_duration_millis": 200,
    "max_body_bytes": MAX_BODY,
    "max_stream_id_length": MAX_SID,
    "max_url_bytes": MAX_URL,
    "max_header_bytes": MAX_HEADERS,
    "channel_buffer_size": 1_000_000,  # accepted writes only accumulate: never a 503 TIMEOUT
}
# orjson parses JSON nested up to 1024 levels but serialises at most 254 (the event wraps the
# body in one more level): the depths around those limits get a test of their own
SERIALISE_DEPTH_LIMIT = 253
PARSE_DEPTH_LIMIT = 1024

pytestmark = pytest.mark.timeout(60 + EXAMPLES)  # about 1 s per example on long local runs

ALNUM = string.ascii_letters + string.digits
TCHAR = "!#$%&'*+-.^_`|~" + ALNUM
B64URL = ALNUM + "-_"
KNOWN_HEADS = {"create", "write", "write-batch", "read", "channelsExists", "metrics"}
NEW_HEADS = {"healthz", "readyz"}
GET_HEADS = {"read", "metrics", "healthz", "readyz"}  # where HEAD is answered like GET
# httptools' reasons for an HTTP version the server answers with 505
UNSUPPORTED_VERSION_REASONS = {"Invalid HTTP version", "Pause on PRI/Upgrade"}
PROTOCOL = "HTTP_STREAM_NDJSON_V1"
CONSUMER_SHAPE = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9]{50})\.([0-9a-fA-F]{1,8})")
PRODUCER_SHAPE = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{59})")
FAILURE_REASONS = {"NOT_FOUND", "BAD_REQUEST"}  # never TIMEOUT/SKIPPED: the buffers never fill


def fuzz_settings(default_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default_examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        report_multiple_bugs=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- the server, in a subprocess ---------------------------------------------------------------

# A real process rather than a thread of this one: hypothesis reseeds the global ``random`` module
# for every example, which in-process would hand the server the same event ids over and over.
# Anything the server writes to stderr (logs at WARNING and above, tracebacks, event-loop errors)
# is a problem; the process ends when its stdin closes.
LAUNCHER = """
import asyncio, json, logging, sys
import uvloop
from megaphone import logs
from megaphone.config import Settings
from megaphone.server import MegaphoneServer

def on_loop_error(loop, context):
    logging.getLogger("megaphone.fuzz").error(
        "event loop: %s", context.get("message"), exc_info=context.get("exception")
    )

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(on_loop_error)
    node = MegaphoneServer(Settings(**json.loads(sys.argv[1])))
    await node.start()
    print(node.port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await node.aclose(grace=1.0)

logs.setup("warning")
uvloop.run(main())
"""


class ServerProcess:
    """One node in a subprocess (one per test function); examples talk to it over sockets."""

    def __init__(self, **overrides: Any) -> None:
        config = {
            "address": "127.0.0.1:0",
            "agent": "test-agent",
            "mng_socket_path": "",  # never the machine's /run/megaphone.sock
            **SERVER_SETTINGS,
            **overrides,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stderr: list[str] = []
        self.stopping = False
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {''.join(self.stderr)}")
        self.port = int(line)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def problems(self) -> str:
        """What went wrong inside the server so far ("" if nothing)."""
        exited = self.process.poll()
        if exited is not None and (exited != 0 or not self.stopping):
            return f"server exited with {exited}\n" + "".join(self.stderr)
        return "".join(self.stderr)

    def stop(self) -> None:
        """Graceful shutdown; afterwards problems() holds everything the server said."""
        assert self.process.stdin is not None
        self.stopping = True
        self.process.stdin.close()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.stderr.append("server did not stop within the grace period\n")
        self._drain.join(WAIT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


# --- raw HTTP: what we send (an oracle parse) and what comes back ----------------------------


@dataclass
class Message:
    """One complete request as httptools (the server's own parser) sees it."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    @property
    def path(self) -> bytes | None:
        try:
            return httptools.parse_url(self.url).path or b""
        except httptools.HttpParserInvalidURLError:
            return None


class Oracle:
    """Parses the bytes we send with httptools: which requests are complete, and whether the
    byte stream is invalid (the server must then answer with a 4xx before closing). ``refusal``:
    the status of a head the server refuses although httptools reads it (505 for a version
    other than 1.0/1.1, 400 for a missing or repeated Host, 501 for a transfer coding other
    than chunked); parsing stops there, as the server's does."""

    def __init__(self, data: bytes) -> None:
        self.messages: list[Message] = []
        self.error: str | None = None
        self.refusal: int | None = None
        self.upgrade = False
        self._current = Message()
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgrade = True
        except httptools.HttpParserError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            if str(exc) in UNSUPPORTED_VERSION_REASONS:
                self.refusal = 505

    def on_message_begin(self) -> None:
        self._current = Message()

    def on_url(self, url: bytes) -> None:
        self._current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._current.method = self.parser.get_method()
        headers: dict[bytes, bytes] = {}
        for name, value in self._current.headers:
            key = name.lower()
            headers[key] = headers[key] + b", " + value if key in headers else value
        version = self.parser.get_http_version()
        host = headers.get(b"host")
        coding = headers.get(b"transfer-encoding")
        if version not in ("1.0", "1.1"):
            self.refusal = 505
        elif (host is None and version == "1.1") or (host is not None and b"," in host):
            self.refusal = 400
        elif coding is not None and coding.lower() != b"chunked":
            self.refusal = 501
        if self.refusal is not None:
            raise ValueError(f"refused: {self.refusal}")  # stops the parse

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        self.messages.append(self._current)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_replies(
    data: bytes, methods: list[bytes], *, eof: bool = True
) -> tuple[list[Reply], bool]:
    """The responses in ``data`` (``methods``: of the requests, in order, to know HEADs) and
    whether the last one is complete (a close-delimited one only is at the ``eof``)."""
    replies: list[Reply] = []
    pos = answered = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end == -1:
            return replies, False
        status_line, *lines = data[pos:end].decode("latin-1").split("\r\n")
        version, status, _ = (status_line + " ").split(" ", 2)
        assert version == "HTTP/1.1", f"bad status line: {status_line!r}"
        assert status.isdigit(), f"bad status line: {status_line!r}"
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon, f"bad response header: {line!r}"
            assert name == name.strip(), f"bad response header: {line!r}"
            assert name.lower() not in headers, f"duplicate response header: {line!r}"
            headers[name.lower()] = value.strip()
        reply = Reply(int(status), headers)
        pos = end + 4
        if reply.status < 200:
            replies.append(reply)
            continue
        head = answered < len(methods) and methods[answered] == b"HEAD"
        answered += 1
        if head and not (reply.closes and pos < len(data)):
            pass  # no body (a fatal error refusing a HEAD's framing does carry one, then closes)
        elif reply.status in (204, 304):
            pass
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if len(data) - pos < size:
                return replies, False
            reply.body, pos = data[pos : pos + size], pos + size
        elif headers.get("transfer-encoding") == "chunked":
            chunks: list[bytes] = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end == -1:
                    return replies, False
                size = int(data[pos:line_end].split(b";")[0], 16)
                if len(data) - line_end - 2 < size + 2:
                    return replies, False
                chunk = data[line_end + 2 : line_end + 2 + size]
                assert data[line_end + 2 + size : line_end + 4 + size] == b"\r\n"
                pos = line_end + 4 + size
                if size == 0:
                    break
                assert chunk.endswith(b"\n"), f"chunk with a partial line: {chunk!r}"
                chunks.append(chunk)
            reply.body = b"".join(chunks)
        else:  # close-delimited
            reply.body, pos = data[pos:], len(data)
            if not eof:
                return [*replies, reply], False
        replies.append(reply)
    return replies, True


def check_reply(reply: Reply) -> None:
    """What holds for every response, whatever was asked."""
    assert reply.status < 500 or reply.status in (501, 505), f"server error: {reply}"
    assert reply.status >= 200 or reply.status == 100, f"unexpected interim response: {reply}"
    if reply.status == 405:
        assert reply.headers.get("allow"), f"405 without Allow: {reply}"
    if reply.status >= 400 and reply.body:
        assert reply.headers.get("content-type") == "application/json", reply
        error = reply.json()
        assert isinstance(error, dict), reply
        assert set(error) == {"code", "message"}, reply
        assert isinstance(error["code"], str), reply
        assert isinstance(error["message"], str), reply
    if reply.status >= 400 and "content-length" in reply.headers:
        assert int(reply.headers["content-length"]) > 0, f"error without a body: {reply}"


def check_exchange(oracle: Oracle, replies: list[Reply]) -> list[tuple[Message, Reply]]:
    """Every complete request is answered, in order, until an answer closes the connection; an
    invalid byte stream ends with a 4xx and a close. Returns (request, final reply) pairs."""
    for reply in replies:
        check_reply(reply)
    finals = [r for r in replies if r.status >= 200]
    pairs: list[tuple[Message, Reply]] = []
    closed = False
    for index, message in enumerate(oracle.messages):
        assert index < len(finals), (
            f"connection closed without an answer to request {index} "
            f"({message.method!r} {message.url[:100]!r}); answers: {finals}"
        )
        pairs.append((message, finals[index]))
        if finals[index].closes:
            closed = True
            break
    rest = finals[len(pairs) :]
    if not closed and oracle.error is not None:
        assert rest, f"invalid request ({oracle.error}) closed without a 4xx answer"
    if rest:  # a refusal of what follows the complete requests: a 4xx, then the close
        assert len(rest) == 1, f"more answers than requests: {finals}"
        if rest[0].status >= 500:  # only what the oracle predicts (a 4xx may come first)
            assert rest[0].status == oracle.refusal, (rest[0], oracle.refusal)
        else:
            assert 400 <= rest[0].status < 500, rest[0]
        assert rest[0].closes, rest[0]
    return pairs


# --- the fixture: server, client, one real channel ------------------------------------------


def b64url(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


class Fuzz:
    """One server, an HTTP client, the real channel and what accepted writes put into it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.port = server.port
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=WAIT)
        self.channel = self.create()
        self.producer: str = self.channel["producerAddress"]
        self.consumer: str = self.channel["consumerAddress"]
        self.agent, _, token = self.producer.partition(".")
        self.sealed = b64url(token)
        self.segment = self.consumer.split(".")[1]
        self.expected: list[tuple[str, Any]] = []  # (sid, body) of every accepted write
        self.server_errors_expected = False  # set by a test that asserts on a known 500 itself

    def close(self) -> None:
        self.http.close()

    def create(self) -> dict[str, Any]:
        reply = self.http.post("/create")
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data

    def assert_healthy(self) -> None:
        """Still serving. (What the server logs arrives on another pipe, a little later: the
        fixture checks it at the end of the test.)"""
        self.create()
        assert self.server.process.poll() is None, self.server.problems()

    # which channel an address names: True = ours, False = not ours, None = another spelling
    # of ours (base64 padding bits, feature digits) that the server may or may not accept
    def producer_is_ours(self, address: str) -> bool | None:
        if address == self.producer:
            return True
        match = PRODUCER_SHAPE.fullmatch(address)
        if match is None or match[1] != self.agent or b64url(match[2]) != self.sealed:
            return False
        return None

    def address_is_ours(self, address: str) -> bool | None:
        if address in (self.producer, self.consumer):
            return True
        match = CONSUMER_SHAPE.fullmatch(address)
        if match is not None:
            return None if (match[1], match[2]) == (self.agent, self.segment) else False
        return self.producer_is_ours(address)

    def account(self, path: bytes, body: bytes, status: int, reply_body: bytes) -> None:
        """Record what an accepted write put into our channel (and that it could only be ours)."""
        if status != 201:
            return
        head, _, rest = path.decode("latin-1")[1:].partition("/")
        if head == "write":
            producer, sid = (unquote_to_bytes(p).decode() for p in rest.split("/", 1))
            assert self.producer_is_ours(producer) is not False, f"a write into {producer!r}"
            self.expected.append((sid, orjson.loads(body)))
        elif head == "write-batch":
            batch = orjson.loads(body)
            channels = batch["channels"] if "channels" in batch else batch["channelIds"]
            failures = orjson.loads(reply_body)["failures"]
            failed = {(f["channel"], f["index"]) for f in failures}
            for channel in dict.fromkeys(channels):
                indexes = range(len(batch["messages"]))
                if self.producer_is_ours(channel) is False:
                    assert all((channel, i) in failed for i in indexes), (channel, failures)
                    continue
                for i, message in enumerate(batch["messages"]):
                    if (channel, i) not in failed:
                        sid = message["streamId"] if "streamId" in message else message["stream_id"]
                        self.expected.append((sid, message["body"]))

    def check_channel(self) -> None:
        """Our channel holds exactly what the accepted writes put there, in order."""
        marker = f"end-of-test-{len(self.expected)}"
        reply = self.http.post(f"/write/{self.producer}/end", json=marker)
        assert reply.status_code == 201, reply.text
        events: list[dict[str, Any]] = []
        buffer = b""
        with self.http.stream("GET", f"/read/{self.consumer}") as stream:
            assert stream.status_code == 200
            # split on b"\n" only: iter_lines() would also split on U+2028, U+0085, ..., which
            # JSON strings may hold unescaped
            for chunk in stream.iter_bytes():
                *lines, buffer = (buffer + chunk).split(b"\n")
                events += [orjson.loads(line) for line in lines]
                if events and events[-1]["body"] == marker:
                    break
        assert events, "no events"
        assert (events[-1]["sid"], events[-1]["body"]) == ("end", marker), events[-3:]
        got = [(e["sid"], e["body"]) for e in events[:-1]]
        assert len(got) == len(self.expected), (len(got), len(self.expected))
        assert got == self.expected

    # raw sockets
    def talk(self, data: bytes, *, answers: int | None = None) -> tuple[bytes, list[Reply]]:
        """Send ``data``; then either half-close and read to the server's close, or (with
        ``answers``, as a half-close ends a read stream: the reader hung up) read until that
        many complete final responses arrived."""
        methods = [m.method for m in Oracle(data).messages]
        received = bytearray()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            try:
                sock.sendall(data)
                if answers is None:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server refused early and closed: read what it said
            while True:
                if answers is not None:
                    replies, complete = parse_replies(bytes(received), methods, eof=False)
                    if complete and len([r for r in replies if r.status >= 200]) >= answers:
                        break
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break  # whatever was owed and is missing fails the checks
                except TimeoutError:
                    raise AssertionError(
                        f"no answer and no close within {WAIT} s; got {bytes(received)[:300]!r}"
                    ) from None
                if not chunk:
                    break
                received += chunk
        replies, complete = parse_replies(bytes(received), methods)
        assert complete, f"truncated response: {bytes(received)[-300:]!r}"
        return bytes(received), replies

    def exchange(self, data: bytes) -> list[tuple[Message, Reply]]:
        """Send ``data`` on a fresh connection, half-close, check the answers (and account for
        accepted writes). Returns (request, final reply) pairs."""
        note(f"sent: {data[:2000]!r}")
        oracle = Oracle(data)
        _, replies = self.talk(data)
        note(f"answers: {replies}")
        event("answers: " + (" ".join(str(r.status) for r in replies) or "none"))
        pairs = check_exchange(oracle, replies)
        for message, reply in pairs:
            if message.path is not None:
                self.account(message.path, message.body, reply.status, reply.body)
        return pairs


@pytest.fixture
def fuzz() -> Iterator[Fuzz]:
    server = ServerProcess()
    try:
        state = Fuzz(server)
        try:
            yield state
        finally:
            state.close()
    finally:
        server.stop()
    if not state.server_errors_expected:
        assert not server.problems(), server.problems()


# --- strategies -------------------------------------------------------------------------------


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def mostly(usual: st.SearchStrategy[T], unusual: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``usual`` three times in four (``one_of(usual, usual, usual, unusual)`` would not do:
    hypothesis merges equal branches)."""
    return st.integers(0, 3).flatmap(lambda n: unusual if n == 3 else usual)


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """Standard JSON (big integers too, which orjson cannot write)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def nested(depth: int, kind: str) -> bytes:
    if kind == "[]":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def sized_string(size: int, unit: str) -> bytes:
    """A JSON string of about ``size`` bytes (never under 2)."""
    unit_bytes = unit.encode()
    return b'"' + unit_bytes * max(0, (size - 2) // len(unit_bytes)) + b'"'


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, delete count, insertion) edits."""
    for position, delete, insert in edits:
        at = position % (len(data) + 1)
        data = data[:at] + insert + data[at + delete :]
    return data


edits = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 4), st.binary(max_size=4)),
    min_size=1,
    max_size=4,
)
json_bodies = st.builds(dumps, json_values, st.booleans())
huge_bodies = st.builds(
    sized_string,
    st.integers(MAX_BODY - 8, MAX_BODY + 8),
    st.sampled_from(["x", "\u00e9", "\u2603"]),
) | st.builds(sized_string, st.integers(2, 10 * MAX_BODY), st.just("y"))
deep_bodies = st.builds(
    nested,
    st.integers(1, 2 * PARSE_DEPTH_LIMIT),
    st.sampled_from(["[]", "{}"]),
)
garbage_bodies = st.binary(max_size=200) | st.text(max_size=100).map(str.encode)
bodies = st.one_of(
    json_bodies,
    huge_bodies,
    deep_bodies,
    garbage_bodies,
    st.builds(mutate, json_bodies, edits),
)
stream_ids = st.one_of(
    st.text(max_size=MAX_SID + 4),
    st.text(alphabet="./%?#&=+ \\\u00e9\U0001f4e3", max_size=6),
    st.integers(MAX_SID - 2, MAX_SID + 2).map(lambda n: "\u00e9" * n),
    st.sampled_from(["s", ".", "..", "%", "%2F", ""]),
)
_header_names = st.one_of(
    st.sampled_from(
        [
            "Content-Type",
            "Content-Length",
            "Transfer-Encoding",
            "Expect",
            "Connection",
            "Host",
            "Upgrade",
            "Origin",
            "Authorization",
            "Last-Event-ID",
            "Access-Control-Request-Method",
            "Accept-Encoding",
            "X-Forwarded-For",
        ]
    ).map(str.encode),
    st.text(alphabet=TCHAR, min_size=1, max_size=20).map(str.encode),
)
_header_values = st.one_of(
    st.sampled_from(
        [
            b"",
            b"0",
            b"-1",
            b"1" * 40,
            b"18446744073709551616",
            b"chunked",
            b"gzip, chunked",
            b"100-continue",
            b"close",
            b"keep-alive",
            b"upgrade",
            b"websocket",
            b"h2c",
            b"*",
            b"null",
            b"Bearer x",
            b"GET",
        ]
    ),
    st.text(alphabet=string.printable[:95], max_size=40).map(str.encode),
    st.text(alphabet="".join(map(chr, range(0x20, 0x100))), max_size=20).map(
        lambda text: text.encode("latin-1")  # obs-text: bytes 0x80..0xff are legal in values
    ),
    st.integers(MAX_HEADERS - 64, MAX_HEADERS + 64).map(lambda n: b"v" * n),
)
header_names = _header_names | st.binary(min_size=1, max_size=12)
header_values = _header_values | st.binary(max_size=40)
headers_lists = mostly(
    st.lists(st.tuples(_header_names, _header_values), max_size=5),
    st.lists(st.tuples(header_names, header_values), min_size=1, max_size=5),
)


def segment(text: str) -> str:
    """Percent-encode everything reserved, dots too (clients drop "." and ".." segments)."""
    return quote(text, safe="").replace(".", "%2E")


def text_or_bytes_segment(value: str | bytes) -> str:
    return quote_from_bytes(value, safe="") if isinstance(value, bytes) else segment(value)


def decoded_sid(value: str | bytes) -> str | None:
    """The stream id the server sees, or None if it is not UTF-8."""
    try:
        return value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return None


def sid_ok(sid: str | None) -> bool:
    return sid is not None and 1 <= len(sid) <= MAX_SID


def json_ok(body: bytes) -> bool:
    """Valid JSON (as the server's parser sees it)."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def serialisable(value: Any) -> bool:
    """Can be an event's body: orjson writes at most 254 levels, and the event adds one."""
    try:
        orjson.dumps([value])
    except TypeError:
        return False
    return True


def request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    version: bytes = b"1.1",
) -> bytes:
    head = [method + b" " + target + b" HTTP/" + version, b"Host: fuzz"]
    head += [name + b": " + value for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(body: bytes, sizes: list[int], extension: bytes, trailer: bytes) -> bytes:
    """``body`` in chunks of ``sizes`` (then the rest), each with ``extension``, then the last
    chunk and ``trailer`` (which may be a header, or garbage)."""
    chunks: list[bytes] = []
    for size in [*sizes, len(body)]:
        piece, body = body[:size], body[size:]
        if piece:
            chunks.append(b"%x%b\r\n%b\r\n" % (len(piece), extension, piece))
    return b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"


def with_length(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Content-Length", str(len(body)).encode())]


def producers(fuzz: Fuzz) -> st.SearchStrategy[str]:
    """Our producer address, our consumer address, and near misses of both."""
    real, agent = fuzz.producer, fuzz.agent
    token = real.partition(".")[2]
    return st.one_of(
        st.just(real),
        st.just(fuzz.consumer),
        st.text(max_size=80),
        st.text(alphabet=B64URL, min_size=59, max_size=59).map(lambda t: f"{agent}.{t}"),
        st.text(alphabet=ALNUM + "_-", min_size=1, max_size=12).map(lambda a: f"{a}.{token}"),
        st.integers(0, len(real) - 1).map(lambda n: real[:n]),
        st.tuples(st.integers(0, len(real) - 1), st.characters(codec="utf-8")).map(
            lambda edit: real[: edit[0]] + edit[1] + real[edit[0] + 1 :]
        ),
        st.sampled_from(B64URL).map(lambda c: real[:-1] + c),  # the last character's spare bits
        st.text(max_size=4).map(lambda s: real + s),
    )


# --- endpoints through an HTTP client ---------------------------------------------------------


def test_write_with_random_producer_stream_id_and_body(fuzz: Fuzz) -> None:
    @fuzz_settings(150)
    @given(
        producer=mostly(st.just(fuzz.producer), producers(fuzz)),
        sid=mostly(st.text(min_size=1, max_size=MAX_SID), stream_ids | st.binary(max_size=12)),
        body=mostly(json_bodies | huge_bodies, bodies),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
        ),
    )
    def run(producer: str, sid: str | bytes, body: bytes, content_type: str) -> None:
        path = f"/write/{segment(producer)}/{text_or_bytes_segment(sid)}"
        reply = fuzz.http.post(path, content=body, headers={"content-type": content_type})
        note(f"POST {path} {body[:300]!r} -> {reply.status_code} {reply.text[:300]}")
        event(f"status {reply.status_code}")
        check_reply(Reply(reply.status_code, dict(reply.headers), reply.content))
        ours = fuzz.producer_is_ours(producer)
        if len(body) > MAX_BODY:
            assert reply.status_code == 413
        elif ours is True and sid_ok(decoded_sid(sid)) and json_ok(body):
            assert reply.status_code == (201 if serialisable(orjson.loads(body)) else 400)
        elif ours is True:
            assert reply.status_code == 400
        elif ours is None:
            assert reply.status_code in (201, 400, 404)
        else:
            assert reply.status_code in (400, 404)
        fuzz.account(path.encode(), body, reply.status_code, reply.content)
        fuzz.assert_healthy()

    run()
    fuzz.check_channel()


def batch_shape_ok(value: Any) -> bool | None:
    """Whether a write-batch body is valid (None: an alias clash, either answer is fine)."""
    if not isinstance(value, dict):
        return False
    keys = set(value)
    if {"channels", "channelIds"} <= keys:
        return None
    if keys not in ({"channels", "messages"}, {"channelIds", "messages"}):
        return False
    channels = value.get("channels", value.get("channelIds"))
    messages = value["messages"]
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        return False
    if not isinstance(messages, list):
        return False
    unsure = False
    for message in messages:
        if not isinstance(message, dict):
            return False
        keys = set(message)
        if keys == {"streamId", "stream_id", "body"}:
            unsure = True
            continue
        if keys not in ({"streamId", "body"}, {"stream_id", "body"}):
            return False
        sid = message.get("streamId", message.get("stream_id"))
        if not isinstance(sid, str) or not sid_ok(sid) or not serialisable(message["body"]):
            return False
    return None if unsure else True


def test_write_batch_with_random_shapes(fuzz: Fuzz) -> None:
    sids = mostly(st.text(min_size=1, max_size=MAX_SID), stream_ids)
    messages = st.lists(
        mostly(st.fixed_dictionaries({"streamId": sids, "body": json_values}), json_values),
        max_size=4,
    )
    channels = st.lists(
        mostly(st.just(fuzz.producer) | producers(fuzz), json_scalars), unique=True, max_size=4
    )
    batches = st.one_of(
        st.fixed_dictionaries({"channels": channels, "messages": messages}),
        st.fixed_dictionaries({"channelIds": channels, "messages": messages}),
        st.fixed_dictionaries(
            {"channels": channels, "messages": messages},
            optional={"channelIds": channels, "extra": json_values},
        ),
        json_values,
    )

    @fuzz_settings(120)
    @given(
        body=mostly(
            st.builds(dumps, batches, st.booleans()), garbage_bodies | huge_bodies | deep_bodies
        )
    )
    def run(body: bytes) -> None:
        reply = fuzz.http.post("/write-batch", content=body)
        note(f"POST /write-batch {body[:500]!r} -> {reply.status_code} {reply.text[:500]}")
        event(f"status {reply.status_code}")
        check_reply(Reply(reply.status_code, dict(reply.headers), reply.content))
        shape = batch_shape_ok(orjson.loads(body)) if json_ok(body) else False
        if len(body) > MAX_BODY:
            assert reply.status_code == 413
        elif shape is True:
            assert reply.status_code == 201
        elif shape is False:
            assert reply.status_code == 400
        else:
            assert reply.status_code in (201, 400)
        if reply.status_code == 201:
            failures = reply.json()["failures"]
            assert isinstance(failures, list)
            for failure in failures:
                assert set(failure) == {"channel", "index", "reason"}, failure
                assert failure["reason"] in FAILURE_REASONS, failure
            assert not [f for f in failures if f["channel"] == fuzz.producer], failures
        fuzz.account(b"/write-batch", body, reply.status_code, reply.content)
        fuzz.assert_healthy()

    run()
    fuzz.check_channel()


def test_create_and_channels_exists_with_random_bodies(fuzz: Fuzz) -> None:
    addresses = st.lists(producers(fuzz) | st.just(fuzz.consumer), max_size=5)
    create_bodies = st.one_of(
        st.fixed_dictionaries(
            {"protocols": st.lists(st.sampled_from([PROTOCOL, "SSE", ""]) | st.text(), max_size=3)}
        ),
        json_values,
    )
    exists_bodies = st.one_of(
        st.fixed_dictionaries({"channels": addresses}),
        st.fixed_dictionaries({"channelIds": addresses}),
        st.fixed_dictionaries({"channels": st.lists(json_scalars, max_size=3)}),
        json_values,
    )

    def bodies_for(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
        odd = garbage_bodies | huge_bodies | deep_bodies | st.sampled_from([b"", b" \r\n\t"])
        return mostly(st.builds(dumps, values, st.booleans()), odd)

    @fuzz_settings(120)
    @given(
        request=st.tuples(st.just("/create"), bodies_for(create_bodies))
        | st.tuples(st.just("/channelsExists"), bodies_for(exists_bodies))
    )
    def run(request: tuple[str, bytes]) -> None:
        endpoint, body = request
        reply = fuzz.http.post(endpoint, content=body)
        note(f"POST {endpoint} {body[:500]!r} -> {reply.status_code} {reply.text[:500]}")
        event(f"{endpoint} status {reply.status_code}")
        check_reply(Reply(reply.status_code, dict(reply.headers), reply.content))
        parsed = orjson.loads(body) if json_ok(body) else None
        if len(body) > MAX_BODY:
            assert reply.status_code == 413
        elif endpoint == "/create":
            protocols = parsed.get("protocols") if isinstance(parsed, dict) else None
            strings = isinstance(protocols, list) and all(isinstance(p, str) for p in protocols)
            if not body.strip():
                assert reply.status_code == 200
            elif not (isinstance(parsed, dict) and set(parsed) <= {"protocols"}) or (
                "protocols" in parsed and not strings
            ):
                assert reply.status_code == 400
            elif not protocols or PROTOCOL in protocols:
                assert reply.status_code == 200
            else:  # strings only, none known today (more protocols are coming): 200 or 400
                assert reply.status_code in (200, 400)
            if reply.status_code == 200:
                created = reply.json()
                assert created["channelId"] == created["consumerAddress"]
                assert CONSUMER_SHAPE.fullmatch(created["consumerAddress"]), created
                assert PRODUCER_SHAPE.fullmatch(created["producerAddress"]), created
                assert isinstance(created["protocols"], list), created
                assert created["protocols"], created
        else:
            listed = None
            if isinstance(parsed, dict) and len(parsed) == 1:
                listed = parsed.get("channels", parsed.get("channelIds"))
            if isinstance(listed, list) and all(isinstance(a, str) for a in listed):
                assert reply.status_code == 200
                exists = reply.json()["channels"]
                assert set(exists) == set(listed), exists
                for address, found in exists.items():
                    ours = fuzz.address_is_ours(address)
                    assert found is ours if ours is not None else isinstance(found, bool)
            else:
                assert reply.status_code == 400
        fuzz.assert_healthy()

    run()


def test_read_with_random_address_and_resume_cursor(fuzz: Fuzz) -> None:
    """``GET /read/{consumer}`` with random ``?after=`` and ``Last-Event-ID`` (resume cursors):
    200 or 4xx, never 5xx, and a stream of whole, well-formed event lines."""
    seen_eids: list[str] = []
    for i in range(3):
        assert fuzz.http.post(f"/write/{fuzz.producer}/seed", json=i).status_code == 201
    cursors = st.one_of(
        st.text(max_size=40).map(str.encode),
        st.binary(max_size=40),
        st.text(alphabet=ALNUM, min_size=23, max_size=23).map(str.encode),
        st.integers(200, 400).map(lambda n: b"e" * n),
    ).map(lambda c: c.replace(b"\r", b"").replace(b"\n", b""))
    # (no line breaks: injected headers and requests are test_random_headers' business)

    @fuzz_settings(60)
    @given(
        consumer=mostly(st.just(fuzz.consumer), producers(fuzz)),
        where=st.sampled_from(["nowhere", "query", "header", "both"]),
        after=cursors,
        after_raw=mostly(st.just(False), st.just(True)),
        last_event_id=cursors,
        known_cursor=st.booleans(),
        pick=st.integers(0, 1000),
        write_first=st.booleans(),
        version=mostly(st.just(b"1.1"), st.just(b"1.0")),
        extra_headers=st.lists(
            st.sampled_from(
                [
                    (b"Origin", b"https://app.example"),
                    (b"Connection", b"keep-alive"),
                    (b"Connection", b"close"),
                    (b"Accept", b"application/x-ndjson"),
                    (b"Last-Event-ID", b""),
                ]
            ),
            max_size=2,
            unique=True,
        ),
    )
    def run(
        consumer: str,
        where: str,
        after: bytes,
        after_raw: bool,
        last_event_id: bytes,
        known_cursor: bool,
        pick: int,
        write_first: bool,
        version: bytes,
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        if known_cursor and seen_eids:  # a cursor the server really sent
            after = last_event_id = seen_eids[pick % len(seen_eids)].encode()
        if write_first:
            assert fuzz.http.post(f"/write/{fuzz.producer}/r", json="r").status_code == 201
        target = b"/read/" + segment(consumer).encode()
        if where in ("query", "both"):
            target += b"?after=" + (after if after_raw else quote_from_bytes(after).encode())
        headers = [(b"Last-Event-ID", last_event_id)] if where in ("header", "both") else []
        raw = request(b"GET", target, headers + extra_headers, b"", version)
        note(f"sent: {raw!r}")
        oracle = Oracle(raw)
        if oracle.error is not None or oracle.upgrade or len(oracle.messages) != 1:
            _, replies = fuzz.talk(raw)  # not one valid request: a 4xx, then the close
            check_exchange(oracle, replies)
        else:
            # a stream ends with its window: chunked (the connection stays) or with the close
            _, replies = fuzz.talk(raw, answers=1)
            note(f"answer: {replies}")
            event(f"status {replies[-1].status}")
            [(_, response)] = check_exchange(oracle, replies)
            ours = fuzz.address_is_ours(consumer)
            if response.status == 200:
                assert ours is not False, consumer
                assert response.headers["content-type"] == "application/x-ndjson"
                framing = response.headers.get("transfer-encoding")
                assert framing == (None if version == b"1.0" else "chunked"), response
                if (b"Origin", b"https://app.example") in extra_headers:
                    assert "access-control-allow-origin" in response.headers, response
                for line in response.body.splitlines():
                    item = orjson.loads(line)
                    assert set(item) == {"sid", "eid", "ts", "body"}, item
                    assert re.fullmatch(r"[A-Za-z0-9]{23}", item["eid"]), item
                    seen_eids.append(item["eid"])
            elif ours is True:
                assert response.status == 400, response  # only a cursor it refuses
            else:
                assert response.status in (400, 404), response
        fuzz.assert_healthy()

    run()


# --- raw HTTP ---------------------------------------------------------------------------------


def templates(fuzz: Fuzz) -> list[bytes]:
    """Valid requests to mix with garbage."""
    write = b'{"n": 1, "t": "caf\xc3\xa9"}'
    exists = orjson.dumps({"channels": [fuzz.consumer, "x"]})
    batch = orjson.dumps(
        {"channels": [fuzz.producer], "messages": [{"streamId": "b", "body": [1, 2]}]}
    )
    producer = fuzz.producer.encode()
    return [
        request(b"POST", b"/create", with_length(b""), b""),
        request(b"POST", b"/write/" + producer + b"/raw", with_length(write), write),
        request(b"POST", b"/write-batch", with_length(batch), batch),
        request(b"POST", b"/channelsExists", with_length(exists), exists),
        request(b"GET", b"/metrics", [], b""),
        request(b"GET", b"/healthz", [], b""),
        request(b"GET", b"/readyz", [], b""),
        request(b"OPTIONS", b"/write/" + producer + b"/raw", [(b"Origin", b"http://a")], b""),
        request(b"GET", b"/read/not-a-consumer", [], b""),
        request(b"HEAD", b"/create", [], b""),
        b"GET /metrics HTTP/1.0\r\n\r\n",
        b"POST /write/" + producer + b"/chunked HTTP/1.1\r\nHost: f\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n",
    ]


def test_raw_bytes_get_an_answer_or_a_clean_close(fuzz: Fuzz) -> None:
    valid = st.sampled_from(templates(fuzz))

    @fuzz_settings(150)
    @given(
        data=st.one_of(
            st.binary(max_size=300),
            st.builds(mutate, valid, edits),
            st.lists(valid | st.binary(max_size=40), min_size=1, max_size=5).map(b"".join),
            st.lists(st.builds(mutate, valid, edits) | valid, min_size=1, max_size=4).map(b"".join),
        )
    )
    def run(data: bytes) -> None:
        fuzz.exchange(data)
        fuzz.assert_healthy()

    run()
    fuzz.check_channel()


methods = mostly(
    st.sampled_from(
        [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT"]
    ),
    st.sampled_from([b"PRI", b"PROPFIND", b"get", b"G ET", b"FOO", b""])
    | st.text(alphabet=TCHAR, min_size=1, max_size=8).map(str.encode),
)
versions = mostly(
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    st.sampled_from([b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b""]),
)
path_heads = st.sampled_from(sorted(KNOWN_HEADS | NEW_HEADS)) | st.text(max_size=12).map(segment)


def test_random_request_lines(fuzz: Fuzz) -> None:
    """Random methods, targets (known and unknown paths, raw and percent-encoded bytes, query
    strings, sizes around the target limit) and versions, with small bodies."""
    raw_segments = st.one_of(
        st.just(fuzz.producer),
        st.just(fuzz.consumer),
        stream_ids.map(segment),
        st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe="")),
        st.text(alphabet=string.printable[:94], max_size=12),
    ).map(str.encode)
    raw_segments = mostly(raw_segments, st.binary(max_size=8))
    queries = st.one_of(
        st.binary(max_size=30),
        st.text(alphabet=string.printable[:94], max_size=30).map(str.encode),
        st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3).map(
            lambda pairs: "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode()
        ),
    )
    known_paths = [
        b"/create",
        b"/write/" + fuzz.producer.encode() + b"/line",
        b"/write-batch",
        b"/read/garbage",
        b"/channelsExists",
        b"/metrics",
        b"/healthz",
        b"/readyz",
    ]
    known_targets = st.builds(
        lambda path, query: path if query is None else path + b"?" + query,
        st.sampled_from(known_paths),
        mostly(st.none(), queries),
    )
    odd_targets = st.one_of(
        st.builds(
            lambda head, segments, query, fragment: (
                b"/"
                + head.encode()
                + b"".join(b"/" + s for s in segments)
                + (b"" if query is None else b"?" + query)
                + (b"" if fragment is None else b"#" + fragment)
            ),
            path_heads,
            st.lists(raw_segments, max_size=3),
            st.none() | queries,
            mostly(st.none(), st.binary(max_size=6)),
        ),
        st.sampled_from([b"*", b"/", b"", b"//create", b"http://fuzz/metrics", b"fuzz:80"]),
        st.integers(MAX_URL - 16, MAX_URL + 16).map(lambda n: b"/read/" + b"a" * (n - 6)),
    )
    targets = mostly(known_targets, odd_targets)
    framings = st.sampled_from(["length", "none", "chunked", "wrong-length"])
    chunkings = st.tuples(
        st.lists(st.integers(1, 64), max_size=6),  # chunk sizes (the rest is the last chunk)
        st.sampled_from([b"", b";ext", b';a=b;c="d"', b" ", b";\xff"]),  # chunk extension
        st.sampled_from([b"", b"Trailer: x\r\n", b"X: \xff\r\n", b"ffffffffffffffffffff\r\n"]),
    )

    @fuzz_settings(150)
    @given(
        method=methods,
        target=targets,
        version=versions,
        body=st.none() | bodies.filter(lambda b: len(b) < 4 * MAX_BODY),
        framing=framings,
        chunking=chunkings,
    )
    def run(
        method: bytes,
        target: bytes,
        version: bytes,
        body: bytes | None,
        framing: str,
        chunking: tuple[list[int], bytes, bytes],
    ) -> None:
        head = method + b" " + target + (b" " + version if version else b"") + b"\r\nHost: f\r\n"
        payload = body or b""
        if framing == "length":
            head += b"Content-Length: %d\r\n" % len(payload)
        elif framing == "wrong-length":
            head += b"Content-Length: %d\r\n" % (len(payload) // 2)
        elif framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
            payload = chunked(payload, *chunking)
        pairs = fuzz.exchange(head + b"\r\n" + payload)
        if pairs and framing != "wrong-length":
            message, reply = pairs[0]
            path = message.path
            if path is not None and reply.status not in (400, 413, 414, 431):
                route = path.decode("latin-1")[1:].partition("/")[0]
                if not path.startswith(b"/") or route not in KNOWN_HEADS | NEW_HEADS:
                    assert reply.status == 404, reply
                elif message.method in (b"GET", b"HEAD") and path in (
                    b"/metrics",
                    b"/healthz",
                    b"/readyz",
                ):
                    assert reply.status == 200, reply
                elif message.method == b"OPTIONS" and path in known_paths:
                    assert reply.status == 204, reply  # a CORS preflight answer
                elif message.method == b"HEAD" and route in GET_HEADS:
                    assert reply.status in (200, 400, 404), reply  # as a GET would be
                elif message.method not in (b"GET", b"POST", b"OPTIONS"):
                    assert reply.status in (404, 405), reply
        fuzz.assert_healthy()

    run()
    fuzz.check_channel()


def test_random_headers(fuzz: Fuzz) -> None:
    """Valid requests with random header names and values (non-ASCII bytes, framing and
    connection headers with odd values, sizes around the header limit)."""
    write = b'{"h": true}'
    exists = orjson.dumps({"channels": [fuzz.consumer]})
    bases = [
        (b"POST", b"/create", b"", 200),
        (b"GET", b"/metrics", b"", 200),
        (b"POST", b"/write/" + fuzz.producer.encode() + b"/hdr", write, 201),
        (b"POST", b"/channelsExists", exists, 200),
        (b"GET", b"/healthz", b"", 200),
        (b"OPTIONS", b"/read/" + fuzz.consumer.encode(), b"", 204),
    ]
    semantic = {
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"connection",
        b"upgrade",
        b"host",
    }

    @fuzz_settings(150)
    @given(
        base=st.sampled_from(bases),
        headers=headers_lists,
        length_first=st.booleans(),
    )
    def run(
        base: tuple[bytes, bytes, bytes, int],
        headers: list[tuple[bytes, bytes]],
        length_first: bool,
    ) -> None:
        method, target, body, status = base
        length = with_length(body)
        all_headers = length + headers if length_first else headers + length
        pairs = fuzz.exchange(request(method, target, all_headers, body))
        plain = all(
            re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name)
            and name.lower() not in semantic
            and not re.search(rb"[\r\n\0]", value)
            for name, value in headers
        )
        size = sum(len(n) + len(v) + 4 for n, v in all_headers)
        if plain and len(pairs) == 1 and size < MAX_HEADERS - 64:
            [(_, reply)] = pairs
            assert reply.status in (status, 400), reply  # 400: a header the parser refuses
        fuzz.assert_healthy()

    run()
    fuzz.check_channel()


# --- deep nesting ------------------------------------------------------------------------------


def test_deeply_nested_body_is_not_a_server_error(fuzz: Fuzz) -> None:
    """orjson reads JSON nested up to 1024 levels but writes at most 254, so the event built
    from a body nested 254..1024 levels deep cannot be serialised (this was a TypeError → 500).
    Either answer is fine (201 and the body comes back intact, or 400), a 500 is not."""
    depths = [SERIALISE_DEPTH_LIMIT, SERIALISE_DEPTH_LIMIT + 1, 1000, PARSE_DEPTH_LIMIT + 1]
    for depth in depths:
        for kind in ("[]", "{}"):
            body = nested(depth, kind)
            batch = b'{"channels":["%s"],"messages":[{"streamId":"deep","body":%s}]}' % (
                fuzz.producer.encode(),
                body,
            )
            for path, content in ((f"/write/{fuzz.producer}/deep", body), ("/write-batch", batch)):
                reply = fuzz.http.post(path, content=content)
                assert reply.status_code in (201, 400), (depth, path, reply.text)
                check_reply(Reply(reply.status_code, dict(reply.headers), reply.content))
                fuzz.account(path.encode(), content, reply.status_code, reply.content)
    fuzz.check_channel()


# --- regressions found by fuzzing ----------------------------------------------------------------


def test_read_cursor_beyond_latin1_is_not_a_server_error(fuzz: Fuzz) -> None:
    statuses: dict[tuple[str, str], int] = {}
    for consumer in (fuzz.consumer, "garbage"):
        for cursor in ("%C4%80", "%E2%98%83", "%FF", "%F0%9F%93%A3"):
            reply = fuzz.http.get(f"/read/{consumer}?after={cursor}")
            statuses[consumer, cursor] = reply.status_code
    assert all(status < 500 for status in statuses.values()), statuses


def test_requests_pipelined_behind_a_waiting_one_are_answered_after_a_half_close() -> None:
    """The client sends three requests and half-closes (``shutdown(SHUT_WR)``): all three are
    complete, so all three are owed an answer. The first waits (a write-batch into a full
    channel: 300 ms, then TIMEOUT), so the EOF arrives while it is in progress."""
    server = ServerProcess(channel_buffer_size=1, write_timeout_millis=300)
    try:
        fuzz = Fuzz(server)
        try:
            assert fuzz.http.post(f"/write/{fuzz.producer}/s", json=1).status_code == 201  # full
            batch = orjson.dumps(
                {"channels": [fuzz.producer], "messages": [{"streamId": "s", "body": 2}]}
            )
            create = request(b"POST", b"/create", with_length(b""), b"")
            data = request(b"POST", b"/write-batch", with_length(batch), batch) + create * 2
            _, replies = fuzz.talk(data)
            assert [r.status for r in replies] == [201, 200, 200], replies
        finally:
            fuzz.close()
    finally:
        server.stop()
    assert not server.problems(), server.problems()


def test_address_with_a_trailing_newline_is_refused(fuzz: Fuzz) -> None:
    """``$`` in a pattern also matches before a final newline: our addresses plus "\\n" must
    not write, read or exist (a 400, and ``false`` in ``/channelsExists``)."""
    producer, consumer = fuzz.producer + "\n", fuzz.consumer + "\n"
    write = fuzz.http.post(f"/write/{quote(producer, safe='')}/s", json="newline")
    read = fuzz.http.get(f"/read/{quote(consumer, safe='')}")
    exists = fuzz.http.post("/channelsExists", json={"channels": [producer, consumer]})
    batch = fuzz.http.post(
        "/write-batch", json={"channels": [producer], "messages": [{"streamId": "s", "body": 1}]}
    )
    outcome = {
        "write": write.status_code,
        "read": read.status_code,
        "exists": exists.json()["channels"],
        "batch": [f["reason"] for f in batch.json()["failures"]],
    }
    assert outcome == {
        "write": 400,
        "read": 400,
        "exists": {producer: False, consumer: False},
        "batch": ["BAD_REQUEST"],
    }
