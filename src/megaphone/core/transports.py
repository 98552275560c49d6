"""The read transports a channel can be read with, their protocol names and feature bits.

A consumer address ends in a hex set of feature bits (SPEC Part A: bit 0 = the chunked NDJSON
stream). Issue #11 adds one bit per browser transport. A channel created without ``protocols`` can
be read with every transport (suffix ``f``); with ``protocols``, only with those. Addresses minted
before (suffix ``1``) keep meaning NDJSON only. The suffix is the client's declared capability, not
a secret: it is not bound to the channel key (as in the original), so editing it changes only which
framing the broker agrees to use, never what can be read.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Transport(enum.Enum):
    """``(protocol name in /create, feature bit, name in docs and metrics)``."""

    NDJSON = ("HTTP_STREAM_NDJSON_V1", 0x1, "ndjson")
    SSE = ("SSE_V1", 0x2, "sse")
    WEBSOCKET = ("WEBSOCKET_V1", 0x4, "websocket")
    LONG_POLL = ("LONG_POLL_V1", 0x8, "long-poll")

    def __init__(self, protocol: str, bit: int, label: str) -> None:
        self.protocol = protocol
        self.bit = bit
        self.label = label


ALL_TRANSPORTS: tuple[Transport, ...] = tuple(Transport)
ALL_FEATURES = 0
for _transport in ALL_TRANSPORTS:
    ALL_FEATURES |= _transport.bit
BY_PROTOCOL = {t.protocol: t for t in ALL_TRANSPORTS}


def choose(protocols: Sequence[str]) -> list[Transport]:
    """The transports of a new channel: those requested that we serve, in the client's order
    (duplicates dropped); every transport, NDJSON first, when none is requested. Empty when
    some were requested and none is known (the caller answers 400)."""
    if not protocols:
        return list(ALL_TRANSPORTS)
    chosen = [BY_PROTOCOL[p] for p in protocols if p in BY_PROTOCOL]
    return list(dict.fromkeys(chosen))


def features(transports: Sequence[Transport]) -> int:
    bits = 0
    for transport in transports:
        bits |= transport.bit
    return bits


def allows(feature_bits: int, transport: Transport) -> bool:
    """May a channel with these address bits be read with ``transport``? Bits we do not know
    (an address from a newer broker, or none set) leave the original NDJSON stream allowed."""
    if feature_bits & ALL_FEATURES == 0:
        return transport is Transport.NDJSON
    return bool(feature_bits & transport.bit)
