"""CurveZMQ from the command line: keys, a secure broker, worker and client as processes, reload on SIGHUP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

from meshkit import MODEL, WorkerProcess, run_cli
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.errors import MeshError
from qmesh.common.keys import CurveClientKeys
from qmesh.testing import ROOT, Child, free_endpoint, qmesh_command, wait_for


def _keys(tmp_path, *names: str) -> None:
    for name in names:
        done = subprocess.run(
            qmesh_command("qmesh-keys", "generate", str(tmp_path / name)),
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


def _secure_broker(tmp_path, endpoint: str, heartbeat_ms: int) -> Child:
    """qmesh-broker on ``endpoint`` with CURVE: tmp_path's broker key pair, and its workers/ and clients/ lists."""
    return Child("qmesh-broker", qmesh_command(
        "qmesh-broker", "--bind", endpoint, "--heartbeat-ms", str(heartbeat_ms),
        "--curve-secret", str(tmp_path / "broker.key_secret"),
        "--allow-workers", str(tmp_path / "workers"), "--allow-clients", str(tmp_path / "clients"),
    ), tmp_path / "broker.log")  # fmt: skip


def test_a_non_loopback_bind_needs_curve_or_insecure():
    done = run_cli("qmesh-broker", "--bind", "tcp://0.0.0.0:1", timeout=30)
    assert done.returncode == 2 and "without CURVE" in done.stderr and "--insecure" in done.stderr
    done = run_cli("qmesh-worker", "--model", MODEL, "--curve-secret", "/nonexistent", timeout=30)
    assert done.returncode == 2 and "--broker-key" in done.stderr


def test_broker_keys_that_fit_neither_one_broker_nor_each_are_a_usage_error(tmp_path):
    _keys(tmp_path, "own", "a", "b", "c")
    keys = ["--curve-secret", str(tmp_path / "own.key_secret"), "--broker-key", ",".join(
        str(tmp_path / f"{name}.key") for name in "abc"
    ), "--broker", "tcp://127.0.0.1:5555,tcp://127.0.0.1:5556"]  # fmt: skip
    for command in (("qmesh-worker", "--model", MODEL, "--no-pull"), ("qmesh-gateway", "--port", "0")):
        done = run_cli(*command, *keys, timeout=30)
        assert done.returncode == 2 and "3 broker keys for 2 broker(s)" in done.stderr, (command, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr


def test_secure_mesh_from_the_command_line_and_key_removal_on_sighup(tmp_path):
    _keys(tmp_path, "broker", "worker", "client")
    (tmp_path / "workers").mkdir()
    (tmp_path / "clients").mkdir()
    shutil.copy(tmp_path / "worker.key", tmp_path / "workers")
    shutil.copy(tmp_path / "client.key", tmp_path / "clients")
    endpoint = free_endpoint()
    broker = _secure_broker(tmp_path, endpoint, heartbeat_ms=300)
    worker = WorkerProcess(
        endpoint, "--slots", "1", "--cpu-threads", "1", "--heartbeat-ms", "300",
        "--curve-secret", str(tmp_path / "worker.key_secret"), "--broker-key", str(tmp_path / "broker.key"),
        log_dir=tmp_path,
    )  # fmt: skip
    client_args = ["--curve-secret", str(tmp_path / "client.key_secret"), "--broker-key", str(tmp_path / "broker.key")]
    try:
        keys = CurveClientKeys.load(tmp_path / "client.key_secret", tmp_path / "broker.key")
        with QMeshClient(endpoint, connect_timeout=10, curve=keys) as client:
            wait_for(lambda: client.has_model(MODEL), 60, "the secure worker to register")
        done = run_cli(
            "qmesh-client", "--broker", endpoint, *client_args, "--jsonl", "--max-tokens", "4", stdin="Hi.\n"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["error"] is None

        done = run_cli("qmesh-client", "--broker", endpoint, "--connect-timeout", "2", stdin="Hi.\n", timeout=30)
        assert done.returncode == 1, "a client without keys must not get in"

        (tmp_path / "clients" / "client.key").unlink()
        broker.popen.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        done = run_cli(
            "qmesh-client", "--broker", endpoint, *client_args, "-m", MODEL, "--connect-timeout", "3",
            "--jsonl", stdin="Hi.\n", timeout=30,
        )  # fmt: skip
        assert done.returncode == 1 and done.stdout == ""
        assert "refused this key" in done.stderr, "a key removed from the list is refused without a restart"
    finally:
        worker.kill()
        broker.stop()


def test_sighup_admits_and_revokes_a_key_at_once(tmp_path):
    """The broker's timers are 10 minutes apart here: a reload that waited for them would miss the 5 s each change
    is given, however busy the machine; one on SIGHUP comes at once."""
    _keys(tmp_path, "broker", "client")
    (tmp_path / "workers").mkdir()
    (tmp_path / "clients").mkdir()
    listed, unlisted = tmp_path / "clients" / "client.key", tmp_path / "client.key"
    shutil.copy(unlisted, listed)
    endpoint = free_endpoint()
    broker = _secure_broker(tmp_path, endpoint, heartbeat_ms=600_000)
    keys = CurveClientKeys.load(tmp_path / "client.key_secret", tmp_path / "broker.key")

    def allowed(client: QMeshClient) -> bool:
        try:
            client.models()
        except MeshError as exc:
            assert exc.code == p.FORBIDDEN, exc
            return False
        return True

    try:
        with QMeshClient(endpoint, connect_timeout=20, curve=keys) as client:  # one connection, open throughout
            assert allowed(client)
            for admit in (False, True, False):
                if admit:
                    shutil.copy(unlisted, listed)
                else:
                    listed.unlink()
                broker.popen.send_signal(signal.SIGHUP)
                change = "admitted" if admit else "revoked"
                wait_for(lambda admit=admit: allowed(client) is admit, 5, f"the key to be {change} after SIGHUP")
    finally:
        broker.stop()
    assert broker.popen.returncode == 0, broker.log_tail()
