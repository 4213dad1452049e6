"""Shard hosts (qmesh-shard): a real rpc-server registered with a real broker, without llama-server. Registration,
release (rpc-server restarted, its old client cut off), crashes, keys, and where rpc-server may listen."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from meshkit import BrokerThread, Keyring, run_cli
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.keys import generate_keys
from qmesh.testing import Child, pid_alive, qmesh_command, wait_for
from qmesh.worker.binary import find_rpc_server
from qmesh.worker.shard import ShardHost, ShardSettings

HEARTBEAT_MS = "200"


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as running:
        yield running


def shards(endpoint: str, curve=None) -> list[dict]:
    with QMeshClient(endpoint, connect_timeout=5, curve=curve) as client:
        return client.shards()


def shard_process(endpoint: str, log_dir: Path, *args: str, name: str = "shard") -> Child:
    command = qmesh_command(
        "qmesh-shard", "--broker", endpoint, "--threads", "1", "--heartbeat-ms", HEARTBEAT_MS, *args
    )
    return Child(name, command, log_dir / f"{name}.log")


def in_process_host(endpoint: str, name: str = "test/host") -> ShardHost:
    settings = ShardSettings(
        endpoint, find_rpc_server(), name=name, memory=100, threads=1, heartbeat_interval=0.2, liveness=3
    )
    host = ShardHost(settings)
    host.start()
    wait_for(host.registered.is_set, 20, "the shard host to register")
    return host


def test_a_shard_host_offers_its_memory_and_status_lists_it(broker: BrokerThread, tmp_path: Path) -> None:
    child = shard_process(broker.endpoint, tmp_path, "--memory", "100", "--name", "lab/one")
    try:
        (row,) = wait_for(lambda: shards(broker.endpoint), 20, "the shard host to register")
        assert (row["name"], row["device"], row["memory"], row["used"], row["free"]) == ("lab/one", "CPU", 100, 0, 100)
        assert row["worker"] is None and row["bridged"] is False
        status = subprocess.run(
            qmesh_command("qmesh-status", "--broker", broker.endpoint), capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        assert "SHARD HOST" in status.stdout and "lab/one" in status.stdout
        # The host never outlives qmesh-shard, nor its rpc-server the host: SIGKILL takes both down.
        (rpc_server,) = psutil.Process(child.pid).children()
        child.kill()
        wait_for(lambda: not pid_alive(rpc_server.pid), 10, "rpc-server to die with its shard host")
        wait_for(lambda: not shards(broker.endpoint), 10, "the broker to forget the dead host")
    finally:
        child.stop()


def test_a_released_host_restarts_rpc_server_cutting_off_its_last_worker(broker: BrokerThread) -> None:
    host = in_process_host(broker.endpoint)
    lease = zmq.Context.instance().socket(zmq.DEALER)
    lease.linger = 0
    try:
        first_pid = host.manager.pid
        lease.connect(broker.endpoint)
        lease.send_multipart(p.shard_request(p.ShardAsk("test/worker", "some-model", 50, 1)))
        assert lease.poll(5000), "no grant"
        (place,) = p.parse_for_shard_peer(lease.recv_multipart()).grant
        wait_for(lambda: host.worker == "test/worker", 5, "the host to learn who holds it")
        # The worker's llama-server would hold this connection for as long as it serves.
        rpc = socket.create_connection(tuple(place.endpoint.rsplit(":", 1)), timeout=5)
        lease.send_multipart(p.disconnect())  # the worker leaves: the broker releases the host
        wait_for(lambda: host.manager.pid not in (None, first_pid), 10, "rpc-server to restart")
        rpc.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # cut off either way
            assert rpc.recv(1) == b""
        rows = wait_for(lambda: shards(broker.endpoint), 10, "the host to register again")
        assert rows[0]["name"] == "test/host" and rows[0]["worker"] is None
    finally:
        lease.close()
        host.stop()
        host.join(timeout=10)


def test_a_crashed_rpc_server_takes_the_host_out_until_it_is_back(broker: BrokerThread) -> None:
    host = in_process_host(broker.endpoint)
    try:
        first = host.manager.pid
        psutil.Process(first).send_signal(signal.SIGKILL)
        wait_for(lambda: host.manager.pid not in (None, first) and host.registered.is_set(), 20, "a restarted host")
        assert [row["name"] for row in shards(broker.endpoint)] == ["test/host"]
        assert host.manager.restarts == 1 and host.manager.is_healthy()
    finally:
        host.stop()
        host.join(timeout=10)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    keys = Keyring(tmp_path)
    public, _ = generate_keys(tmp_path / "shard")
    shutil.copy(public, keys.workers / public.name)
    return keys


def test_only_keys_on_the_worker_list_may_offer_a_shard_host(keyring: Keyring, tmp_path: Path) -> None:
    broker_key = str(keyring.broker_public)
    with BrokerThread(security=keyring.security()) as broker:
        refused = {
            "stranger": "refused this key: it is not on the broker's allow-list",
            "client": "key client is not on the broker's worker allow-list",
        }
        for name, reason in refused.items():
            secret = str(keyring.root / f"{name}.key_secret")
            child = shard_process(
                broker.endpoint, tmp_path, "--curve-secret", secret, "--broker-key", broker_key, name=name
            )
            assert child.popen.wait(timeout=30) == 1, child.log_tail()
            assert reason in child.log(), child.log_tail()
        secret = str(keyring.root / "shard.key_secret")
        child = shard_process(
            broker.endpoint, tmp_path, "--curve-secret", secret, "--broker-key", broker_key, "--memory", "64"
        )
        try:
            (row,) = wait_for(lambda: shards(broker.endpoint, keyring.keys("client")), 20, "the listed key's host")
            assert row["bridged"] is True and row["memory"] == 64
        finally:
            child.stop()


def test_rpc_server_faces_only_loopback_unless_the_operator_says_insecure(keyring: Keyring) -> None:
    refused = run_cli("qmesh-shard", "--rpc-host", "10.1.2.3", timeout=30)
    assert refused.returncode == 2 and "no authentication or encryption" in refused.stderr
    keys = ["--curve-secret", str(keyring.root / "shard.key_secret"), "--broker-key", str(keyring.broker_public)]
    keyed = run_cli("qmesh-shard", "--rpc-host", "0.0.0.0", *keys, timeout=30)
    assert keyed.returncode == 2 and "with keys rpc-server stays on loopback" in keyed.stderr
    bad = run_cli("qmesh-worker", "--model", "smollm2-135m", "--shards", "two", timeout=30)
    assert bad.returncode == 2 and "--shards" in bad.stderr


def test_a_host_that_cannot_say_where_it_is_reached_stops(broker: BrokerThread, tmp_path: Path) -> None:
    child = shard_process(broker.endpoint, tmp_path, "--rpc-host", "0.0.0.0", "--insecure")
    assert child.popen.wait(timeout=30) == 1
    assert "--advertise HOST:PORT" in child.log()
