"""Run a coroutine eagerly: finish it inline when it never suspends, else hand it to a task.

Most requests on the memory store complete without waiting (a write into a channel with room, a
create). Starting them as tasks would cost a task per request on the hot path; ``start`` steps the
coroutine once inline and only wraps it in a task when it actually waits (like Python 3.12's
``eager_start``, which 3.11 lacks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Done(Generic[T]):
    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


def start(coro: Coroutine[Any, Any, T]) -> Done[T] | asyncio.Task[T]:
    """Step ``coro`` once. ``Done(value)`` if it finished; otherwise the task that finishes it.

    An exception raised before the first suspension propagates to the caller.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return Done(stop.value)
    return asyncio.get_running_loop().create_task(_drive(coro, yielded))


def in_task(coro: Coroutine[Any, Any, T]) -> Done[T] | asyncio.Task[T]:
    """Always a task: for code that needs ``asyncio.current_task()`` from its first step (for
    example ``asyncio.timeout``, which redis-py uses)."""
    return asyncio.get_running_loop().create_task(coro)


async def _drive(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    while True:
        to_throw: BaseException | None = None
        if yielded is None:  # a bare yield (asyncio.sleep(0))
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError as exc:
                to_throw = exc
        else:
            future: asyncio.Future[Any] = yielded
            future._asyncio_future_blocking = False
            try:
                if not future.done():
                    await future
            except asyncio.CancelledError as exc:
                # our task was cancelled: make sure the coroutine sees it even if the future
                # it waited on completed normally
                if not future.cancelled():
                    to_throw = exc
            except BaseException:
                pass
        try:
            yielded = coro.throw(to_throw) if to_throw is not None else coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
