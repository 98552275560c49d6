"""The management socket: a Unix socket file only its owner can use.

Created with mode 0600 (the process umask is narrowed while it is bound, so it never exists with
wider permissions), removed on exit. A socket file left by a process that died is replaced; one
that still answers belongs to a running server and is left alone. A path that is not a socket is
never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path


class SocketPathError(ValueError):
    """The management socket cannot be created where configured (one clear line)."""


def check_path(path: str) -> None:
    """Raise SocketPathError (one clear line) when ``path`` cannot become our socket; used by
    the server at start-up and by ``--check``. A stale socket file is fine (it is replaced)."""
    where = Path(path)
    directory = where.parent
    if len(os.fsencode(path)) > 107:
        raise SocketPathError(f"mng_socket_path {path!r} is longer than a Unix socket path may be")
    if not directory.is_dir():
        raise SocketPathError(f"mng_socket_path: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SocketPathError(f"mng_socket_path: directory {str(directory)!r} is not writable")
    try:
        mode = where.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"mng_socket_path {path!r} exists and is not a socket")
    if _answers(path):
        raise SocketPathError(f"mng_socket_path {path!r} is in use by a running server")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        # refused: stale, nobody listens; anything else (a timeout): somebody is there but busy
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


async def listen(path: str, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    """Bind ``path`` (0600), replacing a stale socket file."""
    check_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale (check_path made sure nobody answers)
    loop = asyncio.get_running_loop()
    previous = os.umask(0o177)
    try:
        server = await loop.create_unix_server(factory, path)
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    return server


def remove(path: str) -> None:
    """Remove our socket file on exit (only if it is still a socket)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
