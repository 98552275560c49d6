"""Outbound webhooks (``on-channel-deleted``), posted off the hot path.

Each notification is its own task with a timeout; a failing endpoint is logged once per attempt
at WARNING and never retried into the broker.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from megaphone.config import Webhook

log = logging.getLogger("megaphone.webhooks")


class WebhookNotifier:
    def __init__(self, hooks: dict[str, Webhook], timeout: float) -> None:
        self.endpoints = [
            (name, hook.endpoint)
            for name, hook in hooks.items()
            if hook.hook == "on-channel-deleted"
        ]
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def channels_deleted(self, addresses: list[str]) -> None:
        if self._closed or not self.endpoints:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        payload = {"channels": addresses}
        for name, endpoint in self.endpoints:
            task = asyncio.get_running_loop().create_task(self._post(name, endpoint, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, name: str, endpoint: str, payload: dict[str, list[str]]) -> None:
        assert self._client is not None
        try:
            reply = await self._client.post(endpoint, json=payload)
        except httpx.HTTPError as exc:
            log.warning(
                "webhook failed",
                extra={"webhook": name, "error": f"{type(exc).__name__}: {exc}"},
            )
            return
        if reply.status_code >= 300:
            log.warning("webhook rejected", extra={"webhook": name, "status": reply.status_code})

    async def aclose(self) -> None:
        """Give in-flight notifications their timeout, then close; idempotent."""
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout)
            for task in self._tasks:
                task.cancel()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
