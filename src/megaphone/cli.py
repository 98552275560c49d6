"""The ``megaphone`` command: start a broker node.

Every scalar setting is also a flag (``address`` → ``--address``, ``poll_duration_millis`` →
``--poll-duration-millis``); flags beat ``megaphone_*`` environment variables, which beat the file.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
from pydantic import ValidationError

from megaphone import __version__, logs
from megaphone.config import Settings, load_settings
from megaphone.server import serve

_FLAG_TYPES: dict[Any, click.ParamType[Any]] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
}


def _setting_options(func: Any) -> Any:
    for name, field in reversed(list(Settings.model_fields.items())):
        kind = _FLAG_TYPES.get(field.annotation)
        if name == "agent":
            kind = click.STRING
        if kind is None and get_origin(field.annotation) is Literal:
            kind = click.Choice([str(choice) for choice in get_args(field.annotation)])
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, type=kind, default=None, help=f"setting `{name}`")(func)
    return func


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="config file (.toml/.yaml/.json); default: megaphone.{toml,yaml,yml,json} in the cwd",
)
@click.option("--check", is_flag=True, help="validate the configuration and exit (0 = valid)")
@click.version_option(__version__, prog_name="megaphone")
@_setting_options
def main(config_file: Path | None, check: bool, **flags: Any) -> None:
    """Run a Megaphone broker node."""
    try:
        settings = load_settings(config_file, **flags)
    except (ValidationError, ValueError) as exc:
        click.echo(f"megaphone: invalid configuration:\n{exc}", err=True)
        sys.exit(2)
    if check:
        click.echo(settings.model_dump_json(indent=2))
        return
    logs.setup(settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
