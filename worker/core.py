"""The worker's decisions, with no sockets, threads or HTTP: a state machine fed events and the clock.

``WorkerCore`` is to a worker thread what ``BrokerCore`` is to the broker. Every public method takes an event (a
message from the broker, a slot that finished, the sidecar's health, the clock) and returns the effects to carry
out, in order: open or close the connection, send frames, start, cancel or credit a job, end the thread. The loop
in ``worker.node`` only carries them out, so every rule here is unit-tested and fuzzed directly.

A connection goes through three phases. ``CONNECTING``: READY is sent, nothing heard yet. ``REGISTERED``: the
broker answered (it answers READY with a HEARTBEAT). Without a connection the core is ``WAITING_SIDECAR``
(llama-server is not healthy: nothing to offer) or ``BACKING_OFF`` (the next attempt is due at
``reconnect_at``). Each connection has a number; a job belongs to the connection it came on.

With a pair of brokers (``brokers``: several endpoints) each new connection tries the next endpoint, and a
passive broker's 421 sends the worker on at once. When a connection ends because its broker died (silent, gone,
or a new broker that asks it to register again), generations whose clients named them (a stream id) are *kept*
running (``held``) and offered to the next broker (ATTACH); the client sends its request again, naming the
stream, and the generation goes on where the client is: the answer is exactly the uninterrupted one. Every other
ending of a connection ends its jobs (the broker resumes them elsewhere).
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
FATAL_REFUSALS = frozenset({p.BAD_REQUEST, p.FORBIDDEN, p.CONFLICT})  # 409: another file under this model's name


class Phase(Enum):
    WAITING_SIDECAR = "waiting for llama-server"
    CONNECTING = "connecting"
    REGISTERED = "registered"
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


@dataclass(slots=True)
class WorkerConfig:
    brokers: tuple[str, ...]  # one broker's endpoint, or a pair's two
    service: str
    slots: int
    info: dict[str, Any]  # READY's info frame
    heartbeat_interval: float = 2.5
    liveness: int = 3
    grace: float = 30.0  # seconds in-flight requests may take to finish at shutdown
    max_reconnect_delay: float = 30.0
    capability: str = p.CHAT  # the kind of request it serves: CHAT (generations) or EMBEDDINGS
    hold_streams: float = 30.0  # seconds a generation kept running without a broker waits for its client

    @property
    def broker_ttl(self) -> float:
        return self.heartbeat_interval * self.liveness


# ---------------------------------------------------------------------------------------------- effects


@dataclass(slots=True, frozen=True)
class Connect:
    """Open connection number ``connection`` (a new DEALER, hence a new routing id) to ``endpoint``."""

    connection: int
    endpoint: str


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
class Rebind:
    """A kept generation goes on for its client on this connection, as ``route_key``: send what the client has
    not got (it has ``delivered_tokens`` tokens), then let the client's credit (``window`` chunks) run again."""

    job: Job
    route_key: bytes
    connection: int
    delivered_tokens: int
    window: int


@dataclass(slots=True, frozen=True)
class ServeRead:
    """Send the broker the bytes of the model file it asked for (a pull from this worker, ``read_key``)."""

    read_key: bytes
    read: p.HolderRead


@dataclass(slots=True, frozen=True)
class Exit:
    """The thread ends; ``failure`` says why when it failed."""

    failure: str | None


Effect = Connect | Send | SendHeartbeat | Close | StartJob | CancelJob | GrantCredit | Rebind | ServeRead | Exit


@dataclass(slots=True)
class Kept:
    """A generation kept running while the worker has no broker: until its client asks again, or ``until``."""

    job: Job
    until: float
    final: bytes | None = None  # its FINAL, if it ended in the meantime


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
    endpoint: int = 0  # index into config.brokers of the current (or next) connection
    max_epoch: int = 0  # the newest epoch of a broker pair seen: a broker of an older one is stale
    held: dict[bytes, Kept] = field(default_factory=dict)  # stream id -> generation kept without a broker
    fled: tuple[int, float] | None = None  # (endpoint, when) of the broker of a pair left for dead, until registered

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
            if message.epoch is not None and message.epoch < self.max_epoch:  # a broker that missed a takeover
                if self.failed_attempts < len(self.config.brokers):
                    log.warning(
                        "%s: the broker at %s is of epoch %d, older than %d: trying the other",
                        self._name,
                        self._endpoint,
                        message.epoch,
                        self.max_epoch,
                    )
                    self._drop_connection(out, keep_streams=True)
                    return out
                # A round of the pair went by and no broker of the newer epoch took us: that one is dead or cut off,
                # and this one (restarted without hearing it, or on the other side of a partition) is the broker
                # there is. Waiting for the newer epoch would leave this worker out of the mesh for good.
                log.warning(
                    "%s: the broker at %s is of epoch %d, older than %d, but no broker of a newer one answers: "
                    "following it",
                    self._name,
                    self._endpoint,
                    message.epoch,
                    self.max_epoch,
                )
                self.max_epoch = message.epoch
            self._register(message.epoch, out)
        if message.command == p.W_REQUEST:
            self._accept(message.route_key, message.body, out)
        elif message.command == p.W_CANCEL and message.route_key in self.held:  # nobody claims a kept stream
            out.append(CancelJob(self.held.pop(message.route_key).job))
        elif message.command in (p.W_CANCEL, p.W_CREDIT):
            job = self.jobs.get(message.route_key)
            if job is not None:
                out.append(CancelJob(job) if message.command == p.W_CANCEL else GrantCredit(job, message.credit))
        elif message.command == p.W_READ and message.read is not None:
            out.append(ServeRead(message.route_key, message.read))
        return out

    def on_broker_gone(self, now: float) -> list[Effect]:
        """The connection to the broker closed under us, or could not be made (nothing listens there): its process
        died. A registered worker goes to the other broker at once; so does one still connecting to a pair's broker
        (alone, the broker may be restarting: the connection keeps trying until the broker's heartbeats are due)."""
        self.now = now
        out: list[Effect] = []
        if self.phase is Phase.REGISTERED:
            log.warning("%s: the broker at %s is gone", self._name, self._endpoint)
        elif self.phase is Phase.CONNECTING and len(self.config.brokers) > 1:
            log.info("%s: nothing answers at %s", self._name, self._endpoint)
        else:
            return out
        self._flee()
        self._drop_connection(out, keep_streams=True)
        return out

    def on_job_finished(self, job: Job, body: bytes, now: float) -> list[Effect]:
        """A slot thread finished ``job`` with this FINAL body (after sending every chunk itself)."""
        self.now = now
        out: list[Effect] = []
        kept = self.held.get(job.stream_id) if job.stream_id is not None else None
        # Its key on this connection (a kept generation handed to a new broker has a new one); none: it belonged
        # to a connection that has ended.
        route_key = next((key for key, held in self.jobs.items() if held is job), None)
        if route_key is not None:
            del self.jobs[route_key]
            out.append(Send(p.worker_reply(True, route_key, [body])))
            self._exit_if_drained(out)
        elif kept is not None and kept.job is job:
            kept.final = body  # sent when its client asks for the stream again
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
        # Before the connection check: a stream kept while no broker is reachable expires all the same (its deadline
        # is in next_wakeup, which would otherwise come round again at once, forever).
        for stream, kept in list(self.held.items()):
            if now >= kept.until:  # its client never asked for it again
                del self.held[stream]
                out.append(CancelJob(kept.job))
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
                    self._endpoint,
                    self.config.broker_ttl,
                )
            else:
                log.warning(
                    "%s: the broker at %s was silent for %g s", self._name, self._endpoint, self.config.broker_ttl
                )
            self._flee()
            self._drop_connection(out, keep_streams=True)
            return out
        # Only once registered: a HEARTBEAT the broker reads between READY and the ATTACHes (its answer was slow)
        # would free the slots READY held for the kept streams (``kept``) before they are offered.
        if self.phase is Phase.REGISTERED and now >= self.next_heartbeat:
            out.append(SendHeartbeat(busy=len(self.jobs), draining=self.drain_deadline is not None))
            self.next_heartbeat = now + self.config.heartbeat_interval
        return out

    def next_wakeup(self) -> float:
        """The monotonic time by which ``tick`` must run next."""
        kept = min((k.until for k in self.held.values()), default=float("inf"))
        if self.phase is Phase.BACKING_OFF:
            return min(self.reconnect_at, kept)
        if not self._connected:
            return kept
        heartbeat = self.next_heartbeat if self.phase is Phase.REGISTERED else float("inf")
        wakeup = min(heartbeat, self.broker_expires, kept)
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

    @property
    def _endpoint(self) -> str:
        return self.config.brokers[self.endpoint]

    def _connect(self, out: list[Effect]) -> None:
        self.connection += 1
        self.phase = Phase.CONNECTING
        self.broker_expires = self.now + self.config.broker_ttl
        self.next_heartbeat = self.now + self.config.heartbeat_interval
        out.append(Connect(self.connection, self._endpoint))
        # How many of its slots run generations it kept: the broker holds them for the ATTACHes that follow.
        info = {**self.config.info, "kept": len(self.held)} if self.held else self.config.info
        out.append(Send(p.ready(self.config.service, info)))
        log.info("%s: connecting to the broker at %s", self._name, self._endpoint)

    def _register(self, epoch: int | None, out: list[Effect]) -> None:
        """The broker answered READY: offer it the generations kept since the last one died."""
        self.phase = Phase.REGISTERED
        self.failed_attempts = 0
        self.fled = None
        self.max_epoch = max(self.max_epoch, epoch or 0)
        log.info(
            "%s: registered for %s with %d slot(s) at %s%s",
            self._name,
            self.config.service,
            self.config.slots,
            self._endpoint,
            f" (epoch {epoch})" if epoch else "",
        )
        out.extend(Send(p.attach(stream)) for stream in self.held)

    def _accept(self, route_key: bytes, body: list[bytes], out: list[Effect]) -> None:
        try:
            request = request_from_body(body)
            self._check_kind(request)
        except BadRequest as exc:
            out.append(Send(p.worker_reply(True, route_key, [p.error_body(p.BAD_REQUEST, str(exc))])))
            return
        if isinstance(request, GenerationRequest) and request.stream in self.held:
            kept = self.held.pop(request.stream)
            if self._resume_kept(kept, route_key, request, out):
                return
            out.append(CancelJob(kept.job))  # it cannot go on where the client is: a new generation does
        previous = self.jobs.get(route_key)
        if previous is not None:  # the broker never reuses a key on one connection: a bug, but never two jobs
            log.warning("%s: the broker sent route key %s twice; cancelling the first", self._name, route_key.hex())
            out.append(CancelJob(previous))
        job = Job(route_key, request, self.connection)
        self.jobs[route_key] = job
        out.append(StartJob(job))

    def _resume_kept(self, kept: Kept, route_key: bytes, request: GenerationRequest, out: list[Effect]) -> bool:
        """The client of a kept generation asked for it again: it goes on where the client is. False if it cannot:
        the client's tokens are not this generation's. It has fewer than the generation started after (a broker
        resumed the stream here after tokens that died with it before they reached the client), or others (a broker
        moved the stream to another worker before it died, and the client has that worker's tokens: going on here
        would splice two different answers)."""
        job = kept.job
        # A generation that itself resumed a stream (a failover) sent only the tokens after its request's resume
        # tokens: of its own, the client has those beyond them.
        assert isinstance(job.request, GenerationRequest)
        started_after, has = list(job.request.resume_tokens), list(request.resume_tokens)
        delivered = len(has) - len(started_after)
        if delivered < 0:
            log.warning(
                "%s: a client asked for a kept stream after %d token(s), before the %d it resumed after: starting anew",
                self._name,
                len(has),
                len(started_after),
            )
            return False
        if has[: len(started_after)] != started_after or has[len(started_after) :] != job.sent_tokens()[:delivered]:
            log.warning(
                "%s: a client asked for a kept stream with tokens this generation did not make (the stream ran "
                "elsewhere meanwhile): starting anew from the client's",
                self._name,
            )
            return False
        out.append(Rebind(job, route_key, self.connection, delivered, request.window or 0))
        if kept.final is not None:
            out.append(Send(p.worker_reply(True, route_key, [kept.final])))
            return True
        self.jobs[route_key] = job
        return True

    def _check_kind(self, request: GenerationRequest | EmbeddingRequest) -> None:
        """The broker sends each kind of request only to workers of that kind; this catches one that did not."""
        embeddings = self.config.capability == p.EMBEDDINGS
        if isinstance(request, EmbeddingRequest) != embeddings:
            serves = "serves embeddings only" if embeddings else "does not serve embeddings"
            raise BadRequest(f"this worker of {self.config.service} {serves}")

    def _on_disconnect(self, refusal: tuple[int, str] | None, out: list[Effect]) -> None:
        if refusal is not None and refusal[0] in FATAL_REFUSALS:
            self._stop(out, f"the broker at {self._endpoint} refused this worker: {refusal[1]}", leave=False)
            return
        if refusal is not None and refusal[0] == p.NOT_ACTIVE:
            if self._other_fled():
                log.info(
                    "%s: the broker at %s is not active yet (the other is gone): asking again in %g s",
                    self._name,
                    self._endpoint,
                    p.PASSIVE_RETRY,
                )
                self._drop_connection(out, again_in=p.PASSIVE_RETRY)
                return
            log.info("%s: the broker at %s is not the active one of its pair", self._name, self._endpoint)
        elif self.phase is Phase.CONNECTING:
            why = f": {refusal[1]}" if refusal is not None else ""
            log.warning("%s: the broker refused the registration%s", self._name, why)
        else:
            log.warning("%s: the broker asked us to register again", self._name)
        # A broker that asks a registered worker to register again is a new one (a restart, the other of a pair):
        # what the worker was generating is kept for the clients that will ask the new broker for it.
        self._drop_connection(out, keep_streams=self.phase is Phase.REGISTERED)

    def _flee(self) -> None:
        """The broker this worker was registered with died (or went silent): remember it, so that the other broker
        of the pair, which may not have noticed yet, is asked again rather than this one. A broker never reached
        (not started yet, say) is no such news: the other may rightly be passive."""
        if len(self.config.brokers) > 1 and self.phase is Phase.REGISTERED:
            self.fled = (self.endpoint, self.now)

    def _other_fled(self) -> bool:
        """The broker of the pair this worker is not connecting to was left for dead a moment ago (within a
        heartbeat timeout, the longest the passive one can take to see the same)."""
        return (
            self.fled is not None and self.fled[0] != self.endpoint and self.now - self.fled[1] < self.config.broker_ttl
        )

    def _drop_connection(self, out: list[Effect], keep_streams: bool = False, again_in: float | None = None) -> None:
        """End the connection without a DISCONNECT (the broker already dropped us or cannot hear us) and try the
        next endpoint: at once after a registered connection, and at once while a pair's other broker is untried;
        exponentially later (with jitter) after each round of attempts that got no answer. ``keep_streams``: its
        broker died, so generations with a stream id go on (``held``) for clients to find again. ``again_in``: try
        the same endpoint again after this many seconds instead."""
        registered = self.phase is Phase.REGISTERED
        if keep_streams:
            self._keep_streams(out)
        self._orphan_jobs(out)
        out.append(Close(flush=False))
        self.phase = Phase.WAITING_SIDECAR
        if again_in is None:
            self.endpoint = (self.endpoint + 1) % len(self.config.brokers)
        if self._exit_if_stopping(out) or not self.sidecar_healthy:
            return
        delay = 0.0
        if again_in is not None:
            delay = again_in
        elif not registered:
            self.failed_attempts += 1
            rounds = self.failed_attempts // len(self.config.brokers)  # the other broker of a pair is tried at once
            if rounds:
                doubled = self.config.heartbeat_interval * 2 ** (rounds - 1)
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

    def _keep_streams(self, out: list[Effect]) -> None:
        for route_key, job in list(self.jobs.items()):
            stream = job.stream_id
            if stream is not None and stream not in self.held:
                del self.jobs[route_key]
                self.held[stream] = Kept(job, self.now + self.config.hold_streams)

    def _orphan_jobs(self, out: list[Effect]) -> None:
        """Requests of a connection that ends can no longer be answered on it: stop them and forget them."""
        out.extend(CancelJob(job) for job in self.jobs.values())
        self.jobs.clear()

    def _stop(self, out: list[Effect], failure: str | None, leave: bool = True) -> None:
        if self.phase is Phase.STOPPED:
            return
        out.extend(CancelJob(kept.job) for kept in self.held.values())
        self.held.clear()
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
