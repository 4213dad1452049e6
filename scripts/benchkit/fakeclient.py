"""Synthetic clients: many streams over a few DEALER connections, speaking the QMesh client protocol.

They keep ``concurrency`` requests in flight until ``total`` have been sent (closed loop), grant credit as the
SDK does (half a window at a time), and check every answer: a successful FINAL must follow exactly the number of
chunks asked for. With ``timed`` they read the send time the fake worker puts in each chunk and record, per gap
between consecutive chunks of a stream, the receive gap minus the send gap (the latency the mesh added).
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import Any

import zmq

from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest

MAX_PER_SOCKET = 200  # the broker allows 256 requests in flight per connection


@dataclass(slots=True)
class _Stream:
    socket: zmq.Socket | None
    chunks: int = 0
    unacked: int = 0
    last_recv: float = 0.0
    last_sent: float = 0.0


class Timing:
    """Per gap between two chunks of a stream: receive gap - send gap (added ITL); per chunk: one-way latency."""

    def __init__(self, stall_gap: float) -> None:
        self.stall_gap = stall_gap
        self.added_itl = array("d")  # seconds
        self.one_way = array("d")  # chunk send (worker) -> receive (client), seconds
        self.stalls = 0  # receive gaps longer than stall_gap

    def chunk(self, stream: _Stream, now: float, body: bytes) -> None:
        sent_at = p.unpack_map(body)["t"]
        if stream.last_recv:
            self.added_itl.append((now - stream.last_recv) - (sent_at - stream.last_sent))
            self.stalls += now - stream.last_recv > self.stall_gap
        self.one_way.append(now - sent_at)
        stream.last_recv, stream.last_sent = now, sent_at

    def summary(self) -> dict[str, Any]:
        return {"stalls": self.stalls, "added_itl": self.added_itl.tobytes(), "one_way": self.one_way.tobytes()}


@dataclass(frozen=True)
class StreamPlan:
    """What one client process does: ``concurrency`` streams of ``chunks`` chunks, ``total`` requests in all."""

    concurrency: int
    total: int
    chunks: int
    window: int = 64  # credit window per stream, as the SDK's default
    ramp: float = 0.0  # seconds over which the first ``concurrency`` streams start
    timed: bool = False  # read the fake worker's send stamps: added ITL, one-way latency, stalls
    stall_gap: float = 0.0  # a receive gap longer than this is a stall (timed only)
    timeout: float = 600.0


class SyntheticClients:
    """Runs a ``StreamPlan`` over as few connections as the broker's per-connection limit allows."""

    def __init__(self, endpoint: str, service: str, plan: StreamPlan, prefix: bytes) -> None:
        self.service = service
        self.plan = plan
        self.concurrency = plan.concurrency
        self.total = plan.total
        self.chunks = plan.chunks
        self.prefix = prefix
        self.context = zmq.Context()
        connections = max(1, -(-plan.concurrency // MAX_PER_SOCKET))
        self.sockets = [self.context.socket(zmq.DEALER) for _ in range(connections)]
        self.poller = zmq.Poller()
        for socket in self.sockets:
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            self.poller.register(socket, zmq.POLLIN)
        self.body = GenerationRequest(prompt="benchmark", max_tokens=plan.chunks, window=plan.window).to_body()
        self.streams: dict[bytes, _Stream] = {}
        self.sent = 0
        names = ("requests", "credits", "chunks", "ok", "errors", "lost_chunks", "extra_chunks", "unknown_replies")
        self.counts = dict.fromkeys(names, 0)
        self.error_codes: dict[str, int] = {}
        self.timing = Timing(plan.stall_gap) if plan.timed else None
        self.half_window = max(1, plan.window // 2)
        self.owed: list[bytes] = []  # streams with half a window of chunks read and not yet granted back

    def run(self, deadline: float) -> dict[str, Any]:
        """Send, receive and check until every request ended or ``deadline`` (monotonic) passed."""
        ramp, timing = self.plan.ramp, self.timing
        cpu = time.process_time()
        started = time.monotonic()
        first_sent = last_reply = started
        while self.sent < self.total or self.streams:
            now = time.monotonic()
            if now > deadline:
                break
            # start streams: all at once, or spread over ``ramp`` seconds for the first ``concurrency``
            while self.sent < self.total and len(self.streams) < self.concurrency:
                if ramp and self.sent < self.concurrency and now < started + ramp * self.sent / self.concurrency:
                    break
                self._submit(self.sockets[self.sent % len(self.sockets)])
            for socket, _ in self.poller.poll(5):
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = last_reply = time.monotonic()
                    reply = p.parse_for_client(frames)
                    stream = self.streams.get(reply.request_id or b"")
                    if stream is None:
                        self.counts["unknown_replies"] += 1
                    elif reply.command == p.C_PARTIAL:
                        stream.chunks += 1
                        stream.unacked += 1
                        if stream.unacked == self.half_window:
                            self.owed.append(reply.request_id)  # type: ignore[arg-type]
                        if timing is not None:
                            timing.chunk(stream, now, reply.body[0])
                    elif reply.command == p.C_FINAL:
                        self._final(reply, stream)
            self._grant()
        self.counts["chunks"] = sum(s.chunks for s in self.streams.values()) + self.counts["chunks"]
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()
        return {
            **self.counts,
            "unfinished": len(self.streams),
            "error_codes": self.error_codes,
            "wall": last_reply - first_sent,  # first request sent -> last reply received
            "cpu": time.process_time() - cpu,
            **(timing.summary() if timing is not None else {}),
        }

    def _submit(self, socket: zmq.Socket) -> None:
        request_id = self.prefix + self.sent.to_bytes(8, "big")
        self.sent += 1
        self.streams[request_id] = _Stream(socket)
        socket.send_multipart(p.client_request(self.service, [self.body], request_id))
        self.counts["requests"] += 1

    def _final(self, reply: p.BrokerToClient, stream: _Stream) -> None:
        del self.streams[reply.request_id]  # type: ignore[arg-type]
        self.counts["chunks"] += stream.chunks
        error = p.unpack_map(reply.body[0]).get("error") if reply.body else None
        if isinstance(error, dict):
            code = str(error.get("code"))
            self.error_codes[code] = self.error_codes.get(code, 0) + 1
            self.counts["errors"] += 1
            return
        self.counts["ok"] += 1
        self.counts["lost_chunks"] += max(0, self.chunks - stream.chunks)
        self.counts["extra_chunks"] += max(0, stream.chunks - self.chunks)

    def _grant(self) -> None:
        for request_id in self.owed:
            stream = self.streams.get(request_id)
            if stream is not None and stream.socket is not None and stream.unacked:
                stream.socket.send_multipart(p.client_credit(request_id, stream.unacked))
                stream.unacked = 0
                self.counts["credits"] += 1
        self.owed.clear()


def clients_main(endpoint: str, service: str, plan: StreamPlan, index: int, results: Any) -> None:
    """Process entry point: run the plan, put the summary on ``results``."""
    clients = SyntheticClients(endpoint, service, plan, index.to_bytes(4, "big"))
    results.put(clients.run(time.monotonic() + plan.timeout))


def sink_main(endpoint: str, streams: int, plan: StreamPlan, results: Any) -> None:
    """The no-broker baseline: bind a ROUTER that fake workers stream to directly; time their chunks the same way.

    Streams are told apart by sender and route key; the sink ends when ``streams`` FINALs arrived or at timeout.
    """
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.bind(endpoint)
    results.put("bound")
    timing = Timing(plan.stall_gap)
    live: dict[bytes, _Stream] = {}
    finals = chunks = 0
    deadline = time.monotonic() + plan.timeout
    while finals < streams and time.monotonic() < deadline:
        if not socket.poll(100):
            continue
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.monotonic()
            message = p.parse_inbound(frames[1:])
            if isinstance(message, p.WorkerPartial):
                stream = live.setdefault(frames[0] + message.route_key, _Stream(None))
                timing.chunk(stream, now, message.body[0])
                chunks += 1
            elif isinstance(message, p.WorkerFinal):
                live.pop(frames[0] + message.route_key, None)
                finals += 1
    socket.close(linger=0)
    context.term()
    results.put({"chunks": chunks, "finals": finals, **timing.summary()})
