"""A plain Majordomo load that any MDP/0.2 broker serves, and majortomo's broker to serve it.

Clients and workers speak majortomo 0.2.0's framing (a leading empty frame on every command; the client's
``MDPC02`` with the worker's command codes), the only one majortomo's broker accepts and one QMesh's broker
answers in kind (``protocol.Dialect.MAJORTOMO``): both brokers see the same bytes. Each client sends a request,
reads its answer (``PARTIALS`` PARTIALs, then a FINAL) and sends the next at once; each echo worker answers a
request with its body as every PARTIAL and the FINAL, and heartbeats every second. No QMesh extension is used:
no request ids, no credit, no load frames.

Frames are sent with ``common.fastio`` (the cheapest sends pyzmq has), so that on a 2-core machine the load
generators leave the broker as much of the CPU as they can.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from qmesh.common.fastio import recv_frames, send_frames

PARTIALS = 2
HEARTBEAT_S = 1.0  # under majortomo's 2.5 s interval and 10 s timeout, and QMesh's 7.5 s expiry
CLIENT, WORKER = b"MDPC02", b"MDPW02"
READY, REQUEST, PARTIAL, FINAL, HEARTBEAT = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"


def majortomo_main(endpoint: str, results: Any) -> None:
    """Process entry point: majortomo's ``Broker`` bound to ``endpoint`` until the benchmark kills it. Logging is
    left unconfigured (warnings only), as cheap as that broker gets: its own CLI logs every PARTIAL at INFO."""
    from majortomo.broker import Broker

    results.put("running")
    Broker(bind=endpoint).run()


def workers_main(endpoint: str, service: str, count: int, stop: Any, results: Any) -> None:
    """Process entry point: ``count`` echo workers until ``stop`` is set; reports the requests each answered."""
    context = zmq.Context()
    sockets, poller = _dealers(context, endpoint, count)
    for socket in sockets:
        send_frames(socket, [b"", WORKER, READY, service.encode()])
    answered = dict.fromkeys(range(count), 0)
    next_beat = time.monotonic() + HEARTBEAT_S
    while not stop.is_set():
        for socket, _ in poller.poll(100):
            while True:
                try:
                    frames = recv_frames(socket)
                except zmq.Again:
                    break
                # "", MDPW02, REQUEST, client, "", body...
                if len(frames) > 5 and frames[2] == REQUEST:
                    head, body = frames[3:5], frames[5:]
                    for _ in range(PARTIALS):
                        send_frames(socket, [b"", WORKER, PARTIAL, *head, *body])
                    send_frames(socket, [b"", WORKER, FINAL, *head, *body])
                    answered[sockets.index(socket)] += 1
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + HEARTBEAT_S
            for socket in sockets:
                send_frames(socket, [b"", WORKER, HEARTBEAT])
    for socket in sockets:
        socket.close(linger=0)
    context.term()
    results.put(list(answered.values()))


def clients_main(
    endpoint: str, service: str, count: int, warmup: int, total: int, go: Any, timeout: float, results: Any
) -> None:
    """Process entry point: ``count`` clients, each with one request in flight. First ``warmup`` requests (the
    workers are there), then "warm" on ``results``; after ``go``, ``total`` more, timed and checked."""
    context = zmq.Context()
    sockets, poller = _dealers(context, endpoint, count)
    name = service.encode()
    _run(sockets, poller, name, warmup, time.monotonic() + timeout)
    results.put("warm")
    go.wait()
    start = time.monotonic()
    counts = _run(sockets, poller, name, total, start + timeout)
    counts["wall"] = time.monotonic() - start
    for socket in sockets:
        socket.close(linger=0)
    context.term()
    results.put(counts)


def _dealers(context: zmq.Context, endpoint: str, count: int) -> tuple[list[zmq.Socket], zmq.Poller]:
    """``count`` DEALER sockets connected to ``endpoint``, each registered for input on one poller."""
    poller = zmq.Poller()
    sockets = []
    for _ in range(count):
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        poller.register(socket, zmq.POLLIN)
        sockets.append(socket)
    return sockets, poller


def _run(sockets: list[zmq.Socket], poller: zmq.Poller, service: bytes, total: int, deadline: float) -> dict[str, Any]:
    """Send ``total`` requests, one in flight per socket; every answer must be PARTIALS echoes and a FINAL."""
    counts = {"requests": 0, "ok": 0, "bad": 0}
    partials = dict.fromkeys(sockets, 0)
    bodies: dict[zmq.Socket, bytes] = {}

    def send(socket: zmq.Socket) -> None:
        body = counts["requests"].to_bytes(8, "big")
        counts["requests"] += 1
        bodies[socket] = body
        send_frames(socket, [b"", CLIENT, REQUEST, service, body])

    for socket in sockets[:total]:
        send(socket)
    while bodies and time.monotonic() < deadline:
        for socket, _ in poller.poll(100):
            while True:
                try:
                    frames = recv_frames(socket)
                except zmq.Again:
                    break
                # "", MDPC02, PARTIAL or FINAL, body (majortomo's replies name no service)
                good = frames[:2] == [b"", CLIENT] and frames[3:] == [bodies.get(socket)]
                if good and frames[2] == PARTIAL:
                    partials[socket] += 1
                    continue
                counts["ok" if good and frames[2] == FINAL and partials[socket] == PARTIALS else "bad"] += 1
                partials[socket] = 0
                del bodies[socket]
                if counts["requests"] < total:
                    send(socket)
    counts["unfinished"] = len(bodies)
    return counts
