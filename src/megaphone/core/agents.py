"""Virtual agents: named owners of channels, each with its AES-256-GCM key."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from megaphone.config import AgentMode
from megaphone.core.addressing import AddressBook, AgentCipher, new_agent_key
from megaphone.errors import Unavailable


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

    def add(
        self, name: str, mode: AgentMode, warmup_secs: float = 0.0, key: bytes | None = None
    ) -> Agent:
        cipher = AgentCipher(name, key if key is not None else new_agent_key())
        agent = Agent(name, mode, cipher, warmup_secs, self.clock())
        self.agents[name] = agent
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
