"""A primary/backup broker pair end to end: real broker processes, a worker process with real llama-servers, SDK
clients and the gateway. Streams outlive the active broker's death, a frozen broker that wakes does no harm, a
restarted primary comes back passive."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
import zmq

from meshkit import MODEL, GatewayThread, WorkerProcess, run_cli
from qmesh.client.sdk import QMeshClient, Request
from qmesh.common import protocol as p
from qmesh.common.errors import MeshError
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.gateway.bridge import Bridge
from qmesh.testing import free_endpoint, qmesh_command, wait_for
from qmesh.testing.pair import BrokerPair

HEARTBEAT_MS = 200
PROMPTS = [
    "Write a long poem about rivers.",
    "Tell a long story about a lighthouse keeper.",
    "Describe the four seasons in detail.",
    "Explain how bread is made, step by step.",
]
MAX_TOKENS = 80


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[BrokerPair]:
    brokers = BrokerPair(tmp_path, HEARTBEAT_MS)
    brokers.start("primary")
    brokers.start("backup")
    try:
        yield brokers
    finally:
        brokers.stop()


@pytest.fixture
def worker(pair: BrokerPair, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        pair.address,
        "--threads", "2", "--slots", "2", "--cpu-threads", "1", "--heartbeat-ms", str(HEARTBEAT_MS),
        log_dir=tmp_path,
    )  # fmt: skip
    try:
        with QMeshClient(pair.address, connect_timeout=5) as client:
            wait_for(lambda: client.models().get(MODEL, {}).get("workers", 0) >= 2, 90, "both worker threads")
        yield process
    finally:
        process.stop()


def tokens(request: Request) -> list[int]:
    return [token for chunk in request.chunks for token in chunk.tokens]


def submit_all(client: QMeshClient) -> list[Request]:
    return [client.submit(prompt, model=MODEL, max_tokens=MAX_TOKENS, temperature=0) for prompt in PROMPTS]


def test_the_primary_serves_and_the_backup_waits(pair, worker):
    assert pair.active() == "primary"
    with QMeshClient(pair.endpoints["backup"], connect_timeout=5) as direct:
        result = direct.submit("Say hi.", model=MODEL, max_tokens=4).result()
        assert result.error is not None and result.error.code == p.NOT_ACTIVE  # the passive one says so


def test_killing_the_active_broker_mid_stream_loses_no_token(pair, worker):
    """Four streams at temperature 0; the active broker dies under them. The workers keep generating and hand the
    streams to the new active broker, where the SDK asks for them: each answer is exactly its uninterrupted run."""
    with QMeshClient(pair.address, timeout=180, connect_timeout=5) as client:
        references = submit_all(client)
        assert all(r.result().ok for r in references), [r.result().error for r in references]
        streams = submit_all(client)
        wait_for(lambda: client.poll(0.05) or all(len(s.chunks) >= 5 for s in streams), 60, "four streams")
        os.kill(pair.brokers["primary"].pid, signal.SIGKILL)
        results = [stream.result() for stream in streams]
        assert all(r.ok for r in results), [r.error for r in results]
        for stream, reference in zip(streams, references, strict=True):
            assert tokens(stream) == tokens(reference), "a token lost, repeated or changed at the seam"
            assert stream.result().tokens == reference.result().tokens
    assert pair.active() == "backup"


def test_killing_the_active_broker_before_the_first_token(pair, worker):
    long_prompt = "Summarise this. " + " ".join(f"Line {i} says the tide comes in." for i in range(120))
    with QMeshClient(pair.address, timeout=180, connect_timeout=5) as client:
        request = client.submit(long_prompt, model=MODEL, max_tokens=8, temperature=0)
        wait_for(lambda: client.poll(0.05) or request.status.get("state") == "dispatched", 30, "dispatch")
        assert not request.chunks
        os.kill(pair.brokers["primary"].pid, signal.SIGKILL)
        result = request.result()
        assert result.ok and result.tokens == len(tokens(request)) > 0, result.error


def test_killing_the_passive_broker_changes_nothing(pair, worker):
    with QMeshClient(pair.address, timeout=180, connect_timeout=5) as client:
        stream = client.submit(PROMPTS[0], model=MODEL, max_tokens=MAX_TOKENS, temperature=0)
        wait_for(lambda: client.poll(0.05) or len(stream.chunks) >= 3, 60, "a stream")
        pair.brokers["backup"].kill()
        assert stream.result().ok and stream.result().failovers == 0
    assert pair.active() == "primary"


def test_a_frozen_active_broker_is_replaced_and_stays_out_when_it_wakes(pair, worker):
    primary = pair.brokers["primary"]
    with QMeshClient(pair.address, timeout=180, connect_timeout=5) as client:
        stream = client.submit(PROMPTS[1], model=MODEL, max_tokens=MAX_TOKENS, temperature=0)
        wait_for(lambda: client.poll(0.05) or len(stream.chunks) >= 3, 60, "a stream")
        os.kill(primary.pid, signal.SIGSTOP)
        try:
            result = stream.result()  # the workers and the client notice the silence and go to the backup
            assert result.ok, result.error
        finally:
            os.kill(primary.pid, signal.SIGCONT)
        wait_for(
            lambda: "steps down" in primary.log() or "is passive" in primary.log(), 10, "the woken primary to yield"
        )
        after = client.submit("Say hi.", model=MODEL, max_tokens=4, temperature=0).result()
        assert after.ok, after.error
    assert pair.active() == "backup"
    assert "Traceback" not in primary.log()


def test_a_restarted_primary_comes_back_passive_and_the_mesh_keeps_answering(pair, worker):
    pair.brokers["primary"].kill()
    with QMeshClient(pair.address, timeout=180, connect_timeout=5) as client:
        assert client.submit("Say hi.", model=MODEL, max_tokens=4).result().ok  # the backup took over
        pair.start("primary")
        wait_for(
            lambda: pair.active() == "backup" and "passive" in pair.brokers["primary"].log(), 20, "a passive primary"
        )
        assert client.submit("Say bye.", model=MODEL, max_tokens=4).result().ok
    assert pair.active() == "backup"


def test_a_broker_restarted_alone_serves_the_worker_and_client_that_saw_its_dead_peers_newer_epoch(pair, worker):
    """The backup takes over (epoch 2), then dies too, and the primary comes back alone: it takes over at epoch 1,
    never having heard of epoch 2. The worker and the client that followed epoch 2 find it older, but it is the only
    broker there is: they must settle on it, not go back and forth to the dead one for ever (found by
    scripts/chaos --pair, where the active broker died just as its restarted peer came up)."""
    pair.brokers["primary"].kill()
    with QMeshClient(pair.address, timeout=60, connect_timeout=5) as client:
        wait_for(lambda: client.models().get(MODEL, {}).get("workers", 0) >= 2, 30, "both threads at the backup")
        assert client.submit("Say hi.", model=MODEL, max_tokens=4).result().ok
        assert client.broker_info()["epoch"] == 2
        pair.brokers["backup"].kill()
        pair.start("primary")
        result = client.submit("Say bye.", model=MODEL, max_tokens=4).result()
        assert result.ok, result.error
        assert client.broker_info() == {"endpoint": pair.endpoints["primary"], "pair_role": "primary", "epoch": 1}
        wait_for(lambda: client.models().get(MODEL, {}).get("workers", 0) >= 2, 30, "both threads at the primary")


def test_the_gateway_keeps_serving_across_a_takeover(pair, worker):
    with GatewayThread(Bridge(pair.address, connect_timeout=5)) as front:
        api = front.client()
        chunks = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=60, temperature=0, stream=True
        )
        received = []
        for chunk in chunks:
            received.append(chunk.choices[0].delta.content or "")
            if len(received) == 5:
                os.kill(pair.brokers["primary"].pid, signal.SIGKILL)
        assert "".join(received).strip()
        answer = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
        assert answer.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError):  # an unknown model is still answered, by the new active broker
            api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


def status(pair: BrokerPair, *args: str) -> str:
    done = subprocess.run(
        qmesh_command("qmesh-status", "--broker", pair.address, *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_names_the_active_broker_before_and_after_a_takeover(pair, worker):
    assert f"broker {pair.endpoints['primary']}: active, the primary of its pair, epoch 1" in status(pair)
    pair.brokers["primary"].kill()
    wait_for(lambda: pair.active() == "backup", 20, "the backup to take over")
    assert f"broker {pair.endpoints['backup']}: active, the backup of its pair, epoch 2" in status(pair)
    assert '"pair_role": "backup"' in status(pair, "--json")


@pytest.fixture
def curve_pair(tmp_path: Path) -> Iterator[BrokerPair]:
    brokers = BrokerPair(tmp_path, HEARTBEAT_MS, curve=True)
    assert brokers.keys is not None
    generate_keys(brokers.keys / "impostor")  # a key pair no broker of the pair knows
    try:
        yield brokers
    finally:
        brokers.stop()


def test_a_curve_pair_fails_over_with_each_brokers_own_key(curve_pair, tmp_path):
    """CURVE on both sides: workers and clients list both brokers' keys (--broker-key A.key,B.key), each broker
    admits only its peer on the HA link; a takeover changes nothing for them."""
    curve_pair.start("primary")
    curve_pair.start("backup")
    worker = WorkerProcess(
        curve_pair.address, "--heartbeat-ms", str(HEARTBEAT_MS), *curve_pair.client_keys("worker"), log_dir=tmp_path
    )
    keys = curve_pair.keys
    assert keys is not None
    client_keys = CurveClientKeys.load(keys / "client.key_secret", curve_pair.broker_keys)
    try:
        with QMeshClient(curve_pair.address, timeout=180, connect_timeout=5, curve=client_keys) as client:
            wait_for(lambda: client.models().get(MODEL, {}).get("workers", 0) >= 1, 90, "the worker")
            stream = client.submit(PROMPTS[0], model=MODEL, max_tokens=40, temperature=0)
            wait_for(lambda: client.poll(0.05) or len(stream.chunks) >= 3, 60, "a stream")
            os.kill(curve_pair.brokers["primary"].pid, signal.SIGKILL)
            assert stream.result().ok, stream.result().error
            backup = {"endpoint": curve_pair.endpoints["backup"], "pair_role": "backup", "epoch": 2}
            assert client.broker_info() == backup
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()


def test_an_impostor_cannot_pose_as_the_peer_broker(curve_pair):
    """A broker with another key pair at the backup's place, and active: the primary neither hears it (it cannot
    prove the backup's key) nor lets it listen (its key is not the backup's), so it takes over itself when asked."""
    keys = curve_pair.keys
    assert keys is not None
    impostor = curve_pair.start("backup", key="impostor")
    client_keys = CurveClientKeys.load(keys / "client.key_secret", keys / "impostor.key")
    with QMeshClient(curve_pair.endpoints["backup"], connect_timeout=5, curve=client_keys) as client:
        info = wait_for(lambda: _answer_or_none(client), 20, "the impostor to call itself active")
        assert info["epoch"] == 2
    primary = curve_pair.start("primary")
    client_keys = CurveClientKeys.load(keys / "client.key_secret", keys / "primary.key")
    with QMeshClient(curve_pair.endpoints["primary"], connect_timeout=5, curve=client_keys) as client:
        info = wait_for(lambda: _answer_or_none(client), 20, "the primary to serve")
    assert info == {"endpoint": curve_pair.endpoints["primary"], "pair_role": "primary", "epoch": 1}
    wait_for(lambda: "refused a connection to the HA link from key" in primary.log(), 10, "the impostor refused")
    assert "passive" not in primary.log() and impostor.alive()


def _answer_or_none(client: QMeshClient) -> dict | None:
    try:
        return client.broker_info()
    except MeshError as exc:
        assert exc.code == p.NOT_ACTIVE, exc
        return None


def lazy_pirate_request(endpoints: list[str], service: str, body: bytes, timeout: float) -> tuple[list[bytes], int]:
    """A plain 7/MDP client (a REQ socket) that follows the RFC's advice: no answer within ``timeout``, or a
    passive broker's 421, and it asks again on a new socket, of the next broker. Returns the REPLY's body and the
    number of tries."""
    for attempt in range(1, 9):
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.linger = 0
        socket.connect(endpoints[(attempt - 1) % len(endpoints)])
        try:
            socket.send_multipart([b"MDPC01", service.encode(), body])
            if socket.poll(timeout * 1000):
                header, _, *reply = socket.recv_multipart()
                assert header == b"MDPC01"
                error = p.unpack_map(reply[0]).get("error") if len(reply) == 1 else None
                if not (isinstance(error, dict) and error.get("code") == p.NOT_ACTIVE):
                    return reply, attempt
        finally:
            socket.close()
    raise AssertionError("no broker of the pair answered")


def test_a_plain_mdp_client_gets_a_complete_answer_by_asking_again(pair, worker):
    """A 7/MDP client knows nothing of pairs: the active broker dies before it answers; the client asks again on a
    new socket, of the other broker, and gets the whole answer there."""
    prompt = "Write a very long story about a dragon who learns to cook, in many chapters."
    body = p.pack({"prompt": prompt, "max_tokens": 400, "temperature": 0})  # seconds of tokens: it dies under them
    killer = threading.Timer(0.3, os.kill, (pair.brokers["primary"].pid, signal.SIGKILL))
    killer.start()
    try:
        reply, attempts = lazy_pirate_request(list(pair.endpoints.values()), MODEL, body, timeout=8)
    finally:
        killer.cancel()
    assert attempts >= 2, "the primary answered before it was killed: the test proves nothing"
    *chunks, final = reply
    summary = p.unpack_map(final)
    assert summary["finish_reason"] in ("stop", "length") and summary["tokens"] == len(chunks) > 0
    assert "".join(p.unpack_map(chunk)["text"] for chunk in chunks).strip()


def test_metrics_say_which_broker_is_active_and_the_epoch(tmp_path):
    ports = {role: int(free_endpoint().rsplit(":", 1)[1]) for role in ("primary", "backup")}
    brokers = BrokerPair(tmp_path, HEARTBEAT_MS, args={role: ["--metrics-port", str(ports[role])] for role in ports})

    def gauges(role: str) -> tuple[float, float]:
        text = requests.get(f"http://127.0.0.1:{ports[role]}/metrics", timeout=5).text
        values = dict(line.split() for line in text.splitlines() if line.startswith("qmesh_broker_"))
        return float(values["qmesh_broker_active"]), float(values["qmesh_broker_epoch"])

    try:
        brokers.start("primary")
        brokers.start("backup")
        wait_for(lambda: gauges("primary") == (1, 1) and gauges("backup") == (0, 1), 20, "the primary active")
        brokers.brokers["primary"].kill()
        wait_for(lambda: brokers.active() == "backup", 20, "the backup to take over")  # asking it is a vote
        wait_for(lambda: gauges("backup") == (1, 2), 10, "the backup's gauges")
    finally:
        brokers.stop()


def test_qmesh_client_names_both_brokers_and_is_answered_by_the_backup(pair, worker):
    pair.brokers["primary"].kill()
    done = run_cli("qmesh-client", "--broker", pair.address, "--max-tokens", "8", stdin="Say hi.\nSay bye.\n")
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if line.strip()]) >= 2, done.stdout
