"""The overhead rig: an identical direct llama-server and one or more mesh paths, each a broker and a worker (own
processes, the real CLIs) with the worker's own llama-server; optionally a ``qmesh-gateway`` in front of the first
mesh path's broker.

"Identical" is checked, not assumed: every worker's llama-server command line must equal the direct one's but for
the port. A mesh path may run the worker of another git ref (``export`` of its ``worker/`` and ``common/``); its
broker is always the working tree's, so the two mesh paths differ only in the worker.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from qmesh.testing import Child, ChildExited, free_endpoint, llama_servers, qmesh_command, wait_for, wait_for_workers
from qmesh.worker.binary import find_llama_server
from qmesh.worker.models import resolve_model
from qmesh.worker.process import LlamaProcessManager

from . import procs

MODEL = "smollm2-135m"
CTX_PER_SLOT = 2048  # the worker's --ctx-size default; its llama-server gets slots x this
# The host prompt cache of the mesh's and the direct llama-server alike: a worker's default (--cache-ram) depends on
# the memory free when it starts, which would make the two command lines differ.
CACHE_RAM_MIB = 2048


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
        extra_args=("--cache-ram", str(CACHE_RAM_MIB)),
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
class Mesh:
    """One mesh path: a broker, a worker of it, and that worker's llama-server."""

    label: str
    endpoint: str
    broker: Child
    worker: Child

    def sidecar(self) -> psutil.Process:
        children = llama_servers(self.worker.pid)
        assert children, f"the worker of {self.label} has no llama-server"
        return children[0]


@dataclass
class Rig:
    direct: LlamaProcessManager
    meshes: list[Mesh]  # the working tree's worker first, then the ref's, if any
    same_sidecar: bool
    sidecar_command: list[str]
    gateway: Child | None = None  # qmesh-gateway, in front of the first mesh path's broker
    gateway_url: str = ""

    @property
    def base_url(self) -> str:
        return self.direct.base_url

    @property
    def mesh(self) -> Mesh:
        """The working tree's mesh path."""
        return self.meshes[0]

    def direct_pid(self) -> int:
        assert self.direct.pid is not None, "the direct llama-server is not running"
        return self.direct.pid

    def children(self) -> list[Child]:
        gateway = [self.gateway] if self.gateway is not None else []
        return [child for mesh in self.meshes for child in (mesh.broker, mesh.worker)] + gateway


def start(ps: procs.Processes, slots: int, cpu_threads: int, ref: str | None = None, gateway: bool = False) -> Rig:
    """The direct llama-server and the working tree's mesh path; with ``ref`` also a mesh path whose worker is that
    git ref's. Each mesh path has a broker of its own, so each worker gets exactly its path's requests. With
    ``gateway``, a qmesh-gateway whose bridge is connected to the working tree's broker."""
    meshes = [_mesh(ps, "qmesh", slots, cpu_threads, None)]
    if ref is not None:
        meshes.append(_mesh(ps, f"qmesh @ {ref}", slots, cpu_threads, ps.export(ref, "worker", "common")))
    direct = direct_manager(slots, cpu_threads)
    ps.callback(direct.stop)
    direct.start()
    for mesh in meshes:
        wait_for_workers(mesh.endpoint, MODEL, 1, 180, watch=[mesh.broker, mesh.worker])
    ours = without_port(direct.command())
    same = all(without_port(mesh.sidecar().cmdline()) == ours for mesh in meshes)
    r = Rig(direct, meshes, same, ours)
    if gateway:
        r.gateway, r.gateway_url = _gateway(ps, meshes[0].endpoint)
    return r


def _gateway(ps: procs.Processes, broker: str) -> tuple[Child, str]:
    """``qmesh-gateway`` on a free port, once its ``/v1/models`` lists the model (its bridge reached the broker)."""
    port = free_endpoint().rsplit(":", 1)[1]
    command = qmesh_command("qmesh-gateway", "--broker", broker, "--port", port, "--log-level", "warning")
    child = ps.child("gateway", command)
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        if not child.alive():
            raise ChildExited(f"{child.name} exited:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return any(model["id"] == MODEL for model in json.load(response)["data"])
        except OSError:
            return False

    wait_for(serving, 60, "the gateway to list the model")
    return child, url


def _mesh(ps: procs.Processes, label: str, slots: int, cpu_threads: int, code: Path | None) -> Mesh:
    endpoint = free_endpoint()
    broker = ps.broker(endpoint)
    worker = ps.worker(endpoint, *worker_args(slots, cpu_threads), "--cache-ram", str(CACHE_RAM_MIB), code=code)
    return Mesh(label, endpoint, broker, worker)
