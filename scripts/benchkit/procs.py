"""Processes a benchmark starts: the real broker and worker CLIs, fake workers and helper functions in spawned
processes, and how much CPU and memory they use.

Everything started here is stopped by pid when the ``Processes`` stack closes, even after an error; the
commands are ``qmesh.testing.Child``ren, so they die with the benchmark even when it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from qmesh.testing import Child, qmesh_command
from qmesh.testing.fakeworker import FakePlan, FakeStreamingWorker

from .report import ROOT
from .stats import percentile

SPAWN = mp.get_context("spawn")  # no zmq context may cross a fork
_LOG_PROBLEM = re.compile(r"^\S+ [WE] ")  # qmesh.common.logs: "HH:MM:SS W logger: message"


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads (not its children).

    psutil's user + system time ticks in 10 ms steps, too coarse for zmq.proxy's short runs; the scheduler's own
    nanosecond count in /proc/PID/task/*/schedstat is used when the kernel has it. That count covers live threads
    only, so for this process, whose load threads end with each load, getrusage (microseconds, ended threads
    included) is used instead.
    """
    if pid == os.getpid():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    if os.path.exists(f"/proc/{pid}/schedstat"):
        return _thread_seconds(pid, "")
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def zmq_io_seconds(pid: int) -> float:
    """CPU time of a process's ZeroMQ background threads (libzmq names them ``ZMQbg/...``: the I/O thread that moves
    the bytes of every socket of a context, and its reaper)."""
    return _thread_seconds(pid, "ZMQbg")


def _thread_seconds(pid: int, named: str) -> float:
    """The scheduler's count of CPU time of the live threads of ``pid`` whose name starts with ``named``."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                if not f.read().startswith(named):
                    continue
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS in bytes of a process and of its descendants."""
    process = psutil.Process(pid)
    children = sum(child.memory_info().rss for child in process.children(recursive=True))
    return process.memory_info().rss, children


QUIET = 0.25  # cores other programs used (OtherLoad), on average, below which a round counts as run alone


def ran_alone(others: Iterable[float]) -> bool:
    """Whether a round ran alone: other programs used under QUIET cores during each of its loads."""
    return max(others) < QUIET


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
    """CPU seconds (all threads, procs.cpu_seconds) that each process used between two readings.

    The scheduler's nanosecond count, not psutil's 10 ms ticks: a worker spends ~40 ms of CPU on one 96-token
    request, so ticks would make a round's CPU per token too coarse to compare two workers round by round.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self._pids = list(pids)

    def reading(self) -> dict[int, float]:
        out = {}
        for pid in self._pids:
            try:
                out[pid] = cpu_seconds(pid)
            except psutil.Error:
                out[pid] = math.nan
        return out

    @staticmethod
    def used(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
        return {pid: after[pid] - before[pid] for pid in before}


class Processes(contextlib.ExitStack):
    """Owns a log directory and every process a benchmark starts; closing it stops them all."""

    def __init__(self) -> None:
        super().__init__()
        self.log_dir = Path(self.enter_context(tempfile.TemporaryDirectory(prefix="qmesh-bench-")))
        self.home = self.log_dir / "home"  # QMESH_HOME of the workers: their state stays out of ~/.local
        self._started = 0

    def broker(self, endpoint: str, *args: str, code: Path | None = None, name: str = "broker") -> Child:
        """The real ``qmesh-broker``; ``code`` runs another version of it (see ``export``)."""
        command = qmesh_command("qmesh-broker", "--bind", endpoint, "--log-level", "warning", *args)
        return self.child(name, command, env=_code_env(code))

    def export(self, ref: str, *folders: str) -> Path:
        """``folders`` (``broker``, ``worker``, ``common``) of git ``ref`` as an importable ``qmesh`` tree, to compare
        against the working tree in the same run. On PYTHONPATH it wins over the editable install; the rest still
        comes from the working tree."""
        root = self.log_dir / f"ref-{ref.replace('/', '_')}-{'-'.join(folders)}"
        (root / "qmesh").mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref, *folders], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root / "qmesh")], input=archive.stdout, check=True)
        # Checked, not assumed: a package missing from the export would silently import the working tree's.
        where = "import importlib, sys; print(*(importlib.import_module('qmesh.' + f).__file__ for f in sys.argv[1:]))"
        found = subprocess.run(
            [sys.executable, "-c", where, *folders],
            cwd=ROOT,
            env={**os.environ, **_code_env(root)},
            capture_output=True,
            text=True,
            check=True,
        )
        strays = [path for path in found.stdout.split() if not path.startswith(str(root))]
        if strays:
            raise RuntimeError(f"the export of {ref} does not shadow the working tree: {strays}")
        return root

    def worker(self, endpoint: str, *args: str, name: str = "worker", code: Path | None = None) -> Child:
        """The real ``qmesh-worker``; ``code`` runs another version of it (see ``export``)."""
        command = qmesh_command("qmesh-worker", "--broker", endpoint, "--log-level", "warning", *args)
        return self.child(name, command, env={"QMESH_HOME": str(self.home), **_code_env(code)})

    def child(self, name: str, command: Sequence[str], env: dict[str, str] | None = None) -> Child:
        self._started += 1
        numbered = f"{name}-{self._started}"
        started = Child(numbered, command, self.log_dir / f"{numbered}.log", env)
        self.callback(started.stop)
        return started

    def fake_workers(self, endpoints: list[str], service: str, plan: FakePlan, stop: Any, nice: int = 0) -> Any:
        """``FakeStreamingWorker`` in a spawned process until ``stop`` is set; returns the queue of its summary."""
        return self.function(_fake_workers_main, endpoints, service, plan, stop, nice=nice)[1]

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


def _code_env(code: Path | None) -> dict[str, str]:
    return {"PYTHONPATH": str(code)} if code is not None else {}


def _fake_workers_main(endpoints: list[str], service: str, plan: FakePlan, stop: Any, results: Any) -> None:
    """Process entry point: serve until ``stop``, then put the counters (and, when paced, send lateness) on
    ``results``."""
    fake = FakeStreamingWorker(endpoints, service, plan)
    summary = fake.run(stop)
    if fake.lateness:
        summary["lateness_ms"] = {q: percentile(fake.lateness, q) * 1000 for q in (50, 99, 100)}
    results.put(summary)


def _end_process(process: mp.Process) -> None:
    process.join(5)
    if process.is_alive() and process.pid is not None:
        os.kill(process.pid, signal.SIGKILL)
        process.join(5)


def warnings_in(child: Child, limit: int = 3) -> tuple[int, list[str]]:
    """How many WARNING/ERROR lines a child logged, and the first few (anomalies worth reporting)."""
    lines = [line for line in child.log().splitlines() if _LOG_PROBLEM.match(line)]
    return len(lines), lines[:limit]
