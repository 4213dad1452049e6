"""Credit-based flow control: a client that stops reading pauses generation instead of filling memory."""

from __future__ import annotations

import time

import psutil
import pytest
import requests

from meshkit import MODEL, WorkerProcess
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.testing import Child, free_endpoint, llama_servers, qmesh_command, wait_for

WINDOW = 8
STREAMS = 20
STALL_SECONDS = 30


@pytest.fixture
def broker_process(tmp_path):
    """The broker in its own process, so its memory can be measured."""
    endpoint = free_endpoint()
    command = qmesh_command("qmesh-broker", "--bind", endpoint, "--heartbeat-ms", "300")
    broker = Child("qmesh-broker", command, tmp_path / "broker.log")
    yield endpoint, broker
    broker.stop()


def _rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def _sidecar_ports(worker: WorkerProcess) -> list[int]:
    ports = []
    for child in llama_servers(worker.pid):
        command = child.cmdline()
        if "--port" in command:
            ports.append(int(command[command.index("--port") + 1]))
    return ports


def _busy_slots(ports: list[int]) -> int:
    slots = [slot for port in ports for slot in requests.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()]
    return sum(1 for slot in slots if slot.get("is_processing"))


def test_a_client_that_stops_reading_pauses_generation_and_memory_stays_flat(broker_process, tmp_path):
    endpoint, broker = broker_process
    worker = WorkerProcess(
        endpoint, "--threads", "2", "--slots", "10", "--ctx-size", "512", "--cpu-threads", "1",
        "--heartbeat-ms", "300", "--pause-after", "1", "--stall-timeout", "120", log_dir=tmp_path,
    )  # fmt: skip
    try:
        with QMeshClient(endpoint, timeout=240, connect_timeout=10, window=WINDOW) as client:
            wait_for(lambda: client.models().get(MODEL, {}).get("workers") == 2, 60, "two worker threads")
            ports = _sidecar_ports(worker)
            streams = [
                client.submit(f"Tell a long story about the number {i}.", model=MODEL, max_tokens=64, temperature=0)
                for i in range(STREAMS)
            ]
            wait_for(lambda: client.poll(0.05) or all(r.chunks for r in streams), 120, "every stream to start")
            received_before = sum(len(r.chunks) for r in streams)

            # The client now reads nothing.
            time.sleep(5)
            processes = [psutil.Process(broker.pid), psutil.Process(worker.pid)]
            processes += llama_servers(worker.pid)
            early = [_rss_mb(proc) for proc in processes]
            assert _busy_slots(ports) == 0, "llama-server must pause while the client reads nothing"
            time.sleep(STALL_SECONDS - 5)
            late = [_rss_mb(proc) for proc in processes]
            assert _busy_slots(ports) == 0
            growth = [after - before for before, after in zip(early, late, strict=True)]
            assert max(growth) < 8, f"memory grew while the client read nothing: {growth} MB"

            client.poll(0)  # what arrived during the stall: at most one window per stream
            arrived = sum(len(r.chunks) for r in streams) - received_before
            assert arrived <= STREAMS * WINDOW, f"{arrived} chunks arrived past the credit window"

            results = [r.result() for r in streams]
        for request, result in zip(streams, results, strict=True):
            assert result.ok, result.error
            assert result.tokens == sum(len(c.tokens) for c in request.chunks), "a chunk was lost or repeated"
    finally:
        worker.kill()


def test_a_client_stalled_past_the_timeout_gets_408(broker_process, tmp_path):
    endpoint, _ = broker_process
    worker = WorkerProcess(
        endpoint, "--slots", "2", "--cpu-threads", "1", "--heartbeat-ms", "300",
        "--pause-after", "0.5", "--stall-timeout", "3", log_dir=tmp_path,
    )  # fmt: skip
    try:
        with QMeshClient(endpoint, timeout=120, connect_timeout=10, window=2) as client:
            wait_for(lambda: client.has_model(MODEL), 60, "the worker")
            request = client.submit("Write a long essay about tea.", model=MODEL, max_tokens=200)
            wait_for(lambda: client.poll(0.05) or request.chunks, 60, "the stream to start")
            time.sleep(6)
            result = request.result()
        assert result.error is not None and result.error.code == p.CLIENT_STALLED
        assert "took no chunk" in result.error.message
    finally:
        worker.kill()
