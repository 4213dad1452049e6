"""The practical limit to compare the broker with: ``zmq.proxy`` (libzmq's C loop), ROUTER in, DEALER out.

A producer sends ``count`` messages shaped like a worker's PARTIAL (same frames, same sizes) into the proxy's
ROUTER; the proxy forwards each, with the producer's routing id in front, out of its DEALER to one consumer.
The producer paces itself to the message rate the broker just handled (a proxy's CPU per message depends on how
many messages each wake-up finds), sending with pyzmq's backend ``Socket.send`` and integer flags (about 4 us
a message, against about 27 us for ``send_multipart``) so that it can keep any rate the broker reached.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from qmesh.common import protocol as p

TICK_S = 0.001  # the producer sends each millisecond's share of messages at once
CHUNK_BODY = p.pack({"text": "tok ", "tokens": [1234]})  # the fake worker's unpaced chunk body


def chunk_frames() -> list[bytes]:
    return p.worker_reply(False, (1).to_bytes(8, "big"), [CHUNK_BODY])


def proxy_main(frontend: str, backend: str, results: Any) -> None:
    """Process entry point: bind, say so on ``results``, forward forever (the benchmark kills it)."""
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for socket, endpoint in ((router, frontend), (dealer, backend)):
        socket.setsockopt(zmq.SNDHWM, 100_000)  # as the broker's ROUTER
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.bind(endpoint)
    results.put("bound")
    zmq.proxy(router, dealer)


def producer_main(frontend: str, count: int, rate: float, results: Any) -> None:
    """Send ``count`` messages at ``rate`` per second; report once they have all left."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(frontend)
    *head, last = chunk_frames()
    send = zmq.backend.Socket.send  # no sugar, no enum flags: the cheapest send pyzmq has
    more = int(zmq.SNDMORE)
    start, sent = time.monotonic(), 0
    while sent < count:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        for _ in range(due - sent):
            for frame in head:
                send(socket, frame, more)
            send(socket, last, 0)
        sent = due
        time.sleep(TICK_S)
    socket.close(linger=-1)  # deliver everything before exiting
    context.term()
    results.put(count)


def consumer_main(backend: str, count: int, results: Any) -> None:
    """Receive ``count`` forwarded messages; report the time from the first to the last."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(backend)
    results.put("connected")
    socket.recv_multipart()
    first = time.monotonic()
    for _ in range(count - 1):
        socket.recv_multipart()
    results.put(time.monotonic() - first)
    socket.close(linger=0)
    context.term()
