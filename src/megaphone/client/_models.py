"""The client's value types: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["Channel", "Event", "Failure", "Gap"]


@dataclass(frozen=True, slots=True)
class Channel:
    """A new channel: keep ``producer_address``, hand ``consumer_address`` to the reader."""

    channel_id: str
    producer_address: str
    consumer_address: str
    agent_name: str
    protocols: list[str]


@dataclass(frozen=True, slots=True)
class Event:
    """One event: stream id, event id (the resume cursor), server timestamp (UTC), body.

    ``body`` is the JSON written, decoded (or the ``model`` instance when a read was given one).
    """

    sid: str
    eid: str
    ts: datetime
    body: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed write of a write-batch: channel (as sent), message index, server reason.

    ``reason`` is ``NOT_FOUND``, ``BAD_REQUEST``, ``TIMEOUT``, ``SHUTTING_DOWN`` or ``SKIPPED``.
    """

    channel: str
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Events may be missing here: the server did not find the cursor ``after`` in its window.

    The events that follow are the whole replay window (``megaphone-resume: unknown-cursor``);
    whatever was confirmed before it and not seen by this reader is gone.
    """

    after: str
