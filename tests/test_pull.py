"""Models through a real broker (a thread of this process, its store in a temporary folder) with the real pull and
push clients and ``qmesh-models``: no llama-server. Pulls from a serving worker, and across machines, are in
tests/test_pull_mesh.py and tests/test_netns_pull.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest

from meshkit import FAST, BrokerThread
from qmesh.broker.models_store import ModelStore
from qmesh.broker.security import BrokerSecurity
from qmesh.broker.transfers import TransferConfig
from qmesh.client.models_cli import list_models, pull, push
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.config import section_defaults
from qmesh.common.errors import TransferFailed
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.common.modelfiles import DigestCache, partial_path
from qmesh.common.pull import TransferLink, pull_model, push_model
from qmesh.testing import ROOT, qmesh_command, wait_for
from qmesh.worker.models import DEFAULT_MODEL, resolve_model

MODELS_CLI = qmesh_command("qmesh-models")


def synthetic(folder: Path, name: str, size: int = 3_000_000, seed: int = 7) -> tuple[Path, p.ModelInfo]:
    """A file that looks like a model to the mesh (which never loads it here)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b"GGUF" + hashlib.shake_256(bytes([seed])).digest(size - 4)
    path = folder / f"{name}.gguf"
    path.write_bytes(data)
    return path, p.ModelInfo(name, hashlib.sha256(data).hexdigest(), size)


def store_with_the_default_model(folder: Path) -> Path:
    """A store folder whose smollm2-135m.gguf is the real default model (a hard link: nothing is copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{DEFAULT_MODEL}.gguf"
    source = resolve_model(DEFAULT_MODEL).path
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)
    return target


@pytest.fixture
def store_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    store = ModelStore(tmp_path / "store", DigestCache(tmp_path / "broker-digests.json"))
    with BrokerThread(store=store) as broker:
        yield broker
    store.close()


def models_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODELS_CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **env}
    )


def test_a_pull_from_the_store_lands_verified_in_an_empty_models_folder(tmp_path: Path) -> None:
    source = store_with_the_default_model(tmp_path / "store")
    store = ModelStore(tmp_path / "store", DigestCache(None))
    digests = DigestCache(tmp_path / "digests.json")
    with BrokerThread(store=store) as broker:
        result = pull_model(DEFAULT_MODEL, tmp_path / "models", broker.endpoint, digests=digests)
    store.close()
    expected = store.models[DEFAULT_MODEL]
    assert result.model == expected and result.path == tmp_path / "models" / f"{DEFAULT_MODEL}.gguf"
    assert (result.received, result.resumed_at, result.attempts) == (expected.size, 0, 1)
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == expected.sha256
    assert result.path.stat().st_size == source.stat().st_size
    assert [path.name for path in (tmp_path / "models").iterdir()] == [f"{DEFAULT_MODEL}.gguf"], "no partial left"
    cached = json.loads((tmp_path / "digests.json").read_text())
    assert cached[str(result.path.resolve())]["sha256"] == expected.sha256, "the worker will not hash it again"


def test_a_pushed_model_is_listed_and_pulled_back(store_broker: BrokerThread, tmp_path: Path) -> None:
    source, model = synthetic(tmp_path / "mine", "tiny-pushed")
    digests = DigestCache(None)
    assert push_model(source, "tiny-pushed", store_broker.endpoint, digests) == model
    assert (tmp_path / "store" / "tiny-pushed.gguf").read_bytes() == source.read_bytes()
    assert push_model(source, "tiny-pushed", store_broker.endpoint, digests) == model, "a second push sends nothing"
    with QMeshClient(store_broker.endpoint) as client:
        (listed,) = client.model_files()
    assert listed == {
        "name": "tiny-pushed",
        "sha256": model.sha256,
        "size": model.size,
        "workers": [],
        "stores": ["the broker's store"],
        "bad_copies": [],
        "transfers": 0,
    }
    result = pull_model("tiny-pushed", tmp_path / "models", store_broker.endpoint, sha256=model.sha256)
    assert result.path.read_bytes() == source.read_bytes()


def test_a_copy_that_does_not_match_its_digest_is_found_out_and_never_served_again(tmp_path: Path) -> None:
    path, model = synthetic(tmp_path / "store", "tiny")
    store = ModelStore(tmp_path / "store", DigestCache(None))  # hashed now: the copy rots afterwards
    with path.open("r+b") as handle:
        handle.seek(1_000_000)
        handle.write(b"\xff\xfe")
    with BrokerThread(store=store) as broker:
        with pytest.raises(TransferFailed) as failed:
            pull_model("tiny", tmp_path / "models", broker.endpoint, attempts=2)
        with QMeshClient(broker.endpoint) as client:
            (listed,) = client.model_files()
    store.close()
    message = str(failed.value)
    assert "could not pull model 'tiny'" in message and "the broker's store served bytes that did not match" in message
    assert model.sha256 in message
    assert listed["bad_copies"] == ["the broker's store"]
    assert not (tmp_path / "models" / "tiny.gguf").exists()


def test_names_that_could_leave_the_models_folder_are_refused_everywhere(store_broker: BrokerThread, tmp_path) -> None:
    with pytest.raises(TransferFailed, match=r"'\.\.'"):
        pull_model("../tiny", tmp_path / "models", store_broker.endpoint)
    link = TransferLink(store_broker.endpoint)  # a client that skips its own check: the broker refuses too
    try:
        link.send(p.model_fetch(b"t", "../../etc/passwd"))
        reply = link.receive(5.0)
    finally:
        link.close()
    assert reply is not None and reply.error is not None and reply.error[0] == p.BAD_REQUEST
    done = models_cli("pull", "../tiny", "--broker", store_broker.endpoint, env={"QMESH_HOME": str(tmp_path)})
    assert done.returncode == 2 and "'..'" in done.stderr
    assert not (tmp_path / "store").parent.joinpath("tiny.gguf").exists()


def test_not_enough_disk_space_is_said_before_a_byte_is_written(store_broker: BrokerThread, tmp_path: Path) -> None:
    source, model = synthetic(tmp_path / "mine", "tiny")
    push_model(source, "tiny", store_broker.endpoint, DigestCache(None))
    folder = tmp_path / "models"
    with pytest.raises(TransferFailed) as failed:
        pull_model("tiny", folder, store_broker.endpoint, free_space=lambda _: 1_000_000)
    assert str(failed.value) == (
        f"not enough disk space in {folder} for model 'tiny': it needs 3.0 MB more, 1.0 MB free"
    )
    assert not folder.exists() or not any(folder.iterdir())


def test_an_interrupted_pull_goes_on_from_the_bytes_on_disk(tmp_path: Path) -> None:
    store_with_the_default_model(tmp_path / "store")
    store = ModelStore(tmp_path / "store", DigestCache(None))
    model = store.models[DEFAULT_MODEL]
    env = {"QMESH_MODELS_DIR": str(tmp_path / "models"), "QMESH_HOME": str(tmp_path / "home")}
    partial = partial_path(tmp_path / "models", model)
    slow = replace(FAST, transfers=TransferConfig(rate=10e6, busy_rate=10e6))  # 10 MB/s: time to pull the plug
    with BrokerThread(config=slow, store=store) as broker:
        puller = subprocess.Popen(
            [*MODELS_CLI, "pull", DEFAULT_MODEL, "--broker", broker.endpoint, "--json"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: partial.is_file() and partial.stat().st_size >= 20_000_000, 60, "20 MB on disk")
        finally:
            puller.send_signal(signal.SIGKILL)
            puller.wait(timeout=10)
    kept = partial.stat().st_size
    assert 20_000_000 <= kept < model.size
    with BrokerThread(store=store) as broker:  # a broker at full speed this time
        done = models_cli("pull", DEFAULT_MODEL, "--broker", broker.endpoint, "--json", env=env)
    store.close()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["resumed_at"] == kept and result["received"] == model.size - kept, "it started over"
    assert result["sha256"] == model.sha256
    assert hashlib.sha256(Path(result["path"]).read_bytes()).hexdigest() == model.sha256


def test_with_curve_a_worker_key_fetches_only_its_models_and_a_client_key_any(tmp_path: Path) -> None:
    allow_workers, allow_clients = tmp_path / "allow-workers", tmp_path / "allow-clients"
    allow_workers.mkdir()
    allow_clients.mkdir()
    broker_public, broker_secret = generate_keys(tmp_path / "broker")
    limited, _ = generate_keys(tmp_path / "gpu1", models=["other"])
    client, _ = generate_keys(tmp_path / "alice")
    shutil.copy(limited, allow_workers / limited.name)
    shutil.copy(client, allow_clients / client.name)
    generate_keys(tmp_path / "stranger")
    source, _ = synthetic(tmp_path / "store", "tiny")
    store = ModelStore(tmp_path / "store", DigestCache(None))
    security = BrokerSecurity(broker_secret, allow_workers, allow_clients)

    def keys(name: str) -> CurveClientKeys:
        return CurveClientKeys.load(tmp_path / f"{name}.key_secret", broker_public)

    with BrokerThread(security=security, store=store) as broker:
        with pytest.raises(TransferFailed, match=r"key gpu1 may not fetch or serve 'tiny' \(allowed: other\)"):
            pull_model("tiny", tmp_path / "w", broker.endpoint, curve=keys("gpu1"))
        with pytest.raises(TransferFailed, match="not on the broker's allow-list"):
            pull_model("tiny", tmp_path / "s", broker.endpoint, curve=keys("stranger"))
        result = pull_model("tiny", tmp_path / "c", broker.endpoint, curve=keys("alice"))
    store.close()
    assert result.path.read_bytes() == source.read_bytes()


def test_qmesh_models_lists_pushes_and_pulls(store_broker: BrokerThread, tmp_path: Path) -> None:
    source, model = synthetic(tmp_path / "mine", "my-model")
    env = {"QMESH_HOME": str(tmp_path / "home"), "QMESH_MODELS_DIR": str(tmp_path / "models")}
    endpoint = ["--broker", store_broker.endpoint]
    listed = models_cli("list", *endpoint, env=env)
    assert listed.returncode == 0 and listed.stdout == "no models in the mesh\n"
    pushed = models_cli("push", str(source), "--name", "tiny", "--json", *endpoint, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout) == {"name": "tiny", "sha256": model.sha256, "size": model.size}
    listed = models_cli("list", *endpoint, env=env)
    assert listed.stdout.splitlines() == [
        "NAME   SHA256             SIZE     HELD BY",
        f"tiny   {model.sha256[:16]}   3.0 MB   the broker's store",
    ]
    assert json.loads(models_cli("list", "--json", *endpoint, env=env).stdout)[0]["sha256"] == model.sha256
    pulled = models_cli("pull", "tiny", *endpoint, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "models" / "tiny.gguf").read_bytes() == source.read_bytes()
    again = models_cli("pull", "tiny", *endpoint, env=env)
    assert again.returncode == 1 and "exists already" in again.stderr


def test_a_broker_without_a_store_says_so_and_an_unknown_model_is_named(tmp_path: Path) -> None:
    source, _ = synthetic(tmp_path, "tiny")
    with BrokerThread() as broker:
        with pytest.raises(TransferFailed, match="start it with --models-dir"):
            push_model(source, "tiny", broker.endpoint, DigestCache(None))
        with pytest.raises(TransferFailed, match=r"no worker or store of this mesh holds model 'tiny' \(held: none\)"):
            pull_model("tiny", tmp_path / "models", broker.endpoint)


def test_no_broker_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TransferFailed, match="no answer from the broker at tcp://127.0.0.1:9 .*qmesh-broker running"):
        pull_model("tiny", tmp_path, "tcp://127.0.0.1:9", connect_timeout=1.0)
    assert time.monotonic() - started < 5


def test_qmesh_models_reads_the_models_table_and_says_its_version() -> None:
    example = ROOT / "deploy" / "qmesh.toml"
    for command in (list_models, pull, push):
        assert section_defaults(example, "models", command)["broker"] == "tcp://10.0.0.1:5555"
    done = subprocess.run([*MODELS_CLI, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == f"qmesh {version('qmesh')}\n"
