"""The worker's decisions, with no sockets, threads or HTTP: a state machine fed events and the clock.

``WorkerCore`` is to a worker thread what ``BrokerCore`` is to the broker. Every public method takes an event (a
message from the broker, a slot that finished, the sidecar's health, the clock) and returns the effects to carry
out, in order: open or close the connection, send frames, start, cancel or credit a job, end the thread. The loop
in ``worker.node`` only carries them out, so every rule here is unit-tested and fuzzed directly.

A connection goes through three phases. ``CONNECTING``: READY is sent, nothing heard yet. ``REGISTERED``: the
broker answered (it answers READY with a HEARTBEAT). Without a connection the core is ``WAITING_SIDECAR``
(llama-server is not healthy: nothing to offer) or ``BACKING_OFF`` (the next attempt is due at
``reconnect_at``). Each connection has a number; a job belongs to the connection it came on, and when that
connection ends its jobs end with it (the broker resumes them elsewhere).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qmesh.common import protocol as p
from qmesh.common.bodies import BadRequest, EmbeddingRequest, GenerationRequest, request_from_body
from qmesh.worker.generation import Job

log = logging.getLogger(__name__)

# Refusals a new connection cannot fix: the worker stops with the broker's reason instead of registering again.
FATAL_REFUSALS = frozenset({p.BAD_REQUEST, p.FORBIDDEN})


class Phase(Enum):
    WAITING_SIDECAR = "waiting for llama-server"
    CONNECTING = "connecting"
    REGISTERED = "registered"
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


@dataclass(slots=True)
class WorkerConfig:
    broker: str  # the endpoint, for messages
    service: str
    slots: int
    info: dict[str, Any]  # READY's info frame
    heartbeat_interval: float = 2.5
    liveness: int = 3
    grace: float = 30.0  # seconds in-flight requests may take to finish at shutdown
    max_reconnect_delay: float = 30.0
    capability: str = p.CHAT  # the kind of request it serves: CHAT (generations) or EMBEDDINGS

    @property
    def broker_ttl(self) -> float:
        return self.heartbeat_interval * self.liveness


# ---------------------------------------------------------------------------------------------- effects


@dataclass(slots=True, frozen=True)
class Connect:
    """Open connection number ``connection`` (a new DEALER, hence a new routing id)."""

    connection: int


@dataclass(slots=True, frozen=True)
class Send:
    frames: list[bytes]


@dataclass(slots=True, frozen=True)
class SendHeartbeat:
    """A HEARTBEAT carrying the machine's load (sampled by the loop) and these figures."""

    busy: int
    draining: bool


@dataclass(slots=True, frozen=True)
class Close:
    """Close the connection; ``flush``: give what was just sent (a DISCONNECT) a moment to leave."""

    flush: bool


@dataclass(slots=True, frozen=True)
class StartJob:
    job: Job


@dataclass(slots=True, frozen=True)
class CancelJob:
    job: Job


@dataclass(slots=True, frozen=True)
class GrantCredit:
    job: Job
    credit: int


@dataclass(slots=True, frozen=True)
class Exit:
    """The thread ends; ``failure`` says why when it failed."""

    failure: str | None


Effect = Connect | Send | SendHeartbeat | Close | StartJob | CancelJob | GrantCredit | Exit


# ---------------------------------------------------------------------------------------------- the core


@dataclass(slots=True)
class WorkerCore:
    config: WorkerConfig
    now: float
    rng: random.Random = field(default_factory=random.Random)
    phase: Phase = Phase.WAITING_SIDECAR
    connection: int = 0  # the current (or last) connection's number
    jobs: dict[bytes, Job] = field(default_factory=dict)  # route key -> job, of the current connection
    sidecar_healthy: bool = False
    failed_attempts: int = 0  # connections in a row that ended before the broker answered
    reconnect_at: float = 0.0
    broker_expires: float = 0.0  # the broker is dead if silent until then
    next_heartbeat: float = float("inf")
    drain_deadline: float | None = None  # set when a stop was asked for

    # ------------------------------------------------------------------------------------------ events

    def on_sidecar(self, healthy: bool, now: float) -> list[Effect]:
        """llama-server's health as the loop sees it (called every turn; only changes matter)."""
        self.now = now
        out: list[Effect] = []
        if healthy == self.sidecar_healthy or self.phase is Phase.STOPPED:
            return out
        self.sidecar_healthy = healthy
        if healthy:
            if self.phase is Phase.WAITING_SIDECAR:
                self._connect(out)
        elif self._connected:
            log.warning("%s: llama-server is down; leaving the broker until it is back", self._name)
            self._leave(out)
            self.phase = Phase.WAITING_SIDECAR
            self._exit_if_stopping(out)
        elif self.phase is Phase.BACKING_OFF:
            self.phase = Phase.WAITING_SIDECAR
        return out

    def fail(self, failure: str, now: float, *, leave: bool = True) -> list[Effect]:
        """Something retrying cannot fix (llama-server failed for good, the broker refused our key): end the
        thread. ``leave``: tell the broker first, so it resumes our requests elsewhere at once."""
        self.now = now
        out: list[Effect] = []
        self._stop(out, failure, leave=leave)
        return out

    def on_broker_message(self, frames: list[bytes], now: float) -> list[Effect]:
        self.now = now
        out: list[Effect] = []
        if not self._connected:
            return out
        self.broker_expires = now + self.config.broker_ttl
        try:
            message = p.parse_for_worker(frames)
        except p.ProtocolError as exc:
            log.warning("%s: dropped malformed message from the broker: %s", self._name, exc)
            return out
        if message.command == p.W_DISCONNECT:
            self._on_disconnect(message.refusal, out)
            return out
        if self.phase is Phase.CONNECTING:
            self.phase = Phase.REGISTERED
            self.failed_attempts = 0
            log.info(
                "%s: registered for %s with %d slot(s) at %s",
                self._name,
                self.config.service,
                self.config.slots,
                self.config.broker,
            )
        if message.command == p.W_REQUEST:
            self._accept(message.route_key, message.body, out)
        elif message.command in (p.W_CANCEL, p.W_CREDIT):
            job = self.jobs.get(message.route_key)
            if job is not None:
                out.append(CancelJob(job) if message.command == p.W_CANCEL else GrantCredit(job, message.credit))
        return out

    def on_job_finished(self, job: Job, body: bytes, now: float) -> list[Effect]:
        """A slot thread finished ``job`` with this FINAL body (after sending every chunk itself)."""
        self.now = now
        out: list[Effect] = []
        if self.jobs.get(job.route_key) is job:  # else it belonged to a connection that has ended
            del self.jobs[job.route_key]
            out.append(Send(p.worker_reply(True, job.route_key, [body])))
            self._exit_if_drained(out)
        return out

    def on_connection_lost(self, why: str, now: float) -> list[Effect]:
        """The connection cannot be used any more (the broker stopped taking our messages)."""
        self.now = now
        out: list[Effect] = []
        if self._connected:
            log.warning("%s: %s; starting a new connection", self._name, why)
            self._drop_connection(out)
        return out

    def stop(self, now: float) -> list[Effect]:
        """Take no more work; end once in-flight requests finish or the grace period is over."""
        self.now = now
        out: list[Effect] = []
        if self.drain_deadline is not None or self.phase is Phase.STOPPED:
            return out
        self.drain_deadline = now + self.config.grace
        if not self._connected:
            self._stop(out, None)
            return out
        log.info("%s: stopping; waiting up to %g s for %d request(s)", self._name, self.config.grace, len(self.jobs))
        self.next_heartbeat = now  # tell the broker at once that we take no more work
        out.extend(self.tick(now))
        self._exit_if_drained(out)
        return out

    def tick(self, now: float) -> list[Effect]:
        """Heartbeats, a silent broker, a reconnection that is due, the end of the grace period."""
        self.now = now
        out: list[Effect] = []
        if self.phase is Phase.BACKING_OFF and now >= self.reconnect_at:
            self._connect(out)
        if not self._connected:
            return out
        if self.drain_deadline is not None and now >= self.drain_deadline:
            if self.jobs:  # the DISCONNECT makes the broker resume them elsewhere
                log.warning("%s: %d request(s) handed back to the broker", self._name, len(self.jobs))
            self._stop(out, None)
            return out
        if now >= self.broker_expires:
            if self.phase is Phase.CONNECTING:
                log.warning(
                    "%s: no answer from the broker at %s within %g s (is qmesh-broker running there?)",
                    self._name,
                    self.config.broker,
                    self.config.broker_ttl,
                )
            else:
                log.warning("%s: the broker was silent for %g s", self._name, self.config.broker_ttl)
            self._drop_connection(out)
            return out
        if now >= self.next_heartbeat:
            out.append(SendHeartbeat(busy=len(self.jobs), draining=self.drain_deadline is not None))
            self.next_heartbeat = now + self.config.heartbeat_interval
        return out

    def next_wakeup(self) -> float:
        """The monotonic time by which ``tick`` must run next."""
        if self.phase is Phase.BACKING_OFF:
            return self.reconnect_at
        if not self._connected:
            return float("inf")
        wakeup = min(self.next_heartbeat, self.broker_expires)
        return wakeup if self.drain_deadline is None else min(wakeup, self.drain_deadline)

    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPED

    @property
    def registered(self) -> bool:
        return self.phase is Phase.REGISTERED

    # ------------------------------------------------------------------------------------------ rules

    @property
    def _connected(self) -> bool:
        return self.phase in (Phase.CONNECTING, Phase.REGISTERED)

    @property
    def _name(self) -> str:
        return str(self.config.info.get("name", "worker"))

    def _connect(self, out: list[Effect]) -> None:
        self.connection += 1
        self.phase = Phase.CONNECTING
        self.broker_expires = self.now + self.config.broker_ttl
        self.next_heartbeat = self.now + self.config.heartbeat_interval
        out.append(Connect(self.connection))
        out.append(Send(p.ready(self.config.service, self.config.info)))
        log.info("%s: connecting to the broker at %s", self._name, self.config.broker)

    def _accept(self, route_key: bytes, body: list[bytes], out: list[Effect]) -> None:
        try:
            request = request_from_body(body)
            self._check_kind(request)
        except BadRequest as exc:
            out.append(Send(p.worker_reply(True, route_key, [p.error_body(p.BAD_REQUEST, str(exc))])))
            return
        previous = self.jobs.get(route_key)
        if previous is not None:  # the broker never reuses a key on one connection: a bug, but never two jobs
            log.warning("%s: the broker sent route key %s twice; cancelling the first", self._name, route_key.hex())
            out.append(CancelJob(previous))
        job = Job(route_key, request, self.connection)
        self.jobs[route_key] = job
        out.append(StartJob(job))

    def _check_kind(self, request: GenerationRequest | EmbeddingRequest) -> None:
        """The broker sends each kind of request only to workers of that kind; this catches one that did not."""
        embeddings = self.config.capability == p.EMBEDDINGS
        if isinstance(request, EmbeddingRequest) != embeddings:
            serves = "serves embeddings only" if embeddings else "does not serve embeddings"
            raise BadRequest(f"this worker of {self.config.service} {serves}")

    def _on_disconnect(self, refusal: tuple[int, str] | None, out: list[Effect]) -> None:
        if refusal is not None and refusal[0] in FATAL_REFUSALS:
            self._stop(out, f"the broker at {self.config.broker} refused this worker: {refusal[1]}", leave=False)
            return
        if self.phase is Phase.CONNECTING:
            why = f": {refusal[1]}" if refusal is not None else ""
            log.warning("%s: the broker refused the registration%s", self._name, why)
        else:
            log.warning("%s: the broker asked us to register again", self._name)
        self._drop_connection(out)

    def _drop_connection(self, out: list[Effect]) -> None:
        """End the connection without a DISCONNECT (the broker already dropped us or cannot hear us), then back
        off: at once after a registered connection, exponentially longer after each attempt that got no answer."""
        registered = self.phase is Phase.REGISTERED
        self._orphan_jobs(out)
        out.append(Close(flush=False))
        self.phase = Phase.WAITING_SIDECAR
        if self._exit_if_stopping(out) or not self.sidecar_healthy:
            return
        delay = 0.0
        if not registered:
            self.failed_attempts += 1
            doubled = self.config.heartbeat_interval * 2 ** (self.failed_attempts - 1)
            delay = min(doubled, self.config.max_reconnect_delay) * self.rng.uniform(0.5, 1.5)
            log.warning("%s: next attempt in %.1f s", self._name, delay)
        self.phase = Phase.BACKING_OFF
        self.reconnect_at = self.now + delay
        if delay == 0.0:
            self._connect(out)

    def _leave(self, out: list[Effect]) -> None:
        """DISCONNECT and close: the broker resumes our requests elsewhere at once."""
        self._orphan_jobs(out)
        out.append(Send(p.disconnect()))
        out.append(Close(flush=True))

    def _orphan_jobs(self, out: list[Effect]) -> None:
        """Requests of a connection that ends can no longer be answered on it: stop them and forget them."""
        out.extend(CancelJob(job) for job in self.jobs.values())
        self.jobs.clear()

    def _stop(self, out: list[Effect], failure: str | None, leave: bool = True) -> None:
        if self.phase is Phase.STOPPED:
            return
        if self._connected:
            if leave:
                self._leave(out)
            else:
                self._orphan_jobs(out)
                out.append(Close(flush=False))
        if failure is not None:
            log.error("%s: %s", self._name, failure)
        self.phase = Phase.STOPPED
        out.append(Exit(failure))

    def _exit_if_stopping(self, out: list[Effect]) -> bool:
        if self.drain_deadline is None:
            return False
        self._stop(out, None)
        return True

    def _exit_if_drained(self, out: list[Effect]) -> None:
        if self.drain_deadline is not None and not self.jobs:
            self._stop(out, None)
