"""Several logical streams on one channel: progress events, log lines and a final result.

The job writes ``progress`` events (0..100), ``log`` lines and one ``result``; the reader follows
the one channel and tells them apart by stream id (``sid``), as megaphone-js's ``MegaphonePoller``
does. The read goes on across read windows and reconnects; nothing is lost or seen twice.

Run a broker (``megaphone``), then ``python3 examples/progress_stream.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from megaphone.client import AsyncMegaphone

URL = os.environ.get("MEGAPHONE_URL", "http://127.0.0.1:3000")


async def job(megaphone: AsyncMegaphone, producer: str) -> None:
    for percent in range(0, 101, 20):
        await megaphone.write(producer, "progress", {"percent": percent})
        await megaphone.write(producer, "log", f"step {percent // 20} done")
        await asyncio.sleep(0.1)
    await megaphone.write(producer, "result", {"rows": 1234})


async def main() -> None:
    async with AsyncMegaphone(URL) as megaphone:
        channel = await megaphone.create()
        worker = asyncio.create_task(job(megaphone, channel.producer_address))
        # on_gap: a fresh channel read from its start has no gap to report; events only
        events = megaphone.read(channel.consumer_address, on_gap=print)
        async with contextlib.aclosing(events):  # leaving early releases the connection at once
            async for event in events:
                if event.sid == "progress":
                    print(f"progress {event.body['percent']:3d} %")
                elif event.sid == "log":
                    print(f"  log: {event.body}")
                elif event.sid == "result":
                    print(f"result: {event.body}")
                    break
        await worker


if __name__ == "__main__":
    asyncio.run(main())
