"""End to end through real sockets: broker, workers with real llama-servers and the real model, SDK clients."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest
import requests
import zmq

from meshkit import FAST, MODEL, BrokerThread, worker_threads
from qmesh.broker.core import BrokerConfig
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.bodies import final_body
from qmesh.common.errors import MeshError
from qmesh.testing import free_endpoint, wait_for


@pytest.fixture(scope="module")
def mesh():
    """One broker and one worker thread with 2 slots, shared by the tests of this module."""
    with BrokerThread() as broker, worker_threads(broker.endpoint, count=1, slots=2) as nodes:
        yield broker, nodes[0]


@pytest.fixture
def client(mesh):
    broker, _ = mesh
    with QMeshClient(broker.endpoint, timeout=120, connect_timeout=5) as client:
        yield client


def test_one_prompt_streams_an_answer(client):
    request = client.submit("Name a colour.", model=MODEL, max_tokens=12, temperature=0)
    chunks = list(request)
    result = request.result()
    assert result.ok, result.error
    assert len(chunks) >= 2, "the answer should arrive as a stream of chunks"
    assert result.text == "".join(c.text for c in chunks) and result.text.strip()
    assert result.tokens == sum(len(c.tokens) for c in chunks) > 0
    assert result.finish_reason in ("stop", "length")
    assert result.model == MODEL and result.worker
    assert result.ttft_ms is not None and result.ttft_ms > 0


def test_the_sdk_imports_no_command_line_framework():
    """A program using the SDK neither loads nor needs typer: only the command-line tools do."""
    check = "import qmesh.client.sdk, sys; assert 'typer' not in sys.modules, 'the SDK imported typer'"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


def test_new_chunks_hands_out_each_chunk_once(client):
    request = client.submit("Name a colour.", model=MODEL, max_tokens=12, temperature=0)
    taken = []
    while not request.done:
        client.poll(0.05)
        taken += request.new_chunks()
    taken += request.new_chunks()
    assert taken == request.chunks and len(taken) >= 2
    assert request.new_chunks() == [] and list(request) == [], "iterating reads through the same cursor"


def test_same_seeded_prompt_gives_the_same_answer(client):
    first = client.generate("Count from one to five.", model=MODEL, max_tokens=16, temperature=0)
    second = client.generate("Count from one to five.", model=MODEL, max_tokens=16, temperature=0)
    assert first.text == second.text


def test_chat_keeps_history(client):
    chat = client.chat(MODEL, system="You are terse.")
    chat.ask("My name is Zorblax. Reply with OK.", max_tokens=8, temperature=0)
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    chat.ask("What is my name?", max_tokens=16, temperature=0)
    assert len(chat.history) == 4 and chat.history[2]["content"] == "What is my name?"
    assert "Zorblax" in chat.history[0]["content"]


def test_more_prompts_than_slots_all_complete(client):
    requests_ = [client.submit(f"Say the number {i}.", model=MODEL, max_tokens=8, temperature=0) for i in range(5)]
    results = [r.result() for r in requests_]
    assert all(r.ok for r in results), [r.error for r in results]
    assert sum(r.was_queued for r in requests_) >= 3, "with 2 slots, 3 of 5 prompts must have waited"
    assert all(r.text.strip() for r in results)


def test_unknown_model_fails_fast_with_404(client):
    start = time.monotonic()
    result = client.submit("hi", model="no-such-model", max_tokens=4).result()
    assert result.error is not None and result.error.code == p.UNKNOWN_MODEL
    assert MODEL in result.error.message, "the error should list the models that are served"
    assert time.monotonic() - start < 5


def test_bad_request_gets_400(client):
    result = client.submit(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, raw=True).result()
    assert result.error is not None and result.error.code == p.BAD_REQUEST


def test_a_prompt_longer_than_the_context_is_a_400_that_gives_both_sizes(client):
    result = client.submit("word " * 3000, model=MODEL, max_tokens=4).result()
    assert result.error is not None and result.error.code == p.BAD_REQUEST, result.error
    message = result.error.message
    assert "the model's context is 2048 tokens" in message and "the prompt is 30" in message, message
    assert "http" not in message and "llama-server" not in message  # no internal address, no sidecar blamed


def test_max_tokens_beyond_the_context_is_a_400_before_it_is_sent(client):
    assert client.models()[MODEL]["context"] == 2048  # the SDK keeps the table of its last models() call
    request = client.submit("Say hi.", model=MODEL, max_tokens=5000)
    assert request.done, "refused by the SDK, not after a trip to a worker"
    result = request.result()
    assert result.error is not None and result.error.code == p.BAD_REQUEST, result.error
    assert "5000" in result.error.message and "2048" in result.error.message, result.error.message


def test_mmi_lists_models_and_workers(client):
    models = client.models()
    assert models[MODEL]["workers"] == 1 and models[MODEL]["slots"] == 2
    assert models[MODEL]["context"] == 2048  # per request: what llama-server gives each of the 2 slots
    workers = client.workers()
    assert workers[0]["service"] == MODEL and workers[0]["info"]["worker_id"] == "0" * 64
    assert client.has_model(MODEL) and not client.has_model("no-such-model")


def _slots_busy(base_url: str) -> int:
    return sum(1 for slot in requests.get(f"{base_url}/slots", timeout=5).json() if slot.get("is_processing"))


def test_cancel_frees_the_llama_server_slot(mesh, client):
    _, node = mesh
    request = client.submit("Write a long story about a dragon.", model=MODEL, max_tokens=2000, temperature=0.7)
    wait_for(lambda: client.poll(0.05) or request.chunks, 60, "the first chunk")
    assert _slots_busy(node.manager.base_url) >= 1
    request.cancel()
    assert request.result().error.code == p.CANCELLED
    wait_for(lambda: _slots_busy(node.manager.base_url) == 0, 10, "llama-server to free the slot")


def test_leaving_a_stream_early_cancels_it(mesh, client):
    _, node = mesh
    stream = client.stream("Tell me everything about the ocean.", model=MODEL, max_tokens=2000)
    next(stream)
    stream.close()
    wait_for(lambda: _slots_busy(node.manager.base_url) == 0, 10, "llama-server to free the slot")


def test_no_worker_ends_after_the_queue_timeout():
    config = BrokerConfig(heartbeat_interval=0.2, liveness=3, queue_timeout=1.0)
    with BrokerThread(config=config) as broker, QMeshClient(broker.endpoint, connect_timeout=5) as client:
        start = time.monotonic()
        request = client.submit("hi", model=MODEL, max_tokens=4)
        result = request.result()
        assert result.error is not None and result.error.code == p.QUEUE_TIMEOUT
        assert time.monotonic() - start >= 0.9, "it must have waited for a worker"
        assert request.status.get("state") == "queued"


def test_queue_full_gets_503():
    config = BrokerConfig(heartbeat_interval=0.2, liveness=3, queue_timeout=5.0, max_queue=1)
    with BrokerThread(config=config) as broker, QMeshClient(broker.endpoint, connect_timeout=5) as client:
        first = client.submit("hi", model=MODEL, max_tokens=4)
        second = client.submit("hi", model=MODEL, max_tokens=4)
        assert second.result().error.code == p.QUEUE_FULL
        first.cancel()


def test_two_workers_both_used():
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=2, slots=1),
        QMeshClient(broker.endpoint, timeout=120) as client,
    ):
        batch = [client.submit(f"Say {i}.", model=MODEL, max_tokens=8, temperature=0) for i in range(4)]
        results = [r.result() for r in batch]
    assert all(r.ok for r in results), [r.error for r in results]
    assert len({r.worker for r in results}) == 2


def test_broker_restart_workers_reregister():
    endpoint = free_endpoint()
    broker = BrokerThread(endpoint).start()
    try:
        with worker_threads(endpoint, count=1, slots=1):
            broker.stop()
            broker = BrokerThread(endpoint).start()
            with QMeshClient(endpoint, timeout=60, connect_timeout=5) as client:
                wait_for(lambda: client.has_model(MODEL), 15, "the worker to register again")
                assert client.generate("Say hi.", model=MODEL, max_tokens=6).text.strip()
    finally:
        broker.stop()


def test_queued_request_survives_a_broker_restart():
    """The SDK sends again what had not started streaming when the connection to the broker dropped."""
    endpoint = free_endpoint()
    broker = BrokerThread(endpoint).start()
    try:
        with QMeshClient(endpoint, timeout=120, connect_timeout=10) as client:
            request = client.submit("Say hi.", model=MODEL, max_tokens=6)
            wait_for(lambda: client.poll(0.05) or request.status.get("state") == "queued", 5, "the request to queue")
            broker.stop()
            broker = BrokerThread(endpoint).start()
            with worker_threads(endpoint, count=1, slots=1):
                result = request.result()
        assert result.ok, result.error
        assert result.text.strip()
    finally:
        broker.stop()


def _next_request(worker: zmq.Socket, client: QMeshClient) -> p.BrokerToWorker:
    """The next request the broker hands ``worker``, pumping the client meanwhile."""

    def arrived() -> p.BrokerToWorker | None:
        client.poll(0.05)
        while worker.poll(0):
            message = p.parse_for_worker(worker.recv_multipart())
            if message.command == p.W_REQUEST:
                return message
        return None

    return wait_for(arrived, 15, "the request to reach the worker")


def test_a_stream_resumes_after_each_broker_restart():
    """The SDK sends what was streaming again after a broker restart, continuing after the tokens it has: each
    time the body carries every token received so far and one failover more. A scripted worker shows the bodies."""
    endpoint = free_endpoint()
    config = replace(FAST, heartbeat_interval=5.0)  # the scripted worker sends no heartbeats
    broker = BrokerThread(endpoint, config).start()
    sent: list[int] = []
    worker = None
    try:
        with QMeshClient(endpoint, timeout=60, connect_timeout=10) as client:
            request = client.submit("Count.", model="scripted", max_tokens=50)
            for failovers in range(3):  # the first dispatch, then one after each restart
                if failovers:
                    worker.close()
                    broker.stop()
                    broker = BrokerThread(endpoint, config).start()
                worker = zmq.Context.instance().socket(zmq.DEALER)
                worker.linger = 0
                worker.connect(endpoint)
                worker.send_multipart(p.ready("scripted", {"slots": 1}))
                job = _next_request(worker, client)
                resume = p.unpack_map(job.body[0]).get("resume")
                assert resume == ({"tokens": sent, "failovers": failovers} if failovers else None)
                for token in (len(sent) + 1, len(sent) + 2):
                    worker.send_multipart(
                        p.worker_reply(False, job.route_key, [p.pack({"text": f"{token} ", "tokens": [token]})])
                    )
                    sent.append(token)
                wait_for(lambda: client.poll(0.05) or len(request.chunks) == len(sent), 10, "the chunks")  # noqa: B023
            worker.send_multipart(p.worker_reply(True, job.route_key, [final_body(finish_reason="stop", tokens=6)]))
            result = request.result()
        assert result.ok, result.error
        assert result.text == "1 2 3 4 5 6 " and request.resumes == 2
    finally:
        if worker is not None:
            worker.close()
        broker.stop()


def test_client_without_broker_fails_clearly_within_the_timeout():
    with QMeshClient(free_endpoint(), connect_timeout=1.0) as client:
        start = time.monotonic()
        result = client.submit("hi", model=MODEL).result()
        assert result.error is not None and "qmesh-broker running" in result.error.message
        assert time.monotonic() - start < 5
        with pytest.raises(Exception, match="cannot reach the broker"):
            client.models()


def test_request_sent_before_the_broker_starts_is_answered():
    endpoint = free_endpoint()
    with QMeshClient(endpoint, timeout=60, connect_timeout=30) as client:
        request = client.submit("Say hi.", model=MODEL, max_tokens=6)
        client.poll(0.3)
        with BrokerThread(endpoint) as broker, worker_threads(broker.endpoint, count=1, slots=1):
            result = request.result()
    assert result.ok, result.error


def test_plain_mdp_client_and_worker_through_the_broker():
    """Peers written from RFC 18/MDP alone, with no QMesh extension, work through the broker."""
    context = zmq.Context.instance()
    with BrokerThread() as broker:
        worker = context.socket(zmq.DEALER)
        worker.linger = 0
        worker.connect(broker.endpoint)
        worker.send_multipart([b"MDPW02", b"\x01", b"echo"])
        client = context.socket(zmq.DEALER)
        client.linger = 0
        client.connect(broker.endpoint)
        client.send_multipart([b"MDPC02", b"\x01", b"echo", b"hello", b"world"])
        while True:  # the worker skips heartbeats until the request comes
            frames = worker.recv_multipart()
            if frames[1] == b"\x02":
                break
        assert frames[0] == b"MDPW02" and frames[3] == b"" and frames[4:] == [b"hello", b"world"]
        address = frames[2]
        worker.send_multipart([b"MDPW02", b"\x03", address, b"", b"part-1"])
        worker.send_multipart([b"MDPW02", b"\x04", address, b"", b"done"])
        assert client.recv_multipart() == [b"MDPC02", b"\x02", b"echo", b"part-1"]
        assert client.recv_multipart() == [b"MDPC02", b"\x03", b"echo", b"done"]
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"echo"])
        assert client.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.service", b"200"]
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.nope"])
        assert client.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.nope", b"501"]
        worker.close()
        client.close()


def test_plain_mdp_client_gets_an_answer_from_a_qmesh_worker(mesh):
    broker, _ = mesh
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.linger = 0
    client.connect(broker.endpoint)
    client.send_multipart([b"MDPC02", b"\x01", MODEL.encode(), b"Say hello."])
    replies = []
    while not replies or replies[-1][1] != b"\x03":
        assert client.poll(60_000), "no reply"
        replies.append(client.recv_multipart())
    client.close()
    assert all(r[:3] == [b"MDPC02", r[1], MODEL.encode()] for r in replies)
    text = "".join(p.unpack(r[3])["text"] for r in replies[:-1])
    assert text.strip() and "error" not in p.unpack(replies[-1][3])


def test_garbage_frames_leave_the_broker_serving(mesh, client):
    import random

    broker, _ = mesh
    rng = random.Random(7)
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    attacker.linger = 0
    attacker.connect(broker.endpoint)
    headers = [b"MDPC02", b"MDPW02", b"", b"MDP", b"\xff" * 8]
    for _ in range(3000):
        frames = [rng.choice(headers), bytes([rng.randrange(256)])]
        frames += [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 6))]
        attacker.send_multipart(frames)
    attacker.close()
    assert client.generate("Say yes.", model=MODEL, max_tokens=4).text.strip()
    assert broker.broker.core.dropped_messages > 1000, "the garbage should have reached the broker"
    assert client.models()[MODEL]["workers"] == 1


def test_generate_raises_mesh_errors(client):
    with pytest.raises(MeshError) as info:
        client.generate("hi", model="no-such-model")
    assert info.value.code == p.UNKNOWN_MODEL
