"""Channel stores: one interface (:mod:`megaphone.store.base`), one module per engine."""

from megaphone.store.base import ChannelInfo, ChannelStore, ReadSink, ResumeStatus, Subscription

__all__ = ["ChannelInfo", "ChannelStore", "ReadSink", "ResumeStatus", "Subscription"]
