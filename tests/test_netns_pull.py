"""A pull across machines: the broker on one network-namespace host, a worker with the model on a second, and on a
third a worker whose models folder is empty. The third pulls the model from the second through the broker (workers
open no ports: every byte goes over their own connections to the hub), then serves alone. Needs root and iproute2;
skipped otherwise (tests/netkit.py has the hosts)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from meshkit import MODEL
from netkit import HostProcess, listed, network, run_json
from qmesh.testing import qmesh_command, wait_for
from qmesh.worker.models import resolve_model

pytestmark = pytest.mark.sidecar

PORT = 5555  # free by construction: the broker's namespace is new
HEARTBEAT_MS = "200"


def test_a_worker_on_its_own_host_pulls_its_model_through_the_broker_and_serves_it(tmp_path: Path):
    with network(tmp_path) as net:
        hub = net.add_host("hub")
        endpoint = f"tcp://127.0.0.1:{PORT}"

        def registered() -> list[str]:
            return listed(hub, endpoint)["workers"]

        def worker(key: str, env: dict[str, str]) -> HostProcess:
            host = net.add_host(key)
            link = net.connect(hub, host)
            options = ["--model", MODEL, "--broker", f"tcp://{link.left_addr}:{PORT}", "--heartbeat-ms", HEARTBEAT_MS]
            argv = qmesh_command("qmesh-worker", *options, "--threads", "1", "--cpu-threads", "1", "--grace", "2")
            return net.start(host, argv, tmp_path / f"worker-{key}.log", {"QMESH_HOME": str(tmp_path / key), **env})

        broker = qmesh_command("qmesh-broker", "--bind", f"tcp://0.0.0.0:{PORT}", "--insecure")
        net.start(hub, [*broker, "--heartbeat-ms", HEARTBEAT_MS], tmp_path / "broker.log")
        holder = worker("a", {})
        wait_for(lambda: len(registered()) == 1, 60, "the worker with the model to register")
        puller = worker("b", {"QMESH_MODELS_DIR": str(tmp_path / "empty-models")})
        wait_for(lambda: len(registered()) == 2, 120, "the worker without the model to pull it and register")
        holder.stop()
        wait_for(lambda: [f"/{puller.pid}/" in name for name in registered()] == [True], 30, "b to serve alone")
        answer = run_json(hub, "stream", endpoint, "Say hi.", "8", timeout=60)
    assert answer["error"] is None and f"/{puller.pid}/" in answer["worker"]
    pulled = tmp_path / "empty-models" / f"{MODEL}.gguf"
    original = resolve_model(MODEL).path
    assert hashlib.sha256(pulled.read_bytes()).hexdigest() == hashlib.sha256(original.read_bytes()).hexdigest()
    log = (tmp_path / "worker-b.log").read_text()
    size = original.stat().st_size
    assert re.search(rf"pulled {MODEL} \(sha256 [0-9a-f]{{64}}\) into .*: {size} bytes received, resumed at 0", log)
