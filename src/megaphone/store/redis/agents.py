"""The agents' AES keys in Redis, shared by every node, and kept through Redis losing its data.

``Pagents`` holds, per agent, its key (field ``<name>``, base64) and when it was minted (field
``<name>:minted``, ms; agent names never hold a ``:``). Every node keeps the keys it uses (its own
agents' and those it looked up) with their mint times, and checks them every ``check`` seconds:

* a key Redis lost is written back (only where the field is still empty): whichever node
  restores it first, every node restores the same one;
* a key that differs (a node of that agent started in the moment between the loss and the first
  restore and minted another) is settled by age: the older key wins everywhere. A node holding
  the older key writes it back over the younger (a compare-and-set); a node holding the younger
  adopts the older (``on_change``), so the addresses minted under the younger key in that moment
  stop opening. Keys minted before mint times were recorded count as the oldest.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from megaphone.core.addressing import new_agent_key

log = logging.getLogger("megaphone.store.redis")

# KEYS agents; ARGV name key minted → {key, minted}: the stored key, or this one if none was
MINT = """
local key = redis.call('HGET', KEYS[1], ARGV[1])
if key then return {key, redis.call('HGET', KEYS[1], ARGV[1] .. ':minted') or '0'} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':minted', ARGV[3])
return {ARGV[2], ARGV[3]}
"""

# KEYS agents; ARGV name expected key minted → 1 written, 0 the field changed meanwhile.
# expected '' means "only if there is none" (a restore)
PUT = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':minted', ARGV[4])
return 1
"""

Call = Callable[..., Awaitable[Any]]


class AgentKeys:
    def __init__(self, agents_key: str, call: Call) -> None:
        self.agents_key = agents_key
        self.call = call  # one Redis command; StoreUnavailable on failure
        self.kept: dict[str, tuple[bytes, int]] = {}  # name → (key, minted ms)
        self.on_change: Callable[[str, bytes], None] | None = None

    async def mint(self, names: list[str]) -> dict[str, bytes]:
        """Each agent's key: the stored one, or a new one if Redis holds none (atomically, so
        two nodes starting together agree)."""
        keys: dict[str, bytes] = {}
        for name in names:
            candidate = base64.b64encode(new_agent_key())
            now = int(time.time() * 1000)
            stored, minted = await self.call("EVAL", MINT, 1, self.agents_key, name, candidate, now)
            keys[name] = self._keep(name, stored, minted)
        return keys

    async def lookup(self, name: str) -> bytes | None:
        stored, minted = await self.call("HMGET", self.agents_key, name, f"{name}:minted")
        if stored is None:
            return None
        return self._keep(name, stored, minted or b"0")

    def _keep(self, name: str, stored: bytes, minted: bytes | str) -> bytes:
        key = base64.b64decode(stored)
        self.kept[name] = (key, int(minted))
        return key

    async def restore(self) -> list[str]:
        """Write back what Redis lost, settle what differs (see the module); the names whose
        key Redis did not hold as kept here."""
        if not self.kept:
            return []
        names = list(self.kept)
        fields = [field for name in names for field in (name, f"{name}:minted")]
        stored = await self.call("HMGET", self.agents_key, *fields)
        changed: list[str] = []
        for index, name in enumerate(names):
            value, minted_raw = stored[2 * index], stored[2 * index + 1]
            key, minted = self.kept[name]
            encoded = base64.b64encode(key)
            if value is None:
                if await self.call("EVAL", PUT, 1, self.agents_key, name, "", encoded, minted):
                    changed.append(name)
                    log.warning("agent key restored", extra={"agent": name})
                continue
            if value == encoded:
                continue
            theirs = int(minted_raw or 0)
            if (minted, encoded) < (theirs, value):  # ours is older: it wins
                if await self.call("EVAL", PUT, 1, self.agents_key, name, value, encoded, minted):
                    changed.append(name)
                    log.warning("agent key conflict: the older key restored", extra={"agent": name})
            else:  # ours is younger: adopt the older one
                adopted = self._keep(name, value, minted_raw or b"0")
                changed.append(name)
                log.warning("agent key conflict: adopted the older key", extra={"agent": name})
                if self.on_change is not None:
                    self.on_change(name, adopted)
        return changed
