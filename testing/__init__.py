"""``qmesh.testing``: the one harness behind the tests, the benchmarks and the chaos run.

What ``tests/``, ``scripts/benchkit/`` (``scripts/bench``) and ``scripts/chaos.py`` all need to drive real
QMesh processes, written once:

- ``free_endpoint()``: a free loopback TCP endpoint;
- ``qmesh_command()``: the command line of a QMesh program (``qmesh-worker`` ...) run by this Python;
- ``Child``: a subprocess that never outlives this process (PR_SET_PDEATHSIG), its output in a log file;
- ``start_broker()``: a broker process started until it listens;
- ``wait_for()`` a condition, ``wait_for_workers()`` until the broker lists N workers of a model;
- ``qmesh.testing.pair``: a primary/backup broker pair (``BrokerPair``) for the pair tests and ``scripts/chaos --pair``;
- ``qmesh.testing.fakeworker``: a fake streaming worker, imported by that name only where a fake is the point
  (broker capacity and flow control, not generation); tests get it as the ``fake_workers`` fixture.

Why it lives here, as a package of the project (the folder ``testing/``, mapped to ``qmesh.testing`` by
pyproject.toml like ``common/`` is to ``qmesh.common``): the project is installed into ``.venv`` in editable mode,
so pytest, ``.venv/bin/python scripts/bench.py``, ``scripts/chaos.py`` and every process they spawn import it
by the same name, from any directory, with no sys.path set-up anywhere. Its name says it is test tooling, and it
needs nothing beyond QMesh's own dependencies (no pytest: the fixtures built on it live in tests/conftest.py).
It is meant for a source checkout: children run in its root (``ROOT``), where ``models/`` is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import psutil

from qmesh.client.sdk import QMeshClient
from qmesh.common.errors import QMeshError
from qmesh.common.keys import CurveClientKeys

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {
    "qmesh-broker": "qmesh.broker.cli",
    "qmesh-worker": "qmesh.worker.cli",
    "qmesh-client": "qmesh.client.cli",
    "qmesh-gateway": "qmesh.gateway.cli",
    "qmesh-shard": "qmesh.worker.shard_cli",
    "qmesh-status": "qmesh.client.status",
    "qmesh-models": "qmesh.client.models_cli",
    "qmesh-keys": "qmesh.common.keys_cli",
}
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it

T = TypeVar("T")


def free_endpoint() -> str:
    """A loopback TCP endpoint whose port was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def qmesh_command(program: str, *args: str) -> list[str]:
    """``program`` (a key of PROGRAMS) run as a module of this Python, so it is the code of this checkout."""
    return [sys.executable, "-m", PROGRAMS[program], *args]


def llama_servers(pid: int) -> list[psutil.Process]:
    """The llama-server processes a worker process (``pid``) runs: none while it restarts one, or once it is gone."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if _is_llama_server(child)]


def _is_llama_server(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "llama" in process.name()
    return False  # gone meanwhile


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for a reaper no longer counts."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class WaitTimeout(AssertionError):
    """A wait ran out of time. An AssertionError, so that pytest reports it as an unmet expectation."""


class ChildExited(AssertionError):
    """A child that was expected to keep running has exited."""


class Child:
    """A started subprocess, its stdout and stderr in ``log_path``, that never outlives this process.

    Linux sends it SIGTERM when this process dies, even by SIGKILL (PR_SET_PDEATHSIG), so a crashed test,
    benchmark or chaos run leaves nothing running. Linux sends that signal when the *thread* that forked the child
    ends, so start children from a thread that lives as long as they should: the main thread. The child has its
    own session, so a Ctrl-C at the terminal reaches only this process, which stops its children itself.

    ``env`` is added to this process's environment. With ``stdout_pipe`` the child's stdout is a text pipe
    (``popen.stdout``) and only its stderr goes to the log.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log if stdout_pipe else subprocess.STDOUT,
                text=stdout_pipe,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM it and return its exit status; subprocess.TimeoutExpired if it is still running after ``timeout``."""
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.popen.wait(timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM it, SIGKILL it if it is still running after ``grace`` seconds; it is always reaped."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.terminate(grace)
        self.kill()


def start_broker(start: Callable[[], Child], timeout: float = 10.0) -> Child:
    """Call ``start`` (it starts a ``qmesh-broker``) and wait until that broker listens; return it. A broker started
    right after the one it replaces may find the port not free yet and exit: then it is started again, until
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        broker = start()
        while broker.alive() and "listening on" not in broker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        if broker.alive():
            return broker
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{broker.name} did not start:\n{broker.log()}")
        time.sleep(0.2)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect: nobody would signal us
            os._exit(1)

    return preexec


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``condition`` until it returns something true, and return that; WaitTimeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")


def wait_for_workers(
    endpoint: str,
    model: str,
    count: int,
    timeout: float,
    *,
    watch: Sequence[Child] = (),
    curve: CurveClientKeys | None = None,
) -> None:
    """Block until the broker at ``endpoint`` lists at least ``count`` workers of ``model``.

    A broker that does not answer yet (starting, restarting) counts as listing none; the timeout names its last
    error. A watched child that exits ends the wait at once with ChildExited and the tail of its log.
    """
    last_error: list[QMeshError] = []

    def registered(client: QMeshClient) -> bool:
        for child in watch:
            if not child.alive():
                raise ChildExited(f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}")
        try:
            return client.models().get(model, {}).get("workers", 0) >= count
        except QMeshError as exc:
            last_error[:] = [exc]
            return False

    what = f"{count} worker(s) of {model} to register with {endpoint}"
    with QMeshClient(endpoint, connect_timeout=min(timeout, 5.0), curve=curve) as client:
        try:
            wait_for(lambda: registered(client), timeout, what, interval=0.1)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; the broker's last error: {last_error[0]}" if last_error else str(exc)) from None
