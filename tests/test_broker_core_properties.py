"""Stateful property tests of BrokerCore: random sequences of worker, client and clock events.

Two independent checks run on every step:

* a *model* of the broker (workers, their held route keys, per-service FIFO queues, deadlines, health) predicts
  the exact multiset of messages the core must send; error FINALs are compared by their error code only. The
  route keys a worker holds are the ones in the REQUEST messages it was sent (the comparison guarantees it), and
  the PARTIAL/FINAL rules reply only for those;
* a *client ledger*, fed only by what the core actually sent, checks the client-visible guarantees: every accepted
  request gets exactly one FINAL, nothing reaches a client for a request after its FINAL, no PARTIAL is delivered
  twice, and an XREQUEST retry never creates a second request.

Every peer speaks a framing of its own (18/MDP, with a leading empty frame, majortomo's client framing, 7/MDP), and
the model expects every message in the framing of the peer it goes to: a 7/MDP client gets a stream as one REPLY.

The core is driven only through its public methods. At teardown every worker disconnects and the clock passes
every timeout: all of the core's tables must then be empty.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qmesh.broker.core import BrokerConfig, BrokerCore
from qmesh.common import protocol as p

Outgoing = tuple[bytes, list[bytes]]

CONFIG = BrokerConfig(heartbeat_interval=1.0, liveness=3, max_queue=3, queue_timeout=4.0)
WORKERS = [b"w0", b"w1", b"w2"]
XCLIENTS = [b"cx0", b"cx1"]  # send XREQUEST and CANCEL
PCLIENTS = [b"cp0", b"cp1", b"cp2"]  # plain: send REQUEST only
DELIMITED = p.Framing(delimited=True)
OLD = p.Framing(p.Dialect.MDP01, delimited=True)
FRAMINGS = {
    b"w0": p.MDP02,
    b"w1": DELIMITED,
    b"w2": OLD,  # 7/MDP: one slot, no extensions, one REPLY per request
    b"cx0": p.MDP02,
    b"cx1": DELIMITED,
    b"cp0": p.MDP02,
    b"cp1": p.Framing(p.Dialect.MAJORTOMO, delimited=True),
    b"cp2": OLD,
}
STRANGER = b"stranger"
CLIENTS = XCLIENTS + PCLIENTS
REQUEST_IDS = [b"r0", b"r1", b"r2"]
WORKER_SERVICES = ["a", "a", "b"]  # repeated: more workers share "a", so dispatch has choices
REQUEST_SERVICES = ["a", "a", "b", "c"]  # "c" never has a worker
FAKE_KEY = b"\xff" * 8

# ------------------------------------------------------------------------------------------------ helpers


def is_malformed(frames: list[bytes]) -> bool:
    try:
        p.parse_inbound(frames)
    except p.ProtocolError:
        return True
    return False


def error_code(frame: bytes) -> int | None:
    """The code of an error body, or None when ``frame`` is not one."""
    try:
        body = p.unpack(frame)
    except p.ProtocolError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def normalize(out: list[Outgoing]) -> list[tuple[bytes, tuple[bytes, ...]]]:
    """Sorted, with every error FINAL's body reduced to its code, so message texts do not matter."""
    result = []
    for identity, frames in out:
        frames = list(frames)
        if identity in CLIENTS and frames and (code := error_code(frames[-1])) is not None:  # in any framing
            frames[-1] = b"error %d" % code
        result.append((identity, tuple(frames)))
    return sorted(result)


def error_final(client: bytes, service: str, request_id: bytes | None, code: int) -> Outgoing:
    return client, p.client_reply(True, service, request_id, [p.error_body(code, "")], FRAMINGS[client])


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class ModelRequest:
    key: bytes
    client: bytes
    request_id: bytes | None
    service: str
    body: list[bytes]
    deadline: float
    worker: bytes | None = None
    streamed: bool = False
    closed: bool = False  # cancelled or abandoned while a worker runs it: the client has had its last message
    held: list[bytes] = field(default_factory=list)  # PARTIALs for a 7/MDP client, which come with its FINAL


@dataclass
class ModelWorker:
    identity: bytes
    service: str
    slots: int
    extended: bool
    name: str
    expires_at: float
    health: float = 1.0
    held: set[bytes] = field(default_factory=set)


@dataclass
class Ledger:
    """What clients saw. Streams: ``(client, request_id)`` for XREQUEST, ``(client, None, service)`` for REQUEST."""

    open: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    partial_tags: set[bytes] = field(default_factory=set)
    finals: int = 0
    accepted: int = 0
    abandoned: int = 0

    @staticmethod
    def stream(client: bytes, request_id: bytes | None, service: str) -> tuple[Any, ...]:
        if request_id is not None:
            return (client, request_id)
        if FRAMINGS[client].dialect is p.Dialect.MAJORTOMO:
            return (client, None)  # its replies name no service
        return (client, None, service)

    def accept(self, client: bytes, request_id: bytes | None, service: str) -> None:
        stream = self.stream(client, request_id, service)
        if request_id is not None:
            assert self.open[stream] == 0, f"a second request was created for {stream}"
        self.open[stream] += 1
        self.accepted += 1

    def abandon(self, client: bytes) -> None:
        for stream in [s for s in self.open if s[0] == client]:
            self.abandoned += self.open.pop(stream)

    def observe(self, out: list[Outgoing], rejected: bytes | None = None) -> None:
        """Check the client messages of one step, in the order the core sent them."""
        for identity, frames in out:
            if identity not in CLIENTS:
                p.parse_for_worker(frames, FRAMINGS[identity])  # everything sent to a worker is well formed
                continue
            message = p.parse_for_client(frames, identity in XCLIENTS, FRAMINGS[identity])
            if identity == rejected:
                assert message.command == p.C_FINAL, "a rejected request gets only its FINAL"
                rejected = None
                continue
            stream = self.stream(identity, message.request_id, message.service)
            assert self.open[stream] > 0, f"{message} sent for {stream} with no open request (after its FINAL?)"
            if message.command == p.C_PARTIAL:
                (tag,) = message.body
                assert tag not in self.partial_tags, f"PARTIAL {tag!r} delivered twice"
                self.partial_tags.add(tag)
            elif message.command == p.C_FINAL:
                if FRAMINGS[identity].dialect is p.Dialect.MDP01:  # the PARTIALs held back come first
                    for tag in message.body[:-1]:
                        assert tag not in self.partial_tags, f"PARTIAL {tag!r} delivered twice"
                        self.partial_tags.add(tag)
                self.open[stream] -= 1
                if not self.open[stream]:
                    del self.open[stream]
                self.finals += 1
        assert rejected is None, "the rejected request got no FINAL"


class BrokerMachine(RuleBasedStateMachine):
    """Random events against BrokerCore, checked against a model and a client ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.core = BrokerCore(copy.copy(CONFIG), now=0.0)
        self.now = 0.0
        self.next_heartbeat = CONFIG.heartbeat_interval
        self.workers: dict[bytes, ModelWorker] = {}
        self.requests: dict[bytes, ModelRequest] = {}
        self.queues: dict[str, list[bytes]] = {}
        self.known: set[str] = set()
        self.ledger = Ledger()
        self.tags = count()

    @initialize(
        fleet=st.lists(
            st.tuples(st.sampled_from(WORKER_SERVICES), st.integers(1, 3), st.booleans()),
            max_size=len(WORKERS),
        )
    )
    def start(self, fleet: list[tuple[str, int, bool]]) -> None:
        """Start with a few registered workers, so that requests meet workers early."""
        self.core.check_invariants()
        for identity, (service, slots, extended) in zip(WORKERS, fleet, strict=False):
            self.worker_ready(identity, service, slots, extended)

    # ----------------------------------------------------------------------------------- model operations

    def _tag(self, kind: str) -> bytes:
        return f"{kind}-{next(self.tags)}".encode()

    def _status(self, request: ModelRequest) -> dict[str, Any]:
        if request.worker is None:
            return {"state": "queued", "position": self.queues[request.service].index(request.key) + 1}
        return {"state": "dispatched", "worker": self.workers[request.worker].name}

    def _dispatch(self, service: str, expected: list[Outgoing]) -> None:
        """FIFO over the queue; least loaded worker (in registration order), healthiest on a tie."""
        queue = self.queues.get(service, [])
        while queue:
            free = [w for w in self.workers.values() if w.service == service and len(w.held) < w.slots]
            if not free:
                break
            best = min(free, key=lambda w: (len(w.held) / w.slots, -w.health))
            request = self.requests[queue.pop(0)]
            request.worker = best.identity
            best.held.add(request.key)
            expected.append((best.identity, p.worker_request(request.key, request.body, FRAMINGS[best.identity])))
            if request.request_id is not None:
                status = p.client_status(service, request.request_id, self._status(request), FRAMINGS[request.client])
                expected.append((request.client, status))
        if not queue:
            self.queues.pop(service, None)

    def _finish(self, request: ModelRequest, expected: list[Outgoing], body: list[bytes] | None) -> None:
        """The request leaves the broker; ``body`` is its FINAL to the client, None for no FINAL."""
        del self.requests[request.key]
        if request.worker is not None and request.worker in self.workers:
            self.workers[request.worker].held.discard(request.key)
        if body is not None:
            assert not request.closed, "model error: a FINAL after the last message"
            expected.append(self._final(request, body))

    @staticmethod
    def _final(request: ModelRequest, body: list[bytes]) -> Outgoing:
        framing = FRAMINGS[request.client]
        return request.client, p.client_reply(True, request.service, request.request_id, request.held + body, framing)

    def _error(self, request: ModelRequest, expected: list[Outgoing], code: int) -> None:
        self._finish(request, expected, [p.error_body(code, "")])

    def _remove_worker(self, identity: bytes, expected: list[Outgoing]) -> None:
        worker = self.workers.pop(identity)
        requeue = []
        for key in worker.held:
            request = self.requests[key]
            request.worker = None
            if request.closed:
                self._finish(request, expected, None)
            elif request.streamed:
                self._error(request, expected, p.WORKER_FAILED)
            else:
                requeue.append(key)
        queue = self.queues.setdefault(worker.service, [])
        for key in sorted(requeue, reverse=True):
            self.requests[key].deadline = self.now + CONFIG.queue_timeout
            queue.insert(0, key)
        self._dispatch(worker.service, expected)
        for key in requeue:  # the ones still waiting hear their new queue position
            request = self.requests[key]
            if request.worker is None and request.request_id is not None:
                framing = FRAMINGS[request.client]
                status = p.client_status(request.service, request.request_id, self._status(request), framing)
                expected.append((request.client, status))

    def _cancel(self, request: ModelRequest, notify: bool, expected: list[Outgoing]) -> None:
        if request.worker is None:
            self.queues[request.service].remove(request.key)
            if not self.queues[request.service]:
                del self.queues[request.service]
            self._finish(request, expected, [p.error_body(p.CANCELLED, "")] if notify else None)
            return
        if request.closed:
            return
        if notify:
            self._error_keep(request, expected)
        request.closed = True
        worker = self.workers[request.worker]
        if worker.extended:
            expected.append((worker.identity, p.worker_cancel(request.key, FRAMINGS[worker.identity])))

    def _error_keep(self, request: ModelRequest, expected: list[Outgoing]) -> None:
        """A 499 FINAL for a request that stays on its worker until the worker's FINAL."""
        expected.append(self._final(request, [p.error_body(p.CANCELLED, "")]))

    def _open_request(self, client: bytes, request_id: bytes) -> ModelRequest | None:
        for request in self.requests.values():
            if request.client == client and request.request_id == request_id and not request.closed:
                return request
        return None

    # ----------------------------------------------------------------------------------- checking a step

    def _check(self, out: list[Outgoing], expected: list[Outgoing], rejected: bytes | None = None) -> None:
        self.core.check_invariants()
        assert normalize(out) == normalize(expected), "the core's messages differ from the model's"
        self.ledger.observe(out, rejected)

    def _worker_message(self, identity: bytes, frames: list[bytes]) -> tuple[list[Outgoing], list[Outgoing]]:
        """Send a worker's message; returns (actual, expected) for messages other than READY."""
        out = self.core.on_message(identity, frames, self.now)
        expected: list[Outgoing] = []
        worker = self.workers.get(identity)
        disconnect = isinstance(p.parse_inbound(frames), p.WorkerDisconnect)
        if worker is None:
            if not disconnect:
                expected.append((identity, p.disconnect(framing=FRAMINGS[identity])))
            return out, expected
        if disconnect:
            self._remove_worker(identity, expected)
            return out, expected
        worker.expires_at = self.now + CONFIG.worker_ttl
        return out, expected

    # ----------------------------------------------------------------------------------- worker rules

    @rule(
        identity=st.sampled_from(WORKERS),
        service=st.sampled_from(WORKER_SERVICES),
        slots=st.integers(1, 3),
        extended=st.booleans(),
    )
    def worker_ready(self, identity: bytes, service: str, slots: int, extended: bool) -> None:
        """READY: registers a new worker; a second READY gets DISCONNECT and removal."""
        framing = FRAMINGS[identity]
        extended = extended and framing.dialect is p.Dialect.MDP02  # a 7/MDP READY has no info
        info = {"slots": slots, "name": f"{identity.decode()}-{service}"} if extended else None
        out = self.core.on_message(identity, p.ready(service, info, framing), self.now)
        expected: list[Outgoing] = []
        if identity in self.workers:
            self._remove_worker(identity, expected)
            expected.append((identity, p.disconnect(framing=framing)))
        else:
            self.workers[identity] = ModelWorker(
                identity=identity,
                service=service,
                slots=slots if extended else 1,
                extended=extended,
                name=info["name"] if info else identity.hex(),
                expires_at=self.now + CONFIG.worker_ttl,
            )
            self.known.add(service)
            expected.append((identity, p.heartbeat(framing=framing)))
            self._dispatch(service, expected)
        self._check(out, expected)

    def worker_ready_mmi(self, identity: bytes) -> None:
        """READY for a reserved mmi.* service: DISCONNECT (and removal if it was registered)."""
        out = self.core.on_message(identity, p.ready("mmi.service", framing=FRAMINGS[identity]), self.now)
        expected: list[Outgoing] = []
        if identity in self.workers:
            self._remove_worker(identity, expected)
        expected.append((identity, p.disconnect(framing=FRAMINGS[identity])))
        self._check(out, expected)

    @rule(identity=st.sampled_from(WORKERS), health=st.sampled_from([None, 0.0, 0.25, 0.5, 1.0, 2.0]))
    def worker_heartbeat(self, identity: bytes, health: float | None) -> None:
        framing = FRAMINGS[identity]
        load = None if health is None or framing.dialect is p.Dialect.MDP01 else {"health": health}
        out, expected = self._worker_message(identity, p.heartbeat(load, framing))
        if identity in self.workers and load is not None:
            self.workers[identity].health = min(1.0, max(0.0, health))
        self._check(out, expected)

    @precondition(lambda self: self.workers)
    @rule(pick=st.integers(0, 63), health=st.sampled_from([0.0, 0.3, 0.6, 1.0]))
    def live_worker_heartbeat(self, pick: int, health: float) -> None:
        """A registered worker reports its health, which breaks dispatch ties."""
        identities = list(self.workers)
        self.worker_heartbeat(identities[pick % len(identities)], health)

    def _held(self) -> list[tuple[bytes, bytes]]:
        return sorted((w.identity, key) for w in self.workers.values() for key in w.held)

    @precondition(lambda self: any(w.held for w in self.workers.values()))
    @rule(pick=st.integers(0, 63), final=st.booleans())
    def worker_reply(self, pick: int, final: bool) -> None:
        """A PARTIAL or a FINAL for a request the worker holds (FINALs get a second rule, to be more frequent)."""
        if final:
            self.worker_final(pick)
        else:
            self.worker_partial(pick)

    def worker_partial(self, pick: int) -> None:
        """A PARTIAL for a request the worker holds: forwarded unless the client already has its FINAL, or held
        for the FINAL of a 7/MDP client. A 7/MDP worker has no PARTIAL: it sends its REPLY (a FINAL)."""
        held = [(w, key) for w, key in self._held() if FRAMINGS[w].dialect is not p.Dialect.MDP01]
        if not held:
            self.worker_final(pick)
            return
        identity, key = held[pick % len(held)]
        tag = self._tag("partial")
        out, expected = self._worker_message(identity, p.worker_reply(False, key, [tag], FRAMINGS[identity]))
        request = self.requests[key]
        if not request.closed:
            request.streamed = True
            framing = FRAMINGS[request.client]
            if framing.dialect is p.Dialect.MDP01:
                request.held.append(tag)
            else:
                reply = p.client_reply(False, request.service, request.request_id, [tag], framing)
                expected.append((request.client, reply))
        self._check(out, expected)

    @precondition(lambda self: any(w.held for w in self.workers.values()))
    @rule(pick=st.integers(0, 63))
    def worker_final(self, pick: int) -> None:
        """A FINAL for a request the worker holds: forwarded unless cancelled; the slot takes the next request."""
        held = self._held()
        identity, key = held[pick % len(held)]
        tag = self._tag("final")
        out, expected = self._worker_message(identity, p.worker_reply(True, key, [tag], FRAMINGS[identity]))
        request = self.requests[key]
        self._finish(request, expected, None if request.closed else [tag])
        self._dispatch(self.workers[identity].service, expected)
        self._check(out, expected)

    @rule(identity=st.sampled_from(WORKERS), pick=st.integers(0, 63), final=st.booleans())
    def worker_stray_reply(self, identity: bytes, pick: int, final: bool) -> None:
        """A reply for a route key the sender does not hold (another worker's, a queued one, a made-up one)."""
        keys = sorted(k for k, r in self.requests.items() if r.worker != identity) + [FAKE_KEY]
        key = keys[pick % len(keys)]
        framing = FRAMINGS[identity]
        final = final or framing.dialect is p.Dialect.MDP01
        out, expected = self._worker_message(identity, p.worker_reply(final, key, [self._tag("stray")], framing))
        self._check(out, expected)

    def worker_disconnect(self, identity: bytes) -> None:
        out, expected = self._worker_message(identity, p.disconnect(framing=FRAMINGS[identity]))
        self._check(out, expected)

    def worker_unreachable(self, identity: bytes) -> None:
        out = self.core.on_unreachable(identity, self.now)
        expected: list[Outgoing] = []
        if identity in self.workers:
            self._remove_worker(identity, expected)
        self._check(out, expected)

    @precondition(lambda self: self.workers)
    @rule(identity=st.sampled_from(WORKERS), how=st.sampled_from(["disconnect", "unreachable", "mmi-ready"]))
    def worker_leaves(self, identity: bytes, how: str) -> None:
        """A worker (registered or not) sends DISCONNECT, is found unreachable, or breaks the protocol."""
        if how == "disconnect":
            self.worker_disconnect(identity)
        elif how == "unreachable":
            self.worker_unreachable(identity)
        else:
            self.worker_ready_mmi(identity)

    # ----------------------------------------------------------------------------------- client rules

    def _client_request(self, client: bytes, service: str, request_id: bytes | None) -> None:
        body = [self._tag("request")]
        before = set(self.core.requests)
        sent = p.client_request(service, body, request_id, framing=FRAMINGS[client])
        out = self.core.on_message(client, sent, self.now)
        created = set(self.core.requests) - before
        expected: list[Outgoing] = []
        if request_id is not None and (duplicate := self._open_request(client, request_id)) is not None:
            assert not created, "a retried XREQUEST created a second request"
            status = p.client_status(duplicate.service, request_id, self._status(duplicate), FRAMINGS[client])
            self._check(out, [(client, status)])
            return
        if service not in self.known and self.workers:
            assert not created
            self._check(out, [error_final(client, service, request_id, p.UNKNOWN_MODEL)], rejected=client)
            return
        if len(self.queues.get(service, [])) >= CONFIG.max_queue:
            assert not created
            self._check(out, [error_final(client, service, request_id, p.QUEUE_FULL)], rejected=client)
            return
        assert len(created) == 1, f"expected one new request, got {len(created)}"
        (key,) = created
        request = ModelRequest(key, client, request_id, service, body, self.now + CONFIG.queue_timeout)
        self.requests[key] = request
        self.queues.setdefault(service, []).append(key)
        self.ledger.accept(client, request_id, service)
        self._dispatch(service, expected)
        if request.worker is None and request_id is not None:
            expected.append((client, p.client_status(service, request_id, self._status(request), FRAMINGS[client])))
        self._check(out, expected)

    @rule(client=st.sampled_from(XCLIENTS), service=st.sampled_from(REQUEST_SERVICES), rid=st.sampled_from(REQUEST_IDS))
    def client_xrequest(self, client: bytes, service: str, rid: bytes) -> None:
        self._client_request(client, service, rid)

    @rule(client=st.sampled_from(PCLIENTS), service=st.sampled_from(REQUEST_SERVICES))
    def client_plain_request(self, client: bytes, service: str) -> None:
        self._client_request(client, service, None)

    @rule(client=st.sampled_from(XCLIENTS), rid=st.sampled_from(REQUEST_IDS))
    def client_cancel(self, client: bytes, rid: bytes) -> None:
        """CANCEL: 499 to the client; a running request's extended worker gets CANCEL and keeps the slot."""
        out = self.core.on_message(client, p.client_cancel(rid, FRAMINGS[client]), self.now)
        expected: list[Outgoing] = []
        request = self._open_request(client, rid)
        if request is not None:
            self._cancel(request, True, expected)
        self._check(out, expected)

    def _open_extended(self) -> list[ModelRequest]:
        return [r for _, r in sorted(self.requests.items()) if r.request_id is not None and not r.closed]

    @precondition(lambda self: self._open_extended())
    @rule(pick=st.integers(0, 63))
    def client_cancel_open(self, pick: int) -> None:
        """CANCEL of a request that is open (queued or running): the interesting case, made frequent."""
        candidates = self._open_extended()
        request = candidates[pick % len(candidates)]
        self.client_cancel(request.client, request.request_id)  # type: ignore[arg-type]

    @rule(client=st.sampled_from(CLIENTS))
    def client_unreachable(self, client: bytes) -> None:
        """The client is gone: its requests end without any reply; running ones are cancelled on their worker."""
        out = self.core.on_unreachable(client, self.now)
        expected: list[Outgoing] = []
        for request in [r for r in self.requests.values() if r.client == client and not r.closed]:
            self._cancel(request, False, expected)
        assert client not in {who for who, _ in out}, "an unreachable client was sent a message"
        self.ledger.abandon(client)
        self._check(out, expected)

    @rule(client=st.sampled_from(CLIENTS), service=st.sampled_from(WORKER_SERVICES))
    def client_mmi_service(self, client: bytes, service: str) -> None:
        """mmi.service answers 200 only while a live worker serves the name."""
        rid = b"mmi" if client in XCLIENTS else None
        framing = FRAMINGS[client]
        asked = p.client_request("mmi.service", [service.encode()], rid, framing=framing)
        out = self.core.on_message(client, asked, self.now)
        live = any(w.service == service for w in self.workers.values())
        expected = [(client, p.client_reply(True, "mmi.service", rid, [b"200" if live else b"404"], framing))]
        self._check(out, expected, rejected=client)

    # ----------------------------------------------------------------------------------- clock and garbage

    def _advance(self, dt: float) -> None:
        self.now += dt
        assert self.core.next_wakeup() <= self._next_wakeup(), "a deadline would be missed"  # early: a spare tick
        out = self.core.tick(self.now)
        expected: list[Outgoing] = []
        if self.now >= self.next_heartbeat:
            self.next_heartbeat = self.now + CONFIG.heartbeat_interval
            expected.extend((identity, p.heartbeat(framing=FRAMINGS[identity])) for identity in self.workers)
        for identity in [w.identity for w in self.workers.values() if w.expires_at <= self.now]:
            self._remove_worker(identity, expected)
        for service, queue in list(self.queues.items()):
            for key in [k for k in queue if self.requests[k].deadline <= self.now]:
                queue.remove(key)
                self._error(self.requests[key], expected, p.QUEUE_TIMEOUT)
            if not queue:
                del self.queues[service]
        self._check(out, expected)

    def _next_wakeup(self) -> float:
        deadlines = [self.requests[k].deadline for queue in self.queues.values() for k in queue]
        return min([self.next_heartbeat, *deadlines])

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]))
    def advance_clock(self, dt: float) -> None:
        self._advance(dt)

    @rule(
        identity=st.sampled_from(WORKERS + CLIENTS + [STRANGER]),
        frames=st.lists(
            st.sampled_from(
                [p.CLIENT, p.WORKER, p.CLIENT_01, p.WORKER_01, b"", b"\x00", b"\xc1", b"a", b"mmi.x", b"\x01", b"\x02"]
                + [b"\x03", b"\x04"]
                + [b"\x05", b"\x06", b"\x07", b"\x11", b"\x12", b"\x14", p.pack({"slots": 2}), p.pack([1])]
            )
            | st.binary(max_size=8),
            max_size=6,
        ).filter(is_malformed),
    )
    def garbage(self, identity: bytes, frames: list[bytes]) -> None:
        """A malformed message is dropped: no output and no state change."""
        before = copy.deepcopy((self.core.workers, self.core.requests, self.core.services, self.core.client_requests))
        out = self.core.on_message(identity, frames, self.now)
        assert out == []
        after = (self.core.workers, self.core.requests, self.core.services, self.core.client_requests)
        assert after == before
        self._check(out, [])

    # ----------------------------------------------------------------------------------- invariants

    @invariant()
    def tables_agree_with_model(self) -> None:
        self.core.check_invariants()
        assert set(self.core.requests) == set(self.requests)
        table = self.core.worker_table()
        assert len(table) == len(self.workers) == len(self.core.workers)
        names = [w["name"] for w in table]
        assert len(set(names)) == len(names), "a worker is registered twice"
        listed = [identity for service in self.core.services.values() for identity in service.workers]
        assert sorted(listed) == sorted(self.core.workers), "a worker is listed twice or in the wrong place"
        for row in table:
            assert 0 <= row["busy"] <= row["slots"], f"credit out of range: {row}"
        for identity, worker in self.workers.items():
            assert self.core.workers[identity].active == worker.held
        expected_services = {}
        for name in sorted({w.service for w in self.workers.values()} | set(self.queues)):
            workers = [w for w in self.workers.values() if w.service == name]
            expected_services[name] = {
                "workers": len(workers),
                "slots": sum(w.slots for w in workers),
                "busy": sum(len(w.held) for w in workers),
                "queued": len(self.queues.get(name, [])),
                "capabilities": ["chat"] if workers else [],  # every worker here is a chat worker
                "by_capability": {
                    "chat": {
                        "workers": len(workers),
                        "slots": sum(w.slots for w in workers),
                        "busy": sum(len(w.held) for w in workers),
                    }
                }
                if workers
                else {},
            }
        assert self.core.service_table() == expected_services

    @invariant()
    def every_request_is_accounted_for(self) -> None:
        live = sum(1 for r in self.requests.values() if not r.closed)
        assert sum(self.ledger.open.values()) == live
        assert self.ledger.accepted == self.ledger.finals + self.ledger.abandoned + live

    def teardown(self) -> None:
        """Every worker leaves, every timeout passes: nothing may be left behind, every client got its FINAL."""
        for identity in list(self.workers):
            self.worker_disconnect(identity)
        self._advance(CONFIG.queue_timeout + CONFIG.worker_ttl + 1.0)
        assert self.core.requests == {}
        assert self.core.workers == {}
        assert self.core.client_requests == {}
        assert self.core.services == {}
        assert not self.ledger.open, f"requests without a FINAL: {dict(self.ledger.open)}"
        assert self.ledger.accepted == self.ledger.finals + self.ledger.abandoned


BrokerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
TestBrokerCoreStateful = BrokerMachine.TestCase
