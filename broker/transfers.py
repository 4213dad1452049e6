"""Models travelling through the broker, with no sockets: the catalogue of who holds which file, and the transfers.

Part of the broker's core (``BrokerCore`` owns one ``Transfers`` and hands it the transfer messages, the workers
that come and go, and the clock); like the core it takes events and returns ``(routing_id, frames)`` to send.

**Holders.** A registered worker that announced its model's sha256 and size holds that file; so does the broker's
own store (``qmesh-broker --models-dir``), which stands under the routing id ``STORE``: the loop hands what is sent
there to ``broker.models_store`` and feeds its answers back (``on_store_reply``). A holder whose bytes did not hash
to the sha256 they were served for is remembered (by its copy: the worker's machine and file, or the store) and
never asked for that file again.

**A pull** (``docs/PROTOCOL.md``, section 12): FETCH names a model; the broker picks a holder (its store first: one
hop less, then the holder with the fewest transfers) and answers OFFER. The puller then asks for chunks by offset,
at most ``window`` in flight (its credit); each CHUNK becomes a READ to the holder, and the holder's DATA is
forwarded to the puller. A holder that vanishes, stalls or fails a read hands its outstanding ranges to another
holder of the same file; with none left the transfer ends in an error, and the puller may retry.

**A push** goes the other way, into the store: PUSH, then the client's chunks in order, at most ``window``
unacknowledged; the store's ACKs are the client's credit, and its ENDED says the file was verified and kept.

**Fairness.** Every READ issued and every ACK passed on costs tokens of one bucket: ``rate`` bytes/s (0: no cap),
or ``busy_rate`` while requests are in flight (and ``busy_hold`` seconds after), so that a transfer never takes the
broker loop (and the machines' CPUs) from token streams. Transfers are served round-robin, one chunk each in turn.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

from qmesh.common import protocol as p

if TYPE_CHECKING:
    from qmesh.broker.core import Peer  # broker.core owns this module: imported for its type only

log = logging.getLogger(__name__)

Outgoing = tuple[bytes, list[bytes]]

# The routing id of the broker's own store. libzmq never gives a peer this id: the ids it makes are 5 bytes, and
# an id a peer chooses may not start with a zero byte.
STORE = b"\x00qmesh-store"
STORE_NAME = "the broker's store"
SWEEP_INTERVAL = 1.0  # seconds between looks for stalled reads and idle transfers


@dataclass(slots=True)
class TransferConfig:
    chunk: int = 1024 * 1024  # the largest chunk a client may ask for or send
    window: int = 8  # chunks in flight per transfer
    rate: float = 0.0  # bytes/s for all transfers together; 0: no cap
    busy_rate: float = 16e6  # bytes/s for all transfers while requests are in flight (0: no cap)
    per_peer: int = 2  # transfers one connection may have open at once
    holder_reads: int = 16  # reads in flight per holder
    busy_hold: float = 2.0  # seconds after requests were last seen in flight that busy_rate still holds
    read_timeout: float = 15.0  # seconds a holder may take to answer a read before its ranges go elsewhere
    idle_timeout: float = 60.0  # seconds a transfer may see nothing from its client before it is dropped


@dataclass(slots=True)
class Holder:
    identity: bytes
    name: str  # the worker's name, or STORE_NAME
    copy: str  # which copy of the files it serves: bad copies are remembered by this
    models: dict[str, p.ModelInfo]  # name -> the model (a worker's one, the store's many)
    reads: int = 0  # in flight
    transfers: int = 0  # pulls it serves


@dataclass(slots=True)
class Transfer:
    key: bytes  # the broker's name for it (the store knows a push by it)
    peer: bytes
    transfer_id: bytes
    model: p.ModelInfo
    push: bool
    opened_at: float
    last_heard: float
    holder: bytes | None = None  # a pull's holder (a push's is the store)
    served_by: dict[str, str] = field(default_factory=dict)  # copy -> holder name: blamed if the bytes do not verify
    avoid: set[bytes] = field(default_factory=set)  # holders that failed this transfer
    pending: deque[tuple[int, int]] = field(default_factory=deque)  # asked for by the puller, not yet read
    reads: dict[bytes, tuple[int, int, float]] = field(default_factory=dict)  # read key -> offset, length, sent at
    bytes: int = 0  # relayed
    offered: bool = False  # a push: the store said where its copy stands, and the client was told
    next_offset: int = 0  # a push: the next byte expected from the client
    acked: int = 0  # a push: what the client was told is stored
    acks: deque[int] = field(default_factory=deque)  # a push: the store's ACKs not yet passed on (paced)


class Pacer:
    """A token bucket of bytes shared by all transfers, filled at the rate each call gives (bytes/s; 0: no cap), with
    at most ``burst`` saved up while nothing moves."""

    def __init__(self, burst: int) -> None:
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = 0.0
        self._wanted = 0  # the grant last refused

    def grant(self, size: int, now: float, rate: float) -> bool:
        if rate <= 0:
            return True
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * rate)
        self._at = now
        if self._tokens < size:
            self._wanted = size
            return False
        self._tokens -= size
        return True

    def ready_at(self, now: float, rate: float) -> float:
        """When the grant refused last would be made."""
        return now if rate <= 0 else self._at + max(0.0, self._wanted - self._tokens) / rate


class Transfers:
    def __init__(self, config: TransferConfig | None = None, busy: Callable[[], bool] = lambda: False) -> None:
        self.config = config or TransferConfig()
        self.holders: dict[bytes, Holder] = {}
        self.transfers: dict[bytes, Transfer] = {}  # key -> transfer
        self.by_peer: dict[bytes, dict[bytes, Transfer]] = {}  # peer -> transfer id -> transfer
        self.reads: dict[bytes, bytes] = {}  # read key -> transfer key
        self.bad: dict[tuple[str, str], str] = {}  # (copy, sha256) -> the holder's name when it was found bad
        self._busy = busy
        self._busy_until = float("-inf")  # busy_rate holds until then
        # Two chunks saved up at most: after a pause, a transfer starts again at its pace, not with a burst that
        # would hold up the token streams.
        self._pacer = Pacer(2 * self.config.chunk)
        self._keys = count(1)
        self._turn: deque[bytes] = deque()  # transfers with something to send, in round-robin order
        self._pace_at = float("inf")  # when the pacer lets the next chunk go
        self._sweep_at = float("inf")  # the next look for stalled reads and idle transfers

    # ------------------------------------------------------------------------------------------ holders

    def add_holder(self, identity: bytes, name: str, copy: str, model: p.ModelInfo) -> None:
        """A registered worker serves ``model`` (its READY's name, sha256 and size)."""
        self.holders[identity] = Holder(identity, name, copy, {model.name: model})

    def set_store(self, models: list[p.ModelInfo]) -> None:
        """The files of the broker's store (``--models-dir``)."""
        self.holders[STORE] = Holder(STORE, STORE_NAME, "store", {model.name: model for model in models})

    def remove_holder(self, identity: bytes, now: float) -> list[Outgoing]:
        """A holder left (a worker removed): its transfers go on from other holders of the same files."""
        out: list[Outgoing] = []
        holder = self.holders.pop(identity, None)
        if holder is None:
            return out
        for transfer in [t for t in self.transfers.values() if t.holder == identity]:
            self._move(transfer, f"{holder.name} left the mesh", out)
        self._pump(now, out)
        return out

    def conflict(self, name: str, sha256: str) -> str | None:
        """Why a file of this sha256 may not be served as ``name``: another file is known by that name."""
        for holder in self.holders.values():
            model = holder.models.get(name)
            if model is not None and model.sha256 != sha256:
                return (
                    f"model {name!r} is already in the mesh as sha256 {model.sha256} ({holder.name}); this file is "
                    f"sha256 {sha256}: two different files may not share one name (rename one, or serve the same file)"
                )
        return None

    # ------------------------------------------------------------------------------------------ events

    def on_message(
        self, identity: bytes, message: p.TransferMessage, now: float, peer: Peer | None = None
    ) -> list[Outgoing]:
        """A transfer message from a client or holder. ``peer`` (a ``broker.core.Peer``, None without CURVE) says
        what its key may do: fetch or push with a client key, or a worker key limited to the models it serves."""
        out: list[Outgoing] = []
        if isinstance(message, (p.HolderData, p.HolderReadFailed)):
            if peer is None or peer.worker:
                self._on_holder(identity, message, out)
            else:
                log.warning("dropped a holder's answer from key %s, which is not on the worker list", peer.name)
        elif isinstance(message, (p.ModelFetch, p.ModelPush)):
            self._open(identity, message, now, peer, out)
        else:
            transfer = self.by_peer.get(identity, {}).get(message.transfer_id)
            if transfer is None:
                if not isinstance(message, p.TransferEnd):  # one that ended already: say so
                    ended = (p.UNKNOWN_MODEL, "no such transfer (it ended)")
                    out.append((identity, p.transfer_ended(message.transfer_id, ended)))
                return out
            transfer.last_heard = now
            if isinstance(message, p.ChunkRequest):
                self._on_chunk_request(transfer, message, out)
            elif isinstance(message, p.PushChunk):
                self._on_push_chunk(transfer, message, out)
            else:
                self._on_end(transfer, message.outcome, now, out)
        self._pump(now, out)
        return out

    def on_store_reply(self, frames: list[bytes], now: float) -> list[Outgoing]:
        """What the store answered (the loop feeds it back): a read's data, or where a push stands."""
        out: list[Outgoing] = []
        try:
            reply = p.parse_store_reply(frames)
        except p.ProtocolError as exc:  # a bug in the store: nothing on the wire, so nothing else to blame
            log.error("the store answered something malformed: %s", exc)
            return out
        if isinstance(reply, (p.HolderData, p.HolderReadFailed)):
            self._on_holder(STORE, reply, out)
        else:
            self._on_store_push_reply(reply, out)
        self._pump(now, out)
        return out

    def peer_gone(self, identity: bytes, now: float) -> list[Outgoing]:
        """A client is unreachable: its transfers end (the store drops the file of a push: a push starts over)."""
        out: list[Outgoing] = []
        for transfer in list(self.by_peer.get(identity, {}).values()):
            self._close(transfer, None, out, why="its client is gone")
        self._pump(now, out)
        return out

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        if now >= self._sweep_at:
            self._sweep(now, out)
        if now >= self._pace_at:
            self._pace_at = float("inf")
            self._pump(now, out)
        return out

    def next_wakeup(self) -> float:
        return min(self._pace_at, self._sweep_at)

    def step_down(self) -> list[Outgoing]:
        """The broker stops serving (the passive one of a pair): every transfer ends, pointing its client at the
        other broker; the workers are forgotten with the rest of the core (the store stays)."""
        out: list[Outgoing] = []
        text = "this broker stepped down: the other broker of the pair serves"
        for transfer in list(self.transfers.values()):
            self._close(transfer, (p.NOT_ACTIVE, text), out)
        for identity in [i for i in self.holders if i != STORE]:
            del self.holders[identity]
        return out

    # ------------------------------------------------------------------------------------------ opening

    def _open(
        self, identity: bytes, message: p.ModelFetch | p.ModelPush, now: float, peer: Peer | None, out: list[Outgoing]
    ) -> None:
        transfer_id = message.transfer_id
        name = message.name if isinstance(message, p.ModelFetch) else message.model.name
        refusal = self._refusal(identity, transfer_id, name, peer)
        if refusal is None:
            if isinstance(message, p.ModelFetch):
                self._open_pull(identity, message, now, out)
            else:
                self._open_push(identity, message, now, out)
            return
        log.warning("refused a transfer of %r: %s", name, refusal[1])
        out.append((identity, p.transfer_ended(transfer_id, refusal)))

    def _refusal(self, identity: bytes, transfer_id: bytes, name: str, peer: Peer | None) -> tuple[int, str] | None:
        problem = p.model_name_problem(name)
        if problem is not None:
            return p.BAD_REQUEST, problem
        if peer is not None:
            if peer.worker and peer.models is not None and name not in peer.models:
                allowed = ", ".join(sorted(peer.models)) or "none"
                return p.FORBIDDEN, f"key {peer.name} may not fetch or serve {name!r} (allowed: {allowed})"
            if not (peer.worker or peer.client):
                return p.FORBIDDEN, f"key {peer.name} is on no allow-list of this broker"
        open_here = self.by_peer.get(identity, {})
        if transfer_id in open_here:
            return p.BAD_REQUEST, "a transfer with this id is open on this connection"
        if len(open_here) >= self.config.per_peer:
            return p.TOO_MANY_REQUESTS, f"at most {self.config.per_peer} transfers at once on one connection"
        return None

    def _open_pull(self, identity: bytes, message: p.ModelFetch, now: float, out: list[Outgoing]) -> None:
        known = [h.models[message.name] for h in self.holders.values() if message.name in h.models]
        if not known:
            names = ", ".join(sorted({m.name for h in self.holders.values() for m in h.models.values()})) or "none"
            error = (p.UNKNOWN_MODEL, f"no worker or store of this mesh holds model {message.name!r} (held: {names})")
            out.append((identity, p.transfer_ended(message.transfer_id, error)))
            return
        model = known[0]
        if message.sha256 is not None and message.sha256 != model.sha256:
            text = f"model {message.name!r} in this mesh is sha256 {model.sha256}, not {message.sha256}"
            out.append((identity, p.transfer_ended(message.transfer_id, (p.CONFLICT, text))))
            return
        transfer = self._new(identity, message.transfer_id, model, False, now)
        holder = self._pick_holder(transfer)
        if holder is None:
            self._close(transfer, self._no_holder(model, ""), out)
            return
        self._attach(transfer, holder)
        log.info("pull of %s (%s, %.1f MB) from %s", model.name, model.sha256[:12], model.size / 1e6, holder.name)
        out.append((identity, p.model_offer(message.transfer_id, model, 0, self.config.chunk, self.config.window)))

    def _open_push(self, identity: bytes, message: p.ModelPush, now: float, out: list[Outgoing]) -> None:
        model, transfer_id = message.model, message.transfer_id
        store = self.holders.get(STORE)
        error: tuple[int, str] | None = None
        if store is None:
            error = (p.UNKNOWN_MODEL, "this broker keeps no models: start it with --models-dir DIR to push to it")
        elif (conflict := self.conflict(model.name, model.sha256)) is not None:
            error = (p.CONFLICT, conflict)
        elif any(t.push and t.model.name == model.name for t in self.transfers.values()):
            error = (p.CONFLICT, f"model {model.name!r} is being pushed already")
        if error is not None:
            out.append((identity, p.transfer_ended(transfer_id, error)))
            return
        assert store is not None
        if store.models.get(model.name) == model:  # nothing to send
            out.append((identity, p.transfer_ended(transfer_id, None, model)))
            return
        transfer = self._new(identity, transfer_id, model, True, now)
        transfer.holder = STORE
        log.info("push of %s (%s, %.1f MB) into the store", model.name, model.sha256[:12], model.size / 1e6)
        out.append((STORE, p.model_push(transfer.key, model)))  # the store answers with where its copy stands

    def _new(self, identity: bytes, transfer_id: bytes, model: p.ModelInfo, push: bool, now: float) -> Transfer:
        transfer = Transfer(next(self._keys).to_bytes(8, "big"), identity, transfer_id, model, push, now, now)
        self.transfers[transfer.key] = transfer
        self.by_peer.setdefault(identity, {})[transfer_id] = transfer
        self._sweep_at = min(self._sweep_at, now + SWEEP_INTERVAL)
        return transfer

    # ------------------------------------------------------------------------------------------ pulls

    def _pick_holder(self, transfer: Transfer) -> Holder | None:
        """The store if it has the file (one hop less), else the holder with the fewest pulls; never one whose copy
        served bad bytes, nor one that failed this transfer."""
        sha256 = transfer.model.sha256
        candidates = [
            h
            for h in self.holders.values()
            if (h.copy, sha256) not in self.bad
            and h.identity not in transfer.avoid
            and any(m.sha256 == sha256 for m in h.models.values())
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda h: (h.identity != STORE, h.transfers, h.reads))

    def _attach(self, transfer: Transfer, holder: Holder) -> None:
        transfer.holder = holder.identity
        holder.transfers += 1

    def _no_holder(self, model: p.ModelInfo, why: str) -> tuple[int, str]:
        """The error of a pull that no holder can serve (any more: ``why``)."""
        bad = sorted(name for (_, sha256), name in self.bad.items() if sha256 == model.sha256)
        text = f"no holder can serve model {model.name!r} (sha256 {model.sha256})"
        text += f" any more: {why}" if why else ""
        text += f" ({', '.join(bad)} served bytes that did not match it)" if bad else ""
        return p.WORKER_FAILED, text

    def _on_chunk_request(self, transfer: Transfer, message: p.ChunkRequest, out: list[Outgoing]) -> None:
        cfg, model = self.config, transfer.model
        problem = None
        if transfer.push:
            problem = "CHUNK is for a pull"
        elif message.length > cfg.chunk or message.offset + message.length > model.size:
            problem = f"a chunk is at most {cfg.chunk} bytes within the model's {model.size}"
        elif len(transfer.pending) + len(transfer.reads) >= cfg.window:
            problem = f"more than the window of {cfg.window} chunks asked for at once"
        if problem is not None:
            self._close(transfer, (p.BAD_REQUEST, problem), out)
            return
        transfer.pending.append((message.offset, message.length))
        self._want_turn(transfer)

    def _on_holder(self, identity: bytes, message: p.HolderData | p.HolderReadFailed, out: list[Outgoing]) -> None:
        key = self.reads.get(message.read_key)
        transfer = self.transfers.get(key) if key is not None else None
        if transfer is None or transfer.holder != identity or message.read_key not in transfer.reads:
            return  # a late answer for a transfer that ended or moved on
        del self.reads[message.read_key]
        offset, length, _ = transfer.reads.pop(message.read_key)
        holder = self.holders[identity]
        holder.reads -= 1
        if isinstance(message, p.HolderData) and (message.offset, len(message.data)) == (offset, length):
            transfer.bytes += length
            transfer.served_by[holder.copy] = holder.name
            out.append((transfer.peer, p.model_data(transfer.transfer_id, offset, message.data)))
            return
        if isinstance(message, p.HolderData):
            why = f"sent {len(message.data)} bytes at {message.offset} for a read of {length} at {offset}"
            code = p.RANGE_NOT_SATISFIABLE
        else:
            why, code = f"{message.code}: {message.message}", message.code
        transfer.pending.appendleft((offset, length))
        if code == p.RANGE_NOT_SATISFIABLE:  # a copy that cannot serve its whole file is a bad copy
            self._mark_bad(holder.copy, holder.name, transfer.model, why)
        self._move(transfer, f"{holder.name} failed a read ({why})", out)

    def _move(self, transfer: Transfer, why: str, out: list[Outgoing]) -> None:
        """The transfer's holder cannot go on: its outstanding ranges go to another holder of the file."""
        old = self.holders.get(transfer.holder) if transfer.holder is not None else None
        if transfer.holder is not None:
            transfer.avoid.add(transfer.holder)
        self._release(transfer)
        ranges = sorted(transfer.pending)
        transfer.pending = deque(ranges)
        holder = self._pick_holder(transfer)
        if holder is None:
            self._close(transfer, self._no_holder(transfer.model, why), out)
            return
        self._attach(transfer, holder)
        was = old.name if old is not None else "a holder that left"
        log.warning("pull of %s moves from %s to %s: %s", transfer.model.name, was, holder.name, why)
        if transfer.pending:
            self._want_turn(transfer)

    def _release(self, transfer: Transfer) -> None:
        """Forget the transfer's reads (their ranges go back to ``pending``) and its holder."""
        holder = self.holders.get(transfer.holder) if transfer.holder is not None else None
        for read_key, (offset, length, _) in transfer.reads.items():
            self.reads.pop(read_key, None)
            transfer.pending.append((offset, length))
            if holder is not None:
                holder.reads -= 1
        transfer.reads.clear()
        if holder is not None and not transfer.push:
            holder.transfers -= 1
        transfer.holder = None

    def _mark_bad(self, copy: str, name: str, model: p.ModelInfo, why: str) -> None:
        if (copy, model.sha256) not in self.bad:
            log.error(
                "%s has a bad copy of %s (sha256 %s): %s; not asking it again", name, model.name, model.sha256, why
            )
        self.bad[(copy, model.sha256)] = name

    def _on_end(self, transfer: Transfer, outcome: str, now: float, out: list[Outgoing]) -> None:
        model = transfer.model
        if transfer.push:
            self._close(transfer, None, out, why="its client stopped it")
            return
        if outcome == p.OUTCOME_MISMATCH:
            for copy, name in transfer.served_by.items():
                self._mark_bad(copy, name, model, "the bytes it served did not hash to the model's sha256")
        elapsed, megabytes = max(now - transfer.opened_at, 1e-9), transfer.bytes / 1e6
        log.info(
            "pull of %s ended (%s): %.1f MB relayed in %.2f s (%.0f MB/s)",
            model.name,
            outcome,
            megabytes,
            elapsed,
            megabytes / elapsed,
        )
        self._close(transfer, None, out)

    # ------------------------------------------------------------------------------------------ pushes

    def _on_push_chunk(self, transfer: Transfer, message: p.PushChunk, out: list[Outgoing]) -> None:
        cfg, model = self.config, transfer.model
        problem = None
        if not transfer.push or not transfer.offered:
            problem = "DATA is for a push, after its OFFER"
        elif message.offset != transfer.next_offset:
            problem = f"the push's next bytes start at {transfer.next_offset}, not {message.offset}"
        elif len(message.data) > cfg.chunk or message.offset + len(message.data) > model.size:
            problem = f"a chunk is at most {cfg.chunk} bytes within the model's {model.size}"
        elif message.offset + len(message.data) - transfer.acked > cfg.chunk * cfg.window:
            problem = f"more than the window of {cfg.window} chunks sent ahead of the store's acknowledgements"
        if problem is not None:
            self._close(transfer, (p.BAD_REQUEST, problem), out)
            return
        transfer.next_offset += len(message.data)
        transfer.bytes += len(message.data)
        out.append((STORE, p.push_chunk(transfer.key, message.offset, message.data)))

    def _on_store_push_reply(self, reply: p.TransferReply, out: list[Outgoing]) -> None:
        transfer = self.transfers.get(reply.transfer_id)
        if transfer is None or not transfer.push:
            return  # the push ended while the store wrote
        if reply.command == p.C_ENDED:
            if reply.model is not None:
                self.holders[STORE].models[reply.model.name] = reply.model
                log.info("model %s (%s) is in the store now", reply.model.name, reply.model.sha256[:12])
                out.append((transfer.peer, p.transfer_ended(transfer.transfer_id, None, reply.model)))
                self._close(transfer, None, out, store_done=True)
            else:
                self._close(transfer, reply.error, out, store_done=True)
        elif not transfer.offered:  # the store's first ACK: where its copy stands, so where the client starts
            transfer.offered = True
            transfer.next_offset = transfer.acked = reply.offset
            cfg = self.config
            offer = p.model_offer(transfer.transfer_id, transfer.model, reply.offset, cfg.chunk, cfg.window)
            out.append((transfer.peer, offer))
        else:
            transfer.acks.append(reply.offset)
            self._want_turn(transfer)

    # ------------------------------------------------------------------------------------------ pacing

    def _want_turn(self, transfer: Transfer) -> None:
        if transfer.key not in self._turn:
            self._turn.append(transfer.key)

    def _pump(self, now: float, out: list[Outgoing]) -> None:
        """Send what transfers may send now, one chunk at a time, as long as the pacer and the holders' read limits
        allow. The transfers with something to send wait in ``_turn``: the first that can step does, then goes to the
        back (round-robin); one whose holder has no read to spare keeps its place."""
        turn, rate = self._turn, self._rate(now)
        while True:
            for key in list(turn):
                transfer = self.transfers.get(key)
                if transfer is None or not (transfer.acks if transfer.push else transfer.pending):
                    turn.remove(key)  # ended, or nothing left to send
                    continue
                step = self._next_step(transfer)
                if step is None:
                    continue
                if not self._pacer.grant(step, now, rate):
                    self._pace_at = self._pacer.ready_at(now, rate)
                    return
                turn.remove(key)
                self._take_step(transfer, now, out)
                if transfer.acks if transfer.push else transfer.pending:
                    turn.append(key)
                break
            else:
                return

    def _rate(self, now: float) -> float:
        """What transfers may take now, in bytes/s: ``busy_rate`` while requests are in flight and for ``busy_hold``
        seconds after (between two requests of a client, streams go on: that is no time for a burst), else ``rate``.
        Looked at on every transfer event, so a transfer under way sees the mesh's requests come and go."""
        if self._busy():
            self._busy_until = now + self.config.busy_hold
        return self.config.busy_rate if now < self._busy_until else self.config.rate

    def _next_step(self, transfer: Transfer) -> int | None:
        """The bytes the transfer's next step moves, or None while it has to wait for its holder."""
        if transfer.push:
            return transfer.acks[0] - transfer.acked
        holder = self.holders.get(transfer.holder) if transfer.holder is not None else None
        if holder is None or holder.reads >= self.config.holder_reads:
            return None
        return transfer.pending[0][1]

    def _take_step(self, transfer: Transfer, now: float, out: list[Outgoing]) -> None:
        if transfer.push:
            transfer.acked = transfer.acks.popleft()
            out.append((transfer.peer, p.push_ack(transfer.transfer_id, transfer.acked)))
            return
        assert transfer.holder is not None
        offset, length = transfer.pending.popleft()
        read_key = next(self._keys).to_bytes(8, "big")
        transfer.reads[read_key] = (offset, length, now)
        self.reads[read_key] = transfer.key
        self.holders[transfer.holder].reads += 1
        out.append((transfer.holder, p.holder_read(read_key, transfer.model.sha256, offset, length)))

    # ------------------------------------------------------------------------------------------ ending

    def _sweep(self, now: float, out: list[Outgoing]) -> None:
        cfg = self.config
        for transfer in list(self.transfers.values()):
            if now - transfer.last_heard >= cfg.idle_timeout:
                stalled = (p.CLIENT_STALLED, f"nothing from the client for {cfg.idle_timeout:g} s")
                self._close(transfer, stalled, out)
            elif any(now - sent >= cfg.read_timeout for _, _, sent in transfer.reads.values()):
                holder = self.holders.get(transfer.holder) if transfer.holder is not None else None
                name = holder.name if holder is not None else "its holder"
                self._move(transfer, f"{name} did not answer a read within {cfg.read_timeout:g} s", out)
        self._sweep_at = now + SWEEP_INTERVAL if self.transfers else float("inf")
        self._pump(now, out)

    def _close(
        self,
        transfer: Transfer,
        error: tuple[int, str] | None,
        out: list[Outgoing],
        why: str = "",
        store_done: bool = False,
    ) -> None:
        """Forget a transfer; tell its client about ``error`` if there is one, and the store that a push it has not
        ended itself (``store_done``) stops (it drops the bytes: a push starts over)."""
        if transfer.push and not store_done:
            out.append((STORE, p.transfer_end(transfer.key, p.OUTCOME_CANCELLED)))
        self._release(transfer)
        self.transfers.pop(transfer.key, None)
        open_here = self.by_peer.get(transfer.peer, {})
        open_here.pop(transfer.transfer_id, None)
        if not open_here:
            self.by_peer.pop(transfer.peer, None)
        if error is not None:
            log.warning("transfer of %s ended: %s", transfer.model.name, error[1])
            out.append((transfer.peer, p.transfer_ended(transfer.transfer_id, error)))
        elif why:
            log.info("transfer of %s ended: %s", transfer.model.name, why)

    # ------------------------------------------------------------------------------------------ tables

    def catalogue(self) -> list[dict[str, Any]]:
        """``mmi.models``: each model by name and sha256, with its size, the workers and stores that hold it, the
        holders whose copies were found bad, and the transfers of it under way."""
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for holder in self.holders.values():
            for model in holder.models.values():
                entry = entries.setdefault(
                    (model.name, model.sha256),
                    {"name": model.name, "sha256": model.sha256, "size": model.size, "workers": [], "stores": []},
                )
                entry["stores" if holder.identity == STORE else "workers"].append(holder.name)
        for entry in entries.values():
            entry["workers"].sort()
            entry["bad_copies"] = sorted(name for (_, sha256), name in self.bad.items() if sha256 == entry["sha256"])
            entry["transfers"] = sum(1 for t in self.transfers.values() if t.model.sha256 == entry["sha256"])
        return [entries[key] for key in sorted(entries)]

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables disagree. Used by tests after every step."""
        for holder in self.holders.values():
            reads = sum(1 for t in self.transfers.values() if t.holder == holder.identity for _ in t.reads)
            assert holder.reads == reads, f"{holder.name} counts {holder.reads} reads, has {reads}"
            pulls = sum(1 for t in self.transfers.values() if t.holder == holder.identity and not t.push)
            assert holder.transfers == pulls, f"{holder.name} counts {holder.transfers} pulls, serves {pulls}"
            assert holder.reads <= self.config.holder_reads, "a holder has more reads than its limit"
        assert set(self.reads.values()) <= set(self.transfers)
        for transfer in self.transfers.values():
            assert self.by_peer[transfer.peer][transfer.transfer_id] is transfer
            assert all(self.reads[key] == transfer.key for key in transfer.reads)
            assert len(transfer.pending) + len(transfer.reads) <= self.config.window or transfer.push
            assert transfer.holder is None or transfer.holder in self.holders
        assert sum(len(by_id) for by_id in self.by_peer.values()) == len(self.transfers)
