"""The management API (HTTP over a Unix socket, SPEC Part A) and ``megactl``, its command line."""
