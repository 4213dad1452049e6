"""The broker's decisions, with no sockets: a state machine fed events and the current monotonic time.

Every public method takes an event (a message from a peer, a peer found unreachable, the clock) and returns the
messages to send as ``(routing_id, frames)`` pairs. The socket loop in ``broker.loop`` only moves bytes, so
everything here is unit-tested and fuzzed directly.

Bookkeeping lives in three tables kept consistent by a few small methods (``_assign``, ``_finish``,
``_remove_worker``): ``workers`` (routing id -> WorkerState), ``requests`` (route key -> RequestState) and
``services`` (name -> ServiceState: its workers and its FIFO queue). A request is always in exactly one of two
places: a service queue (``worker is None``) or one worker's ``active`` set.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from qmesh.broker.routing import POLICIES, TOKENS_PER_BLOCK, Candidate, PrefixIndex, RoutingConfig
from qmesh.broker.shards import ShardRegistry
from qmesh.broker.transfers import TransferConfig, Transfers
from qmesh.common import protocol as p
from qmesh.common.bodies import resume_body
from qmesh.common.prefix import split_hashes

log = logging.getLogger(__name__)

Outgoing = tuple[bytes, list[bytes]]

MAX_SLOTS_PER_WORKER = 1024
MAX_SESSIONS = 100_000  # sessions remembered (least recently used forgotten first)
DEFAULT_CONTEXT = 2048  # tokens per slot assumed for a worker that does not announce its context
RECENT_REQUESTS = 300  # ended requests mmi.requests keeps (the dashboard's table), oldest dropped first


@dataclass(slots=True)
class BrokerConfig:
    heartbeat_interval: float = 2.5  # seconds between heartbeats to each worker
    liveness: int = 3  # heartbeats a worker may miss before it is dead
    max_queue: int = 1000  # waiting requests per service
    queue_timeout: float = 60.0  # seconds a request may wait for a worker
    max_failovers: int = 2  # times a stream may move to another worker before it ends in 502
    max_request_bytes: int = 1024 * 1024  # request body size limit (413)
    max_client_requests: int = 256  # requests in flight per client connection (429)
    heartbeat_batch: int = 64  # heartbeats sent per tick; a larger round is spread over several loop turns
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    transfers: TransferConfig = field(default_factory=TransferConfig)  # models travelling through the broker
    attach_grace: float = 2.5  # seconds a stream sent again after a broker's death waits for the worker keeping it

    @property
    def worker_ttl(self) -> float:
        return self.heartbeat_interval * self.liveness


@dataclass(slots=True)
class WorkerState:
    identity: bytes
    service: str
    slots: int
    extended: bool
    name: str
    info: dict[str, Any]
    expires_at: float
    active: set[bytes] = field(default_factory=set)
    health: float = 1.0
    draining: bool = False
    load: dict[str, Any] = field(default_factory=dict)
    prefixes: PrefixIndex = field(default_factory=lambda: PrefixIndex(1))  # what its llama-server has cached
    prompt_tokens: int = 0  # prompt tokens of the requests it finished, and how many of those came from cache
    cached_tokens: int = 0
    capabilities: frozenset[str] = frozenset({p.CHAT})  # the kinds of request it serves (READY's info)
    framing: p.Framing = p.MDP02  # how it frames its commands, and so how the broker frames what it sends it
    attached: dict[bytes, float] = field(default_factory=dict)  # streams it kept running, offered (ATTACH): until
    # their clients ask for them again (or the time given here passes) they hold a slot each
    reserved: int = 0  # slots its READY said run streams it kept, held for the ATTACHes that follow
    key: str | None = None  # the CURVE key it registered with (None without authentication)

    @property
    def taken(self) -> int:
        """Slots its requests, the streams it keeps and those its READY announced hold."""
        return len(self.active) + len(self.attached) + self.reserved

    @property
    def free_slots(self) -> int:
        return 0 if self.draining else self.slots - self.taken


@dataclass(slots=True, frozen=True)
class Peer:
    """What an authenticated sender may do (CURVE on): act as a worker, as a client, serve which models."""

    name: str
    worker: bool
    client: bool
    models: frozenset[str] | None  # None: any model
    key: str | None = None  # its z85 public key: what a shard host's bridge admits (broker/shards.py)


@dataclass(slots=True, frozen=True)
class FinishedRequest:
    """What the metrics need to know about a request once its client has the FINAL."""

    model: str
    outcome: str  # "ok", or the error code ("504", "499", ...)
    queue_wait: float | None  # seconds from arrival to the first dispatch
    ttft: float | None  # seconds from arrival to the first chunk
    duration: float  # seconds from arrival to the end
    chunks: int
    prompt_tokens: int = 0  # as the worker's FINAL reports them, and how many came from its prompt cache
    cached_tokens: int = 0


@dataclass(slots=True, frozen=True)
class RecentRequest:
    """An ended request as ``mmi.requests`` reports it (the gateway's dashboard): times in seconds of the
    broker's monotonic clock, so a reader only ever sees differences."""

    seq: int  # 1, 2, ... in the order the requests ended: which records a reader has seen
    ended_at: float
    model: str
    worker: str | None  # the worker that held it when it ended; None if none did (queued, or its worker died)
    outcome: str  # as in FinishedRequest
    queue_wait: float | None
    ttft: float | None
    duration: float
    tokens: int  # the worker's count when its FINAL says (resumed tokens included), else the chunks delivered
    prompt_tokens: int
    cached_tokens: int
    failovers: int

    def as_map(self, now: float) -> dict[str, Any]:
        # Generation speed from the first token to the last: queueing and prompt evaluation are in ttft already.
        generating = self.duration - self.ttft if self.ttft is not None else 0.0
        speed = round((self.tokens - 1) / generating, 1) if self.tokens > 1 and generating > 0 else None
        return {
            "seq": self.seq,
            "ended_s_ago": round(max(0.0, now - self.ended_at), 3),
            "model": self.model,
            "worker": self.worker,
            "outcome": self.outcome,
            "queue_wait_s": _rounded(self.queue_wait),
            "ttft_s": _rounded(self.ttft),
            "duration_s": round(self.duration, 4),
            "tokens": self.tokens,
            "tokens_per_second": speed,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "failovers": self.failovers,
        }


@dataclass(slots=True)
class RequestState:
    key: bytes
    client: bytes
    request_id: bytes | None  # None for a plain MDP request
    service: str
    body: list[bytes]
    deadline: float  # when waiting in the queue ends in a 504
    received_at: float
    worker: bytes | None = None
    dispatched_at: float | None = None
    first_chunk_at: float | None = None
    chunks: int = 0  # PARTIALs delivered to the client (non-zero: a move elsewhere is a resume)
    cancelled: bool = False  # the client has its FINAL; we only wait for the worker to free the slot
    delivered: bytearray = field(default_factory=bytearray)  # PARTIAL bodies sent since the last (re)dispatch,
    # concatenated: about 25 bytes a token instead of ~65 for a list of bytes objects (decoded only on failover)
    partial_prefix: list[bytes] = field(default_factory=list)  # the frames before the body of a PARTIAL to the client
    framing: p.Framing = p.MDP02  # the client's: its replies are framed the same way
    held: list[bytes] | None = None  # a 7/MDP client's PARTIAL bodies, sent with the FINAL as its one REPLY
    failovers: int = 0
    prefix: list[bytes] = field(default_factory=list)  # the routing hint's prefix block hashes
    session: str | None = None
    predicted_blocks: int = 0  # prefix blocks the worker it went to was thought to hold
    capability: str = p.CHAT  # what it needs of a worker (its hint's; a request without one is a chat)
    stream: bytes | None = None  # the generation's name (its client's request id), when the client gives it
    attach_until: float = 0.0  # a stream sent again after a broker died waits until then for a worker keeping it


@dataclass(slots=True)
class ServiceState:
    workers: dict[bytes, None] = field(default_factory=dict)  # ordered set of routing ids
    queue: deque[bytes] = field(default_factory=deque)  # route keys, oldest first


class BrokerCore:
    def __init__(self, config: BrokerConfig | None = None, now: float = 0.0) -> None:
        self.config = config or BrokerConfig()
        self.workers: dict[bytes, WorkerState] = {}
        self.requests: dict[bytes, RequestState] = {}
        self.services: dict[str, ServiceState] = {}
        self.client_requests: dict[bytes, dict[bytes | None, set[bytes]]] = {}
        # Every service a worker ever served -> the kinds of request its workers served: both stay known while
        # the service has no worker (its metric label; a request of a kind it served waits rather than fails).
        self.known_services: dict[str, set[str]] = {}
        self.sessions: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (model, session) -> worker
        self._routing = self.config.routing
        self._policy = POLICIES[self._routing.policy]
        self.dropped_messages = 0
        self._last_drop_warning = float("-inf")
        self._worker_ttl = self.config.worker_ttl
        self._keys = count(1)
        self._next_heartbeat = now + self.config.heartbeat_interval
        self._heartbeat_round: deque[bytes] = deque()  # workers still owed this round's heartbeat
        self._now = now  # the time of the event being handled
        self._earliest_deadline = float("inf")  # of the queued requests; may be early (a spare tick), never late
        self.finished: deque[FinishedRequest] = deque(maxlen=100_000)  # drained by the metrics, if any
        self.recent: deque[RecentRequest] = deque(maxlen=RECENT_REQUESTS)  # read (not drained) by mmi.requests
        self._recent_seq = count(1)
        self.epoch = 0  # of the broker pair's last takeover (0: a broker without a peer): fences stale brokers
        self.pair_role: str | None = None  # "primary" or "backup" in a pair (set by its loop), for mmi.broker
        self.streams: dict[bytes, bytes] = {}  # stream id -> route key of the live request that names it
        self._next_stream_check = float("inf")  # the earliest attach wait or attached stream that runs out
        # Models travelling through the broker; paced harder while requests are in flight (their token streams).
        self.transfers = Transfers(self.config.transfers, busy=lambda: bool(self.requests))
        self.shards = ShardRegistry(self._worker_ttl)  # shard hosts and split workers' leases (issue 19)

    # ------------------------------------------------------------------------------------------ events

    def on_message(self, identity: bytes, frames: list[bytes], now: float, peer: Peer | None = None) -> list[Outgoing]:
        """A message arrived from ``identity``. Malformed ones are dropped and logged.

        ``peer`` is who sent it when the socket authenticates (None: no authentication): a key may only act in
        the roles its allow-list gives it, and a worker key may be limited to some models.
        """
        self._now = now
        lead = 0 if frames and frames[0] else 1  # a REQ-compatible peer's leading empty frame (majortomo's)
        if (
            peer is None
            and len(frames) > lead + 4
            and frames[lead + 1] == p.W_PARTIAL
            and frames[lead] == p.WORKER
            and not frames[lead + 3]
        ):
            # The message that dominates a busy mesh, handled without building a message object: a PARTIAL from
            # a registered worker for a request it holds. Anything else takes the general path below.
            worker = self.workers.get(identity)
            request = self.requests.get(frames[lead + 2]) if worker is not None else None
            if request is not None and request.worker == identity:
                worker.expires_at = now + self._worker_ttl
                out: list[Outgoing] = []
                self._forward_partial(request, frames[lead + 4 :], now, out)
                return out
        shards = self.shards  # a shard peer's messages go to its registry (two lookups and a frame check for others)
        if identity in shards.hosts or identity in shards.leases or p.is_shard_hello(frames):
            return shards.on_message(identity, frames, now, peer)
        try:
            message = p.parse_inbound(frames)
        except p.ProtocolError as exc:
            self.dropped_messages += 1
            if now - self._last_drop_warning >= 1.0:  # at most one line a second under a flood of garbage
                self._last_drop_warning = now
                log.warning(
                    "dropped malformed message from %s: %s (%d so far)", identity.hex(), exc, self.dropped_messages
                )
            return []
        if isinstance(message, p.TransferMessage):  # models travelling: rules of their own (broker.transfers)
            return self.transfers.on_message(identity, message, now, peer)
        out: list[Outgoing] = []
        if peer is not None and not self._authorized(identity, message, peer, now, out):
            return out
        if isinstance(message, p.ClientRequest):
            self._on_client_request(identity, message, now, out)
        elif isinstance(message, p.ClientCancel):
            self._on_client_cancel(identity, message.request_id, out)
        elif isinstance(message, p.ClientCredit):
            self._on_client_credit(identity, message, out)
        elif isinstance(message, p.WorkerReady):
            self._on_ready(identity, message, now, out, peer)
        else:
            self._on_worker_message(identity, message, now, out)
        return out

    def _authorized(
        self, identity: bytes, message: p.InboundMessage, peer: Peer, now: float, out: list[Outgoing]
    ) -> bool:
        if isinstance(message, p.ClientMessage):
            if peer.client:
                return True
            log.warning("refused a client message from key %s, which is not on the client list", peer.name)
            out.extend(self.on_unreachable(identity, now))
            if isinstance(message, p.ClientRequest):
                text = "this key is not on the broker's client allow-list"
                self._reject(identity, message.service, message.request_id, p.FORBIDDEN, text, out, message.framing)
            return False
        if not peer.worker:
            log.warning("dropped a worker message from key %s, which is not on the worker list", peer.name)
            reason = f"key {peer.name} is not on the broker's worker allow-list"
        elif isinstance(message, p.WorkerReady) and peer.models is not None and message.service not in peer.models:
            allowed = ", ".join(sorted(peer.models)) or "none"
            log.warning("key %s may not serve %r (allowed: %s)", peer.name, message.service, allowed)
            reason = f"key {peer.name} may not serve {message.service!r} (allowed: {allowed})"
        else:
            return True
        known = self.workers.get(identity)
        extended = known.extended if known is not None else isinstance(message, p.WorkerReady) and message.extended
        framing = known.framing if known is not None else message.framing
        self._remove_worker(identity, now, f"key {peer.name} not allowed", out)
        out.append((identity, p.disconnect((p.FORBIDDEN, reason) if extended else None, framing)))
        return False

    def on_unreachable(self, identity: bytes, now: float) -> list[Outgoing]:
        """A send to ``identity`` failed: the peer is gone. A worker is removed; a client's requests are cancelled."""
        self._now = now
        if identity in self.shards:
            return self.shards.on_unreachable(identity)
        out: list[Outgoing] = []
        if identity in self.workers:
            self._remove_worker(identity, now, "unreachable", out)
        else:
            keys = [key for keys in self.client_requests.get(identity, {}).values() for key in keys]
            for key in keys:
                self._cancel(self.requests[key], notify_client=False, out=out)
            out.extend(self.transfers.peer_gone(identity, now))
        return out

    def tick(self, now: float) -> list[Outgoing]:
        """Heartbeats, dead workers, queued requests past their deadline."""
        self._now = now
        out: list[Outgoing] = []
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval
            self._heartbeat_round = deque(self.workers)
            out.extend(self.shards.heartbeat_round(now))
        if self._heartbeat_round:
            self._send_heartbeats(out)
        for identity in [w.identity for w in self.workers.values() if w.expires_at <= now]:
            self._remove_worker(identity, now, "missed heartbeats", out)
        if now >= self._earliest_deadline:
            self._expire_queued(now, out)
        if now >= self._next_stream_check:
            self._check_streams(now, out)
        out.extend(self.transfers.tick(now))
        return out

    def next_wakeup(self) -> float:
        """The monotonic time by which ``tick`` must run next (called on every loop turn, so O(1)).

        While a heartbeat round is under way it is the last tick's time: the loop handles what is waiting, then
        ticks again at once.
        """
        if self._heartbeat_round:
            return self._now
        return min(self._next_heartbeat, self._earliest_deadline, self._next_stream_check, self.transfers.next_wakeup())

    def _send_heartbeats(self, out: list[Outgoing]) -> None:
        """Send the next batch of the round. One burst to a thousand workers would stall every stream for tens
        of milliseconds; in batches, the loop forwards the chunks that arrived in between."""
        pending, workers, beat = self._heartbeat_round, self.workers, p.heartbeat()
        for _ in range(min(self.config.heartbeat_batch, len(pending))):
            identity = pending.popleft()
            worker = workers.get(identity)
            if worker is not None:  # it may have left since the round began
                out.append((identity, beat if worker.framing == p.MDP02 else p.heartbeat(framing=worker.framing)))

    def _expire_queued(self, now: float, out: list[Outgoing]) -> None:
        for name, service in list(self.services.items()):
            for key in [k for k in service.queue if self.requests[k].deadline <= now]:
                service.queue.remove(key)
                capability = self.requests[key].capability
                served = any(capability in self.workers[w].capabilities for w in service.workers)
                waited = "every worker stayed busy" if served else "no worker serves it"
                message = f"no worker of model '{name}' took the request within {self.config.queue_timeout:g} s"
                message += f" ({waited})"
                self._finish(self.requests[key], out, p.error_body(p.QUEUE_TIMEOUT, message))
            self._prune(name)
        deadlines = (self.requests[k].deadline for service in self.services.values() for k in service.queue)
        self._earliest_deadline = min(deadlines, default=float("inf"))

    # ------------------------------------------------------------------------------------------ clients

    def _on_client_request(self, client: bytes, message: p.ClientRequest, now: float, out: list[Outgoing]) -> None:
        service_name, request_id, framing = message.service, message.request_id, message.framing
        if service_name.startswith(p.MMI_PREFIX):
            answer = self._mmi(service_name, message.body)
            out.append((client, p.client_reply(True, service_name, request_id, answer, framing)))
            return
        if request_id is not None and self.client_requests.get(client, {}).get(request_id):
            # A client resending a request that got no answer yet: the broker already has it.
            (key,) = self.client_requests[client][request_id]
            request = self.requests[key]
            out.append((client, p.client_status(request.service, request_id, self._status(request), framing)))
            return
        size = sum(len(frame) for frame in message.body)
        if size > self.config.max_request_bytes:
            text = f"the request body is {size} bytes; the limit is {self.config.max_request_bytes}"
            self._reject(client, service_name, request_id, p.TOO_LARGE, text, out, framing)
            return
        in_flight = sum(len(keys) for keys in self.client_requests.get(client, {}).values())
        if in_flight >= self.config.max_client_requests:
            text = f"too many requests in flight on one connection (limit {self.config.max_client_requests})"
            body = [p.error_body(p.TOO_MANY_REQUESTS, text)]
            out.append((client, p.client_reply(True, service_name, request_id, body, framing)))
            return
        service = self.services.get(service_name)
        if (service is None or not service.workers) and service_name not in self.known_services and self.workers:
            models = ", ".join(sorted(s for s, st in self.services.items() if st.workers)) or "none"
            text = f"no worker serves model '{service_name}' (models served: {models})"
            self._reject(client, service_name, request_id, p.UNKNOWN_MODEL, text, out, framing)
            return
        capability = (message.hint.capability if message.hint is not None else None) or p.CHAT
        served = self.known_services.get(service_name, set())
        if service is not None and service.workers and capability not in served:
            # Like an unknown model: a kind of request the model never served ends now. One it served before
            # waits for such a worker to come back, as a model that lost its workers does.
            text = _capability_refusal(service_name, capability, served)
            self._reject(client, service_name, request_id, p.BAD_REQUEST, text, out, framing, param="model")
            return
        stream = message.hint.stream if message.hint is not None else None
        can_start_now = service is not None and (
            any(self.workers[w].free_slots > 0 and capability in self.workers[w].capabilities for w in service.workers)
            or (stream is not None and stream not in self.streams and self._keeper_of(stream, service_name) is not None)
        )  # a worker keeps its stream: it goes on there at once
        if not can_start_now and len(service.queue if service else ()) >= self.config.max_queue:
            text = f"the queue for model '{service_name}' is full ({self.config.max_queue} waiting)"
            self._reject(client, service_name, request_id, p.QUEUE_FULL, text, out, framing)
            return
        if service is None:
            service = self.services[service_name] = ServiceState()
        key = next(self._keys).to_bytes(8, "big")
        request = RequestState(
            key,
            client,
            request_id,
            service_name,
            message.body,
            deadline=now + self.config.queue_timeout,
            received_at=now,
        )
        request.framing = framing
        if framing.dialect is p.Dialect.MDP01:
            request.held = []
        else:
            request.partial_prefix = p.client_reply(False, service_name, request_id, [], framing)
        request.capability = capability
        hint = message.hint
        if hint is not None:
            request.prefix, request.session = split_hashes(hint.prefix), hint.session
        self.requests[key] = request
        self.client_requests.setdefault(client, {}).setdefault(request_id, set()).add(key)
        if hint is not None and hint.stream is not None and hint.stream not in self.streams:
            request.stream = hint.stream
            self.streams[hint.stream] = key
            keeper = self._keeper_of(hint.stream, service_name)
            if keeper is not None:  # the worker that kept generating it takes it back
                del keeper.attached[hint.stream]
                self._assign(request, keeper, out)
                return
            if hint.attach:  # its worker may still be on its way to this broker: give it a moment
                request.attach_until = now + self.config.attach_grace
                self._next_stream_check = min(self._next_stream_check, request.attach_until)
        service.queue.append(key)
        self._dispatch(service_name, out)
        if request.worker is None:
            self._earliest_deadline = min(self._earliest_deadline, request.deadline)
        if request.worker is None and request_id is not None:
            out.append((client, p.client_status(service_name, request_id, self._status(request), framing)))

    def _reject(
        self,
        client: bytes,
        service: str,
        request_id: bytes | None,
        code: int,
        text: str,
        out: list[Outgoing],
        framing: p.Framing,
        param: str | None = None,
    ) -> None:
        """End a request the broker does not accept, before it has any state; ``param``: the part of the request
        at fault, when one is."""
        model = service if service in self.known_services else "other"  # keeps metric labels bounded
        self.finished.append(FinishedRequest(model, str(code), None, None, 0.0, 0))
        self.recent.append(
            RecentRequest(next(self._recent_seq), self._now, model, None, str(code), None, None, 0.0, 0, 0, 0, 0)
        )
        out.append((client, p.client_reply(True, service, request_id, [p.error_body(code, text, param)], framing)))

    def _on_client_cancel(self, client: bytes, request_id: bytes, out: list[Outgoing]) -> None:
        keys = self.client_requests.get(client, {}).get(request_id)
        if not keys:
            return  # already finished: the FINAL is on its way or delivered
        for key in list(keys):
            self._cancel(self.requests[key], notify_client=True, out=out)

    def _on_client_credit(self, client: bytes, message: p.ClientCredit, out: list[Outgoing]) -> None:
        """Pass the client's credit on to the worker streaming the request; nothing to do while it waits."""
        for key in self.client_requests.get(client, {}).get(message.request_id, ()):
            request = self.requests[key]
            worker = self.workers.get(request.worker) if request.worker is not None else None
            if worker is not None and worker.extended and message.credit:
                out.append((worker.identity, p.worker_credit(key, message.credit, worker.framing)))

    def _status(self, request: RequestState) -> dict[str, Any]:
        status = self._placement(request)
        if self.epoch:
            status["epoch"] = self.epoch  # clients of a pair follow the broker of the newest epoch
        return status

    def _placement(self, request: RequestState) -> dict[str, Any]:
        if request.worker is None:
            queue = self.services[request.service].queue
            return {"state": "queued", "position": queue.index(request.key) + 1}
        return {"state": "dispatched", "worker": self.workers[request.worker].name}

    def _cancel(self, request: RequestState, notify_client: bool, out: list[Outgoing]) -> None:
        """End a request for its client now; a worker running it is told to stop and keeps the slot until FINAL."""
        body = [p.error_body(p.CANCELLED, "cancelled by the client")] if notify_client else None
        if request.worker is None:
            self.services[request.service].queue.remove(request.key)
            self._finish(request, out, *(body or []), notify=notify_client)
            self._prune(request.service)
            return
        if request.cancelled:
            return
        request.cancelled = True
        self._unindex_client(request)
        self._record(request, str(p.CANCELLED), {})
        if notify_client and body:
            out.append((request.client, self._final(request, body)))
        worker = self.workers[request.worker]
        if worker.extended:
            out.append((worker.identity, p.worker_cancel(request.key, worker.framing)))

    # ------------------------------------------------------------------------------------------ workers

    def _on_ready(
        self, identity: bytes, message: p.WorkerReady, now: float, out: list[Outgoing], peer: Peer | None = None
    ) -> None:
        if identity in self.workers:
            log.warning("worker %s sent READY twice: disconnecting it", identity.hex())
            self._remove_worker(identity, now, "protocol violation (second READY)", out)
            out.append((identity, p.disconnect(framing=message.framing)))
            return
        refusal, code = None, p.BAD_REQUEST
        if message.service.startswith(p.MMI_PREFIX):
            refusal = f"service names starting with {p.MMI_PREFIX!r} are reserved for the broker"
        info = message.info
        slots = info.get("slots", 1)
        if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= MAX_SLOTS_PER_WORKER:
            refusal = f"slots must be an integer from 1 to {MAX_SLOTS_PER_WORKER}, got {slots!r}"
        kept = info.get("kept", 0)
        if refusal is None and (not isinstance(kept, int) or isinstance(kept, bool) or not 0 <= kept <= slots):
            refusal = f"kept must be an integer from 0 to slots, got {kept!r}"
        capabilities = info.get("capabilities", [p.CHAT])
        if not isinstance(capabilities, list) or not capabilities or not all(map(p.is_capability, capabilities)):
            refusal = f"capabilities must be a non-empty list of names of 1-{p.MAX_CAPABILITY_LEN} printable characters"
        sha256, size = info.get("sha256"), info.get("size")  # the model file's, so that others can pull it
        if (sha256, size) != (None, None) and (not p.is_sha256(sha256) or _positive(size) is None):
            refusal = "sha256 and size must be 64 lowercase hex characters and the file's size in bytes"
        elif sha256 is not None and (conflict := self.transfers.conflict(message.service, sha256)) is not None:
            refusal, code = conflict, p.CONFLICT
        if refusal is not None:
            log.warning("worker %s refused (%s): disconnecting", identity.hex(), refusal)
            refused = p.disconnect((code, refusal) if message.extended else None, message.framing)
            out.append((identity, refused))
            return
        name = info.get("name")
        earlier = self._earlier_connection(message.service, info, peer.key if peer is not None else None)
        if earlier is not None:  # it thought this broker silent and connected again: the old connection is dead
            # Its streams wait for an ATTACH only if it kept some: one that kept none (it dropped them with the
            # connection) will offer none.
            self._remove_worker(earlier.identity, now, "connected again", out, streams_kept=kept > 0)
        context = _positive(info.get("context")) or DEFAULT_CONTEXT
        capacity = _positive(info.get("prefix_capacity")) or slots * context  # tokens its llama-server can hold
        worker = WorkerState(
            identity=identity,
            service=message.service,
            slots=slots,
            extended=message.extended,
            name=name if isinstance(name, str) and name else identity.hex(),
            info=info,
            expires_at=now + self.config.worker_ttl,
            prefixes=PrefixIndex(capacity // TOKENS_PER_BLOCK),
            capabilities=frozenset(capabilities),
            framing=message.framing,
            # no queued request takes those before the ATTACHes come (only 18/MDP's own framing has ATTACH)
            reserved=kept if message.extended and message.framing == p.MDP02 else 0,
            key=peer.key if peer is not None else None,
        )
        self.workers[identity] = worker
        self.services.setdefault(message.service, ServiceState()).workers[identity] = None
        self.known_services.setdefault(message.service, set()).update(worker.capabilities)
        log.info("worker %s ready for %s with %d slot(s)", worker.name, message.service, slots)
        if sha256 is not None and worker.extended and worker.framing == p.MDP02:  # it can serve its file's bytes
            copy = f"{info.get('worker_id') or identity.hex()}:{info.get('model_file', '')}"
            self.transfers.add_holder(identity, worker.name, copy, p.ModelInfo(message.service, sha256, size))
        # the answer a worker waits for before it calls itself registered; a broker of a pair says its epoch
        epoch = {"epoch": self.epoch} if self.epoch and worker.extended and worker.framing == p.MDP02 else None
        out.append((identity, p.heartbeat(epoch, framing=worker.framing)))
        self._dispatch(message.service, out)

    def _earlier_connection(self, service: str, info: dict[str, Any], key: str | None) -> WorkerState | None:
        """The same worker (its ``instance``, random for each worker's life, and with CURVE the same key), registered
        on a connection it has since given up: a worker has one connection at a time."""
        instance = info.get("instance")
        if not (isinstance(instance, str) and instance):
            return None
        for worker in self.workers.values():
            if worker.service == service and worker.info.get("instance") == instance and worker.key == key:
                return worker
        return None

    def _on_worker_message(self, identity: bytes, message: p.InboundMessage, now: float, out: list[Outgoing]) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            if not isinstance(message, p.WorkerDisconnect):
                # Typically a worker that outlived a broker restart: DISCONNECT makes it reconnect and re-register.
                out.append((identity, p.disconnect(framing=message.framing)))
            return
        if isinstance(message, p.WorkerDisconnect):
            self._remove_worker(identity, now, "disconnected", out)
            return
        worker.expires_at = now + self._worker_ttl
        if isinstance(message, p.WorkerAttach):
            worker.reserved = max(0, worker.reserved - 1)  # the slot its READY held for it
            self._on_attach(worker, message.stream, now, out)
            self._dispatch(worker.service, out)  # a slot the offer did not take after all
            return
        if worker.reserved:  # its ATTACHes come before anything else it sends: the ones READY counted ended meanwhile
            worker.reserved = 0
            self._dispatch(worker.service, out)
        if isinstance(message, p.WorkerHeartbeat):
            self._apply_load(worker, message.load, out)
            return
        assert isinstance(message, (p.WorkerPartial, p.WorkerFinal))
        request = self.requests.get(message.route_key)
        if request is None or request.worker != identity:
            log.warning("dropped reply from %s for a request it does not hold", worker.name)
            return
        if isinstance(message, p.WorkerPartial):
            self._forward_partial(request, message.body, now, out)
            return
        self._finish(request, out, *message.body, notify=not request.cancelled)
        self._dispatch(worker.service, out)

    def _forward_partial(self, request: RequestState, body: list[bytes], now: float, out: list[Outgoing]) -> None:
        if request.cancelled:
            return
        request.chunks += 1
        if request.first_chunk_at is None:
            request.first_chunk_at = now
        request.delivered += b"".join(body)
        if request.held is None:
            out.append((request.client, request.partial_prefix + body))
        else:
            request.held.extend(body)

    def _apply_load(self, worker: WorkerState, load: dict[str, Any], out: list[Outgoing]) -> None:
        if not load:
            return
        worker.load = load
        health = load.get("health")
        if isinstance(health, (int, float)) and not isinstance(health, bool):
            worker.health = min(1.0, max(0.0, float(health)))
        was_draining = worker.draining
        worker.draining = load.get("draining") is True
        if was_draining and not worker.draining:
            self._dispatch(worker.service, out)

    def _remove_worker(
        self, identity: bytes, now: float, reason: str, out: list[Outgoing], streams_kept: bool = False
    ) -> None:
        """Delete a worker everywhere; requests it held go back to the queue head, or end in 502 if mid-stream.
        ``streams_kept``: the worker goes on with their generations on a new connection (it connected again), so its
        named streams wait for their ATTACH there, as a client's resent stream does, instead of starting elsewhere."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        service = self.services[worker.service]
        del service.workers[identity]
        log.warning("worker %s (%s) removed: %s", worker.name, worker.service, reason)
        out.extend(self.transfers.remove_holder(identity, now))
        requeue: list[RequestState] = []
        for key in worker.active:
            request = self.requests[key]
            request.worker = None
            if request.cancelled:
                self._finish(request, out, notify=False)
            elif request.chunks:  # the client has part of the answer: moving it means resuming it
                resumed = resume_body(request.body, request.delivered)
                if resumed is None or request.failovers >= self.config.max_failovers:
                    why = "it cannot be resumed" if resumed is None else f"after {request.failovers} failover(s)"
                    message = f"worker {worker.name} failed mid-stream ({reason}); {why}"
                    self._finish(request, out, p.error_body(p.WORKER_FAILED, message))
                    continue
                log.info("resuming a stream of %s elsewhere after %d chunk(s)", worker.name, request.chunks)
                request.body, request.delivered = resumed, bytearray()
                request.failovers += 1
                requeue.append(request)
            else:
                requeue.append(request)
        for request in sorted(requeue, key=lambda r: r.key, reverse=True):
            request.deadline = now + self.config.queue_timeout
            service.queue.appendleft(request.key)
            if streams_kept and request.stream is not None:
                request.attach_until = now + self.config.attach_grace
                self._next_stream_check = min(self._next_stream_check, request.attach_until)
        self._dispatch(worker.service, out)
        for request in requeue:
            if request.worker is None:
                self._earliest_deadline = min(self._earliest_deadline, request.deadline)
            if request.worker is None and request.request_id is not None:
                status = p.client_status(request.service, request.request_id, self._status(request), request.framing)
                out.append((request.client, status))
        self._prune(worker.service)

    # ------------------------------------------------------------------------------------ a broker of a pair

    def _on_attach(self, worker: WorkerState, stream: bytes, now: float, out: list[Outgoing]) -> None:
        """A worker offers a generation it kept running while it had no broker. Its client, which lost the same
        broker, sends the request again naming the stream: whichever comes first waits for the other."""
        if stream in worker.attached:  # offered twice: nothing changes
            return
        key = self.streams.get(stream)
        request = self.requests.get(key) if key is not None else None
        # Kept only in a slot the broker can count as taken, and by one worker: a second copy (two workers that
        # each kept it through a broker's death) is dropped, and the worker that resumes it checks that it goes
        # on from the very tokens its client has.
        usable = worker.extended and worker.free_slots > 0 and self._keeper_of(stream, worker.service) is None
        if usable and request is not None and request.worker is None and request.service == worker.service:
            self.services[request.service].queue.remove(request.key)
            self._assign(request, worker, out)  # the client asked first: the generation goes on where it is
        elif not usable or request is not None:
            out.append((worker.identity, p.worker_cancel(stream)))  # it runs elsewhere already: drop this copy
        else:
            worker.attached[stream] = now + self.config.queue_timeout
            self._next_stream_check = min(self._next_stream_check, worker.attached[stream])

    def _keeper_of(self, stream: bytes, service: str) -> WorkerState | None:
        for identity in self.services[service].workers:
            worker = self.workers[identity]
            if stream in worker.attached:
                return worker
        return None

    def _check_streams(self, now: float, out: list[Outgoing]) -> None:
        """Kept streams no client asked for in time are dropped; requests that waited for their keeper in vain
        are placed like any other (a failover from the tokens their client has)."""
        upcoming = float("inf")
        for worker in self.workers.values():
            for stream, until in list(worker.attached.items()):
                if until <= now:
                    del worker.attached[stream]
                    out.append((worker.identity, p.worker_cancel(stream)))
                else:
                    upcoming = min(upcoming, until)
        waited: set[str] = set()
        for request in self.requests.values():
            if request.attach_until and request.attach_until <= now:
                request.attach_until = 0.0
                waited.add(request.service)
            elif request.attach_until:
                upcoming = min(upcoming, request.attach_until)
        self._next_stream_check = upcoming
        for service in waited:
            self._dispatch(service, out)

    def answer_passive(self, identity: bytes, frames: list[bytes], epoch: int) -> list[Outgoing]:
        """What a passive broker of a pair says to a client or worker: "not active, the other broker serves"
        (a 421, with the newest epoch it knows); nothing to what needs no answer."""
        text = "this broker is the passive one of a pair: use the other"
        if p.is_shard_hello(frames):  # a shard host or split worker
            return [(identity, p.disconnect((p.NOT_ACTIVE, text)))]
        try:
            message = p.parse_inbound(frames)
        except p.ProtocolError:
            return []
        if isinstance(message, p.ClientRequest):
            body = [p.not_active_body(epoch, text)]
            return [(identity, p.client_reply(True, message.service, message.request_id, body, message.framing))]
        if isinstance(message, (p.ModelFetch, p.ModelPush)):  # a transfer goes to the other broker too
            return [(identity, p.transfer_ended(message.transfer_id, (p.NOT_ACTIVE, text)))]
        if isinstance(message, p.WorkerReady):  # a QMesh worker is told why, and tries the other broker at once
            told = message.extended and message.framing == p.MDP02
            return [(identity, p.disconnect((p.NOT_ACTIVE, text) if told else None, message.framing))]
        if isinstance(message, p.WorkerMessage) and not isinstance(message, p.WorkerDisconnect):
            return [(identity, p.disconnect(framing=message.framing))]  # it registers again, and hears why then
        return []

    def step_down(self, now: float) -> list[Outgoing]:
        """This broker is no longer the active one of its pair (the other has a newer epoch): every worker is told
        to go to the other broker, every client to send its requests there (where the workers' generations join
        them again), and everything is forgotten."""
        self._now = now
        out: list[Outgoing] = []
        text = "this broker stepped down: the other broker of the pair serves"
        for worker in self.workers.values():
            refusal = (p.NOT_ACTIVE, text) if worker.extended and worker.framing == p.MDP02 else None
            out.append((worker.identity, p.disconnect(refusal, worker.framing)))
        for request in self.requests.values():
            if not request.cancelled:
                body = [p.not_active_body(self.epoch, text)]
                out.append(
                    (request.client, p.client_reply(True, request.service, request.request_id, body, request.framing))
                )
        # A passive broker keeps nothing of what it served (the records of ended requests stay for the metrics).
        for table in (self.workers, self.requests, self.services, self.client_requests, self.sessions, self.streams):
            table.clear()
        self.known_services.clear()
        self._heartbeat_round.clear()
        out.extend(self.shards.forget_all())
        self._earliest_deadline = self._next_stream_check = float("inf")
        out.extend(self.transfers.step_down())
        return out

    # ------------------------------------------------------------------------------------------ dispatch

    def _dispatch(self, service_name: str, out: list[Outgoing]) -> None:
        """Give queued requests, oldest first, to workers with free slots, as the routing policy places them.

        A request the policy places to wait for a busy worker stays queued (and counts in that worker's load for
        the requests after it); the ones after it may still start elsewhere.
        """
        service = self.services.get(service_name)
        if service is None or not service.queue:
            return
        workers = [w for w in map(self.workers.__getitem__, service.workers) if not w.draining]
        free = sum(w.free_slots for w in workers)
        while free > 0 and self._place_one(service, workers, out):
            free -= 1  # and look again from the oldest: a request that waited may now have a warm worker free

    def _place_one(self, service: ServiceState, workers: list[WorkerState], out: list[Outgoing]) -> bool:
        """Start the oldest queued request the policy places on a free worker; False if there is none."""
        waiting: dict[bytes, int] = {}
        full: set[str] = set()  # capabilities none of whose workers is free: the requests of another may start
        for key in service.queue:
            request = self.requests[key]
            if request.capability in full or request.attach_until > self._now:  # the latter waits for its keeper
                continue
            placement = self._policy(self._candidates(request, workers, waiting), len(request.prefix), self._routing)
            if placement is None:
                full.add(request.capability)
                continue
            if placement.wait:
                waiting[placement.identity] = waiting.get(placement.identity, 0) + 1
                continue
            service.queue.remove(key)
            self._assign(request, self.workers[placement.identity], out)
            return True
        return False

    def _candidates(
        self, request: RequestState, workers: list[WorkerState], waiting: dict[bytes, int]
    ) -> list[Candidate]:
        session = self.sessions.get((request.service, request.session)) if request.session is not None else None
        return [
            Candidate(
                w.identity,
                w.slots,
                w.taken,  # a kept stream runs there too, and holds its slot
                waiting.get(w.identity, 0),
                w.health,
                w.prefixes.match(request.prefix) if request.prefix else 0,
                session=w.identity == session,
            )
            for w in workers
            if request.capability in w.capabilities
        ]

    def _assign(self, request: RequestState, worker: WorkerState, out: list[Outgoing]) -> None:
        request.worker = worker.identity
        request.attach_until = 0.0  # placed: should it come back to the queue, it waits for no keeper
        if request.dispatched_at is None:
            request.dispatched_at = self._now
        worker.active.add(request.key)
        if request.prefix:  # once it has run there, that llama-server holds the whole prefix
            request.predicted_blocks = worker.prefixes.match(request.prefix)
            worker.prefixes.add(request.prefix)
        if request.session is not None:
            self.sessions[(request.service, request.session)] = worker.identity
            self.sessions.move_to_end((request.service, request.session))
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        out.append((worker.identity, p.worker_request(request.key, request.body, worker.framing)))
        if request.request_id is not None:
            status = p.client_status(request.service, request.request_id, self._status(request), request.framing)
            out.append((request.client, status))

    def _finish(self, request: RequestState, out: list[Outgoing], *body: bytes, notify: bool = True) -> None:
        """Remove a request from every table; send the client its FINAL unless told not to."""
        self.requests.pop(request.key, None)
        if request.stream is not None and self.streams.get(request.stream) == request.key:
            del self.streams[request.stream]
        summary = _summary(body)
        if request.worker is not None:
            worker = self.workers.get(request.worker)
            if worker is not None:
                worker.active.discard(request.key)
                self._learn(worker, request, summary)
        if not request.cancelled:
            self._unindex_client(request)
            self._record(request, _outcome(summary) if notify else str(p.CANCELLED), summary)
        if notify:
            out.append((request.client, self._final(request, list(body))))

    @staticmethod
    def _final(request: RequestState, body: list[bytes]) -> list[bytes]:
        """The client's FINAL in its framing; a 7/MDP client's one REPLY also carries the PARTIAL bodies held back."""
        if request.held:
            body = request.held + body
        return p.client_reply(True, request.service, request.request_id, body, request.framing)

    def _learn(self, worker: WorkerState, request: RequestState, summary: dict[str, Any]) -> None:
        """What the worker's FINAL says of its prompt cache: counted, and a predicted hit that missed shrinks what
        the broker thinks that llama-server holds (it evicted more than its announced capacity suggests)."""
        prompt, cached = _prompt_tokens(summary)
        if not prompt:
            return
        worker.prompt_tokens += prompt
        worker.cached_tokens += cached
        if request.predicted_blocks and cached < prompt * request.predicted_blocks / len(request.prefix) / 2:
            worker.prefixes.shrink(0.75)

    def _record(self, request: RequestState, outcome: str, summary: dict[str, Any]) -> None:
        start = request.received_at
        queue_wait = None if request.dispatched_at is None else request.dispatched_at - start
        ttft = None if request.first_chunk_at is None else request.first_chunk_at - start
        prompt, cached = _prompt_tokens(summary)
        if self.finished.maxlen != 0:  # a zero-length deque: nobody reads the records (a broker without metrics)
            self.finished.append(
                FinishedRequest(
                    request.service, outcome, queue_wait, ttft, self._now - start, request.chunks, prompt, cached
                )
            )
        worker = self.workers.get(request.worker) if request.worker is not None else None
        tokens = summary.get("tokens")
        self.recent.append(
            RecentRequest(
                next(self._recent_seq),
                self._now,
                request.service,
                worker.name if worker is not None else None,
                outcome,
                queue_wait,
                ttft,
                self._now - start,
                tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else request.chunks,
                prompt,
                cached,
                request.failovers,
            )
        )

    def _unindex_client(self, request: RequestState) -> None:
        by_id = self.client_requests.get(request.client)
        if by_id is None:
            return
        keys = by_id.get(request.request_id)
        if keys is not None:
            keys.discard(request.key)
            if not keys:
                del by_id[request.request_id]
        if not by_id:
            del self.client_requests[request.client]

    def _prune(self, service_name: str) -> None:
        """Forget a service with no workers and nothing waiting, so unknown names cannot pile up."""
        service = self.services.get(service_name)
        if service is not None and not service.workers and not service.queue:
            del self.services[service_name]

    # ------------------------------------------------------------------------------------------ MMI

    def _mmi(self, service_name: str, body: list[bytes]) -> list[bytes]:
        if service_name == "mmi.service":
            asked = body[0].decode("utf-8", "replace") if body else ""
            service = self.services.get(asked)
            return [b"200" if service is not None and service.workers else b"404"]
        if service_name == "mmi.services":
            return [p.pack(self.service_table())]
        if service_name == "mmi.workers":
            return [p.pack(self.worker_table())]
        if service_name == "mmi.shards":
            return [p.pack(self.shards.table(self._now))]
        if service_name == "mmi.requests":
            return [p.pack([record.as_map(self._now) for record in self.recent])]
        if service_name == "mmi.models":
            return [p.pack(self.transfers.catalogue())]
        if service_name == "mmi.broker":
            return [p.pack({"pair_role": self.pair_role, "epoch": self.epoch})]
        return [b"501"]

    def service_table(self) -> dict[str, dict[str, Any]]:
        """Per model: workers, slots, busy, queued, capabilities (what its workers serve, and workers, slots and busy
        for each), and context (tokens per request) when every worker says."""
        table = {}
        for name, service in sorted(self.services.items()):
            if not service.workers and not service.queue:
                continue
            workers = [self.workers[i] for i in service.workers]
            table[name] = {
                "workers": len(workers),
                "slots": sum(w.slots for w in workers),
                "busy": sum(len(w.active) for w in workers),
                "queued": len(service.queue),
            }
            by_capability: dict[str, dict[str, int]] = {}
            for w in workers:
                for capability in sorted(w.capabilities):
                    counts = by_capability.setdefault(capability, {"workers": 0, "slots": 0, "busy": 0})
                    counts["workers"] += 1
                    counts["slots"] += w.slots
                    counts["busy"] += len(w.active)
            table[name]["capabilities"] = sorted(by_capability)
            table[name]["by_capability"] = dict(sorted(by_capability.items()))
            contexts = [w.info.get("context") for w in workers]
            if contexts and all(_positive(c) is not None for c in contexts):
                table[name]["context"] = min(contexts)  # what fits on whichever worker a request lands on
        return table

    def worker_table(self) -> list[dict[str, Any]]:
        ttl = self.config.worker_ttl  # expires_at is refreshed to "last message + ttl" on every sign of life
        return [
            {
                "name": w.name,
                "service": w.service,
                "slots": w.slots,
                "busy": len(w.active),
                "health": w.health,
                "draining": w.draining,
                "extended": w.extended,
                "info": w.info,
                "load": w.load,
                "last_seen_s": round(max(0.0, self._now - (w.expires_at - ttl)), 3),
                "prompt_tokens": w.prompt_tokens,
                "cached_tokens": w.cached_tokens,
                "cached_prefix_blocks": len(w.prefixes),
            }
            for w in self.workers.values()
        ]

    # ------------------------------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables disagree. Used by tests after every step."""
        queued: set[bytes] = set()
        for name, service in self.services.items():
            assert len(set(service.queue)) == len(service.queue), "a request is queued twice"
            for key in service.queue:
                request = self.requests[key]
                assert request.worker is None and request.service == name and not request.cancelled
                queued.add(key)
            for identity in service.workers:
                assert self.workers[identity].service == name
        active: set[bytes] = set()
        for identity, worker in self.workers.items():
            assert identity in self.services[worker.service].workers
            assert 0 <= worker.taken <= worker.slots, "credit out of range"
            for key in worker.active:
                assert self.requests[key].worker == identity
                assert self.requests[key].capability in worker.capabilities, "a worker holds a kind it cannot serve"
                assert key not in active, "a request is held by two workers"
                active.add(key)
        assert queued.isdisjoint(active)
        assert queued | active == set(self.requests), "a request is neither queued nor held"
        self.shards.check_invariants()
        indexed = {k for by_id in self.client_requests.values() for keys in by_id.values() for k in keys}
        live = {k for k, r in self.requests.items() if not r.cancelled}
        assert indexed == live, "client index out of sync"
        self.transfers.check_invariants()
        for stream, key in self.streams.items():
            assert self.requests[key].stream == stream, "stream index out of sync"
        assert not any(stream in self.streams for w in self.workers.values() for stream in w.attached), (
            "a stream both kept by a worker and asked for by its client"
        )


def _summary(body: tuple[bytes, ...]) -> dict[str, Any]:
    """A FINAL's body as a map: a worker's summary or an error; empty for a plain MDP body."""
    if len(body) != 1:
        return {}
    try:
        return p.unpack_map(body[0])
    except p.ProtocolError:
        return {}


def _outcome(summary: dict[str, Any]) -> str:
    """'ok', or the code of an error FINAL (a plain MDP body counts as ok)."""
    error = summary.get("error")
    return str(error.get("code", "error")) if isinstance(error, dict) else "ok"


def _prompt_tokens(summary: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens, of which from the prompt cache) as a worker's summary reports them; (0, 0) if it does not."""
    prompt, cached = summary.get("prompt_tokens"), summary.get("cached_tokens", 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (prompt, cached)):
        return 0, 0
    return prompt, min(cached, prompt)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _capability_refusal(model: str, capability: str, served: set[str]) -> str:
    """Why ``model`` cannot take a request that needs ``capability``: its workers serve other kinds."""
    if capability == p.CHAT:
        return f"model '{model}' serves {' and '.join(sorted(served))} only"
    return f"model '{model}' does not serve {capability}"
