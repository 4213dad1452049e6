"""The broker's shard registry (broker/shards.py): allocation, leases, faults; alone and through BrokerCore."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from qmesh.broker.core import BrokerConfig, BrokerCore, Peer
from qmesh.broker.shards import ShardRegistry, choose, shares
from qmesh.common import protocol as p

TTL = 3.0
KEY_A, KEY_W = "A" * 40, "W" * 40


@dataclass(frozen=True)
class Host:
    name: str
    memory: int


def offer(name: str, memory: int, bridged: bool = False) -> p.ShardOffer:
    return p.ShardOffer(name, f"machine-{name}", "CPU", memory, f"127.0.0.1:{5000 + len(name)}", bridged)


def ask(memory: int, count: int = 0, model: str = "m", exclude: tuple[str, ...] = (), name: str = "w") -> p.ShardAsk:
    return p.ShardAsk(name, model, memory, count, exclude)


def frames_to(out: list[tuple[bytes, list[bytes]]], identity: bytes) -> list[p.ToShardPeer]:
    return [p.parse_for_shard_peer(frames) for to, frames in out if to == identity]


class Mesh:
    """A registry and the identities of its peers, with helpers that check every answer."""

    def __init__(self) -> None:
        self.registry = ShardRegistry(TTL)
        self.now = 0.0

    def send(self, identity: bytes, frames: list[bytes], peer: Peer | None = None) -> list[tuple[bytes, list[bytes]]]:
        out = self.registry.on_message(identity, frames, self.now, peer)
        self.registry.check_invariants()
        return out

    def host(self, identity: bytes, name: str, memory: int, peer: Peer | None = None) -> None:
        out = self.send(identity, p.shard_ready(offer(name, memory)), peer)
        assert frames_to(out, identity) == [p.ToShardPeer(p.W_HEARTBEAT)]

    def lease(self, identity: bytes, request: p.ShardAsk, peer: Peer | None = None) -> list[tuple[bytes, list[bytes]]]:
        return self.send(identity, p.shard_request(request), peer)


# ---------------------------------------------------------------------------------------------- choosing hosts


def test_as_few_as_fit_then_the_smallest_of_that_many() -> None:
    hosts = [Host("a", 100), Host("b", 300), Host("c", 200), Host("d", 120)]
    assert choose(hosts, 150, 0) == [Host("c", 200)]  # one fits: the smallest one that does
    assert choose(hosts, 350, 0) == [Host("c", 200), Host("b", 300)]  # two: the largest one alone is too small
    assert choose(hosts, 301, 0) == [Host("d", 120), Host("c", 200)]  # two, the smallest pair that fits
    assert choose(hosts, 720, 0) == sorted(hosts, key=lambda h: h.memory)  # all of them
    assert choose(hosts, 721, 0) is None
    assert choose(hosts, 150, 2) == [Host("a", 100), Host("d", 120)]  # two asked for: two given
    assert choose(hosts, 10, 5) is None and choose([], 1, 0) is None


def test_shares_follow_what_each_host_offers() -> None:
    assert shares(100, [100, 100]) == [50, 50]
    assert shares(101, [100, 300]) == [25, 76]
    assert sum(shares(7, [1, 1, 1])) == 7
    assert shares(3, [1, 1000, 1000]) == [1, 1, 1]  # a tiny host beside large ones still holds a part


@settings(max_examples=400)
@given(
    sizes=st.lists(st.integers(1, 50), max_size=7),
    memory=st.integers(1, 200),
    count=st.integers(0, 4),
)
def test_choose_against_every_subset(sizes: list[int], memory: int, count: int) -> None:
    memory = max(memory, count)  # an ask gives each host at least 1 MiB (the registry refuses less)
    hosts = [Host(f"h{i}", size) for i, size in enumerate(sizes)]
    chosen = choose(hosts, memory, count)

    def fits(k: int) -> bool:
        return any(sum(h.memory for h in subset) >= memory for subset in combinations(hosts, k))

    if count:
        assert (chosen is None) == (not fits(count))
    else:
        fewest = next((k for k in range(1, len(hosts) + 1) if fits(k)), None)
        assert (chosen is None) == (fewest is None)
        if chosen is not None:
            assert len(chosen) == fewest, "auto must pick the fewest hosts that fit"
    if chosen is not None:
        assert len({h.name for h in chosen}) == len(chosen) and all(h in hosts for h in chosen)
        assert sum(h.memory for h in chosen) >= memory
        assert all(0 < s <= h.memory for s, h in zip(shares(memory, [h.memory for h in chosen]), chosen, strict=True))
        assert sum(shares(memory, [h.memory for h in chosen])) == memory


# ---------------------------------------------------------------------------------------------- leases


def test_a_grant_assigns_its_hosts_and_no_one_else_gets_them() -> None:
    mesh = Mesh()
    mesh.host(b"h1", "one", 100, Peer("one", worker=True, client=False, models=None, key=KEY_A))
    mesh.host(b"h2", "two", 100)
    out = mesh.lease(b"w1", ask(150), Peer("w", worker=True, client=False, models=None, key=KEY_W))
    (grant,) = frames_to(out, b"w1")
    assert [place.name for place in grant.grant] == ["one", "two"]
    assert grant.grant[0].key == KEY_A and grant.grant[1].key is None
    assert [place.memory for place in grant.grant] == [75, 75]
    for host in (b"h1", b"h2"):
        assert frames_to(out, host) == [p.ToShardPeer(p.W_SHARD_ASSIGN, assign=p.ShardAssign("w", KEY_W))]
    (refused,) = frames_to(mesh.lease(b"w2", ask(10, name="x")), b"w2")
    assert refused.refusal is not None and refused.refusal[0] == p.QUEUE_FULL
    assert "0 free" in refused.refusal[1]
    table = {row["name"]: row for row in mesh.registry.table(mesh.now)}
    assert table["one"]["worker"] == "w" and table["one"]["used"] == 75 and table["one"]["free"] == 25


def test_a_lost_host_is_told_to_its_worker_and_a_released_one_leaves() -> None:
    mesh = Mesh()
    for i in range(3):
        mesh.host(bytes([i]), f"h{i}", 100)
    out = mesh.lease(b"w", ask(200, count=2))
    granted = [place.name for place in frames_to(out, b"w")[0].grant]
    lost = next(bytes([i]) for i in range(3) if f"h{i}" == granted[0])
    out = mesh.send(lost, p.disconnect())
    assert frames_to(out, b"w") == [p.ToShardPeer(p.W_SHARD_LOST, lost=granted[0])]
    # The worker lets the rest go and asks again, not for the host it could not reach: the host it still held
    # leaves (it restarts its rpc-server and registers again), so only the third one is free.
    kept = next(bytes([i]) for i in range(3) if f"h{i}" == granted[1])
    out = mesh.lease(b"w", ask(100, exclude=(granted[0],)))
    assert frames_to(out, kept) == [p.ToShardPeer(p.W_SHARD_RELEASE)]
    assert kept not in mesh.registry.hosts
    assert [place.name for place in frames_to(out, b"w")[-1].grant] == [
        f"h{i}" for i in range(3) if f"h{i}" not in granted
    ]


def test_the_worker_that_leaves_releases_every_host() -> None:
    mesh = Mesh()
    mesh.host(b"a", "a", 64)
    mesh.host(b"b", "b", 64)
    mesh.lease(b"w", ask(100))
    out = mesh.send(b"w", p.disconnect())
    assert sorted(to for to, _ in out) == [b"a", b"b"] and not mesh.registry.hosts and not mesh.registry.leases


def test_silence_removes_peers() -> None:
    mesh = Mesh()
    mesh.host(b"a", "a", 64)
    mesh.host(b"b", "b", 64)
    mesh.lease(b"w", ask(100))
    mesh.now = 2.0
    mesh.send(b"w", p.heartbeat())
    mesh.send(b"a", p.heartbeat())
    mesh.now = TTL + 0.5
    out = mesh.registry.heartbeat_round(mesh.now)
    assert frames_to(out, b"w")[0] == p.ToShardPeer(p.W_SHARD_LOST, lost="b")
    assert sorted(to for to, frames in out if frames == p.heartbeat()) == [b"a", b"w"]
    mesh.now = 10.0
    out = mesh.registry.heartbeat_round(mesh.now)
    assert not mesh.registry.hosts and not mesh.registry.leases


def test_keys_off_the_worker_list_and_models_their_keys_may_not_serve() -> None:
    mesh = Mesh()
    client_key = Peer("client", worker=False, client=True, models=None)
    out = mesh.send(b"x", p.shard_ready(offer("x", 100)), client_key)
    (refusal,) = frames_to(out, b"x")
    assert refusal.command == p.W_DISCONNECT and refusal.refusal is not None and refusal.refusal[0] == p.FORBIDDEN
    assert not mesh.registry.hosts
    mesh.host(b"limited", "limited", 100, Peer("limited", worker=True, client=False, models=frozenset({"other"})))
    assert frames_to(mesh.lease(b"w", ask(50)), b"w")[0].refusal[0] == p.QUEUE_FULL  # only for model "other"
    narrow = Peer("narrow", worker=True, client=False, models=frozenset({"other"}))
    refused = frames_to(mesh.lease(b"v", ask(50, model="m"), narrow), b"v")[0].refusal
    assert refused is not None and refused[0] == p.FORBIDDEN and "may not serve 'm'" in refused[1]
    assert frames_to(mesh.lease(b"u", ask(50, model="other"), narrow), b"u")[0].grant


def test_a_host_that_registers_again_replaces_its_old_connection() -> None:
    mesh = Mesh()
    mesh.host(b"old", "same", 100)
    mesh.lease(b"w", ask(50))
    out = mesh.send(b"new", p.shard_ready(offer("same", 100)))
    assert frames_to(out, b"w") == [p.ToShardPeer(p.W_SHARD_LOST, lost="same")]
    assert list(mesh.registry.hosts) == [b"new"]


# ---------------------------------------------------------------------------------------------- random histories

ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(0, 5), st.integers(1, 300)),
        st.tuples(st.just("ask"), st.integers(10, 15), st.integers(1, 600), st.integers(0, 3)),
        st.tuples(st.just("leave"), st.integers(0, 15)),
        st.tuples(st.just("beat"), st.integers(0, 15)),
        st.tuples(st.just("time"), st.floats(0.1, 2.0)),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(history=ops)
def test_no_host_ever_serves_two_workers(history: list[tuple]) -> None:
    mesh = Mesh()
    for op in history:
        if op[0] == "offer":
            mesh.send(bytes([op[1]]), p.shard_ready(offer(f"h{op[1]}", op[2])))
        elif op[0] == "ask":
            identity, memory, count = bytes([op[1]]), op[2], op[3]
            held = set(mesh.registry.leases[identity].hosts) if identity in mesh.registry.leases else set()
            free = [h for i, h in mesh.registry.hosts.items() if h.lease is None and i not in held]
            out = mesh.lease(identity, ask(memory, count, name=f"w{op[1]}"))
            replies = [m for m in frames_to(out, identity) if m.command == p.W_SHARD_GRANT]
            if identity in mesh.registry.hosts or not replies:
                continue
            (reply,) = replies
            expected = choose(free, memory, count) if memory >= count else None
            assert (reply.refusal is None) == (expected is not None)
            if expected is not None:
                assert sorted(place.name for place in reply.grant) == sorted(h.name for h in expected)
                assert sum(place.memory for place in reply.grant) == memory
        elif op[0] == "leave":
            mesh.send(bytes([op[1]]), p.disconnect())
        elif op[0] == "beat":
            mesh.send(bytes([op[1]]), p.heartbeat())
        else:
            mesh.now += op[1]
            mesh.registry.heartbeat_round(mesh.now)
            mesh.registry.check_invariants()


# ---------------------------------------------------------------------------------------------- through the core


def test_the_core_hands_shard_peers_to_its_registry() -> None:
    core = BrokerCore(BrokerConfig(heartbeat_interval=1.0, liveness=2))
    assert core.on_message(b"h", p.shard_ready(offer("h", 100)), 0.0) == [(b"h", p.heartbeat())]
    out = core.on_message(b"w", p.shard_request(ask(80)), 0.1)
    assert [to for to, _ in out] == [b"h", b"w"] and not core.workers
    assert core.on_message(b"h", p.heartbeat(), 0.2) == []  # a shard host's heartbeat is not a stray worker's
    answer = core.on_message(b"c", p.client_request("mmi.shards", [], b"id"), 0.3)
    (row,) = p.unpack(p.parse_for_client(answer[0][1]).body[0])
    assert (row["name"], row["worker"], row["used"], row["free"]) == ("h", "w", 80, 20)
    core.check_invariants()
    assert (b"w", p.shard_lost("h")) in core.on_unreachable(b"h", 0.4)
    out = core.tick(5.0)  # the lease fell silent
    assert not core.shards.leases
    out = core.on_message(b"w", p.heartbeat(), 5.1)  # a stranger now: told to register again, as a worker is
    assert out == [(b"w", p.disconnect())]


def test_metrics_count_shard_hosts_their_memory_and_split_workers() -> None:
    from qmesh.broker.metrics import BrokerMetrics

    core = BrokerCore()
    for name in ("a", "b", "c"):
        core.on_message(name.encode(), p.shard_ready(offer(name, 100)), 0.0)
    core.on_message(b"w", p.shard_request(ask(150, model="big")), 0.0)
    metrics = BrokerMetrics()
    metrics.update(core, 0.0)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert (sample("qmesh_shard_hosts", state="used"), sample("qmesh_shard_hosts", state="free")) == (2, 1)
    assert sample("qmesh_shard_memory_bytes", state="used") == 150 * 2**20
    assert sample("qmesh_shard_memory_bytes", state="free") == 150 * 2**20
    assert sample("qmesh_split_workers", model="big") == 1
    core.on_message(b"w", p.disconnect(), 1.0)
    metrics.update(core, 1.0)
    assert sample("qmesh_split_workers", model="big") == 0
    assert sample("qmesh_shard_hosts", state="free") == 1  # the released two register again once restarted
