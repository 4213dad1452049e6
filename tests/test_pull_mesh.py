"""Models through a mesh of real workers (real llama-server, real model): a worker that lacks its model pulls it from
one that serves it and then serves alone; a bad copy in the store is passed over for a worker's good one; two
different files under one name are refused, naming both digests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from meshkit import DIGESTS, MODEL, BrokerThread, WorkerProcess, worker_threads
from qmesh.broker.models_store import ModelStore
from qmesh.client.sdk import QMeshClient
from qmesh.common.modelfiles import DigestCache
from qmesh.common.pull import pull_model
from qmesh.testing import Child, qmesh_command, wait_for, wait_for_workers
from qmesh.worker.models import resolve_model


def the_digest() -> str:
    return DIGESTS.digest(resolve_model(MODEL).path).sha256


def test_a_worker_without_the_model_pulls_it_from_a_serving_worker_then_answers_alone(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    with BrokerThread() as broker:
        with worker_threads(broker.endpoint, slots=1):
            command = qmesh_command(
                "qmesh-worker", "--model", MODEL, "--broker", broker.endpoint, "--threads", "1", "--heartbeat-ms", "200"
            )
            env = {"QMESH_MODELS_DIR": str(empty), "QMESH_HOME": str(tmp_path / "home")}
            puller = Child("puller", command, tmp_path / "puller.log", env)
            try:
                wait_for_workers(broker.endpoint, MODEL, 2, 120, watch=[puller])
            except BaseException:
                puller.stop()
                raise
        try:  # the worker it pulled from is gone: the puller answers alone
            with QMeshClient(broker.endpoint, timeout=60) as client:
                wait_for(lambda: client.models()[MODEL]["workers"] == 1, 30, "the first worker to leave")
                result = client.generate("Say hi.", model=MODEL, max_tokens=8, temperature=0)
        finally:
            puller.stop()
    assert result.worker is not None and f"/{puller.pid}/" in result.worker
    assert result.model_sha256 == the_digest(), "the answer names the file that made it"
    assert hashlib.sha256((empty / f"{MODEL}.gguf").read_bytes()).hexdigest() == the_digest()
    size = resolve_model(MODEL).path.stat().st_size
    assert f"{size} bytes received, resumed at 0" in puller.log()


def test_a_bad_copy_in_the_store_is_passed_over_for_a_worker_that_serves_the_file(tmp_path: Path) -> None:
    rotten = tmp_path / "store" / f"{MODEL}.gguf"
    rotten.parent.mkdir()
    shutil.copyfile(resolve_model(MODEL).path, rotten)
    store = ModelStore(rotten.parent, DigestCache(None))  # hashed while good; then a byte rots
    with rotten.open("r+b") as handle:
        handle.seek(50_000_000)
        handle.write(b"\x00\x01\x02")
    with BrokerThread(store=store) as broker, worker_threads(broker.endpoint, slots=1):
        result = pull_model(MODEL, tmp_path / "models", broker.endpoint, attempts=2)
        with QMeshClient(broker.endpoint) as client:
            (listed,) = client.model_files()
    store.close()
    assert result.attempts == 2 and result.model.sha256 == the_digest()
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == the_digest()
    assert listed["bad_copies"] == ["the broker's store"] and len(listed["workers"]) == 1


def test_two_different_files_under_one_name_are_refused_naming_both_digests(tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    shutil.copyfile(resolve_model(MODEL).path, other)
    with other.open("r+b") as handle:  # the last byte of the last tensor: llama-server still loads it
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    with BrokerThread() as broker, worker_threads(broker.endpoint, slots=1):
        second = WorkerProcess(broker.endpoint, "--model", str(other), "--name", MODEL, log_dir=tmp_path)
        try:
            status = second.popen.wait(timeout=120)
        finally:
            second.stop()
        with QMeshClient(broker.endpoint) as client:
            assert client.models()[MODEL]["workers"] == 1
    log = second.log()
    assert status == 1, log[-2000:]
    assert "refused this worker" in log and the_digest() in log and other_sha in log
