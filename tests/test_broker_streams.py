"""The real broker, on a real socket, carries many concurrent streams from fake workers to SDK clients.

A fake is the point here: these tests are about routing and flow control, not generation, so they need no
llama-server and run in the fast lane.
"""

from __future__ import annotations

from meshkit import BrokerThread
from qmesh.client.sdk import QMeshClient
from qmesh.testing import wait_for, wait_for_workers
from qmesh.testing.fakeworker import FakePlan

SERVICE = "fake-model"
PLAN = FakePlan(count=2, slots=2, heartbeat=0.2)  # heartbeats as often as the test broker expects them (FAST)


def test_every_chunk_of_concurrent_streams_reaches_its_client(fake_workers) -> None:
    with BrokerThread() as broker:
        fake = fake_workers(broker.endpoint, PLAN, SERVICE)
        wait_for_workers(broker.endpoint, SERVICE, PLAN.count, 10)
        with QMeshClient(broker.endpoint, timeout=30, window=8) as client:
            requests = [client.submit(f"prompt {i}", model=SERVICE, max_tokens=100 + i) for i in range(10)]
            results = [request.result() for request in requests]
        counts = fake.stop()
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert result.ok, result.error
        assert result.tokens == len(request.chunks) == 100 + i
        assert result.text == "tok " * (100 + i)
    assert counts["requests"] == counts["finals"] == 10
    assert counts["credits"] > 0, "a window of 8 chunks must have been refilled by credit"
    assert counts["disconnects"] == 0


def test_a_cancelled_stream_is_cancelled_at_the_worker(fake_workers) -> None:
    with BrokerThread() as broker:
        fake = fake_workers(broker.endpoint, FakePlan(count=1, slots=1, rate=50, heartbeat=0.2), SERVICE)
        wait_for_workers(broker.endpoint, SERVICE, 1, 10)
        with QMeshClient(broker.endpoint, timeout=30) as client:
            request = client.submit("a long one", model=SERVICE, max_tokens=10_000)
            wait_for(lambda: client.poll(0.05) or request.chunks, 10, "the first chunk")
            request.cancel()
            result = request.result()
            after = client.submit("a short one", model=SERVICE, max_tokens=3).result()
        counts = fake.stop()
    assert not result.ok and result.error is not None and result.error.code == 499
    assert after.ok and after.tokens == 3, "the cancelled stream's slot must be free again"
    assert counts["cancels"] == 1
