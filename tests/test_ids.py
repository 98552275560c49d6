"""Identifiers: event ids and consumer-address segments, drawn from buffered random pools."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from megaphone.core import events
from megaphone.core.events import EVENT_ID_LENGTH, new_event_id, secure_alphanumerics


def test_event_ids_are_alphanumeric_and_unique_across_pool_refills() -> None:
    # a pool holds ~4 KiB: 2,000 ids cross several refills
    ids = [new_event_id() for _ in range(2_000)]
    assert all(re.fullmatch(rf"[A-Za-z0-9]{{{EVENT_ID_LENGTH}}}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_secure_segments_of_any_length() -> None:
    assert len(secure_alphanumerics(events._Pool.SIZE + 10)) == events._Pool.SIZE + 10
    segments = [secure_alphanumerics(50) for _ in range(500)]
    assert all(re.fullmatch(r"[A-Za-z0-9]{50}", s) for s in segments)
    assert len(set(segments)) == len(segments)


def _in_child(produce: Callable[[], str]) -> str:
    """What ``produce()`` returns in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write_end, produce().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        value = pipe.read().decode()
    os.waitpid(pid, 0)
    return value


def test_a_forked_child_does_not_repeat_the_parents_values() -> None:
    new_event_id()
    secure_alphanumerics(50)  # both pools hold buffered values now
    child_id = _in_child(new_event_id)
    child_segment = _in_child(lambda: secure_alphanumerics(50))
    assert child_id != new_event_id()
    assert child_segment != secure_alphanumerics(50)
