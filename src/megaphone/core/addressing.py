"""Channel addresses (SPEC Part A, "Addresses").

* consumer address: ``<agent>.<50 random alphanumerics>.<features hex>`` (features bit 0 = chunked
  stream, so the suffix is ``1``);
* producer address: ``<agent>.<b64url-nopad(nonce(12) ‖ AES-256-GCM(agent key, md5) ‖ tag(16))>``,
  md5 being the MD5 of the consumer segment.

Both resolve to the same :class:`ChannelKey`: the agent name and the 16-byte MD5 of the 50-character
segment. The producer address cannot be derived from the consumer address without the agent key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from megaphone.core.events import secure_alphanumerics
from megaphone.errors import BadRequest, NotFound

SEGMENT_LENGTH = 50
FEATURE_CHUNKED_STREAM = 0x1
_AGENT = r"[A-Za-z0-9_-]+"  # patterns are used with fullmatch: "$" would allow a final "\n"
CONSUMER_RE = re.compile(rf"({_AGENT})\.([A-Za-z0-9]{{{SEGMENT_LENGTH}}})\.([0-9a-fA-F]{{1,8}})")
PRODUCER_RE = re.compile(rf"({_AGENT})\.([A-Za-z0-9_-]{{59}})")
NONCE_LENGTH = 12
KEY_LENGTH = 32


class ChannelKey(NamedTuple):
    agent: str
    digest: bytes  # md5 of the consumer segment


def new_agent_key() -> bytes:
    return os.urandom(KEY_LENGTH)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AgentCipher:
    """Mints and opens producer addresses for one agent."""

    __slots__ = ("_aead", "key", "name")

    def __init__(self, name: str, key: bytes) -> None:
        if len(key) != KEY_LENGTH:
            raise ValueError("agent key must be 32 bytes")
        self.name = name
        self.key = key
        self._aead = AESGCM(key)

    def producer_address(self, digest: bytes) -> str:
        nonce = os.urandom(NONCE_LENGTH)
        sealed = self._aead.encrypt(nonce, digest, None)
        return f"{self.name}.{_b64encode(nonce + sealed)}"

    def open(self, token: str) -> bytes:
        """Return the channel digest sealed in ``token`` (the part after the agent name)."""
        try:
            raw = _b64decode(token)
            digest = self._aead.decrypt(raw[:NONCE_LENGTH], raw[NONCE_LENGTH:], None)
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise BadRequest("producer address does not belong to this agent") from exc
        if len(digest) != 16:
            raise BadRequest("producer address does not hold a channel key")
        return digest


def new_consumer_address(
    agent: str, features: int = FEATURE_CHUNKED_STREAM
) -> tuple[str, ChannelKey]:
    segment = secure_alphanumerics(SEGMENT_LENGTH)
    address = f"{agent}.{segment}.{features:x}"
    return address, ChannelKey(agent, hashlib.md5(segment.encode("ascii")).digest())


def parse_consumer(address: str) -> ChannelKey:
    """The channel key of a consumer address; 400 for anything else (producer addresses too)."""
    match = CONSUMER_RE.fullmatch(address)
    if match is None:
        if PRODUCER_RE.fullmatch(address):
            raise BadRequest("a producer address cannot be used to read")
        raise BadRequest("malformed consumer address")
    return ChannelKey(match[1], hashlib.md5(match[2].encode("ascii")).digest())


def consumer_features(address: str) -> int:
    """The feature bits of a consumer address (see :mod:`megaphone.core.transports`); 400 when
    the address is malformed."""
    match = CONSUMER_RE.fullmatch(address)
    if match is None:
        parse_consumer(address)  # raises the precise 400
        raise BadRequest("malformed consumer address")
    return int(match[3], 16)


def split_producer(address: str) -> tuple[str, str]:
    """``(agent, sealed token)`` of a producer address; 400 for anything else."""
    match = PRODUCER_RE.fullmatch(address)
    if match is None:
        if CONSUMER_RE.fullmatch(address):
            raise BadRequest("a consumer address cannot be used to write")
        raise BadRequest("malformed producer address")
    return match[1], match[2]


class AddressBook:
    """Resolves addresses to channel keys with the agents' keys. Unknown agent → 404.

    Opened producer addresses are remembered (a bounded map), so a producer writing many events
    pays for the AES-GCM decryption once, not per write.
    """

    CACHE_SIZE = 65_536

    def __init__(self) -> None:
        self._ciphers: dict[str, AgentCipher] = {}
        self._opened: dict[str, ChannelKey] = {}

    def add(self, cipher: AgentCipher) -> None:
        self._ciphers[cipher.name] = cipher
        self._opened.clear()  # a replaced key must not keep opening old addresses

    def cipher(self, agent: str) -> AgentCipher:
        try:
            return self._ciphers[agent]
        except KeyError:
            raise NotFound(f"unknown agent {agent!r}") from None

    def producer(self, address: str) -> ChannelKey:
        key = self._opened.get(address)
        if key is not None:
            return key
        agent, token = split_producer(address)
        key = ChannelKey(agent, self.cipher(agent).open(token))
        if len(self._opened) >= self.CACHE_SIZE:
            self._opened.clear()
        self._opened[address] = key
        return key

    def consumer(self, address: str) -> ChannelKey:
        key = parse_consumer(address)
        self.cipher(key.agent)
        return key

    def any(self, address: str) -> ChannelKey:
        """A channel key from either kind of address (``/channelsExists``)."""
        if CONSUMER_RE.fullmatch(address):
            return self.consumer(address)
        return self.producer(address)
