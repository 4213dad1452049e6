"""Models bigger than one machine (issue 19), on loopback with real processes: a split worker over shard hosts
answers as an unsplit worker does; a shard host killed mid-stream costs the stream nothing and the split worker
forms again; with CURVE an eavesdropper between the hosts sees neither the model nor the prompt."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshkit import MODEL, BrokerThread, Keyring, RecordingProxy, worker_settings, worker_threads
from qmesh.client.sdk import QMeshClient
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.testing import Child, free_endpoint, qmesh_command, wait_for, wait_for_workers
from qmesh.worker.split import SplitWorker, memory_needed

pytestmark = pytest.mark.sidecar

SPLIT = "smollm2-split"  # the split worker's service, beside the unsplit MODEL
HOST_MIB = 100  # each host holds less than the model needs (about 150 MiB): auto takes two
PROMPT = "Write a long poem about rivers."
SECRET_PROMPT = "The launch code is swordfish-tango-42."


def shard_host(endpoint: str, log_dir: Path, name: str, *args: str) -> Child:
    options = ["--broker", endpoint, "--memory", str(HOST_MIB), "--threads", "1", "--heartbeat-ms", "200"]
    return Child(
        name, qmesh_command("qmesh-shard", *options, "--name", name, *args), log_dir / f"{name.replace('/', '-')}.log"
    )


@contextmanager
def split_worker(
    endpoint: str, service: str, curve: CurveClientKeys | None = None, **options: object
) -> Iterator[SplitWorker]:
    """A split worker thread (as many hosts as fit), registered before the block runs."""
    worker = SplitWorker(worker_settings(endpoint, slots=1, service=service, curve=curve, **options), 0, 0)
    worker.start()
    try:
        wait_for(lambda: worker.registered.is_set() or not worker.is_alive(), 90, "the split worker to form")
        assert worker.is_alive(), worker.failure
        yield worker
    finally:
        worker.stop()
        worker.join(timeout=30)


def token_ids(client: QMeshClient, model: str, prompt: str, max_tokens: int) -> list[int]:
    request = client.submit(prompt, model=model, max_tokens=max_tokens, temperature=0)
    result = request.result()
    assert result.error is None, result.error
    return [token for chunk in request.chunks for token in chunk.tokens]


def test_a_split_worker_answers_as_an_unsplit_one(tmp_path: Path) -> None:
    assert memory_needed(worker_settings("tcp://x").model.path, 2048) > HOST_MIB
    with BrokerThread() as broker:
        hosts = [shard_host(broker.endpoint, tmp_path, f"lab/{key}") for key in "ab"]
        try:
            with (
                QMeshClient(broker.endpoint, timeout=60) as client,
                worker_threads(broker.endpoint, slots=1),
            ):
                wait_for(lambda: len(client.shards()) == 2, 30, "two shard hosts")
                with split_worker(broker.endpoint, SPLIT) as split:
                    (row,) = [w for w in client.workers() if w["service"] == SPLIT]
                    assert sorted(host["name"] for host in row["info"]["split"]) == ["lab/a", "lab/b"]
                    table = client.shards()
                    assert {s["worker"] for s in table} == {split.worker_name}
                    assert sum(s["used"] for s in table) == split.memory
                    assert all(s["used"] + s["free"] == HOST_MIB for s in table)
                    split_tokens = token_ids(client, SPLIT, PROMPT, 16)
                    plain_tokens = token_ids(client, MODEL, PROMPT, 16)
                    assert len(split_tokens) == 16 and split_tokens == plain_tokens
                # The split worker left: its hosts are free again (each restarted its rpc-server first).
                wait_for(lambda: [s["worker"] for s in client.shards()] == [None, None], 20, "the hosts to be free")
        finally:
            for host in hosts:
                host.stop()


def test_a_shard_host_killed_mid_stream_costs_the_stream_nothing(tmp_path: Path) -> None:
    with BrokerThread() as broker:
        hosts = {key: shard_host(broker.endpoint, tmp_path, f"lab/{key}") for key in "abc"}
        try:
            with (
                QMeshClient(broker.endpoint, timeout=90) as client,
                worker_threads(broker.endpoint, slots=1),  # the unsplit worker the stream moves to
            ):
                wait_for(lambda: len(client.shards()) == 3, 30, "three shard hosts")
                with split_worker(broker.endpoint, MODEL) as split:
                    wait_for_workers(broker.endpoint, MODEL, 2, 30)
                    requests = [client.submit(PROMPT, model=MODEL, max_tokens=160, temperature=0) for _ in range(2)]

                    def on_split() -> object:
                        client.poll(0.05)
                        return next((r for r in requests if r.status.get("worker") == split.worker_name), None)

                    victim = wait_for(on_split, 30, "a stream on the split worker")
                    wait_for(lambda: client.poll(0.05) or len(victim.chunks) >= 10, 30, "ten tokens from it")
                    used = [s["name"] for s in client.shards() if s["worker"] == split.worker_name]
                    killed = used[0].split("/")[1]
                    hosts[killed].kill()
                    result = victim.result()
                    assert result.error is None, result.error
                    assert result.failovers == 1  # to the unsplit worker, or to the split one formed again
                    streamed = [token for chunk in victim.chunks for token in chunk.tokens]
                    for request in requests:
                        assert request.result().error is None
                    # The split worker forms again over the hosts that are left, and serves.
                    wait_for(lambda: split.formations >= 2 and split.registered.is_set(), 60, "the split worker back")
                    (row,) = [w for w in client.workers() if w["info"].get("split")]
                    assert used[0] not in [host["name"] for host in row["info"]["split"]]
                    reference = token_ids(client, MODEL, PROMPT, 160)
                    assert streamed == reference, "the failover lost or repeated tokens"
        finally:
            for host in hosts.values():
                host.stop()


@pytest.mark.parametrize("curve", [False, True], ids=["direct", "curve"])
def test_an_eavesdropper_between_the_hosts_sees_the_model_only_without_curve(tmp_path: Path, curve: bool) -> None:
    """Each shard host is reached through a recording proxy (its advertised address). Without CURVE (rpc-server on
    loopback, which only --insecure would open to a network) the proxy carries the model's weights in clear; with
    CURVE it sees neither them nor the prompt."""
    keyring = Keyring(tmp_path)
    for name in ("a", "b"):
        public, _ = generate_keys(tmp_path / f"shard-{name}")
        shutil.copy(public, keyring.workers / public.name)
    model = worker_settings("tcp://x").model.path
    with model.open("rb") as handle:  # 64 bytes of weights from the middle of the file: a layer's tensor
        handle.seek(model.stat().st_size // 2)
        weights = handle.read(64)
    proxies: list[RecordingProxy] = []
    hosts: list[Child] = []
    security, worker_keys = (keyring.security(), keyring.keys("worker")) if curve else (None, None)
    with BrokerThread(security=security) as broker:
        try:
            for name in ("a", "b"):
                port = int(free_endpoint().rsplit(":", 1)[1])
                proxies.append(RecordingProxy(port))
                advertise = ["--advertise", proxies[-1].endpoint[len("tcp://") :]]
                if curve:
                    keys = ["--curve-secret", str(tmp_path / f"shard-{name}.key_secret")]
                    keys += ["--broker-key", str(keyring.broker_public), "--bind", f"tcp://127.0.0.1:{port}"]
                else:
                    keys = ["--rpc-port", str(port)]
                hosts.append(shard_host(broker.endpoint, tmp_path, f"lab/{name}", *advertise, *keys))
            with (
                split_worker(broker.endpoint, MODEL, curve=worker_keys),
                QMeshClient(broker.endpoint, timeout=60, curve=keyring.keys("client") if curve else None) as client,
            ):
                assert client.generate(SECRET_PROMPT, model=MODEL, max_tokens=8).text.strip()
        finally:
            for host in hosts:
                host.stop()
            for proxy in proxies:
                proxy.close()
    recorded = b"".join(bytes(proxy.recorded) for proxy in proxies)
    assert len(recorded) > 20 * 2**20, "the proxies should have carried the model's layers"
    assert b"swordfish" not in recorded
    assert (weights in recorded) is not curve
