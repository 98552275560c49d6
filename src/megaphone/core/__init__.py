"""The broker core: agents, addresses, events and channels. No HTTP and no storage engine here."""
