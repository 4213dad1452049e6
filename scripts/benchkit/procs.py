"""Processes a benchmark starts: the real broker and worker CLIs, helper functions in spawned processes.

Everything started here is stopped by pid when the ``Processes`` stack closes, even after an error.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from qmesh.client.sdk import QMeshClient

from .report import ROOT

PYTHON = sys.executable
SPAWN = mp.get_context("spawn")  # no zmq context may cross a fork
_LOG_PROBLEM = re.compile(r"^\S+ [WE] ")  # qmesh.common.logs: "HH:MM:SS W logger: message"


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads (not its children).

    psutil's user + system time ticks in 10 ms steps, too coarse for zmq.proxy's short runs; the scheduler's own
    nanosecond count in /proc/PID/task/*/schedstat is used when the kernel has it.
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS in bytes of a process and of its descendants."""
    process = psutil.Process(pid)
    children = sum(child.memory_info().rss for child in process.children(recursive=True))
    return process.memory_info().rss, children


class OtherLoad:
    """CPU that programs outside this benchmark used since it was made, in cores on average.

    The machine's busy time (/proc/stat) minus this process tree's CPU (itself, its reaped children, its live
    descendants): on a shared machine it tells which rounds ran alone.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:8]]
        busy = (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")
        me = psutil.Process()
        times = me.cpu_times()
        own = times.user + times.system + times.children_user + times.children_system
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                own += child_times.user + child_times.system
        return time.monotonic(), busy, own

    def cores(self) -> float:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


class CpuMeter:
    """CPU seconds (user + system, all threads) that each named process used between two readings."""

    def __init__(self, processes: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in processes.items()}

    def reading(self) -> dict[str, float]:
        out = {}
        for name, process in self._processes.items():
            try:
                times = process.cpu_times()
                out[name] = times.user + times.system
            except psutil.Error:
                out[name] = math.nan
        return out

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


class Child:
    """A started subprocess with its log file."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Processes(contextlib.ExitStack):
    """Owns a log directory and every process a benchmark starts; closing it stops them all."""

    def __init__(self) -> None:
        super().__init__()
        self.log_dir = Path(self.enter_context(tempfile.TemporaryDirectory(prefix="qmesh-bench-")))
        self.home = self.log_dir / "home"  # QMESH_HOME of the workers: their state stays out of ~/.local
        self._started = 0

    def broker(self, endpoint: str, *args: str, code: Path | None = None, name: str = "broker") -> Child:
        """The real ``qmesh-broker``; ``code`` runs another version of it (see ``export_broker``)."""
        command = [PYTHON, "-m", "qmesh.broker.cli", "--bind", endpoint, "--log-level", "warning", *args]
        return self.child(name, command, env={"PYTHONPATH": str(code)} if code is not None else None)

    def export_broker(self, ref: str) -> Path:
        """``broker/`` and ``common/`` of git ``ref`` as an importable ``qmesh`` tree, to compare against the
        working tree in the same run. On PYTHONPATH it wins over the editable install; the rest still comes
        from the working tree."""
        root = self.log_dir / f"ref-{ref.replace('/', '_')}"
        (root / "qmesh").mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref, "broker", "common"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root / "qmesh")], input=archive.stdout, check=True)
        return root

    def worker(self, endpoint: str, *args: str, name: str = "worker") -> Child:
        command = [PYTHON, "-m", "qmesh.worker.cli", "--broker", endpoint, "--log-level", "warning", *args]
        return self.child(name, command, env={"QMESH_HOME": str(self.home)})

    def child(self, name: str, command: Sequence[str], env: dict[str, str] | None = None) -> Child:
        self._started += 1
        started = Child(f"{name}-{self._started}", command, self.log_dir, env)
        self.callback(started.stop)
        return started

    def function(self, target: Callable[..., Any], *args: Any, nice: int = 0) -> tuple[mp.Process, Any]:
        """Run ``target(*args, results)`` in a spawned process (at ``nice`` niceness); returns it and the queue it
        reports on."""
        results = SPAWN.Queue()
        process = SPAWN.Process(target=target, args=(*args, results), daemon=True)
        process.start()
        if nice:
            psutil.Process(process.pid).nice(nice)
        self.callback(_end_process, process)
        return process, results


def _end_process(process: mp.Process) -> None:
    process.join(5)
    if process.is_alive() and process.pid is not None:
        os.kill(process.pid, signal.SIGKILL)
        process.join(5)


def wait_for_workers(endpoint: str, service: str, count: int, timeout: float, watch: Sequence[Child] = ()) -> None:
    """Block until ``count`` workers serve ``service``; fail early if a watched process has exited."""
    deadline = time.monotonic() + timeout
    with QMeshClient(endpoint, connect_timeout=timeout) as client:
        while True:
            for child in watch:
                if child.popen.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.log()[-2000:]}")
            if client.models().get(service, {}).get("workers", 0) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} worker(s) of {service} did not register within {timeout:g} s")
            time.sleep(0.1)


def warnings_in(child: Child, limit: int = 3) -> tuple[int, list[str]]:
    """How many WARNING/ERROR lines a child logged, and the first few (anomalies worth reporting)."""
    lines = [line for line in child.log().splitlines() if _LOG_PROBLEM.match(line)]
    return len(lines), lines[:limit]
