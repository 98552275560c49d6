"""The Redis store's own edge cases, below HTTP, against the session's real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from megaphone.core.addressing import new_consumer_address
from megaphone.metrics import Metrics
from megaphone.store.redis import RedisStore, _Keys
from support import RedisServer


class Sink:
    writable = True

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.ended = False

    def deliver(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def end(self) -> None:
        self.ended = True


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    made = RedisStore(url=redis_server.url, metrics=Metrics(), prefix=f"s{uuid.uuid4().hex}:")
    await made.start()
    yield made
    await made.aclose()


async def test_a_cancelled_attach_does_not_keep_the_lease(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves while its read attaches, after the attach script took the lease but
    before its reply came back: no subscription exists to release the lease, the store must."""
    address, key = new_consumer_address("a")
    await store.create(key, address, 100)
    real = store._script

    async def slow_reply(name: str, keys: list[str], args: list[Any]) -> Any:
        result = await real(name, keys, args)
        if name == "attach":
            await asyncio.sleep(0.2)  # the script ran; its reply is still on its way
        return result

    monkeypatch.setattr(store, "_script", slow_reply)
    attaching = asyncio.ensure_future(store.attach(key, Sink(), None))
    await asyncio.sleep(0.05)
    attaching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attaching
    meta = _Keys(store.prefix, key).meta
    for _ in range(100):  # the release runs in the background once the script is done
        if await store.redis.hget(meta, "reader") is None:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the lease taken by a cancelled attach is still held")
    monkeypatch.undo()
    subscription = await store.attach(key, Sink(), None)  # and the channel can be read again
    released = subscription.close()
    assert released is not None
    await released
