"""Shard hosts and the split workers that hold them (issue 19), with no sockets: a registry fed events and the
monotonic time, returning the messages to send, as ``BrokerCore`` does (the core owns one and hands it every
message of a shard peer).

A shard host offers the memory of one llama.cpp rpc-server. rpc-server serves one client at a time and keeps
whatever that client allocated, so a host belongs to at most one split worker at once: the broker never gives one
host's memory to two workers. A split worker holds its hosts through a *lease* (its own connection): it asks for
N hosts (or as few as fit) with M MiB together, and the registry picks them (``choose``), tells each host which
worker holds it now (ASSIGN, with that worker's key, the only one its CURVE bridge admits) and tells the worker
where its hosts are (GRANT, with each host's key and the MiB of the model it puts there). A host that dies is LOST
to its lease; a lease that ends, or asks again, RELEASEs its hosts, which leave the registry: each restarts its
rpc-server, so nothing of the old worker lingers there, and registers again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from qmesh.common import protocol as p

if TYPE_CHECKING:
    from qmesh.broker.core import Outgoing, Peer

log = logging.getLogger(__name__)


class Offering(Protocol):
    """What ``choose`` reads of a shard host."""

    @property
    def name(self) -> str: ...

    @property
    def memory(self) -> int: ...


H = TypeVar("H", bound=Offering)


def choose(free: Sequence[H], memory: int, count: int) -> list[H] | None:
    """``count`` of the ``free`` hosts (0: as few as fit) whose memory together holds ``memory`` MiB; None if no
    such set exists.

    As few as fit: the largest hosts taken first show the fewest that can hold it (no k hosts hold more than the
    k largest). Among the sets of that many (or of ``count``), the one that wastes least of the windows of hosts
    next to each other in size, so that large hosts stay free for the models that need them.
    """
    by_size = sorted(free, key=lambda host: (host.memory, host.name))
    if count == 0:
        total = 0
        for taken, host in enumerate(reversed(by_size), start=1):
            total += host.memory
            if total >= memory:
                count = taken
                break
        else:
            return None
    for start in range(len(by_size) - count + 1):  # window sums grow with start: the first that fits is the least
        window = by_size[start : start + count]
        if sum(host.memory for host in window) >= memory:
            return window
    return None


def shares(memory: int, offered: Sequence[int]) -> list[int]:
    """``memory`` MiB (at least one per host) spread over hosts in proportion to what each offers (llama-server's
    --tensor-split does the same with the layers); whole MiB that add up to ``memory``, none above what its host
    offers, none zero."""
    total = sum(offered)
    exact = [memory * size / total for size in offered]
    parts = [int(share) for share in exact]
    by_remainder = sorted(range(len(offered)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: memory - sum(parts)]:
        parts[i] += 1
    for i, part in enumerate(parts):  # a tiny host beside large ones: one MiB taken from the largest share
        if part == 0:
            parts[parts.index(max(parts))] -= 1
            parts[i] = 1
    return parts


@dataclass(slots=True)
class ShardHost:
    identity: bytes
    offer: p.ShardOffer
    key: str | None  # its CURVE key, as the broker authenticated it (None without CURVE)
    models: frozenset[str] | None  # the models its key may serve (None: any)
    expires_at: float
    lease: bytes | None = None  # the lease that holds it
    used: int = 0  # MiB of its lease's model placed on it

    @property
    def name(self) -> str:
        return self.offer.name

    @property
    def memory(self) -> int:
        return self.offer.memory


@dataclass(slots=True)
class Lease:
    identity: bytes
    ask: p.ShardAsk  # its last ask
    key: str | None  # the split worker's CURVE key, which its hosts' bridges admit
    expires_at: float
    hosts: list[bytes]  # those it holds, in the order of its grant


class ShardRegistry:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl  # seconds a shard peer may stay silent
        self.hosts: dict[bytes, ShardHost] = {}
        self.leases: dict[bytes, Lease] = {}
        self.dropped_messages = 0

    def __contains__(self, identity: bytes) -> bool:
        return identity in self.hosts or identity in self.leases

    # ------------------------------------------------------------------------------------------ events

    def on_message(self, identity: bytes, frames: list[bytes], now: float, peer: Peer | None) -> list[Outgoing]:
        """A message from a shard peer, or from a peer whose first message is a SHARD READY or REQUEST. ``peer``:
        who sent it when the broker authenticates (a key must be on the worker allow-list)."""
        try:
            message = p.parse_from_shard_peer(frames)
        except p.ProtocolError as exc:
            self.dropped_messages += 1
            log.debug(
                "dropped malformed message from shard peer %s: %s (%d so far)",
                identity.hex(),
                exc,
                self.dropped_messages,
            )
            return []
        out: list[Outgoing] = []
        if peer is not None and not peer.worker:
            log.warning("refused shard peer key %s, which is not on the worker list", peer.name)
            self._remove(identity, f"key {peer.name} not allowed", out)
            reason = f"key {peer.name} is not on the broker's worker allow-list"
            out.append((identity, p.disconnect((p.FORBIDDEN, reason))))
            return out
        if isinstance(message, p.WorkerDisconnect):
            self._remove(identity, "disconnected", out)
        elif isinstance(message, p.WorkerHeartbeat):
            self._refresh(identity, now)
        elif isinstance(message, p.ShardOffer):
            self._on_offer(identity, message, now, peer, out)
        else:
            self._on_ask(identity, message, now, peer, out)
        return out

    def on_unreachable(self, identity: bytes) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._remove(identity, "unreachable", out)
        return out

    def heartbeat_round(self, now: float) -> list[Outgoing]:
        """Each heartbeat interval: a HEARTBEAT to every shard peer, and the silent ones removed."""
        out: list[Outgoing] = []
        for identity in [i for i, host in self.hosts.items() if host.expires_at <= now] + [
            i for i, lease in self.leases.items() if lease.expires_at <= now
        ]:
            self._remove(identity, "missed heartbeats", out)
        beat = p.heartbeat()
        out.extend((identity, beat) for identity in [*self.hosts, *self.leases])
        return out

    def forget_all(self) -> list[Outgoing]:
        """The broker stops serving (a pair's step-down): every shard peer is told to register again elsewhere."""
        out = [(identity, p.disconnect()) for identity in [*self.hosts, *self.leases]]
        self.hosts.clear()
        self.leases.clear()
        return out

    # ------------------------------------------------------------------------------------------ rules

    def _refresh(self, identity: bytes, now: float) -> None:
        peer = self.hosts.get(identity) or self.leases.get(identity)
        if peer is not None:
            peer.expires_at = now + self.ttl

    def _on_offer(
        self, identity: bytes, offer: p.ShardOffer, now: float, peer: Peer | None, out: list[Outgoing]
    ) -> None:
        if identity in self:
            log.warning("shard peer %s sent a second hello: disconnecting it", identity.hex())
            self._remove(identity, "protocol violation (a second hello)", out)
            out.append((identity, p.disconnect()))
            return
        for stale in [i for i, host in self.hosts.items() if host.name == offer.name]:
            self._remove(stale, "registered again", out)  # its old connection, which we had not seen end
        models = peer.models if peer is not None else None
        key = peer.key if peer is not None else None
        self.hosts[identity] = ShardHost(identity, offer, key, models, now + self.ttl)
        kind = "through its CURVE bridge" if offer.bridged else "directly"
        log.info(
            "shard host %s ready: %d MiB on %s at %s (%s)", offer.name, offer.memory, offer.device, offer.endpoint, kind
        )
        out.append((identity, p.heartbeat()))  # the answer a shard host waits for before it counts as registered

    def _on_ask(self, identity: bytes, ask: p.ShardAsk, now: float, peer: Peer | None, out: list[Outgoing]) -> None:
        if identity in self.hosts:
            self._remove(identity, "protocol violation (a shard host asked for shards)", out)
            out.append((identity, p.disconnect()))
            return
        if peer is not None and peer.models is not None and ask.model not in peer.models:
            allowed = ", ".join(sorted(peer.models)) or "none"
            text = f"key {peer.name} may not serve {ask.model!r} (allowed: {allowed})"
            out.append((identity, p.shard_refusal(p.FORBIDDEN, text)))
            return
        lease = self.leases.get(identity)
        if lease is None:
            lease = self.leases[identity] = Lease(identity, ask, peer.key if peer is not None else None, 0.0, [])
        else:
            self._release(lease, out)  # a lease holds one grant: asking again gives back the hosts it held
            lease.ask = ask
        lease.expires_at = now + self.ttl
        if ask.memory < ask.count:
            out.append((identity, p.shard_refusal(p.BAD_REQUEST, "an ask needs at least 1 MiB for each host")))
            return
        excluded = set(ask.exclude)
        free = [
            host
            for host in self.hosts.values()
            if host.lease is None and host.name not in excluded and (host.models is None or ask.model in host.models)
        ]
        chosen = choose(free, ask.memory, ask.count)
        if chosen is None:
            out.append((identity, p.shard_refusal(p.QUEUE_FULL, _shortage(ask, free))))
            return
        places = []
        for host, share in zip(chosen, shares(ask.memory, [h.memory for h in chosen]), strict=True):
            host.lease, host.used = identity, share
            lease.hosts.append(host.identity)
            out.append((host.identity, p.shard_assign(p.ShardAssign(ask.name, lease.key))))
            offer = host.offer
            place = p.ShardPlace(offer.name, offer.host, offer.device, offer.endpoint, offer.bridged, host.key, share)
            places.append(place)
        log.info("split worker %s of %s holds %s", ask.name, ask.model, ", ".join(h.name for h in chosen))
        out.append((identity, p.shard_grant(tuple(places))))

    def _remove(self, identity: bytes, reason: str, out: list[Outgoing]) -> None:
        host = self.hosts.pop(identity, None)
        if host is not None:
            log.warning("shard host %s removed: %s", host.name, reason)
            lease = self.leases.get(host.lease) if host.lease is not None else None
            if lease is not None:
                lease.hosts.remove(identity)
                out.append((lease.identity, p.shard_lost(host.name)))
            return
        lease = self.leases.pop(identity, None)
        if lease is not None:
            if lease.hosts:
                log.info("split worker %s let its shard hosts go: %s", lease.ask.name, reason)
            self._release(lease, out)

    def _release(self, lease: Lease, out: list[Outgoing]) -> None:
        """The lease's hosts leave: each restarts its rpc-server (cutting off whoever still uses it) and registers
        again, free."""
        for identity in lease.hosts:
            del self.hosts[identity]
            out.append((identity, p.shard_release()))
        lease.hosts = []

    # ------------------------------------------------------------------------------------------ reading

    def table(self, now: float) -> list[dict[str, Any]]:
        """``mmi.shards``: each shard host, what it offers, how much of it is used and by which split worker."""
        rows = []
        for host in sorted(self.hosts.values(), key=lambda h: h.name):
            lease = self.leases.get(host.lease) if host.lease is not None else None
            ask = lease.ask if lease is not None else None
            offer = host.offer
            rows.append(
                {
                    "name": offer.name,
                    "host": offer.host,
                    "device": offer.device,
                    "memory": offer.memory,
                    "used": host.used,
                    "free": offer.memory - host.used,
                    "worker": ask.name if ask is not None else None,
                    "model": ask.model if ask is not None else None,
                    "bridged": offer.bridged,
                    "last_seen_s": round(max(0.0, now - (host.expires_at - self.ttl)), 3),
                }
            )
        return rows

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables disagree. Used by tests after every step."""
        held: set[bytes] = set()
        for identity, lease in self.leases.items():
            assert lease.identity == identity
            for host_identity in lease.hosts:
                assert host_identity not in held, "a shard host is held by two split workers"
                held.add(host_identity)
                host = self.hosts[host_identity]
                assert host.lease == identity, "a lease holds a host that names another"
            if lease.hosts:
                total = sum(self.hosts[h].used for h in lease.hosts)
                assert total <= lease.ask.memory, "more placed than asked for"
        for identity, host in self.hosts.items():
            assert host.identity == identity and identity not in self.leases
            assert (host.lease is None) == (identity not in held), "a host names a lease that does not hold it"
            assert 0 <= host.used <= host.memory, "more placed on a host than it offers"
            assert host.lease is not None or host.used == 0
        names = [host.name for host in self.hosts.values()]
        assert len(names) == len(set(names)), "two live shard hosts of one name"


def _shortage(ask: p.ShardAsk, free: list[ShardHost]) -> str:
    """Why no grant, for the worker's log: what it asked for against what is free now."""
    wanted = f"{ask.count} shard host(s)" if ask.count else "shard hosts"
    largest = max((host.memory for host in free), default=0)
    return (
        f"no {wanted} with {ask.memory} MiB together for {ask.model}: {len(free)} free, "
        f"{sum(host.memory for host in free)} MiB in all, the largest {largest} MiB"
    )
