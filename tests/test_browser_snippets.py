"""The README's browser snippet for the NDJSON stream, run as written in Debian's Chromium
(Playwright): the page reads a channel with ``fetch`` and gets every event in order, lines whole,
until the read window ends. (SSE and WebSocket run in a browser in test_chat_browser.py.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import ServerFactory, base_url, create_channel

playwright_api = pytest.importorskip("playwright.async_api")

README = Path(__file__).resolve().parent.parent / "README.md"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (`apt-get install -y chromium`; .ci/run does)"
)


def readme_function(name: str) -> str:
    """The JavaScript function ``name`` as the README shows it."""
    match = re.search(rf"^async function {name}\(.*?^\}}$", README.read_text(), re.S | re.M)
    assert match is not None, f"{name} is not in the README"
    return match.group(0)


async def test_the_readme_s_ndjson_snippet_reads_a_channel(server_factory: ServerFactory) -> None:
    node = await server_factory(poll_duration_millis=1_500)
    url = base_url(node)
    big = "x" * 100_000  # a line longer than a network chunk: it arrives in pieces
    async with httpx.AsyncClient(base_url=url) as http:
        channel = await create_channel(http)
        for body in ({"n": 0}, {"n": 1, "pad": big}, {"n": 2}):
            answer = await http.post(f"/write/{channel['producerAddress']}/s", json=body)
            assert answer.status_code == 201
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"{url}/healthz")  # the broker's origin: no CORS needed here
            events = await page.evaluate(
                "async (url) => {"
                + readme_function("readNdjson")
                + "; const got = []; await readNdjson(url, (e) => got.push(e)); return got; }",
                f"{url}/read/{channel['consumerAddress']}",
            )
        finally:
            await browser.close()
    assert [event["body"]["n"] for event in events] == [0, 1, 2]
    assert events[1]["body"]["pad"] == big
    assert all(event["sid"] == "s" and event["eid"] for event in events)
