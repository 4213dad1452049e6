"""A llama-server that crashes under a worker thread: restarted, the thread re-registers, the stream resumes;
after the last failed restart the thread leaves the mesh and says why."""

from __future__ import annotations

import os
import signal

from meshkit import MODEL, BrokerThread, worker_threads
from qmesh.client.sdk import QMeshClient
from qmesh.testing import wait_for


def test_sidecar_crash_mid_stream_resumes_after_restart():
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=1) as (node,),
        QMeshClient(broker.endpoint, timeout=120) as client,
    ):
        request = client.submit("Write a long poem about mountains.", model=MODEL, max_tokens=80, temperature=0)
        wait_for(lambda: client.poll(0.05) or len(request.chunks) >= 5, 60, "the stream to start")
        os.kill(node.manager.pid, signal.SIGKILL)
        result = request.result()
        assert result.ok, result.error
        assert result.failovers == 1
        assert result.tokens == sum(len(chunk.tokens) for chunk in request.chunks)
        assert node.manager.restarts == 1 and node.is_alive()
        wait_for(lambda: client.has_model(MODEL), 30, "the thread to register again")


def test_sidecar_that_cannot_be_restarted_takes_its_thread_out_of_the_mesh():
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=1, max_restarts=0) as (node,),
        QMeshClient(broker.endpoint, timeout=30) as client,
    ):
        os.kill(node.manager.pid, signal.SIGKILL)
        node.join(timeout=30)
        assert not node.is_alive()
        assert node.failure is not None and "llama-server" in node.failure
        wait_for(lambda: not client.has_model(MODEL), 10, "the broker to forget the worker")
