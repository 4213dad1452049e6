"""Logging set-up shared by the command-line tools: everything goes to stderr, never stdout.

Two formats: ``text`` (one short line per record, the level coloured on a terminal unless ``NO_COLOR`` is set)
for people, ``json`` (one JSON object per line) for log shippers such as journald exporters, Loki or Vector.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from enum import Enum
from typing import Any, TextIO

import typer


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


LEVELS = tuple(level.value for level in LogLevel)
_COLOURS = {"D": "\033[2m", "W": "\033[33m", "E": "\033[31m", "C": "\033[1;31m"}
# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON object.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extras and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``12:00:01 W qmesh.broker.core: message``; the level letter coloured when ``colour`` is set."""

    def __init__(self, colour: bool) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.colour = colour

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        code = _COLOURS.get(record.levelname[:1]) if self.colour else None
        if code is None:
            return line
        stamp = len(self.formatTime(record, self.datefmt)) + 1
        return f"{line[:stamp]}{code}{line[stamp]}\033[0m{line[stamp + 1 :]}"


def setup_logging(level: str | LogLevel = "info", fmt: str | LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send every log record to stderr in ``fmt``; calling it again replaces the previous set-up."""
    level_name = level.value if isinstance(level, LogLevel) else str(level)
    fmt_name = fmt.value if isinstance(fmt, LogFormat) else str(fmt)
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt_name == "json":
        handler.setFormatter(JsonFormatter())
    else:
        colour = stream.isatty() and not os.environ.get("NO_COLOR")
        handler.setFormatter(TextFormatter(colour))
    logging.basicConfig(level=getattr(logging, level_name.upper(), logging.INFO), handlers=[handler], force=True)


def log_level_option(default: LogLevel = LogLevel.info) -> Any:
    return typer.Option(default, "--log-level", envvar="QMESH_LOG_LEVEL", help="Least severe level logged.")


def log_format_option() -> Any:
    return typer.Option(
        LogFormat.text, "--log-format", envvar="QMESH_LOG_FORMAT", help="text for people, json for machines."
    )
