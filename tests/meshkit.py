"""Test helpers that run real meshes on loopback: a broker thread, worker threads or processes, the CLI.

Built on the shared harness ``qmesh.testing`` (endpoints, child processes, waits); what is here is only for tests.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import uvicorn

from qmesh.broker.core import BrokerConfig
from qmesh.broker.loop import Broker
from qmesh.broker.models_store import ModelStore
from qmesh.broker.security import BrokerSecurity
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.common.modelfiles import DigestCache
from qmesh.gateway.app import create_app
from qmesh.testing import ROOT, Child, free_endpoint, qmesh_command, wait_for, wait_for_workers
from qmesh.worker.binary import find_llama_server
from qmesh.worker.models import resolve_model
from qmesh.worker.node import WorkerNode, WorkerSettings

MODEL = "smollm2-135m"
DIGESTS = DigestCache(None)  # in memory: the model is hashed once per test process
FAST = BrokerConfig(heartbeat_interval=0.2, liveness=3, max_queue=100, queue_timeout=30.0)


class BrokerThread:
    """A real broker on a real socket, run in a thread of the test process."""

    def __init__(
        self,
        endpoint: str | None = None,
        config: BrokerConfig = FAST,
        security: BrokerSecurity | None = None,
        store: ModelStore | None = None,
    ) -> None:
        self.endpoint = endpoint or free_endpoint()
        self.config = config
        self.security = security
        self.store = store  # the broker's own models (--models-dir)
        self.broker: Broker | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> BrokerThread:
        # A broker stopped a moment ago in this process may still hold the port: libzmq unbinds asynchronously.
        self.broker = wait_for(self._bind, 5, f"{self.endpoint} to be free", interval=0.1)
        self.thread = threading.Thread(target=self.broker.run, name="test-broker", daemon=True)
        self.thread.start()
        return self

    def _bind(self) -> Broker | None:
        try:
            return Broker(self.endpoint, self.config, security=self.security, store=self.store)
        except OSError:
            return None

    def stop(self) -> None:
        if self.broker is not None and self.thread is not None:
            self.broker.stop()
            self.thread.join(timeout=5)
            assert not self.thread.is_alive(), "broker thread did not stop"
        self.broker = self.thread = None

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_settings(endpoint: str, slots: int = 2, heartbeat: float = 0.2, **overrides: object) -> WorkerSettings:
    model = resolve_model(MODEL)
    model = replace(model, digest=DIGESTS.digest(model.path))  # READY says which file it serves
    settings = WorkerSettings(
        broker=endpoint,
        model=model,
        service=model.name,
        binary=find_llama_server(),
        slots=slots,
        ctx_size=2048,
        cpu_threads=1,
        heartbeat_interval=heartbeat,
        liveness=3,
        grace=5.0,
        worker_id="0" * 64,
    )
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


@contextlib.contextmanager
def worker_threads(
    endpoint: str, count: int = 1, watcher_curve: CurveClientKeys | None = None, **options: object
) -> Iterator[list[WorkerNode]]:
    """In-process worker threads (each with a real llama-server), registered before the block runs (at least
    ``count`` workers of their service, ``options["service"]`` or MODEL).

    ``watcher_curve``: the client keys used to watch for the registration on a CURVE broker."""
    nodes = [WorkerNode(worker_settings(endpoint, **options), index) for index in range(count)]
    for node in nodes:
        node.start()
    try:
        wait_for_workers(endpoint, str(options.get("service", MODEL)), count, 60, curve=watcher_curve)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            node.join(timeout=30)


class WorkerProcess(Child):
    """``qmesh-worker`` as a real process (for tests that kill it), serving MODEL with one thread by default."""

    def __init__(self, endpoint: str, *args: str, log_dir: Path) -> None:
        # a later --threads in args wins
        command = qmesh_command("qmesh-worker", "--model", MODEL, "--broker", endpoint, "--threads", "1", *args)
        log_path = log_dir / f"worker-{os.getpid()}-{time.monotonic_ns()}.log"
        super().__init__("qmesh-worker", command, log_path, {"QMESH_HOME": str(log_dir / "home")})


def run_cli(*args: str, stdin: str = "", timeout: float = 120, env: dict[str, str] | None = None):
    """Run a QMesh command (``qmesh-client`` ...) as a real process; returns the CompletedProcess."""
    return subprocess.run(
        qmesh_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


class GatewayThread:
    """A real uvicorn server with the gateway app, on a free port, in a thread of the test process."""

    def __init__(self, bridge: Any, api_keys: tuple[str, ...] = ()) -> None:
        self.bridge = bridge
        config = uvicorn.Config(create_app(bridge, api_keys), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-gateway", daemon=True)

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the gateway to start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "gateway did not stop"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=60)


class Keyring:
    """A broker key, worker and client allow-lists, and keys on and off them, in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workers, self.clients = root / "allow-workers", root / "allow-clients"
        self.workers.mkdir()
        self.clients.mkdir()
        self.broker_public, self.broker_secret = generate_keys(root / "broker")
        for name, allow in (("worker", self.workers), ("client", self.clients)):
            public, _ = generate_keys(root / name)
            shutil.copy(public, allow / public.name)
        generate_keys(root / "stranger")

    def keys(self, name: str, broker_key: Path | None = None) -> CurveClientKeys:
        return CurveClientKeys.load(self.root / f"{name}.key_secret", broker_key or self.broker_public)

    def security(self) -> BrokerSecurity:
        return BrokerSecurity(self.broker_secret, self.workers, self.clients)


class RecordingProxy:
    """A TCP forwarder between a client and the broker that keeps every byte it carries: the eavesdropper."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.recorded = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                inbound, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(inbound, outbound), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            readable, _, _ = select.select(list(peers), [], [], 0.2)
            for source in readable:
                data = source.recv(65536)
                if not data:
                    a.close()
                    b.close()
                    return
                self.recorded += data
                peers[source].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
