"""The public HTTP API.

Endpoints in :mod:`.app`, framing in :mod:`.wire`, the connection protocol in :mod:`.protocol`.
"""
