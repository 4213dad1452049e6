"""One worker thread: a llama-server sidecar with K slots and one DEALER connection to the broker.

The worker thread runs the poll loop (``_serve``): registration, heartbeats, requests, credit, cancels,
reconnects. K slot threads each stream one generation at a time from llama-server over HTTP.

A slot thread sends its chunks to the broker itself, on the shared DEALER: one thread wake-up per token
instead of two (a hand-over to the loop thread cost about 0.13 ms of CPU per token, measured per thread under
``scripts/bench overhead``). ZeroMQ sockets are not thread-safe, but may be shared with a full memory barrier
around every use: every call on the DEALER is made holding ``_dealer_lock``, and the loop thread never waits
inside libzmq on it. It waits on the socket's ZMQ_FD with a plain poll, and a slot thread whose send may have
taken that signal (a send processes the socket's pending commands) rings the ``_wakeup`` eventfd instead.
Finals, and "llama-server is down", still go to the loop over an inproc PUSH/PULL pair, in order after the
chunks. A send the DEALER refuses (its queue to the broker is full) ends the connection, never a lost chunk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from itertools import count

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.bodies import BadRequest, GenerationRequest
from qmesh.common.errors import ConfigError, QMeshError, SidecarError
from qmesh.common.fastio import recv_frames, send_frames, send_frames_waiting
from qmesh.common.keys import HANDSHAKE_EVENTS, CurveClientKeys, handshake_failure
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.generation import FINAL, PARTIAL, SIDECAR_DOWN, Generation, Job
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.models import ModelFile
from qmesh.worker.monitor import SystemMonitor
from qmesh.worker.process import LlamaProcessManager

log = logging.getLogger(__name__)

_inproc_ids = count()
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


@dataclass(slots=True)
class WorkerSettings:
    broker: str
    model: ModelFile
    service: str
    binary: LlamaServerBinary
    slots: int = 1
    ctx_size: int = 2048  # tokens of context per slot
    gpu_layers: int = 0
    cpu_threads: int | None = None
    heartbeat_interval: float = 2.5
    liveness: int = 3
    grace: float = 30.0  # seconds in-flight requests may take to finish at shutdown
    load_timeout: float = 120.0
    max_restarts: int = 3  # llama-server restarts in a row before the thread gives up
    pause_after: float = 1.0  # seconds without the client's credit before llama-server is paused
    stall_timeout: float = 60.0  # seconds a stream may wait for the client's credit before it is cancelled (408)
    worker_id: str = ""
    max_reconnect_delay: float = 30.0
    curve: CurveClientKeys | None = None  # own key pair and the broker's public key, when the broker uses CURVE


class WorkerNode(threading.Thread):
    """Serves one model through the broker until ``stop()``; ``failure`` says why it ended, if it failed."""

    def __init__(self, settings: WorkerSettings, index: int = 0, context: zmq.Context | None = None) -> None:
        super().__init__(name=f"qmesh-worker-{index}", daemon=True)
        self.settings = settings
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}/{index}"
        self.context = context or zmq.Context.instance()
        self.failure: str | None = None
        self.registered = threading.Event()
        self._stop_requested = threading.Event()
        self._jobs: dict[bytes, Job] = {}
        self._job_queue: queue.Queue[Job | None] = queue.Queue()
        self._inproc = f"inproc://qmesh-worker-{next(_inproc_ids)}"
        self.manager: LlamaProcessManager | None = None
        self.client: LlamaHttpClient | None = None
        self._dealer: zmq.Socket | None = None
        self._dealer_fd = -1  # the DEALER's ZMQ_FD: readable when the socket's state may have changed
        self._dealer_lock = threading.RLock()  # held for every call on the DEALER and for changes to _jobs
        self._wakeup = -1  # an eventfd while running: slot threads ring the loop thread with it
        self._dealer_events: zmq.Socket | None = None
        self._monitor = SystemMonitor()
        self._seen_restarts = 0
        self._sidecar_lost = False
        self._connection_broken = False
        self._chunks_sent = 0  # PARTIALs forwarded (one token each from llama-server): tokens/s in heartbeats
        self._rate_mark = (time.monotonic(), 0)

    def stop(self) -> None:
        """Stop taking work, let in-flight requests finish within the grace period, then disconnect."""
        self._stop_requested.set()

    # ------------------------------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        s = self.settings
        self.manager = LlamaProcessManager(
            s.model.path,
            s.binary,
            ctx_size=s.ctx_size * s.slots,
            gpu_layers=s.gpu_layers,
            parallel=s.slots,
            threads=s.cpu_threads,
            load_timeout=s.load_timeout,
            max_restarts=s.max_restarts,
        )
        slot_threads = [
            threading.Thread(target=self._slot_loop, name=f"{self.name}-slot-{i}", daemon=True) for i in range(s.slots)
        ]
        pull = self.context.socket(zmq.PULL)
        pull.bind(self._inproc)
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.manager.start()
            self.client = LlamaHttpClient(self.manager.base_url)
            self._seen_restarts = self.manager.restarts
            for thread in slot_threads:
                thread.start()
            self._serve(pull)
        except QMeshError as exc:
            self.failure = str(exc)
            log.error("%s: %s", self.worker_name, exc)
        except Exception as exc:  # a bug: report it rather than let the thread vanish silently
            self.failure = f"internal error: {exc!r}"
            log.exception("%s crashed", self.worker_name)
        finally:
            for job in list(self._jobs.values()):
                job.cancel()
            for _ in slot_threads:
                self._job_queue.put(None)
            for thread in slot_threads:
                if thread.is_alive():
                    thread.join(timeout=5)
            self._close_dealer(send_disconnect=True)
            pull.close(linger=0)
            self.manager.stop()
            self.registered.clear()
            with self._dealer_lock:  # a slot thread still running (stuck past the join) must not write to it
                os.close(self._wakeup)
                self._wakeup = -1

    # ------------------------------------------------------------------------------------------ poll loop

    def _serve(self, pull: zmq.Socket) -> None:
        s = self.settings
        ttl = s.heartbeat_interval * s.liveness
        reconnect_delay = s.heartbeat_interval
        drain_deadline: float | None = None
        self._connect()
        broker_expires = time.monotonic() + ttl
        next_heartbeat = time.monotonic() + s.heartbeat_interval
        poller, polled_dealer = zmq.Poller(), None
        poller.register(pull, zmq.POLLIN)
        while True:
            if polled_dealer is not self._dealer:  # a new connection: poll its socket instead of the old one
                poller = zmq.Poller()
                for socket_ in (pull, self._dealer_events):
                    if socket_ is not None:
                        poller.register(socket_, zmq.POLLIN)
                poller.register(self._wakeup, zmq.POLLIN)
                if self._dealer is not None:
                    poller.register(self._dealer_fd, zmq.POLLIN)  # the fd only: no libzmq call outside the lock
                polled_dealer = self._dealer
            wait = max(0.0, min(next_heartbeat - time.monotonic(), 0.25))
            ready = dict(poller.poll(wait * 1000))
            if self._wakeup in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wakeup)
            if self._drain_broker():  # whatever woke us: the DEALER's signal may have been taken by a slot's send
                broker_expires = time.monotonic() + ttl
                reconnect_delay = s.heartbeat_interval
            if pull in ready:
                self._drain_slots(pull)
            if self._dealer_events is not None and self._dealer_events in ready:
                self._check_handshake()
            now = time.monotonic()
            sidecar_ready = self._sidecar_ready()
            if self._stop_requested.is_set() and self._dealer is None:
                return
            if not sidecar_ready:
                continue
            if self._dealer is None:  # sidecar is back after a restart: register again
                self._connect()
                broker_expires, next_heartbeat = now + ttl, now
            if self._stop_requested.is_set() and drain_deadline is None:
                log.info(
                    "%s: stopping; waiting up to %g s for %d request(s)", self.worker_name, s.grace, len(self._jobs)
                )
                drain_deadline = now + s.grace
                next_heartbeat = now  # tell the broker at once that we take no more work
            if drain_deadline is not None and (not self._jobs or now >= drain_deadline):
                if self._jobs:  # out of time: DISCONNECT (in run's cleanup) makes the broker resume them elsewhere
                    log.warning("%s: %d request(s) handed back to the broker", self.worker_name, len(self._jobs))
                return
            if now >= next_heartbeat:
                self._send_heartbeat(draining=drain_deadline is not None)
                next_heartbeat = now + s.heartbeat_interval
            if now >= broker_expires or self._connection_broken:
                delay = reconnect_delay * random.uniform(0.5, 1.5)
                why = (
                    "the broker stopped taking messages" if self._connection_broken else f"broker silent for {ttl:g} s"
                )
                log.warning("%s: %s; reconnecting in %.1f s", self.worker_name, why, delay)
                self._close_dealer(send_disconnect=False)
                self._connection_broken = False
                if self._stop_requested.wait(delay):
                    return
                reconnect_delay = min(reconnect_delay * 2, s.max_reconnect_delay)
                self._connect()
                broker_expires = time.monotonic() + ttl

    def _connect(self) -> None:
        """A new DEALER (a new routing id) and READY: how a worker registers, and re-registers."""
        with self._dealer_lock:
            self._orphan_jobs()
            dealer = self.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
            if self.settings.curve is not None:
                self.settings.curve.apply(dealer)
            self._dealer_events = dealer.get_monitor_socket(HANDSHAKE_EVENTS)
            dealer.connect(self.settings.broker)
            info = {
                "slots": self.settings.slots,
                "name": self.worker_name,
                "worker_id": self.settings.worker_id,
                "model_file": self.settings.model.path.name,
                "version": 1,
            }
            self._dealer, self._dealer_fd = dealer, dealer.getsockopt(zmq.FD)
            self._send_to_broker(p.ready(self.settings.service, info))
            self.registered.set()
            log.info(
                "%s: registered for %s with %d slot(s) at %s",
                self.worker_name,
                self.settings.service,
                self.settings.slots,
                self.settings.broker,
            )

    def _close_dealer(self, send_disconnect: bool) -> None:
        with self._dealer_lock:
            if self._dealer is None:
                return
            if self._dealer_events is not None:
                self._dealer.disable_monitor()
                self._dealer_events.close(linger=0)
                self._dealer_events = None
            if send_disconnect:
                with contextlib.suppress(zmq.ZMQError):
                    self._dealer.send_multipart(p.disconnect(), zmq.NOBLOCK)
                self._dealer.close(linger=200)
            else:
                self._dealer.close(linger=0)
            self._dealer = None
            self.registered.clear()
            self._orphan_jobs()

    def _orphan_jobs(self) -> None:
        """Requests of a closed connection can no longer be answered: stop them and forget them."""
        for job in self._jobs.values():
            job.cancel()
        self._jobs.clear()

    def _check_handshake(self) -> None:
        """A refused key or a wrong broker key will not fix itself: end the thread with a clear error."""
        assert self._dealer_events is not None
        while self._dealer_events.poll(0):
            failure = handshake_failure(recv_monitor_message(self._dealer_events)["event"], self.settings.broker)
            if failure is not None:
                raise ConfigError(failure)

    def _drain_broker(self) -> bool:
        """Handle everything the broker sent; returns True if anything arrived (the broker is alive)."""
        with self._dealer_lock:
            got_any = False
            while self._dealer is not None:
                try:
                    frames = recv_frames(self._dealer)
                except zmq.Again:
                    break
                got_any = True
                try:
                    message = p.parse_for_worker(frames)
                except p.ProtocolError as exc:
                    log.warning("%s: dropped malformed message from the broker: %s", self.worker_name, exc)
                    continue
                if message.command == p.W_REQUEST:
                    self._accept(message.route_key, message.body)
                elif message.command == p.W_CANCEL:
                    job = self._jobs.get(message.route_key)
                    if job is not None:
                        job.cancel()
                elif message.command == p.W_CREDIT:
                    job = self._jobs.get(message.route_key)
                    if job is not None:
                        job.grant(message.credit)
                elif message.command == p.W_DISCONNECT:
                    log.warning("%s: the broker asked us to reconnect", self.worker_name)
                    self._close_dealer(send_disconnect=False)
                    self._connect()
            return got_any

    def _accept(self, route_key: bytes, body: list[bytes]) -> None:
        try:
            request = GenerationRequest.from_body(body)
        except BadRequest as exc:
            self._send_to_broker(p.worker_reply(True, route_key, [p.error_body(p.BAD_REQUEST, str(exc))]))
            return
        job = Job(route_key, request)
        with self._dealer_lock:
            self._jobs[route_key] = job
        self._job_queue.put(job)

    def _drain_slots(self, pull: zmq.Socket) -> None:
        while True:
            try:
                route_key, kind, body = recv_frames(pull)
            except zmq.Again:
                return
            if kind == SIDECAR_DOWN:
                self._on_sidecar_down()
                continue
            with self._dealer_lock:
                if self._jobs.pop(route_key, None) is not None:  # else: of an earlier connection, or ended
                    self._send_to_broker(p.worker_reply(True, route_key, [body]))

    def _send_chunk(self, job: Job, body: bytes) -> None:
        """A slot thread's PARTIAL, sent on the DEALER at once (see the module docstring)."""
        with self._dealer_lock:
            if self._jobs.get(job.route_key) is not job:
                return  # a request of an earlier connection, or one already ended
            was_broken = self._connection_broken
            if self._send_to_broker(p.worker_reply(False, job.route_key, [body])):
                self._chunks_sent += 1
                assert self._dealer is not None
                wake = bool(self._dealer.getsockopt(_EVENTS) & _POLLIN)  # a message is waiting: the loop must look
            else:
                wake = self._connection_broken and not was_broken  # this chunk broke the connection
            if wake and self._wakeup >= 0:
                os.eventfd_write(self._wakeup, 1)

    def _send_to_broker(self, frames: list[bytes]) -> bool:
        """Never block the loop. If the broker takes nothing (the queue to it is full), this connection is done:
        nothing after a lost message may reach the broker, so the loop starts a new connection and the broker
        resumes our requests from what it did receive. True if the message went out."""
        with self._dealer_lock:
            if self._dealer is None or self._connection_broken:
                return False
            try:
                send_frames(self._dealer, frames)
            except zmq.Again:
                log.warning("%s: the broker is not taking messages; starting a new connection", self.worker_name)
                self._connection_broken = True
                return False
            return True

    def _send_heartbeat(self, draining: bool) -> None:
        sample = self._monitor.sample(self.manager is not None and self.manager.state == "ready")
        now, (since, sent) = time.monotonic(), self._rate_mark
        self._rate_mark = (now, self._chunks_sent)
        load = {
            "health": sample.health,
            "busy": len(self._jobs),
            "cpu": sample.cpu_percent,
            "memory": sample.memory_percent,
            "draining": draining,
            "tokens_per_second": round((self._chunks_sent - sent) / max(now - since, 1e-3), 1),
            "host": socket.gethostname(),
        }
        self._send_to_broker(p.heartbeat(load))

    # ------------------------------------------------------------------------------------------ sidecar

    def _sidecar_ready(self) -> bool:
        """False while llama-server is down or restarting (we are unregistered then); raises once it failed for good."""
        assert self.manager is not None
        state = self.manager.state
        if state == "failed":
            raise SidecarError(f"llama-server failed for good: {self.manager.failure}")
        if self.manager.restarts != self._seen_restarts:
            self._seen_restarts = self.manager.restarts
            self._on_sidecar_down()
            self.client = LlamaHttpClient(self.manager.base_url)  # a restart may have moved it to another port
        if state != "ready":
            return False
        if self._sidecar_lost:
            # A slot saw it fail before the manager noticed the exit: wait until llama-server answers again.
            if not self.manager.is_healthy():
                return False
            self._sidecar_lost = False
        return True

    def _on_sidecar_down(self) -> None:
        """Leave the broker so it resumes our requests elsewhere; register again once llama-server is back."""
        self._sidecar_lost = True
        if self._dealer is not None:
            log.warning("%s: llama-server is down; leaving the broker until it is back", self.worker_name)
            self._close_dealer(send_disconnect=True)

    # ------------------------------------------------------------------------------------------ slots

    def _slot_loop(self) -> None:
        push = self.context.socket(zmq.PUSH)
        push.connect(self._inproc)
        try:
            while (job := self._job_queue.get()) is not None:
                self._generate(job, push)
        finally:
            push.close(linger=1000)

    def _generate(self, job: Job, push: zmq.Socket) -> None:
        assert self.client is not None and self.manager is not None

        def send(kind: bytes, body: bytes) -> None:
            if kind == PARTIAL:
                self._send_chunk(job, body)
            else:  # through the loop thread, after every chunk this thread sent
                send_frames_waiting(push, [job.route_key, kind, body])

        generation = Generation(
            job,
            self.client,
            send,
            worker_name=self.worker_name,
            model=self.settings.service,
            pause_after=self.settings.pause_after,
            stall_timeout=self.settings.stall_timeout,
        )
        try:
            generation.run()
        except SidecarError as exc:
            if job.cancelled.is_set():
                send(FINAL, p.error_body(p.CANCELLED, "cancelled"))
            elif not self.manager.is_healthy():
                send(SIDECAR_DOWN, b"")  # the loop leaves the broker, which resumes the request elsewhere
            else:
                send(FINAL, p.error_body(p.WORKER_FAILED, f"llama-server error: {exc}"))
        except Exception as exc:
            log.exception("%s: generation failed", self.worker_name)
            send(FINAL, p.error_body(p.WORKER_FAILED, f"worker error: {exc!r}"))
