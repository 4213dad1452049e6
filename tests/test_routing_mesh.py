"""Cache-aware routing end to end: real broker, two worker threads with real llama-servers, SDK chats."""

from __future__ import annotations

import pytest
import zmq

from meshkit import MODEL, BrokerThread, worker_threads
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p

DOCUMENT = "Here is a note about rivers. " + " ".join(f"River {i} runs from the hills to the sea." for i in range(40))


@pytest.fixture(scope="module")
def mesh():
    # A host-memory prompt cache, as qmesh-worker gives llama-server by default: a slot that served another
    # conversation in between keeps nothing of this one, its prompt cache does.
    with BrokerThread() as broker, worker_threads(broker.endpoint, count=2, slots=1, cache_ram=256) as nodes:
        yield broker, nodes


def test_a_chat_stays_on_the_llama_server_that_holds_it_and_its_turns_are_served_from_cache(mesh):
    broker, _ = mesh
    with QMeshClient(broker.endpoint, timeout=120, connect_timeout=5) as client:
        chat = client.chat(MODEL, system="Answer in one short sentence.")
        other = client.chat(MODEL)
        workers, cached = [], []
        for turn, question in enumerate(["What is this note about?", "Name one river.", "Where do they run?"]):
            # Another conversation runs at the same time, sometimes sent first: least-loaded would scatter.
            others = other.client.submit(model=MODEL, messages=[{"role": "user", "content": f"Count to {turn + 3}."}])
            message = (DOCUMENT + "\n\n" + question) if turn == 0 else question
            request = client.submit(
                model=MODEL,
                messages=[*chat.history, {"role": "user", "content": message}],
                system=chat.system,
                session=chat.session,
                max_tokens=24,
                temperature=0,
            )
            result = request.result()
            assert result.ok, result.error
            chat.history += [{"role": "user", "content": message}, {"role": "assistant", "content": result.text}]
            workers.append(result.worker)
            cached.append(result.cached_tokens)
            assert others.result().ok
        assert len(set(workers)) == 1, workers
        assert cached[0] == 0 and all(c > 300 for c in cached[1:]), cached  # the document came from cache
        assert sum(row["cached_tokens"] for row in client.workers()) >= sum(cached)


def test_chat_objects_carry_their_session(mesh):
    broker, _ = mesh
    with QMeshClient(broker.endpoint, timeout=120, connect_timeout=5) as client:
        chat = client.chat(MODEL)
        first = chat.ask("Say hi.", max_tokens=4, temperature=0)
        assert first
        assert (MODEL, chat.session) in broker.broker.core.sessions


def test_plain_mdp_requests_still_work_with_cache_aware_routing(mesh):
    broker, _ = mesh
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    chunks: list[dict] = []
    try:
        plain.connect(broker.endpoint)
        plain.send_multipart(p.client_request(MODEL, [b"Say hi."]))
        while True:
            assert plain.poll(60_000), "no answer to a plain MDP request"
            reply = p.parse_for_client(plain.recv_multipart(), extended=False)
            if reply.command == p.C_FINAL:
                break
            assert reply.command == p.C_PARTIAL, reply
            chunks.append(p.unpack_map(reply.body[0]))
    finally:
        plain.close()
    summary = p.unpack_map(reply.body[0])
    assert "error" not in summary, summary
    assert summary["tokens"] == len(chunks) > 0 and "".join(chunk["text"] for chunk in chunks).strip()
