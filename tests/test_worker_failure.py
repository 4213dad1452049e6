"""Workers that die: detected within the liveness window, nothing hangs, and streams continue elsewhere."""

from __future__ import annotations

import psutil

from meshkit import MODEL, BrokerThread, WorkerProcess, wait_for
from qmesh.client.sdk import QMeshClient

HEARTBEAT_MS = 200  # with liveness 3: a dead worker is noticed within 0.6 s of silence

STORY = "Write a long poem about rivers."
MAX_TOKENS = 120
LONG_PROMPT = "Summarise this text. " + " ".join(f"Sentence {i} says the sky is blue today." for i in range(150))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
            sidecars = [c.pid for c in psutil.Process(first.process.pid).children(recursive=True)]
            first.kill()
            seen_at_kill = len(_tokens(streaming))

            client.poll(1.5)  # the broker notices within the liveness window and holds both for another worker
            assert not streaming.done and not prefilling.done, "nothing may end while no worker can take it"
            second = _worker(broker.endpoint, tmp_path)
            resumed = streaming.result()
            assert resumed.ok, resumed.error
            assert resumed.failovers == 1
            assert prefilling.result().ok and prefilling.result().failovers == 0
            wait_for(lambda: not any(_alive(pid) for pid in sidecars), 10, "the dead worker's sidecar to exit")

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


def test_sigterm_lets_inflight_requests_finish(tmp_path):
    with BrokerThread() as broker, QMeshClient(broker.endpoint, timeout=120, connect_timeout=5) as client:
        worker = _worker(broker.endpoint, tmp_path, "--grace", "30")
        try:
            wait_for(lambda: client.has_model(MODEL), 60, "the worker to register")
            request = client.submit("Describe a cat in three sentences.", model=MODEL, max_tokens=48, temperature=0)
            wait_for(lambda: client.poll(0.05) or request.chunks, 60, "the request to stream")
            worker.process.terminate()
            result = request.result()
            assert result.ok, result.error
            assert worker.process.wait(timeout=30) == 0, worker.log()
            wait_for(lambda: not client.has_model(MODEL), 5, "the worker to leave the broker")
        finally:
            worker.kill()
