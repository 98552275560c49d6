"""The ``megaphone`` command: start a broker node.

Every scalar setting is also a flag (``address`` → ``--address``, ``poll_duration_millis`` →
``--poll-duration-millis``); flags beat ``megaphone_*`` environment variables, which beat the file.
Its help text is the setting's description and default (see :mod:`megaphone.config`).

A configuration mistake is one line per mistake on stderr and exit code 2, whether ``--check``
finds it or the server at start-up: both validate the values, then run
:func:`~megaphone.config.startup_problems`; a start-up that still fails (the port taken, the
management socket held, Redis unreachable) is one ``cannot start`` line and exit code 2 too.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from megaphone import __version__, logs
from megaphone.config import (
    Settings,
    default_text,
    env_typos,
    hide_password,
    load_settings,
    mng_socket_problem,
    startup_problems,
)
from megaphone.errors import MegaphoneError
from megaphone.server import run, serve
from megaphone.workers import StartFailed, Supervisor, start_error

_FLAG_TYPES: dict[Any, click.ParamType[Any]] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
}


def _setting_help(name: str) -> str:
    """The setting's description and default, without the README's Markdown backticks."""
    description = Settings.model_fields[name].description or ""
    return f"{description}  [default: {default_text(name)}]".replace("`", "")


def _flag_type(name: str) -> click.ParamType[Any] | None:
    annotation = Settings.model_fields[name].annotation
    if name in ("agent", "workers"):  # a union: pydantic reads the string
        return click.STRING
    if get_origin(annotation) is Literal:
        return click.Choice([str(choice) for choice in get_args(annotation)])
    return _FLAG_TYPES.get(annotation)


def _setting_options(func: Any) -> Any:
    for name in reversed(list(Settings.model_fields)):
        kind = _flag_type(name)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, type=kind, default=None, help=_setting_help(name))(func)
    return func


def _epilog() -> str:
    """The settings that are not flags (dicts, lists, secrets), with their meaning."""
    lines = ["\b", "Settings from the environment (megaphone_<key>) or a config file only:"]
    for name in Settings.model_fields:
        if _flag_type(name) is None:
            text = f"{name}: {_setting_help(name)}"
            lines += textwrap.wrap(text, 78, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def _error_lines(exc: ValidationError) -> Iterator[str]:
    """One line per mistake: ``setting: what is wrong``."""
    errors: list[ErrorDetails] = exc.errors()
    for error in errors:
        loc = [str(part) for part in error["loc"]]
        if loc[:2] == ["agent", "str"] and not isinstance(error["input"], str):
            continue  # the map form was meant: its own errors say what is wrong
        loc = [part for part in loc if part not in ("str", "VirtualAgents")]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] != "value_error" and loc[:1] != ["producer_token"]:
            message += f", got {error['input']!r}"
        yield f"{'.'.join(loc)}: {message}" if loc else message


def _fail(lines: Iterator[str] | list[str], what: str = "invalid configuration") -> None:
    for line in lines:
        click.echo(f"megaphone: {what}: {line}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="config file (.toml/.yaml/.json); default: megaphone.{toml,yaml,yml,json} in the cwd",
)
@click.option(
    "--check",
    is_flag=True,
    help="validate the configuration as the server would at start-up (values, Redis URL, agents, "
    "listen address, management socket), print the effective settings and exit (0 = valid, "
    "2 = one line per mistake on stderr)",
)
@click.version_option(__version__, prog_name="megaphone")
@_setting_options
def main(config_file: Path | None, check: bool, **flags: Any) -> None:
    """Run a Megaphone broker node."""
    try:
        settings = load_settings(config_file, **flags)
    except ValidationError as exc:
        _fail(_error_lines(exc))
    except ValueError as exc:  # the config file's name
        _fail([str(exc)])
    for warning in env_typos(os.environ):
        click.echo(f"megaphone: warning: {warning}", err=True)
    problems = startup_problems(settings, check_only=check)
    if problems:
        _fail(problems)
    if check:
        path = settings.mng_socket_path
        problem = mng_socket_problem(path) if path else None
        if problem and "mng_socket_path" not in settings.model_fields_set:
            click.echo(f"megaphone: warning: {problem}: the management API will be off", err=True)
        shown = settings.model_dump(mode="json")
        shown["redis_url"] = hide_password(settings.redis_url)
        click.echo(json.dumps(shown, indent=2))
        return
    logs.setup(settings.log_level)
    if settings.worker_count > 1:
        try:
            Supervisor(settings).run()
        except StartFailed as exc:
            _fail([str(exc)], "cannot start")
        except OSError as exc:  # the port cannot be reserved
            _fail([start_error(exc, settings)], "cannot start")
        return
    try:
        run(serve(settings))
    except (MegaphoneError, OSError, ValueError) as exc:  # what a start-up refuses, one line
        _fail([start_error(exc, settings)], "cannot start")
