"""``megactl``: the management API from a shell (SPEC Part A's command line).

    megactl [-p SOCKET] [-o plain|json] COMMAND
    COMMAND: list-agents | add-agent -n NAME | pipe-agent -n NAME -t URL
             | list-channels [-s SKIP] [-l LIMIT] | dispose-channel -n ADDRESS

Plain output is an aligned table (or one line); json prints what the server answered. Exit codes:
0 done; 1 the server said no (its code and message on stderr); 2 a usage error, or the socket is
missing, refused or not ours to use.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import quote

import click
import httpx
import orjson

DEFAULT_PATH = "/run/megaphone.sock"
TIMEOUT = 30.0


class Ctl:
    def __init__(self, path: str, out: str) -> None:
        self.path = path
        self.out = out

    def call(self, method: str, target: str, body: Any = None) -> Any:
        self._check_socket()
        content = orjson.dumps(body) if body is not None else None
        transport = httpx.HTTPTransport(uds=self.path)
        try:
            with httpx.Client(
                transport=transport, base_url="http://megaphone", timeout=TIMEOUT
            ) as http:
                reply = http.request(
                    method, target, content=content, headers={"content-type": "application/json"}
                )
        except httpx.ConnectError as exc:
            fail(f"cannot connect to {self.path}: {_reason(exc)}", 2)
        except httpx.TimeoutException:
            fail(f"no answer from {self.path} within {TIMEOUT:g} s", 2)
        except httpx.HTTPError as exc:
            fail(f"talking to {self.path} failed: {exc}", 2)
        try:
            data = orjson.loads(reply.content) if reply.content else None
        except orjson.JSONDecodeError:
            fail(f"the server answered {reply.status_code} with a body that is not JSON", 1)
        if reply.status_code >= 400:
            if isinstance(data, dict) and "code" in data:
                fail(f"{data['code']} ({reply.status_code}): {data.get('message', '')}", 1)
            fail(f"the server answered {reply.status_code}", 1)
        return data

    def _check_socket(self) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            fail(
                f"no management socket at {self.path} (is megaphone running with this "
                "mng_socket_path? use -p/--path)",
                2,
            )
        except PermissionError:
            fail(f"not allowed to use {self.path} (it is its owner's only)", 2)
        if not stat.S_ISSOCK(mode):
            fail(f"{self.path} is not a socket", 2)

    def show(self, data: Any, plain: str) -> None:
        if self.out == "json":
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        else:
            click.echo(plain)


def _reason(exc: Exception) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (a stale socket: the server is not running)"
        if isinstance(cause, PermissionError):
            return "permission denied"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"megactl: {message}", err=True)
    sys.exit(code)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-p",
    "--path",
    default=lambda: os.environ.get("MEGAPHONE_MNG_SOCKET_PATH", DEFAULT_PATH),
    show_default=DEFAULT_PATH,
    help="the management socket (env MEGAPHONE_MNG_SOCKET_PATH)",
)
@click.option(
    "-o",
    "--out-format",
    type=click.Choice(["plain", "json"]),
    default="plain",
    show_default=True,
    help="plain: aligned tables; json: the server's answer",
)
@click.pass_context
def main(ctx: click.Context, path: str, out_format: str) -> None:
    """Manage a running megaphone node through its management socket."""
    ctx.obj = Ctl(path, out_format)


@main.command("list-agents")
@click.pass_obj
def list_agents(ctl: Ctl) -> None:
    """The node's virtual agents."""
    agents = ctl.call("GET", "/vagent/list")
    rows = [
        (a["name"], a["mode"], a["since"], "yes" if a["warmingUp"] else "no", a["channelsCount"])
        for a in agents
    ]
    ctl.show(agents, table(["NAME", "MODE", "SINCE", "WARMING UP", "CHANNELS"], rows))


@main.command("add-agent")
@click.option("-n", "--name", required=True, help="the new agent's name ([A-Za-z0-9_-]+)")
@click.pass_obj
def add_agent(ctl: Ctl, name: str) -> None:
    """Add a MASTER agent to the node."""
    answer = ctl.call("POST", "/vagent/add", {"name": name})
    ctl.show(answer, f"agent {name} added")


@main.command("pipe-agent")
@click.option("-n", "--name", required=True, help="the agent to pipe")
@click.option("-t", "--target", required=True, help="the other node's sync service URL")
@click.pass_obj
def pipe_agent(ctl: Ctl, name: str, target: str) -> None:
    """Forward an agent's channels and events to another node (not implemented yet: 501)."""
    answer = ctl.call("POST", "/vagent/pipe", {"name": name, "target": target})
    ctl.show(answer, f"agent {name} piped to {target}")


@main.command("list-channels")
@click.option("-s", "--skip", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("-l", "--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.pass_obj
def list_channels(ctl: Ctl, skip: int, limit: int) -> None:
    """A page of the node's channels (consumer address and agent)."""
    channels = ctl.call("GET", f"/channel/list?skip={skip}&limit={limit}")
    rows = [(c["address"], c["agentId"]) for c in channels]
    ctl.show(channels, table(["ADDRESS", "AGENT"], rows))


@main.command("dispose-channel")
@click.option(
    "-n", "--name", "address", required=True, help="the channel's consumer or producer address"
)
@click.pass_obj
def dispose_channel(ctl: Ctl, address: str) -> None:
    """Delete a channel: an attached read ends, pending events are lost (and counted)."""
    answer = ctl.call("DELETE", f"/channel/{quote(address, safe='')}")
    ctl.show(answer, f"channel {address} disposed")


if __name__ == "__main__":
    main()
