"""Tables for the terminal and ``docs/BENCHMARKS.md``, and the machine description every section starts with."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECORD = ROOT / "docs" / "BENCHMARKS.md"
SOURCE_DIRS = ("broker", "worker", "client", "common")  # the code a benchmark measures


@dataclass
class Table:
    """A markdown table, padded so that it also reads well on a terminal."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [max(len(row[i]) for row in [self.headers, *self.rows]) for i in range(len(self.headers))]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        return "\n".join([line(self.headers), rule, *(line(row) for row in self.rows)])


def cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """The commit measured, and QMesh source files changed since (benchmarks often run on work in progress)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_DIRS], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown (no git)"
    changed = sorted(line[3:] for line in status.stdout.splitlines() if line.strip())
    return head.stdout.strip() + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def machine() -> str:
    """nproc, CPU model, load, Python/pyzmq/libzmq versions: what a reader needs to weigh the figures."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{len(os.sched_getaffinity(0))} CPUs ({cpu_model()}), load average {load:.2f} at start; "
        f"Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
    )


@dataclass
class Section:
    """What one benchmark run reports: settings, tables, verdicts against goals, and remarks."""

    name: str
    command: str
    settings: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, Table]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: str = field(default_factory=machine)
    code: str = field(default_factory=code_version)
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    data: dict[str, Any] = field(default_factory=dict)  # raw figures for --json
    other_load: float | None = None  # cores used by other programs during the run, on average

    def table(self, title: str, table: Table) -> None:
        self.tables.append((title, table))

    def render(self) -> str:
        out = [f"### {self.name}: {self.started:%Y-%m-%d %H:%M} UTC", ""]
        out.append(f"- machine: {self.machine}")
        if self.other_load is not None:
            out.append(f"- other programs used {self.other_load:.2f} cores on average during this run")
        out.append(f"- command: `{self.command}`")
        out.append(f"- code: {self.code}")
        if self.settings:
            out.append("- settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        for title, table in self.tables:
            out.append("")
            if title:
                out += [f"{title}:", ""]
            out.append(table.render())
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def command_line(argv: list[str]) -> str:
    return " ".join(["scripts/bench", *argv])


def publish(section: Section, record: Path | None, json_path: Path | None) -> None:
    """Print the section; append it to ``record`` (made with a title if missing); dump its data to JSON."""
    text = section.render()
    sys.stdout.write("\n" + text)
    sys.stdout.flush()
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        if not record.exists():
            record.write_text("# QMesh benchmarks\n")
        with record.open("a") as f:
            f.write("\n" + text)
    if json_path is not None:
        existing = json.loads(json_path.read_text()) if json_path.exists() else {}
        existing[section.name] = section.data
        json_path.write_text(json.dumps(existing, indent=2, default=str))
