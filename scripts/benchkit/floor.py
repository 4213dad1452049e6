"""The floors under ``overhead``'s figures: what the mesh's hops cost at the least.

The latency floor under the added TTFT, with no llama-server at all, two measures taken in the same run:

- the mesh round trip: SDK -> broker -> a fake worker that answers at once (``FakeStreamingWorker``, named as
  the fake backend it is) -> broker -> SDK, one request at a time: the time to the first chunk;
- a ZeroMQ round trip over TCP loopback between two processes (DEALER -> ROUTER echo -> DEALER), the unit the
  mesh is made of: a request crosses two such round trips (client-broker, broker-worker).

Requests are spaced a millisecond apart, as single requests are in ``overhead``: every hop then wakes a
sleeping thread, which is what a first token pays.

The CPU floor under the tokens/s ratio (``relay_cpu``): the CPU per message of a process that does nothing but
take a ZeroMQ message in and send it on, at the token rate of the run's saturated load and while that load keeps
llama-server on every core (as the gateway, the broker and the worker each take a token in and send it on, on a
machine whose cores llama-server fills). Two such relays, alternated: the plainest pyzmq loop (``recv_multipart``,
``send_multipart``) and libzmq's own C loop (``zmq.proxy``), whose cost is the I/O threads' and the wake-ups' alone.
And the CPU per event of reading llama-server's token stream in Python (``stream_read_cpu``), which the worker
does for every token: its own reader (requests and sseclient-py) and the leanest one (http.client, a line at a time).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import zmq

from qmesh.client.sdk import QMeshClient
from qmesh.testing import free_endpoint, wait_for_workers
from qmesh.testing.fakeworker import FakePlan
from qmesh.worker.http_client import LlamaHttpClient, _completion_body

from . import procs, proxybase
from .stats import percentile
from .streamload import prompts

SERVICE = "latency-floor"
SPACING_S = 0.001
PYTHON_RELAY, C_RELAY = "pyzmq loop (recv_multipart, send_multipart)", "libzmq's C loop (zmq.proxy)"
WORKER_READER, BARE_READER = "the worker's (requests, sseclient-py)", "http.client, a line at a time"


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


def _relay_main(kind: str, front: str, back: str, results: Any) -> None:
    """A process that passes every message from ``front`` (PULL) to ``back`` (PUSH) until it is killed."""
    context = zmq.Context()
    inbound, outbound = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbound.bind(front)
    outbound.bind(back)
    results.put("ready")
    if kind == C_RELAY:
        zmq.proxy(inbound, outbound)
    else:
        while True:
            outbound.send_multipart(inbound.recv_multipart())


def relay_cpu(
    ps: procs.Processes, rate: float, burst: int, busy: Callable[[], None], rounds: int = 3, seconds: float = 6.0
) -> dict[str, list[float]]:
    """ms of CPU per message of each relay (PYTHON_RELAY, C_RELAY), ``rounds`` of each alternated, every round
    ``seconds`` of messages at ``rate`` per second in bursts of ``burst`` (a decode step of llama-server's makes a
    token for each busy slot at once), while ``busy()`` runs again and again in a thread."""
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            busy()

    loader = threading.Thread(target=keep_busy, name="relay-floor-load", daemon=True)
    loader.start()
    out: dict[str, list[float]] = {PYTHON_RELAY: [], C_RELAY: []}
    try:
        time.sleep(1.0)  # the load reaches its stride
        for kind in [PYTHON_RELAY, C_RELAY] * rounds:
            out[kind].append(_relay_round(ps, kind, rate, burst, seconds))
    finally:
        stop.set()
        loader.join()
    return out


def _relay_round(ps: procs.Processes, kind: str, rate: float, burst: int, seconds: float) -> float:
    front, back = free_endpoint(), free_endpoint()
    process, results = ps.function(_relay_main, kind, front, back)
    results.get(timeout=30)
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    for socket in (sender, receiver):
        socket.setsockopt(zmq.LINGER, 0)
    sender.connect(front)
    receiver.connect(back)
    frames = proxybase.chunk_frames()  # a worker's PARTIAL of one token
    try:
        for _ in range(20):  # connections up and warm before the count starts
            sender.send_multipart(frames)
            _receive(receiver)
        assert process.pid is not None
        bursts = max(1, round(rate * seconds / burst))
        before, start = procs.cpu_seconds(process.pid), time.monotonic()
        for index in range(bursts):
            wait = start + index * burst / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            for _ in range(burst):
                sender.send_multipart(frames)
            for _ in range(burst):  # passed on before the next burst comes: the relay wakes for each, as for tokens
                _receive(receiver)
        return (procs.cpu_seconds(process.pid) - before) * 1000 / (bursts * burst)
    finally:
        sender.close()
        receiver.close()
        context.term()
        process.kill()
        process.join(5)


def _receive(receiver: zmq.Socket) -> None:
    if not receiver.poll(5000):
        raise RuntimeError("the relay passed nothing on within 5 s")
    receiver.recv_multipart()


def stream_read_cpu(base_url: str, max_tokens: int, rounds: int = 3, streams: int = 3) -> dict[str, list[float]]:
    """ms of this thread's CPU per event of llama-server's ``/completion`` stream, for each reader (WORKER_READER,
    BARE_READER), ``rounds`` of ``streams`` streams each, alternated; one stream at a time, so llama-server computes
    the next token on both cores while the reader wakes for the last one, as the worker's slot threads do."""
    worker_reader = LlamaHttpClient(base_url)
    address = urllib.parse.urlsplit(base_url)
    readers = {
        WORKER_READER: lambda prompt: _worker_read(worker_reader, prompt, max_tokens),
        BARE_READER: lambda prompt: _bare_read(address.hostname or "127.0.0.1", address.port or 80, prompt, max_tokens),
    }
    out: dict[str, list[float]] = {name: [] for name in readers}
    try:
        for index in range(rounds * len(readers)):
            name = list(readers)[index % len(readers)]
            start, events = time.thread_time(), 0
            for prompt in prompts(streams, offset=3_000_000 + index * streams):  # answers of max_tokens
                events += readers[name](prompt)
            out[name].append((time.thread_time() - start) * 1000 / max(1, events))
    finally:
        worker_reader.close()
    return out


def _worker_read(client: LlamaHttpClient, prompt: str, max_tokens: int) -> int:
    with client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0) as stream:
        return sum(1 for _ in stream)


def _bare_read(host: str, port: int, prompt: str, max_tokens: int) -> int:
    """The stream read with nothing but the standard library: the request the worker sends, one line per event."""
    body = _completion_body(prompt, stream=True, max_tokens=max_tokens, temperature=0.0)  # the worker's request
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        events = 0
        for line in connection.getresponse():
            if line.startswith(b"data: "):
                events += 1
                if json.loads(line[6:]).get("stop"):
                    break
        return events
    finally:
        connection.close()
