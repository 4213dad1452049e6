"""The TOML configuration file, and the options commands share (``--config``, ``--version``, and the CURVE keys of
everything that connects to the broker). Only command-line tools import this module: it needs typer.

Precedence is flag > ``QMESH_*`` environment variable > config file > built-in default. Click gives exactly this
order to its ``default_map``, so ``--config`` is an eager option whose callback reads the file, checks it
against the command's own signature (names, types, ranges) and installs the command's table as the default map
before any other option is resolved.

The file (``--config``, ``$QMESH_CONFIG``, else ``config_dir()/qmesh.toml`` when it exists) has one table per
command; keys are option names with ``_`` or ``-``, and a repeatable option takes a list or one value::

    [broker]
    bind = "tcp://0.0.0.0:5555"
    metrics_port = 9464

    [gateway]
    broker = "tcp://10.0.0.1:5555"
    api_key = ["sk-one", "sk-two"]
"""

from __future__ import annotations

import inspect
import sys
import typing
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer

from qmesh.common.endpoints import DEFAULT_BROKER, broker_endpoints
from qmesh.common.errors import ConfigError
from qmesh.common.keys import CurveClientKeys
from qmesh.common.paths import config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("broker", "worker", "client", "gateway", "status", "models", "shard")
NOT_IN_FILE = {"config", "version"}  # options that make no sense in the file itself
# Old key names still read, per table. deploy/qmesh.toml showed [gateway] api_keys before the key took the option's
# name (--api-key), so a file copied from it keeps working.
OLD_NAMES = {"gateway": {"api_keys": "api_key"}}


def default_config_path() -> Path:
    return config_dir() / "qmesh.toml"


def in_config_dir(name: str) -> str:
    """Where ``config_dir() / name`` is, in the words --help and the README use: one place, picked by variables."""
    return (
        f"$QMESH_HOME/config/{name} if QMESH_HOME is set, otherwise $XDG_CONFIG_HOME/qmesh/{name} "
        f"(~/.config/qmesh/{name} without XDG_CONFIG_HOME)"
    )


def qmesh_version() -> str:
    try:
        return version("qmesh")
    except PackageNotFoundError:  # running from a tree that was never installed
        return "unknown"


def load_file(path: Path) -> dict[str, Any]:
    """Parse the file; errors name it and say what is wrong."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (tables: {', '.join(SECTIONS)})")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table ([{name}]), not a {_kind(table)}")
    return data


def section_defaults(path: Path, section: str, command: typing.Callable[..., Any]) -> dict[str, Any]:
    """The ``[section]`` table of the file, checked against ``command``'s options, as a Click default map."""
    table = load_file(path).get(section, {})
    hints = typing.get_type_hints(command)
    options = {
        name: parameter.default
        for name, parameter in inspect.signature(command).parameters.items()
        if name not in NOT_IN_FILE
    }
    old_names = OLD_NAMES.get(section, {})
    given = {key.replace("-", "_") for key in table}
    for old, new in old_names.items():
        if old in given and new in given:
            raise ConfigError(f"{path}: [{section}] {old} is the old name of {new}: give only {new}")
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        name = old_names.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in options:
            known = ", ".join(sorted(options))
            raise ConfigError(f"{path}: [{section}] unknown key '{key}' (known keys: {known})")
        if typing.get_origin(hints[name]) is list and not isinstance(value, list):
            value = [value]  # one value of a repeatable option, as on the command line: api_key = "sk-one"
        problem = _check(value, hints[name], options[name])
        if problem:
            raise ConfigError(f"{path}: [{section}] {key}: {problem}")
        defaults[name] = value.value if isinstance(value, Enum) else value
    return defaults


def _check(value: Any, annotation: Any, info: Any) -> str | None:
    """Why ``value`` does not fit an option of type ``annotation`` (None if it does)."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            return f"expected a list, got {_kind(value)} {value!r}"
        return next((problem for v in value if (problem := _check(v, item, info))), None)
    if annotation is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_kind(value)} {value!r}"
    if annotation in (int, float):
        numeric = (int,) if annotation is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return f"expected {'an integer' if annotation is int else 'a number'}, got {_kind(value)} {value!r}"
        low, high = getattr(info, "min", None), getattr(info, "max", None)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}" if low is not None else f"<= {high}"
            return f"must be {bounds}, got {value!r}"
        return None
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = [member.value for member in annotation]
        return None if value in choices else f"expected one of {', '.join(choices)}, got {value!r}"
    if annotation in (str, Path):
        return None if isinstance(value, str) else f"expected a string, got {_kind(value)} {value!r}"
    return f"cannot be set in the config file (type {annotation})"


def _kind(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return names.get(type(value), type(value).__name__)


def config_option(section: str) -> Any:
    """``--config FILE``: read before every other option, so flags and env vars override the file."""

    def load(ctx: typer.Context, value: Path | None) -> Path | None:
        path = value or default_config_path()
        if value is None and not path.is_file():
            return None  # no file at the default place: nothing to read
        command = inspect.unwrap(ctx.command.callback)
        try:
            ctx.default_map = {**(ctx.default_map or {}), **section_defaults(path, section, command)}
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
        return path

    return typer.Option(
        None,
        "--config",
        envvar="QMESH_CONFIG",
        is_eager=True,
        callback=load,
        help=f"TOML config file whose '{section}' table sets defaults. Default, read if it exists: "
        f"{in_config_dir('qmesh.toml')}.",
    )


def version_option() -> Any:
    def show(value: bool) -> None:
        if value:
            typer.echo(f"qmesh {qmesh_version()}")
            raise typer.Exit()

    return typer.Option(False, "--version", is_eager=True, callback=show, help="Print the version and exit.")


def curve_secret_option() -> Any:
    """``--curve-secret FILE``: this side's key pair (NAME.key_secret); with --broker-key, turns CURVE on."""
    return typer.Option(
        None, "--curve-secret", envvar="QMESH_CURVE_SECRET", help="Own CURVE key pair file (NAME.key_secret)."
    )


def broker_option() -> Any:
    """``--broker``: where the broker listens, or both brokers of a pair."""
    return typer.Option(
        DEFAULT_BROKER,
        "--broker",
        envvar="QMESH_BROKER",
        help="Broker endpoint; a broker pair as both, the primary's first: tcp://A:5555,tcp://B:5556.",
    )


def connect_timeout_option(default: float = 10.0) -> Any:
    """``--connect-timeout``: how long a command that talks to the broker waits to reach it."""
    return typer.Option(
        default, "--connect-timeout", envvar="QMESH_CONNECT_TIMEOUT", min=0.1, help="Seconds to reach the broker."
    )


def broker_key_option() -> Any:
    """``--broker-key FILE``: the broker's public key (NAME.key); a pair's, one per broker (A.key,B.key)."""
    return typer.Option(
        None,
        "--broker-key",
        envvar="QMESH_BROKER_KEY",
        help="The broker's CURVE public key file; a pair's as A.key,B.key (in --broker's order) unless they share one.",
    )


def client_keys_from_options(
    curve_secret: Path | None, broker_key: Path | None, broker: str | None = None
) -> CurveClientKeys | None:
    """The keys a worker or client uses, or None without CURVE; one option without the other is an error, and so
    is a number of broker keys that fits neither one key for all of ``broker``'s endpoints (--broker) nor one each:
    said here, as a usage error, rather than when the worker or client first connects."""
    if curve_secret is None and broker_key is None:
        return None
    if curve_secret is None or broker_key is None:
        raise ConfigError("--curve-secret and --broker-key go together: give both to use CURVE, or neither")
    keys = CurveClientKeys.load(curve_secret, broker_key)
    if broker is not None:
        try:
            endpoints = broker_endpoints(broker)
        except ValueError as exc:  # the message the SDK gives without CURVE
            raise ConfigError(f"bad broker address {broker!r}: {exc}") from exc
        keys.check_brokers(len(endpoints))
    return keys
