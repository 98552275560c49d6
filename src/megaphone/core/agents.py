"""Virtual agents: named owners of channels, each with its AES-256-GCM key.

A node's own agents come from its settings; ``/create`` picks among its ready masters. With a
store that shares agent keys (Redis), the registry also *learns* the agents of other nodes: an
address of an agent this node does not know is looked up once in the store (``lookup``), its key
cached, and looked up again only after a miss (an unknown agent is asked for again at most every
:data:`RETRY_SECONDS`; a producer address that does not open under a learned key refreshes that
key, at most as often). Learned agents serve writes, reads and ``/channelsExists``; never
``/create``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from megaphone.config import AgentMode
from megaphone.core.addressing import AddressBook, AgentCipher, new_agent_key
from megaphone.errors import NotFound, Unavailable

RETRY_SECONDS = 1.0  # a name the store did not know, or a learned key that failed, is asked again
MAX_MISSING = 10_000  # names remembered as unknown (bounded: they come from requests)

Lookup = Callable[[str], Awaitable[bytes | None]]


@dataclass
class Agent:
    name: str
    mode: AgentMode
    cipher: AgentCipher
    warmup_secs: float
    started: float  # monotonic
    since: datetime = field(default_factory=lambda: datetime.now(UTC))

    def warming_up(self, now: float) -> bool:
        return now - self.started < self.warmup_secs


class AgentRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.agents: dict[str, Agent] = {}
        self.addresses = AddressBook()
        # the shared keys' store (Redis); None: only this node's own agents are known
        self.lookup: Lookup | None = None
        self.learned: dict[str, float] = {}  # agent → when its key was (last) looked up
        self._missing: dict[str, float] = {}  # agent → until when it is not asked for again
        self._learning: dict[str, asyncio.Future[bool]] = {}

    def add(
        self, name: str, mode: AgentMode, warmup_secs: float = 0.0, key: bytes | None = None
    ) -> Agent:
        cipher = AgentCipher(name, key if key is not None else new_agent_key())
        agent = Agent(name, mode, cipher, warmup_secs, self.clock())
        self.agents[name] = agent
        self.learned.pop(name, None)
        self.addresses.add(cipher)
        return agent

    def pick_master(self) -> Agent:
        """A random MASTER agent past its warm-up."""
        now = self.clock()
        ready = [
            a for a in self.agents.values() if a.mode is AgentMode.MASTER and not a.warming_up(now)
        ]
        if not ready:
            raise Unavailable("no master agent is ready to host channels (warming up?)")
        return random.choice(ready)

    def replace_key(self, name: str, key: bytes) -> None:
        """The shared store settled on another key for ``name`` (its older one): use it."""
        cipher = AgentCipher(name, key)
        agent = self.agents.get(name)
        if agent is not None:
            agent.cipher = cipher
        self.addresses.add(cipher)

    # --- agents of other nodes (shared keys) ---------------------------------------------------

    def may_learn(self, address: str) -> bool:
        """Whether an address that did not resolve may after a look-up: its agent is not one of
        this node's own, and was not asked for (or refreshed) within :data:`RETRY_SECONDS`."""
        if self.lookup is None:
            return False
        agent = address.partition(".")[0]
        if not agent or agent in self.agents:
            return False
        now = self.clock()
        if agent in self.learned:
            return now - self.learned[agent] >= RETRY_SECONDS
        return self._missing.get(agent, 0.0) <= now

    async def learn(self, address: str) -> bool:
        """Look up the key of ``address``'s agent in the shared store (one look-up at a time per
        agent, however many requests wait for it); True when a key new to this node was found,
        so resolving the address again is worth it. ``StoreUnavailable`` passes through."""
        if not self.may_learn(address):
            return False
        agent = address.partition(".")[0]
        pending = self._learning.get(agent)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(agent))
            self._learning[agent] = pending
            pending.add_done_callback(lambda _: self._learning.pop(agent, None))
        return await asyncio.shield(pending)

    async def _fetch(self, agent: str) -> bool:
        assert self.lookup is not None
        key = await self.lookup(agent)
        now = self.clock()
        if key is None:
            if len(self._missing) >= MAX_MISSING:
                self._missing.clear()
            self._missing[agent] = now + RETRY_SECONDS
            return False
        self._missing.pop(agent, None)
        self.learned[agent] = now
        try:
            known = self.addresses.cipher(agent).key
        except NotFound:
            known = None
        if known == key or agent in self.agents:
            return False
        self.addresses.add(AgentCipher(agent, key))
        return True
