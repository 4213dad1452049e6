"""Running llama-server as a supervised subprocess that never outlives its manager.

Threading: one supervisor thread per started manager does *all* spawning, the first launch and every restart,
and lives until the manager stops. The child is started with ``PR_SET_PDEATHSIG=SIGKILL``, which Linux fires
when the *thread* that forked it exits, so spawning from the caller's thread would kill llama-server as soon
as a short-lived caller thread ended. Tying it to the supervisor thread means the child dies exactly when the
supervisor does: at ``stop()``, or with the whole Python process (even when that is SIGKILLed). An ``atexit``
hook stops managers on a normal interpreter exit, gracefully.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from qmesh.common.errors import SidecarStartError
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.http_client import LlamaHttpClient

log = logging.getLogger(__name__)

STOPPED, STARTING, READY, RESTARTING, FAILED = "stopped", "starting", "ready", "restarting", "failed"
STABLE_AFTER = 60.0  # seconds a restarted llama-server must stay up before its crashes stop counting "in a row"
_OUTPUT_LINES = 500
_PORT_ATTEMPTS = 3
_HEALTH_POLL = 0.1
_PR_SET_PDEATHSIG = 1
_SHELL_SIGNALS = {int(s) for s in (signal.SIGILL, signal.SIGABRT, signal.SIGBUS, signal.SIGSEGV, signal.SIGKILL)}

_live_managers: weakref.WeakSet[LlamaProcessManager] = weakref.WeakSet()


class _Cancelled(Exception):
    """stop() was called while a launch was in progress."""


class LlamaProcessManager:
    """Starts, health-checks, restarts and stops one llama-server serving ``model``.

    After an unexpected exit it restarts llama-server up to ``max_restarts`` times in a row, waiting
    ``restart_backoff * 2**k`` before the k-th; a run that lasted ``STABLE_AFTER`` seconds ends the streak.
    Then it gives up: state "failed", with ``failure`` saying why.

    A subclass supervises another llama.cpp program the same way (a shard host's rpc-server, worker/shard.py): it
    names it in ``program`` and says how it knows the program is up (``command``, ``probe``, ``is_healthy``).
    """

    program = "llama-server"  # what logs and errors call the process

    def __init__(
        self,
        model: Path,
        binary: LlamaServerBinary,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ctx_size: int = 2048,
        gpu_layers: int = 0,
        parallel: int = 1,
        threads: int | None = None,
        load_timeout: float = 60.0,
        max_restarts: int = 3,
        restart_backoff: float = 0.5,
        stop_grace: float = 5.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model = Path(model)
        self.binary = binary
        self.host = host
        self.ctx_size = ctx_size
        self.gpu_layers = gpu_layers
        self.parallel = parallel
        self.threads = threads
        self.load_timeout = load_timeout
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.stop_grace = stop_grace
        self.extra_args = tuple(extra_args)
        self._auto_port = port is None
        self._port = _free_port(host) if port is None else port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._launched = threading.Event()
        self._launch_error: SidecarStartError | None = None
        self._supervisor: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=_OUTPUT_LINES)
        self._state = STOPPED
        self._restarts = 0
        self._failure: str | None = None

    # -- public API ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """Where llama-server listens; it can change across a restart if an automatic port was taken meanwhile."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def state(self) -> str:
        """One of "stopped", "starting", "ready", "restarting", "failed"."""
        return self._state

    @property
    def restarts(self) -> int:
        """Restarts so far; a caller notices a restart (and a lost KV cache) by this changing."""
        return self._restarts

    @property
    def failure(self) -> str | None:
        """Why the manager is in state "failed", with llama-server's last output."""
        return self._failure

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def output_tail(self, n: int = 30) -> list[str]:
        """The last ``n`` lines llama-server wrote (stdout and stderr together) in its current run."""
        lines = list(self._output)
        return lines[-n:] if n > 0 else []

    def command(self) -> list[str]:
        """The llama-server command line for the current port."""
        cmd = [
            str(self.binary.path),
            "-m", str(self.model),
            "--host", self.host,
            "--port", str(self._port),
            "-c", str(self.ctx_size),
            "-ngl", str(self.gpu_layers),
            "-np", str(self.parallel),
        ]  # fmt: skip
        if self.threads is not None:
            cmd += ["-t", str(self.threads)]
        return cmd + ["--no-webui", *self.extra_args]

    def start(self) -> None:
        """Launch llama-server and block until /health answers 200; raises :class:`SidecarStartError`."""
        with self._lock:
            if self._supervisor is not None and self._supervisor.is_alive():
                raise SidecarStartError(f"{self.program} for {self.model} is already {self._state}")
            self._stopping.clear()
            self._launched.clear()
            self._launch_error = None
            self._restarts = 0
            self._failure = None
            self._state = STARTING
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"llama-server-supervisor:{self.model.name}", daemon=True
            )
            _live_managers.add(self)
            self._supervisor.start()
        self._launched.wait()
        if self._launch_error is not None:
            raise self._launch_error

    def stop(self) -> None:
        """SIGTERM llama-server, SIGKILL it after ``stop_grace`` seconds, and end supervision. Idempotent."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
            supervisor = self._supervisor
        if proc is not None and proc.poll() is None:
            log.info("stopping %s (pid %d)", self.program, proc.pid)
            _terminate(proc, self.stop_grace)
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()
        with self._lock:
            self._proc = None
            self._supervisor = None
            self._state = STOPPED
        _live_managers.discard(self)

    def is_healthy(self) -> bool:
        """True when the manager is ready and llama-server answers /health with 200 right now."""
        if self._state != READY or self.pid is None:
            return False
        client = LlamaHttpClient(self.base_url, read_timeout=2.0)
        try:
            return client.health_check()
        finally:
            client.close()

    def __enter__(self) -> LlamaProcessManager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- supervision (runs in the supervisor thread) ---------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._launch()
        except _Cancelled:
            self._launch_error = SidecarStartError(f"{self.program} for {self.model} was stopped while starting")
        except SidecarStartError as exc:
            self._launch_error = exc
            self._set_failed(str(exc))
        except Exception as exc:  # e.g. no free port: start() must still get an answer
            self._launch_error = SidecarStartError(f"could not start {self.program}: {exc!r}")
            self._launch_error.__cause__ = exc
            self._set_failed(str(self._launch_error))
        else:
            self._state = READY
        finally:
            self._launched.set()
        if self._launch_error is not None:
            return
        try:
            self._watch()
        except Exception as exc:  # never leave the manager "restarting" forever; the child dies with us
            log.exception("llama-server supervisor crashed")
            self._set_failed(f"the llama-server supervisor crashed: {exc!r}" + self._tail_text())

    def _watch(self) -> None:
        """Wait for llama-server to die; unless we are stopping, restart it with backoff or give up."""
        streak = 0
        while True:
            proc = self._proc
            if proc is None:
                return
            up_since = time.monotonic()
            returncode = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - up_since >= STABLE_AFTER:
                streak = 0
            self._drain_output()
            reason = f"{self.program} {describe_exit(returncode)}" + self._tail_text()
            log.warning("%s", reason)
            while True:
                if streak >= self.max_restarts:
                    self._set_failed(f"{reason}\ngave up after {self.max_restarts} restarts in a row")
                    return
                self._state = RESTARTING
                if self._stopping.wait(self.restart_backoff * 2**streak):
                    return
                streak += 1
                self._restarts += 1
                log.info("restarting %s (restart %d, %d in a row)", self.program, self._restarts, streak)
                try:
                    self._launch()
                except _Cancelled:
                    return
                except SidecarStartError as exc:
                    reason = str(exc)
                    log.warning("%s", reason)
                    continue
                self._state = READY
                break

    def _set_failed(self, failure: str) -> None:
        self._failure = failure
        self._state = FAILED
        log.error("%s failed: %s", self.program, failure)

    def _launch(self) -> None:
        """Spawn llama-server and wait for health, moving to a fresh port if the chosen one is taken."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._spawn()
                self._wait_healthy()
                return
            except SidecarStartError:
                if not (self._auto_port and attempt < _PORT_ATTEMPTS and self._port_taken()):
                    raise
                old, self._port = self._port, _free_port(self.host)
                log.warning("port %d was taken; retrying llama-server on port %d", old, self._port)

    def _spawn(self) -> None:
        cmd = self.command()
        env = {**os.environ, **self.binary.env}
        with self._lock:
            if self._stopping.is_set():
                raise _Cancelled
            self._output.clear()
            log.info("starting %s", " ".join(cmd))
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except OSError as exc:
                raise SidecarStartError(f"could not execute {self.program} {self.binary.path}: {exc}") from exc
            proc = self._proc
        self._reader = threading.Thread(
            target=self._read_output, args=(proc,), name=f"llama-server-output:{proc.pid}", daemon=True
        )
        self._reader.start()

    def _read_output(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                line = line.rstrip("\n")
                self._output.append(line)
                log.debug("llama-server[%d]: %s", proc.pid, line)

    def _wait_healthy(self) -> None:
        proc = self._proc
        assert proc is not None
        client = LlamaHttpClient(self.base_url, connect_timeout=0.5, read_timeout=2.0)
        deadline = time.monotonic() + self.load_timeout
        try:
            while True:
                if self._stopping.is_set():
                    raise _Cancelled
                returncode = proc.poll()
                if returncode is not None:
                    self._drain_output()
                    raise SidecarStartError(
                        f"{self.program} (loading {self.model}) {describe_exit(returncode)}" + self._tail_text()
                    )
                if self.probe(client):
                    log.info("%s ready at %s (pid %d)", self.program, self.base_url, proc.pid)
                    return
                if time.monotonic() >= deadline:
                    _terminate(proc, self.stop_grace)
                    raise SidecarStartError(
                        f"{self.program} did not become healthy within {self.load_timeout:g}s loading "
                        f"{self.model}" + self._tail_text()
                    )
                self._stopping.wait(_HEALTH_POLL)
        finally:
            client.close()

    def probe(self, client: LlamaHttpClient) -> bool:
        """Whether the program answers now, while it starts: llama-server's /health says 200."""
        return client.health_check()

    def _drain_output(self) -> None:
        """Wait briefly for the reader to collect a dead process's last lines, so error messages have them."""
        if self._reader is not None:
            self._reader.join(timeout=2.0)

    def _port_taken(self) -> bool:
        text = "\n".join(self._output).lower()
        return "address already in use" in text or "couldn't bind" in text or "failed to bind" in text

    def _tail_text(self, n: int = 30) -> str:
        tail = self.output_tail(n)
        if not tail:
            return f"\n({self.program} printed nothing)"
        return f"\nlast {len(tail)} lines of {self.program} output:\n" + "\n".join(tail)


def describe_exit(returncode: int) -> str:
    """A returncode in words; SIGILL gets its usual meaning spelled out.

    A shell wrapper reports a child killed by signal N as exit code 128+N, so those codes count as signals too.
    """
    if returncode < 0:
        signum = -returncode
    elif returncode - 128 in _SHELL_SIGNALS:
        signum = returncode - 128
    else:
        return f"exited with code {returncode}"
    name = _signal_name(signum)
    if signum == signal.SIGILL:
        return (
            f"was killed by {name} (illegal instruction): this llama-server was built for instructions "
            "this CPU lacks (e.g. AVX-512); run scripts/setup to build one for this machine, or pass "
            "--llama-server / set QMESH_LLAMA_SERVER to a build that runs here"
        )
    return f"was killed by {name}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _free_port(host: str) -> int:
    """A port the OS considers free right now (a later bind can still lose a race; _launch retries)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _terminate(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds, and reap it."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("llama-server (pid %d) ignored SIGTERM for %gs; killing it", proc.pid, grace)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when the spawning thread (or the process) dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@atexit.register
def _stop_all() -> None:
    """Stop every running manager when the interpreter exits normally."""
    for manager in list(_live_managers):
        manager.stop()
