"""Every Prometheus instrument of the broker, in one place.

The counters keep the original's names exactly (``megaphone_channel_created``, not ``..._total``),
so dashboards written for megaphone-broker 0.10.5 keep working; they are plain integers on the hot
path and rendered in the Prometheus text format on scrape. The histogram uses prometheus-client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = tuple(float(80 * 2**i) for i in range(9))  # 80, 160, ..., 20480

_COUNTERS = {
    "channel_created": "Channels created",
    "channel_disposed": "Channels deleted (expired or disposed)",
    "messages_received": "Events accepted by write or write-batch",
    "messages_read": "Events sent to readers",
    "messages_replayed": "Sent events sent again to a resuming reader",
    "messages_unroutable": "Events written to an unknown channel",
    "messages_lost": "Events deleted with their channel before being read",
}


class Metrics:
    __slots__ = (
        "_registry",
        "channel_created",
        "channel_disposed",
        "channel_duration",
        "messages_lost",
        "messages_read",
        "messages_received",
        "messages_replayed",
        "messages_unroutable",
    )

    def __init__(self) -> None:
        self.channel_created = 0
        self.channel_disposed = 0
        self.messages_received = 0
        self.messages_read = 0
        self.messages_replayed = 0
        self.messages_unroutable = 0
        self.messages_lost = 0
        self._registry = CollectorRegistry(auto_describe=True)
        self.channel_duration = Histogram(
            "megaphone_channel_duration",
            "Lifetime of deleted channels, in seconds",
            buckets=DURATION_BUCKETS,
            registry=self._registry,
        )

    def render(self) -> bytes:
        lines = []
        for name, help_text in _COUNTERS.items():
            full = f"megaphone_{name}"
            lines.append(f"# HELP {full} {help_text}\n# TYPE {full} counter\n")
            lines.append(f"{full} {getattr(self, name)}\n")
        return "".join(lines).encode() + generate_latest(self._registry)
