"""Address formats of SPEC Part A: decode a producer address with the agent key; consumer shape."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import create_channel
from megaphone.core.addressing import (
    AddressBook,
    AgentCipher,
    new_agent_key,
    new_consumer_address,
    parse_consumer,
    split_producer,
)
from megaphone.errors import BadRequest, NotFound
from megaphone.server import MegaphoneServer


async def test_addresses_from_create(server: MegaphoneServer, client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    consumer = channel["consumerAddress"]
    agent, segment, features = consumer.split(".")
    assert agent == "test-agent"
    assert re.fullmatch(r"[A-Za-z0-9]{50}", segment)
    # issue #11: created without protocols, readable with every transport (bits 0-3: NDJSON,
    # SSE, WebSocket, long-poll); asked for the original's one protocol, the original's suffix
    assert features == "f"
    original = await create_channel(client, protocols=["HTTP_STREAM_NDJSON_V1"])
    assert original["consumerAddress"].rsplit(".", 1)[1] == "1"  # bit 0: chunked stream

    producer = channel["producerAddress"]
    p_agent, token = producer.split(".")
    assert p_agent == agent
    assert "=" not in token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(raw) == 12 + 16 + 16  # nonce, encrypted md5, tag
    key = server.registry.agents[agent].cipher.key
    channel_key = AESGCM(key).decrypt(raw[:12], raw[12:], None)
    assert channel_key == hashlib.md5(segment.encode()).digest()


def test_producer_addresses_are_not_derivable_and_differ() -> None:
    cipher = AgentCipher("a", new_agent_key())
    consumer, key = new_consumer_address("a")
    first = cipher.producer_address(key.digest)
    second = cipher.producer_address(key.digest)
    assert first != second  # fresh nonce each time
    assert cipher.open(first.split(".")[1]) == cipher.open(second.split(".")[1]) == key.digest
    assert consumer.split(".")[1] not in first


def test_a_foreign_key_cannot_open_a_producer_address() -> None:
    _, key = new_consumer_address("a")
    address = AgentCipher("a", new_agent_key()).producer_address(key.digest)
    with pytest.raises(BadRequest):
        AgentCipher("a", new_agent_key()).open(address.split(".")[1])


def test_kinds_are_not_interchangeable() -> None:
    book = AddressBook()
    cipher = AgentCipher("a", new_agent_key())
    book.add(cipher)
    consumer, key = new_consumer_address("a")
    producer = cipher.producer_address(key.digest)
    assert book.producer(producer) == key == book.consumer(consumer)
    assert book.any(producer) == book.any(consumer) == key
    with pytest.raises(BadRequest, match="consumer address cannot be used to write"):
        book.producer(consumer)
    with pytest.raises(BadRequest, match="producer address cannot be used to read"):
        book.consumer(producer)
    with pytest.raises(NotFound):
        book.consumer(consumer.replace("a.", "b.", 1))
    with pytest.raises(BadRequest):
        split_producer("a")
    for bad in [
        "",
        "a",
        "a.b.1",
        "a." + "x" * 49 + ".1",
        "a b." + "x" * 50 + ".1",
        "a." + "x" * 50 + ".g",
    ]:
        with pytest.raises(BadRequest):
            parse_consumer(bad)


def test_remembered_producer_addresses_follow_key_changes() -> None:
    book = AddressBook()
    book.add(AgentCipher("a", new_agent_key()))
    _, key = new_consumer_address("a")
    producer = book.cipher("a").producer_address(key.digest)
    assert book.producer(producer) == key
    assert book.producer(producer) == key  # from the map this time
    book.add(AgentCipher("a", new_agent_key()))  # the agent's key changed
    with pytest.raises(BadRequest):
        book.producer(producer)
