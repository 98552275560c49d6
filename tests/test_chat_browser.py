"""examples/chat in a real browser (Debian's Chromium driven by Playwright): two pages chat through
the demo backend, one reading with EventSource and one with a WebSocket; the broker (Redis store)
restarts under them, and both pages come back by themselves and show every message exactly once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from support import RedisServer, free_port

playwright_api = pytest.importorskip("playwright.async_api")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (`apt-get install -y chromium`; .ci/run does)"
)


class Broker:
    """A broker subprocess on a fixed port, on Redis, that can be restarted."""

    def __init__(self, redis: RedisServer, prefix: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "megaphone",
            "--address", f"127.0.0.1:{self.port}",
            "--agent", "chat",
            "--store", "redis",
            "--redis-url", redis.url,
            "--redis-prefix", prefix,
            "--sse-retry-millis", "300",
            "--shutdown-grace-millis", "2000",
            "--mng-socket-path", "",
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(*self.args)
        await wait_serving(f"{self.url}/readyz")

    async def stop(self) -> None:
        await stop(self.process)


async def stop(process: asyncio.subprocess.Process | None) -> None:
    """SIGTERM (a graceful stop), and wait for the exit."""
    if process is not None and process.returncode is None:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.wait()


async def wait_serving(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
async def chat(redis_server: RedisServer) -> AsyncIterator[tuple[str, Broker]]:
    """The demo exactly as the README runs it, but on a broker the test can restart."""
    broker = Broker(redis_server, f"chat-{os.getpid()}-{free_port()}:")
    await broker.start()
    port = free_port()
    app = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples/chat/app.py"), "--port", str(port),
        "--broker", broker.url,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_serving(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}", broker
    finally:
        await stop(app)
        await broker.stop()


async def lines_of(page: playwright_api.Page) -> list[str]:
    texts: list[str] = await page.locator("#log p").all_inner_texts()
    return texts


async def until_shown(page: playwright_api.Page, text: str) -> None:
    await page.locator("#log p", has_text=text).first.wait_for(timeout=15_000)


async def test_two_pages_chat_and_survive_a_broker_restart(chat: tuple[str, Broker]) -> None:
    url, broker = chat
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            alice = await (await browser.new_context()).new_page()
            bob = await (await browser.new_context()).new_page()
            await alice.goto(url)  # EventSource
            await bob.goto(url + "/?transport=ws")  # WebSocket
            for page, name in ((alice, "alice"), (bob, "bob")):
                await page.fill("#name", name)
                await page.click("#join button")
                await page.wait_for_function("window.chatOpens >= 1", timeout=15_000)
            await alice.fill("#text", "hello from alice")
            await alice.press("#text", "Enter")
            await bob.fill("#text", "hi alice, bob here")
            await bob.press("#text", "Enter")
            for page in (alice, bob):
                await until_shown(page, "hello from alice")
                await until_shown(page, "hi alice, bob here")

            # the broker restarts (graceful stop, then a new process on the same port and
            # Redis): both readers reconnect by themselves and resume after their last event
            await broker.stop()
            await broker.start()
            for page in (alice, bob):
                await page.wait_for_function("window.chatOpens >= 2", timeout=20_000)
            await alice.fill("#text", "back after the restart")
            await alice.press("#text", "Enter")
            for page in (alice, bob):
                await until_shown(page, "back after the restart")
                lines = await lines_of(page)
                for text in ("hello from alice", "hi alice, bob here", "back after the restart"):
                    assert sum(text in line for line in lines) == 1, (text, lines)
            shot = os.environ.get("MEGAPHONE_CHAT_SCREENSHOT")
            if shot:
                await bob.screenshot(path=shot)
        finally:
            await browser.close()
