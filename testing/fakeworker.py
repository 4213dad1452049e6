"""``FakeStreamingWorker``: many simulated QMesh workers (one DEALER each) in one process, and no llama-server.

A fake backend, for where a fake is the point: the broker's capacity, scale and flow control, with generation
taken out of the picture (``scripts/bench capacity``, ``scale``, the latency floor; the ``fake_workers`` fixture
of the tests). Each registers like a real worker (READY with slots), heartbeats with a load frame, honours the
client's credit window and CANCEL, and answers a request with ``max_tokens`` PARTIALs and a FINAL. With ``rate``
0 it streams as fast as credit allows; with a rate it paces each stream and puts the send time (monotonic,
comparable across processes on Linux) in every chunk body, so a client can tell its added inter-token latency.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from qmesh.common import protocol as p
from qmesh.common.bodies import BadRequest, GenerationRequest, final_body

TICK_S = 0.001  # paced mode sends what is due once a millisecond: polling hundreds of sockets costs time
BATCH = 2000  # chunks sent between two looks at the sockets in streaming-as-fast-as-possible mode


@dataclass(slots=True)
class _Job:
    socket: zmq.Socket
    key: bytes
    remaining: int
    total: int
    credit: int | None
    next_at: float
    parked: bool = False  # out of the schedule until credit arrives


@dataclass(frozen=True)
class FakePlan:
    """``count`` fake workers with ``slots`` each, streaming ``rate`` chunks/s per stream (0: as fast as allowed)."""

    count: int
    slots: int
    rate: float = 0.0
    name: str = "fake"
    direct_chunks: int = 0  # no-broker baseline: every slot streams this many chunks straight to a sink
    ramp: float = 0.0  # no-broker baseline: seconds over which those streams start
    heartbeat: float = 2.5  # seconds between two heartbeats of one fake worker: the broker's own interval


class FakeStreamingWorker:
    """Fake workers registered with the broker at ``endpoints[0]``, or streaming straight to sinks (baseline)."""

    def __init__(self, endpoints: list[str], service: str, plan: FakePlan) -> None:
        self.service = service
        self.interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
        self.name = plan.name
        self.heartbeat = plan.heartbeat
        self.direct = plan.direct_chunks > 0
        self.context = zmq.Context()
        self.context.set(zmq.MAX_SOCKETS, plan.count + 64)
        self.sockets: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.jobs: dict[bytes, _Job] = {}
        self.schedule: list[tuple[float, bytes]] = []
        self.lateness: list[float] = []  # paced mode: actual - scheduled send time of each chunk
        names = ("ready", "requests", "chunks", "finals", "cancels", "credits", "heartbeats", "disconnects", "sent")
        self.counts = dict.fromkeys(names, 0)
        self._chunk = p.pack({"text": "tok ", "tokens": [1234]})
        start = time.monotonic() + self.interval
        for index in range(plan.count):
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoints[index % len(endpoints)])
            self.sockets.append(socket)
            self.poller.register(socket, zmq.POLLIN)
            if self.direct:
                for slot in range(plan.slots):
                    n = index * plan.slots + slot
                    at = start + plan.ramp * n / (plan.count * plan.slots)
                    self._start(_Job(socket, n.to_bytes(8, "big"), plan.direct_chunks, plan.direct_chunks, None, at))
                continue
            info = {"slots": plan.slots, "name": f"{plan.name}/{index}", "worker_id": "f" * 64, "model_file": "-"}
            socket.send_multipart(p.ready(service, {**info, "version": 1}))
            self.counts["ready"] += 1

    def run(self, stop: Any) -> dict[str, Any]:
        """Serve until ``stop`` (an Event) is set; returns the counters and the CPU time used.

        In paced mode ``lateness`` then holds how late each chunk was sent (actual - scheduled, seconds)."""
        epoch = time.monotonic()
        cpu = time.process_time()
        try:
            while not stop.is_set():
                now = time.monotonic()
                self._send_due(now)
                if not self.direct:
                    self._heartbeat(now - epoch)
                if self.schedule and self.schedule[0][0] <= time.monotonic():
                    wait = 0.0
                else:
                    due = self.schedule[0][0] if self.schedule else now + 0.1
                    wait = max(TICK_S if self.interval else 0.0, min(due, now + 0.1) - now)
                for socket, _ in self.poller.poll(wait * 1000):
                    self._drain(socket)
        finally:
            for socket in self.sockets:
                with contextlib.suppress(zmq.ZMQError):
                    socket.send_multipart(p.disconnect(), zmq.NOBLOCK)
                socket.close(linger=0)
            self.context.term()
        return {**self.counts, "cpu": time.process_time() - cpu}

    def _send_due(self, now: float) -> None:
        sent = 0
        schedule, jobs = self.schedule, self.jobs
        while schedule and schedule[0][0] <= now and sent < BATCH:
            _, key = heapq.heappop(schedule)
            job = jobs.get(key)
            if job is None:
                continue  # finished or cancelled
            if job.credit == 0:
                job.parked = True
                continue
            self._send_chunk(job)
            sent += 1
            if job.remaining == 0:
                summary = final_body(finish_reason="length", tokens=job.total, worker=self.name, model=self.service)
                job.socket.send_multipart(p.worker_reply(True, key, [summary]))
                self.counts["finals"] += 1
                self.counts["sent"] += 1
                del jobs[key]
                continue
            job.next_at = job.next_at + self.interval if self.interval else now
            heapq.heappush(schedule, (job.next_at, key))

    def _send_chunk(self, job: _Job) -> None:
        if self.interval:
            sent_at = time.monotonic()
            self.lateness.append(sent_at - job.next_at)
            body = p.pack({"text": "tok ", "tokens": [1234], "t": sent_at})
        else:
            body = self._chunk
        job.socket.send_multipart(p.worker_reply(False, job.key, [body]))
        job.remaining -= 1
        if job.credit is not None:
            job.credit -= 1
        self.counts["chunks"] += 1
        self.counts["sent"] += 1

    def _heartbeat(self, elapsed: float) -> None:
        """Each worker heartbeats every ``heartbeat`` s on its own phase, as independent workers would (no bursts)."""
        due = int(elapsed * len(self.sockets) / self.heartbeat) + 1
        if due <= self.counts["heartbeats"]:
            return
        beat = p.heartbeat({"health": 1.0, "busy": len(self.jobs), "cpu": 0.0, "memory": 0.0, "draining": False})
        for n in range(self.counts["heartbeats"], due):
            self.sockets[n % len(self.sockets)].send_multipart(beat)
        self.counts["sent"] += due - self.counts["heartbeats"]
        self.counts["heartbeats"] = due

    def _drain(self, socket: zmq.Socket) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = p.parse_for_worker(frames)
            if message.command == p.W_REQUEST:
                self._accept(socket, message.route_key, message.body)
            elif message.command == p.W_CREDIT:
                self.counts["credits"] += 1
                job = self.jobs.get(message.route_key)
                if job is not None and job.credit is not None:
                    job.credit += message.credit
                    if job.parked:
                        job.parked = False
                        heapq.heappush(self.schedule, (job.next_at, job.key))
            elif message.command == p.W_CANCEL:
                self.counts["cancels"] += 1
                if self.jobs.pop(message.route_key, None) is not None:
                    socket.send_multipart(p.worker_reply(True, message.route_key, [p.error_body(p.CANCELLED, "")]))
                    self.counts["sent"] += 1
            elif message.command == p.W_DISCONNECT:
                self.counts["disconnects"] += 1  # the broker forgot this worker: an anomaly in a benchmark

    def _accept(self, socket: zmq.Socket, key: bytes, body: list[bytes]) -> None:
        self.counts["requests"] += 1
        try:
            request = GenerationRequest.from_body(body)
        except BadRequest as exc:
            socket.send_multipart(p.worker_reply(True, key, [p.error_body(p.BAD_REQUEST, str(exc))]))
            return
        start = time.monotonic() + self.interval
        self._start(_Job(socket, key, request.max_tokens, request.max_tokens, request.window, start))

    def _start(self, job: _Job) -> None:
        self.jobs[job.key] = job
        heapq.heappush(self.schedule, (job.next_at, job.key))


class FakeWorkersThread(threading.Thread):
    """``FakeStreamingWorker`` run in a thread of this process (made there too: its zmq sockets stay in it)."""

    def __init__(self, endpoint: str, service: str, plan: FakePlan) -> None:
        super().__init__(name=f"fake-workers-{plan.name}", daemon=True)
        self.endpoint, self.service, self.plan = endpoint, service, plan
        self._stop_event = threading.Event()
        self._summary: dict[str, Any] | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._summary = FakeStreamingWorker([self.endpoint], self.service, self.plan).run(self._stop_event)
        except BaseException as exc:  # re-raised by stop(), in the thread that owns the test
            self._error = exc

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop serving (each fake sends DISCONNECT) and return the counters; an error of the thread is raised."""
        self._stop_event.set()
        self.join(timeout)
        if self._error is not None:
            raise self._error
        if self._summary is None:
            raise TimeoutError(f"the fake workers did not stop within {timeout:g} s")
        return self._summary
