"""The overhead rig: a broker and a worker (own processes, the real CLIs) and an identical direct llama-server.

"Identical" is checked, not assumed: the worker's llama-server command line must equal the direct one's but
for the port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from qmesh.testing import Child, free_endpoint, wait_for_workers
from qmesh.worker.binary import find_llama_server
from qmesh.worker.models import resolve_model
from qmesh.worker.process import LlamaProcessManager

from . import procs

MODEL = "smollm2-135m"
CTX_PER_SLOT = 2048  # the worker's --ctx-size default; its llama-server gets slots x this


def default_cpu_threads() -> int:
    """What ``qmesh-worker --threads 1`` gives its llama-server by default: all the cores."""
    return max(1, os.cpu_count() or 1)


def direct_manager(slots: int, cpu_threads: int) -> LlamaProcessManager:
    """A llama-server started the way a worker starts its own (worker/node.py), on another port."""
    model = resolve_model(MODEL)
    return LlamaProcessManager(
        model.path,
        find_llama_server(),
        ctx_size=CTX_PER_SLOT * slots,
        parallel=slots,
        threads=cpu_threads,
        load_timeout=120,
    )


def worker_args(slots: int, cpu_threads: int, threads: int = 1, name: str | None = None) -> list[str]:
    args = ["--model", MODEL, "--slots", str(slots), "--threads", str(threads), "--cpu-threads", str(cpu_threads)]
    args += ["--ctx-size", str(CTX_PER_SLOT)]
    return args + (["--name", name] if name else [])


def without_port(command: list[str]) -> list[str]:
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg == "--port":
            skip = True
            continue
        out.append(arg)
    return out


@dataclass
class Rig:
    endpoint: str
    broker: Child
    worker: Child
    direct: LlamaProcessManager
    same_sidecar: bool
    sidecar_command: list[str]

    @property
    def base_url(self) -> str:
        return self.direct.base_url

    def role_pids(self) -> list[int]:
        """This process, the broker, the worker, the worker's llama-server, the direct llama-server."""
        sidecar = self.sidecar_pids()[0]
        assert self.direct.pid is not None, "the direct llama-server is not running"
        return [os.getpid(), self.broker.pid, self.worker.pid, sidecar, self.direct.pid]

    def sidecar_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.worker.pid).children(recursive=True)]


def start(ps: procs.Processes, slots: int, cpu_threads: int) -> Rig:
    endpoint = free_endpoint()
    broker = ps.broker(endpoint)
    worker = ps.worker(endpoint, *worker_args(slots, cpu_threads))
    direct = direct_manager(slots, cpu_threads)
    ps.callback(direct.stop)
    direct.start()
    wait_for_workers(endpoint, MODEL, 1, 180, watch=[broker, worker])
    sidecars = psutil.Process(worker.pid).children(recursive=True)
    theirs = without_port(sidecars[0].cmdline()) if sidecars else []
    ours = without_port(direct.command())
    return Rig(endpoint, broker, worker, direct, theirs == ours, ours)
