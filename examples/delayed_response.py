"""The delayed response: the pattern Megaphone is named for.

A web backend gets a request whose answer takes a while. Instead of holding the request open, it
creates a channel, starts the slow job, and answers at once with the channel's consumer address.
The job writes its result into the channel when it is done; the client waits for it with one call
(``wait_for``: the first event of a stream id), across read windows and dropped connections.

Run a broker (``megaphone``), then ``python3 examples/delayed_response.py`` (``MEGAPHONE_URL``
picks another broker).
"""

from __future__ import annotations

import asyncio
import os

from megaphone.client import AsyncMegaphone

URL = os.environ.get("MEGAPHONE_URL", "http://127.0.0.1:3000")
JOBS: set[asyncio.Task[None]] = set()


async def start_job(megaphone: AsyncMegaphone, number: int) -> str:
    """What the backend's request handler does: returns at once with where to wait."""
    channel = await megaphone.create()

    async def slow_job() -> None:
        await asyncio.sleep(1.0)  # the long-running work
        await megaphone.write(channel.producer_address, "result", {"square": number * number})

    task = asyncio.create_task(slow_job())
    JOBS.add(task)
    task.add_done_callback(JOBS.discard)
    return channel.consumer_address


async def main() -> None:
    async with AsyncMegaphone(URL) as megaphone:
        consumer = await start_job(megaphone, 12)  # the backend's immediate answer
        print(f"job started; its answer will come to {consumer}")
        result = await megaphone.wait_for(consumer, "result", timeout=30)  # the client side
        print(f"result: {result.body}")


if __name__ == "__main__":
    asyncio.run(main())
