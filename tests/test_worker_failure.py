"""A worker process killed with SIGKILL: detected within the liveness window, nothing hangs, nothing is lost
that had not started streaming."""

from __future__ import annotations

import time

import psutil

from meshkit import MODEL, BrokerThread, WorkerProcess, wait_for
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p

HEARTBEAT_MS = 200  # with liveness 3: a dead worker is noticed within 0.6 s of silence

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


def test_sigkilled_worker_requeues_unstarted_and_fails_midstream(tmp_path):
    with BrokerThread() as broker, QMeshClient(broker.endpoint, timeout=180, connect_timeout=5) as client:
        first = _worker(broker.endpoint, tmp_path)
        second = None
        try:
            wait_for(lambda: client.has_model(MODEL), 60, "the first worker to register")
            streaming = client.submit("Write a long poem about rivers.", model=MODEL, max_tokens=2000)
            wait_for(lambda: client.poll(0.05) or streaming.chunks, 60, "the first request to stream")
            prefilling = client.submit(LONG_PROMPT, model=MODEL, max_tokens=8, temperature=0)
            wait_for(lambda: client.poll(0.05) or prefilling.status.get("state") == "dispatched", 10, "dispatch")
            assert not prefilling.chunks, "the long prompt should still be in prompt evaluation"
            sidecars = [c.pid for c in psutil.Process(first.process.pid).children(recursive=True)]
            first.kill()
            killed_at = time.monotonic()

            failed = wait_for(lambda: client.poll(0.05) or streaming.done, 10, "the mid-stream request to end")
            assert failed and streaming.final.error is not None
            assert streaming.final.error.code == p.WORKER_FAILED
            assert time.monotonic() - killed_at < 5, "a dead worker must be noticed within the liveness window"
            assert not prefilling.done, "a request that had not streamed must wait for another worker"

            second = _worker(broker.endpoint, tmp_path)
            result = prefilling.result()
            assert result.ok, result.error
            assert result.text.strip()
            wait_for(
                lambda: not any(psutil.pid_exists(pid) for pid in sidecars), 10, "the dead worker's sidecar to exit"
            )
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
