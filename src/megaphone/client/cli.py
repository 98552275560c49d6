"""``megaphone-client``: the client library on the command line, for shell scripts and debugging.

::

    megaphone-client create                                   # the channel, as JSON
    megaphone-client write PRODUCER greetings '{"hello": 1}'   # body as an argument, or - for stdin
    megaphone-client read CONSUMER [--after EID] [--stream S] [--count N]

``read`` follows the channel across read windows (reconnecting and resuming as the library does)
and prints one NDJSON line per event; a gap (``unknown-cursor``) is reported on stderr. The server
is ``--url`` (or ``MEGAPHONE_URL``, default ``http://127.0.0.1:3000``); the producer token
``--token`` (or ``MEGAPHONE_TOKEN``). Exit codes: 0 done, 1 the server or the network said no
(the message on stderr), 2 bad usage.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
import orjson

from megaphone.client import Gap, Megaphone, MegaphoneClientError


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"megaphone-client: {exc}", err=True)
    raise SystemExit(1)


@click.group()
@click.option("--url", envvar="MEGAPHONE_URL", default="http://127.0.0.1:3000", show_default=True)
@click.option("--token", envvar="MEGAPHONE_TOKEN", default=None, help="producer bearer token")
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None) -> None:
    """Create channels, write events and follow reads on a Megaphone broker."""
    ctx.obj = {"url": url, "token": token}


@main.command()
@click.option("--protocol", "protocols", multiple=True, help="a protocol name (repeatable)")
@click.pass_obj
def create(obj: dict[str, Any], protocols: tuple[str, ...]) -> None:
    """Create a channel; print it as JSON."""
    try:
        with Megaphone(obj["url"], token=obj["token"]) as client:
            channel = client.create(protocols=list(protocols) or None)
    except MegaphoneClientError as exc:
        _fail(exc)
    click.echo(
        orjson.dumps(
            {
                "channelId": channel.channel_id,
                "producerAddress": channel.producer_address,
                "consumerAddress": channel.consumer_address,
                "agentName": channel.agent_name,
                "protocols": channel.protocols,
            }
        ).decode()
    )


@main.command()
@click.argument("producer")
@click.argument("stream")
@click.argument("body", default="-")
@click.pass_obj
def write(obj: dict[str, Any], producer: str, stream: str, body: str) -> None:
    """Write one event: BODY is JSON (``-``, the default: read it from stdin)."""
    raw = sys.stdin.read() if body == "-" else body
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="BODY") from None
    try:
        with Megaphone(obj["url"], token=obj["token"]) as client:
            client.write(producer, stream, value)
    except MegaphoneClientError as exc:
        _fail(exc)


@main.command()
@click.argument("consumer")
@click.option("--after", default=None, help="resume after this event id")
@click.option("--stream", "streams", multiple=True, help="only these stream ids (repeatable)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N events")
@click.pass_obj
def read(
    obj: dict[str, Any],
    consumer: str,
    after: str | None,
    streams: tuple[str, ...],
    count: int | None,
) -> None:
    """Follow a channel across read windows; one NDJSON line per event."""

    def gap(item: Gap) -> None:
        click.echo(f"megaphone-client: gap: {item}", err=True)

    seen = 0
    try:
        with Megaphone(obj["url"]) as client:
            for event in client.read(
                consumer, after=after, stream_ids=list(streams) or None, on_gap=gap
            ):
                line = {"sid": event.sid, "eid": event.eid, "ts": event.ts, "body": event.body}
                sys.stdout.buffer.write(orjson.dumps(line, option=orjson.OPT_UTC_Z) + b"\n")
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return
    except MegaphoneClientError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
