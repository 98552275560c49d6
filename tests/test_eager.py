"""megaphone.core.eager: inline completion, task fallback, errors and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from megaphone.core import eager


async def quick() -> int:
    return 1


async def slow(future: asyncio.Future[int]) -> int:
    return await future + 1


async def test_finishes_inline_without_a_task() -> None:
    outcome = eager.start(quick())
    assert isinstance(outcome, eager.Done)
    assert outcome.value == 1


async def test_error_before_first_suspension_propagates() -> None:
    async def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        eager.start(boom())


async def test_waits_in_a_task() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    outcome = eager.start(slow(future))
    assert isinstance(outcome, asyncio.Task)
    future.set_result(41)
    assert await outcome == 42


async def test_exception_from_awaited_future_reaches_the_coroutine() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def guarded() -> str:
        try:
            await future
        except KeyError:
            return "handled"
        return "no"

    outcome = eager.start(guarded())
    assert isinstance(outcome, asyncio.Task)
    future.set_exception(KeyError())
    assert await outcome == "handled"


async def test_cancel_reaches_the_coroutine() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cleaned = []

    async def waiting() -> None:
        try:
            await future
        finally:
            cleaned.append(True)

    outcome = eager.start(waiting())
    assert isinstance(outcome, asyncio.Task)
    await asyncio.sleep(0)
    outcome.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome
    assert cleaned == [True]


async def test_multiple_suspensions_and_bare_yield() -> None:
    async def steps() -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return 3

    outcome = eager.start(steps())
    assert isinstance(outcome, asyncio.Task)
    assert await outcome == 3
