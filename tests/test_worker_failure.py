"""Workers that die: detected within the liveness window, nothing hangs, and streams continue elsewhere."""

from __future__ import annotations

import json
import logging
import re

from meshkit import MODEL, BrokerThread, WorkerProcess, worker_settings
from qmesh.client.sdk import QMeshClient
from qmesh.testing import free_endpoint, llama_servers, pid_alive, wait_for
from qmesh.worker.node import WorkerNode

HEARTBEAT_MS = 200  # with liveness 3: a dead worker is noticed within 0.6 s of silence

STORY = "Write a long poem about rivers."
MAX_TOKENS = 120
LONG_PROMPT = "Summarise this text. " + " ".join(f"Sentence {i} says the sky is blue today." for i in range(150))


def _worker(endpoint: str, tmp_path, *args: str) -> WorkerProcess:
    return WorkerProcess(
        endpoint, "--slots", "2", "--cpu-threads", "1", "--heartbeat-ms", str(HEARTBEAT_MS), *args, log_dir=tmp_path
    )


def _tokens(request) -> list[int]:
    return [token for chunk in request.chunks for token in chunk.tokens]


def test_sigkilled_worker_streams_continue_on_another_worker(tmp_path):
    """Mid-stream requests resume after the tokens already sent; not-yet-started ones simply move."""
    with BrokerThread() as broker, QMeshClient(broker.endpoint, timeout=180, connect_timeout=5) as client:
        first = _worker(broker.endpoint, tmp_path)
        second = None
        try:
            wait_for(lambda: client.has_model(MODEL), 60, "the first worker to register")
            streaming = client.submit(STORY, model=MODEL, max_tokens=MAX_TOKENS, temperature=0)
            wait_for(lambda: client.poll(0.05) or len(streaming.chunks) >= 10, 60, "the first request to stream")
            prefilling = client.submit(LONG_PROMPT, model=MODEL, max_tokens=8, temperature=0)
            wait_for(lambda: client.poll(0.05) or prefilling.status.get("state") == "dispatched", 10, "dispatch")
            assert not prefilling.chunks, "the long prompt should still be in prompt evaluation"
            sidecars = [c.pid for c in llama_servers(first.pid)]
            first.kill()
            seen_at_kill = len(_tokens(streaming))

            client.poll(1.5)  # the broker notices within the liveness window and holds both for another worker
            assert not streaming.done and not prefilling.done, "nothing may end while no worker can take it"
            second = _worker(broker.endpoint, tmp_path)
            resumed = streaming.result()
            assert resumed.ok, resumed.error
            assert resumed.failovers == 1
            assert prefilling.result().ok and prefilling.result().failovers == 0
            wait_for(lambda: not any(pid_alive(pid) for pid in sidecars), 10, "the dead worker's sidecar to exit")

            tokens = _tokens(streaming)
            assert resumed.tokens == len(tokens) <= MAX_TOKENS, "tokens before the seam count against max_tokens"
            assert resumed.text == "".join(chunk.text for chunk in streaming.chunks)
            reference = client.submit(STORY, model=MODEL, max_tokens=MAX_TOKENS, temperature=0)
            assert reference.result().ok, reference.result().error
            past_seam = seen_at_kill + 8
            assert tokens[:past_seam] == _tokens(reference)[:past_seam], "the seam lost or repeated text"
        finally:
            first.kill()
            if second is not None:
                assert second.terminate() == 0, second.log()


LIST = {  # an answer long enough to kill its worker in the middle of it
    "type": "object",
    "properties": {
        "animals": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 20, "maxItems": 20}
    },
    "required": ["animals"],
    "additionalProperties": False,
}


def test_a_constrained_answer_cut_by_a_dead_worker_ends_in_valid_json_or_an_explicit_error(tmp_path):
    """It is replayed on the next worker and continues only if it comes out the same: never broken JSON."""
    with BrokerThread() as broker, QMeshClient(broker.endpoint, timeout=180, connect_timeout=5) as client:
        first = _worker(broker.endpoint, tmp_path)
        second = None
        try:
            wait_for(lambda: client.has_model(MODEL), 60, "the first worker to register")
            question = "List twenty animals as JSON."
            request = client.submit(question, model=MODEL, max_tokens=400, temperature=0, json_schema=LIST)
            wait_for(lambda: client.poll(0.05) or len(request.chunks) >= 10, 60, "the answer to stream")
            first.kill()
            second = _worker(broker.endpoint, tmp_path)
            result = request.result()
            if result.ok:
                assert result.failovers == 1
                answer = json.loads(result.text)
                assert len(answer["animals"]) == 20 and result.finish_reason == "stop"
                reference = client.submit(question, model=MODEL, max_tokens=400, temperature=0, json_schema=LIST)
                assert result.text == reference.result().text, "the continued answer is not the uninterrupted one"
            else:
                assert result.error is not None and result.error.code == 502, result.error
                assert "constrained" in result.error.message
        finally:
            first.kill()
            if second is not None:
                assert second.terminate() == 0, second.log()


def test_sigterm_lets_inflight_requests_finish(tmp_path):
    with BrokerThread() as broker, QMeshClient(broker.endpoint, timeout=120, connect_timeout=5) as client:
        worker = _worker(broker.endpoint, tmp_path, "--grace", "30")
        try:
            wait_for(lambda: client.has_model(MODEL), 60, "the worker to register")
            request = client.submit("Describe a cat in three sentences.", model=MODEL, max_tokens=48, temperature=0)
            wait_for(lambda: client.poll(0.05) or request.chunks, 60, "the request to stream")
            worker.popen.terminate()  # while the answer streams
            result = request.result()
            assert result.ok, result.error
            assert worker.popen.wait(timeout=30) == 0, worker.log()
            wait_for(lambda: not client.has_model(MODEL), 5, "the worker to leave the broker")
        finally:
            worker.kill()


def test_a_worker_with_no_broker_to_talk_to_never_claims_to_be_registered(caplog):
    """It keeps trying, less and less often, and says so; "registered" waits for the broker's answer."""
    endpoint = free_endpoint()  # nothing listens there
    node = WorkerNode(worker_settings(endpoint, slots=1, heartbeat=0.1, max_reconnect_delay=0.8))

    def delays() -> list[float]:  # what the worker says of its next attempts, in order
        found = (re.search(r"next attempt in ([\d.]+) s", record.getMessage()) for record in caplog.records)
        return [float(match[1]) for match in found if match]

    with caplog.at_level(logging.INFO, logger="qmesh.worker"):
        node.start()
        try:
            wait_for(lambda: node.manager is not None and node.manager.state == "ready", 60, "the sidecar")
            # 0.1 s doubled to the 0.8 s cap by the fourth, each x 0.5-1.5 (tests/test_worker_core.py: the rule)
            wait_for(lambda: len(delays()) >= 5, 60, "five attempts that failed")
            assert not node.registered.is_set()
        finally:
            node.stop()
            node.join(timeout=30)
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "registered" in m], messages
    assert sum("connecting to the broker" in m for m in messages) >= 5
    assert sum("no answer from the broker" in m for m in messages) >= 3
    waits = delays()
    assert min(waits[3:]) > max(waits[:1]), f"the attempts did not back off: {waits}"
