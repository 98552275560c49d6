"""Idempotent writes over HTTP (issue #13), on both stores: ``Idempotency-Key`` on
``POST /write``, ``idempotencyKey`` per write-batch message. The rules below HTTP (retention,
bounds, per channel, not remembered when not applied) are in test_store_contract.py."""

from __future__ import annotations

import httpx

from conftest import create_channel, read_events


async def test_a_retried_write_is_applied_once(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    producer, consumer = channel["producerAddress"], channel["consumerAddress"]
    for body in ("first", "retry"):
        reply = await client.post(
            f"/write/{producer}/s", json=body, headers={"Idempotency-Key": "order-42"}
        )
        assert reply.status_code == 201, reply.text
        assert reply.json() == {"status": "OK"}  # as the first answered
    reply = await client.post(f"/write/{producer}/s", json="after")
    assert reply.status_code == 201
    events = await read_events(client, consumer, 2)
    assert [event["body"] for event in events] == ["first", "after"]


async def test_a_retried_write_batch_is_applied_once(client: httpx.AsyncClient) -> None:
    channels = [await create_channel(client) for _ in range(2)]
    batch = {
        "channels": [c["producerAddress"] for c in channels],
        "messages": [
            {"streamId": "s", "body": 1, "idempotencyKey": "m1"},
            {"streamId": "s", "body": 2},
        ],
    }
    for _ in range(2):
        reply = await client.post("/write-batch", json=batch)
        assert reply.status_code == 201, reply.text
        assert reply.json() == {"failures": []}
    for channel in channels:  # the keyed message once, the other one twice
        events = await read_events(client, channel["consumerAddress"], 3)
        assert [event["body"] for event in events] == [1, 2, 2]


async def test_malformed_idempotency_keys_are_refused(client: httpx.AsyncClient) -> None:
    channel = await create_channel(client)
    producer = channel["producerAddress"]
    for key in ("", "k" * 257):
        reply = await client.post(f"/write/{producer}/s", json=1, headers={"Idempotency-Key": key})
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == "BAD_REQUEST"
    batch = {
        "channels": [producer],
        "messages": [{"streamId": "s", "body": 1, "idempotencyKey": "k" * 257}],
    }
    assert (await client.post("/write-batch", json=batch)).status_code == 400
