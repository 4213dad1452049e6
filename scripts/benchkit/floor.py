"""The latency floor under ``overhead``'s added TTFT: what the mesh's hops cost with no llama-server at all.

Two measures, taken on the same machine in the same run:

- the mesh round trip: SDK -> broker -> a fake worker that answers at once (``FakeStreamingWorker``, named as
  the fake backend it is) -> broker -> SDK, one request at a time: the time to the first chunk;
- a ZeroMQ round trip over TCP loopback between two processes (DEALER -> ROUTER echo -> DEALER), the unit the
  mesh is made of: a request crosses two such round trips (client-broker, broker-worker).

Requests are spaced a millisecond apart, as single requests are in ``overhead``: every hop then wakes a
sleeping thread, which is what a first token pays.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from qmesh.client.sdk import QMeshClient
from qmesh.testing import free_endpoint, wait_for_workers
from qmesh.testing.fakeworker import FakePlan

from . import procs
from .stats import percentile

SERVICE = "latency-floor"
SPACING_S = 0.001


def mesh_round_trip(ps: procs.Processes, endpoint: str, requests: int = 300) -> list[float]:
    """TTFT in ms of ``requests`` one-chunk requests through the broker at ``endpoint`` to an instant fake worker."""
    stop = procs.SPAWN.Event()
    results = ps.fake_workers([endpoint], SERVICE, FakePlan(1, 1), stop)
    try:
        wait_for_workers(endpoint, SERVICE, 1, 60)
        with QMeshClient(endpoint, timeout=30) as client:
            times = []
            for index in range(requests + 20):
                request = client.submit(f"ping {index}", model=SERVICE, max_tokens=1)
                while not request.done:
                    client.poll(0.5)
                if index >= 20 and request.first_chunk_at is not None:  # the first ones warm connections up
                    times.append((request.first_chunk_at - request.sent_at) * 1000)
                time.sleep(SPACING_S)
        return times
    finally:
        stop.set()
        results.get(timeout=30)


def _echo_main(endpoint: str, results: Any) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(endpoint)
    results.put("ready")
    while True:
        frames = socket.recv_multipart()
        if frames[-1] == b"stop":
            break
        socket.send_multipart(frames)
    socket.close(linger=0)
    context.term()


def zmq_round_trip(ps: procs.Processes, count: int = 1000) -> list[float]:
    """Round trips in ms of one-frame messages between this process and an echo process, over TCP loopback."""
    endpoint = free_endpoint()
    _, results = ps.function(_echo_main, endpoint)
    results.get(timeout=30)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        times = []
        for index in range(count + 50):
            start = time.perf_counter()
            socket.send(b"ping")
            if not socket.poll(5000):
                raise RuntimeError("the echo process did not answer within 5 s")
            socket.recv()
            if index >= 50:
                times.append((time.perf_counter() - start) * 1000)
            time.sleep(SPACING_S)
        socket.send(b"stop")
        return times
    finally:
        socket.close(linger=100)
        context.term()


def summary(times: list[float]) -> str:
    return " / ".join(f"{percentile(times, q):.3f}" for q in (50, 90, 99))
