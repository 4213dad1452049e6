"""Sampling the broker with py-spy (an optional tool: ``.venv/bin/python -m pip install py-spy``)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .report import Table


def pyspy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record`` attached to a running process, writing collapsed stacks (one function per frame)."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        exe = pyspy_path()
        if exe is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/python -m pip install py-spy")
        self.out = out
        command = [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out)]
        command += ["-r", str(rate), "--nolineno", "--nonblocking"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        """End the recording (py-spy writes its file on SIGINT)."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def hot_spots(raw: Path, top: int = 15) -> tuple[Table, int]:
    """Functions by share of the samples where the broker was running: self time and time including callees."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if " (" in frame]  # drop the "process/thread" prefixes
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    table = Table(["function (file)", "self %", "incl. %"])
    for frame, count in own.most_common(top):
        table.add(frame, f"{100 * count / total:.1f}", f"{100 * inclusive[frame] / total:.1f}")
    return table, total
