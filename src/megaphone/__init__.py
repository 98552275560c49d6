"""Megaphone: a broker for long-running requests and server streaming.

Wire-compatible with megaphone-broker 0.10.5 (see SPEC Part A).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
