"""Unit and property tests of the broker's model transfers (broker/transfers.py): no sockets, no files, no sleeps.

Holders and clients are routing ids; the store is ``STORE``, answered by hand here (``broker.models_store`` has
tests of its own). Every step ends with ``check_invariants``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from qmesh.broker.core import BrokerConfig, BrokerCore, Peer
from qmesh.broker.transfers import STORE, TransferConfig, Transfers
from qmesh.common import protocol as p

SHA = "ab" * 32
OTHER_SHA = "cd" * 32
MODEL = p.ModelInfo("tiny", SHA, 10)
CHUNK, WINDOW = 4, 2
PULLER, PULLER_2 = b"puller-1", b"puller-2"
W1, W2 = b"worker-1", b"worker-2"
CONFIG = TransferConfig(chunk=CHUNK, window=WINDOW, rate=0.0, busy_rate=0.0, per_peer=2, holder_reads=4)


def transfers(config: TransferConfig = CONFIG, busy: bool = False) -> Transfers:
    machine = Transfers(config, busy=lambda: busy)
    machine.add_holder(W1, "host-a/1/0", "a:tiny.gguf", MODEL)
    return machine


def two_holders(config: TransferConfig = CONFIG) -> Transfers:
    """``transfers()`` with a second worker holding the same file."""
    machine = transfers(config)
    machine.add_holder(W2, "host-b/1/0", "b:tiny.gguf", MODEL)
    return machine


def other_holder(holder: bytes) -> bytes:
    return W2 if holder == W1 else W1


def to(out: list[tuple[bytes, list[bytes]]], peer: bytes) -> list[list[bytes]]:
    return [frames for identity, frames in out if identity == peer]


def replies(out: list[tuple[bytes, list[bytes]]], peer: bytes) -> list[p.TransferReply]:
    return [p.parse_transfer_reply(frames) for frames in to(out, peer)]


def reads(out: list[tuple[bytes, list[bytes]]], holder: bytes) -> list[tuple[bytes, p.HolderRead]]:
    parsed = [p.parse_for_worker(frames) for frames in to(out, holder)]
    return [(message.route_key, message.read) for message in parsed if message.read is not None]


def fetch(machine: Transfers, client: bytes = PULLER, name: str = "tiny", tid: bytes = b"t1", key: Peer | None = None):
    """FETCH from ``client``, whose CURVE key (None: no CURVE) is ``key``."""
    out = machine.on_message(client, p.parse_inbound(p.model_fetch(tid, name)), 0.0, key)
    machine.check_invariants()
    return out


def ask(machine: Transfers, offset: int, length: int, peer: bytes = PULLER, tid: bytes = b"t1", now: float = 0.0):
    out = machine.on_message(peer, p.parse_inbound(p.chunk_request(tid, offset, length)), now)
    machine.check_invariants()
    return out


def answer(machine: Transfers, holder: bytes, key: bytes, read: p.HolderRead, data: bytes | None = None):
    frames = p.holder_data(key, read.offset, data if data is not None else bytes(read.length))
    out = machine.on_message(holder, p.parse_inbound(frames), 0.0)
    machine.check_invariants()
    return out


def test_an_unknown_model_is_a_404_naming_what_the_mesh_holds() -> None:
    (reply,) = replies(fetch(transfers(), name="nope"), PULLER)
    assert reply.command == p.C_ENDED and reply.error is not None
    assert reply.error[0] == p.UNKNOWN_MODEL and "'nope'" in reply.error[1] and "held: tiny" in reply.error[1]


def test_a_pull_is_offered_then_each_chunk_asked_for_is_read_from_the_holder_and_forwarded() -> None:
    machine = transfers()
    (offer,) = replies(fetch(machine), PULLER)
    assert (offer.command, offer.model, offer.chunk, offer.window) == (p.C_OFFER, MODEL, CHUNK, WINDOW)
    out = ask(machine, 0, 4) + ask(machine, 4, 4)
    issued = reads(out, W1)
    assert [(read.sha256, read.offset, read.length) for _, read in issued] == [(SHA, 0, 4), (SHA, 4, 4)]
    (data,) = replies(answer(machine, W1, *issued[1], b"efgh"), PULLER)
    assert (data.command, data.transfer_id, data.offset, data.data) == (p.C_DATA, b"t1", 4, b"efgh")
    assert machine.by_peer[PULLER][b"t1"].bytes == 4


def test_the_store_serves_before_workers_and_the_least_busy_worker_before_others() -> None:
    machine = two_holders()
    fetch(machine, tid=b"a")
    assert machine.transfers[next(iter(machine.transfers))].holder == W1
    fetch(machine, tid=b"b")
    assert {t.holder for t in machine.transfers.values()} == {W1, W2}, "the second pull goes to the idle holder"
    machine.set_store([MODEL])
    fetch(machine, PULLER_2, tid=b"c")
    assert machine.by_peer[PULLER_2][b"c"].holder == STORE


def test_names_that_could_leave_the_models_folder_are_refused() -> None:
    for name in ("../tiny", "a/b", "..", ".hidden", "x" * 200):
        (reply,) = replies(fetch(transfers(), name=name), PULLER)
        assert reply.error is not None and reply.error[0] == p.BAD_REQUEST, name
    assert "'..'" in replies(fetch(transfers(), name="../tiny"), PULLER)[0].error[1]


def test_keys_fetch_only_what_their_lists_allow() -> None:
    limited = Peer("gpu1", worker=True, client=False, models=frozenset({"other"}))
    (reply,) = replies(fetch(transfers(), key=limited), PULLER)
    assert reply.error == (p.FORBIDDEN, "key gpu1 may not fetch or serve 'tiny' (allowed: other)")
    for allowed in (
        Peer("alice", worker=False, client=True, models=frozenset()),
        Peer("gpu2", worker=True, client=False, models=frozenset({"tiny"})),
    ):
        assert replies(fetch(transfers(), key=allowed), PULLER)[0].command == p.C_OFFER
    revoked = Peer("gone", worker=False, client=False, models=frozenset())
    assert replies(fetch(transfers(), key=revoked), PULLER)[0].error[0] == p.FORBIDDEN


def test_a_connection_may_have_only_so_many_transfers_at_once() -> None:
    machine = transfers()
    fetch(machine, tid=b"a")
    fetch(machine, tid=b"b")
    (reply,) = replies(fetch(machine, tid=b"c"), PULLER)
    assert reply.error is not None and reply.error[0] == p.TOO_MANY_REQUESTS


def test_a_holder_that_leaves_hands_its_ranges_in_order_to_another() -> None:
    machine = two_holders()
    fetch(machine)
    holder = machine.by_peer[PULLER][b"t1"].holder
    other = other_holder(holder)
    ask(machine, 0, 4)
    ask(machine, 4, 4)
    out = machine.remove_holder(holder, 1.0)
    machine.check_invariants()
    assert [(read.offset, read.length) for _, read in reads(out, other)] == [(0, 4), (4, 4)]


def test_a_pull_whose_last_holder_leaves_ends_in_502() -> None:
    machine = transfers()
    fetch(machine)
    ask(machine, 0, 4)
    (reply,) = replies(machine.remove_holder(W1, 1.0), PULLER)
    assert reply.error is not None and reply.error[0] == p.WORKER_FAILED
    assert "left the mesh" in reply.error[1]
    assert not machine.transfers and machine.holders == {}


def test_a_truncated_copy_is_marked_bad_its_range_read_elsewhere_and_it_is_never_asked_again() -> None:
    machine = two_holders()
    fetch(machine)
    bad = machine.by_peer[PULLER][b"t1"].holder
    good = other_holder(bad)
    ((key, read),) = reads(ask(machine, 8, 2), bad)
    failed = p.parse_inbound(p.holder_read_failed(key, p.RANGE_NOT_SATISFIABLE, "the file holds 9 bytes"))
    out = machine.on_message(bad, failed, 0.0)
    machine.check_invariants()
    assert [(r.offset, r.length) for _, r in reads(out, good)] == [(8, 2)]
    fetch(machine, PULLER_2)
    assert machine.by_peer[PULLER_2][b"t1"].holder == good
    assert machine.catalogue()[0]["bad_copies"] == [machine.holders[bad].name]


def test_bytes_of_the_wrong_length_count_as_a_bad_copy_too() -> None:
    machine = transfers()
    fetch(machine)
    ((key, read),) = reads(ask(machine, 0, 4), W1)
    (reply,) = replies(answer(machine, W1, key, read, b"ab"), PULLER)
    assert reply.error is not None and reply.error[0] == p.WORKER_FAILED
    assert ("a:tiny.gguf", SHA) in machine.bad


def test_a_mismatch_blames_every_copy_that_served_the_pull() -> None:
    machine = transfers()
    fetch(machine)
    ((key, read),) = reads(ask(machine, 0, 4), W1)
    answer(machine, W1, key, read)
    machine.on_message(PULLER, p.parse_inbound(p.transfer_end(b"t1", p.OUTCOME_MISMATCH)), 0.0)
    machine.check_invariants()
    (reply,) = replies(fetch(machine, tid=b"t2"), PULLER)
    assert reply.error is not None and reply.error[0] == p.WORKER_FAILED
    assert "host-a/1/0 served bytes that did not match it" in reply.error[1]
    assert SHA in reply.error[1]


def test_a_cancelled_pull_blames_nobody() -> None:
    machine = transfers()
    fetch(machine)
    machine.on_message(PULLER, p.parse_inbound(p.transfer_end(b"t1", p.OUTCOME_CANCELLED)), 0.0)
    assert not machine.bad and not machine.transfers and machine.holders[W1].transfers == 0


def test_a_holder_that_does_not_answer_in_time_hands_its_ranges_on() -> None:
    config = TransferConfig(chunk=CHUNK, window=WINDOW, read_timeout=5.0, idle_timeout=100.0)
    machine = two_holders(config)
    fetch(machine)
    slow = machine.by_peer[PULLER][b"t1"].holder
    ask(machine, 0, 4)
    assert machine.next_wakeup() <= 1.0
    assert machine.tick(1.0) == []
    out = machine.tick(6.0)
    machine.check_invariants()
    other = other_holder(slow)
    assert [(r.offset, r.length) for _, r in reads(out, other)] == [(0, 4)]


def test_a_transfer_its_client_left_idle_is_dropped_with_408() -> None:
    machine = transfers(TransferConfig(chunk=CHUNK, window=WINDOW, idle_timeout=10.0))
    fetch(machine)
    assert machine.tick(5.0) == []
    (reply,) = replies(machine.tick(11.0), PULLER)
    assert reply.error is not None and reply.error[0] == p.CLIENT_STALLED
    assert machine.next_wakeup() == float("inf")


def test_more_chunks_than_the_window_end_the_transfer() -> None:
    machine = transfers()
    fetch(machine)
    ask(machine, 0, 4)
    ask(machine, 4, 4)
    (reply,) = replies(ask(machine, 8, 2), PULLER)
    assert reply.error is not None and reply.error[0] == p.BAD_REQUEST and "window" in reply.error[1]


def test_a_chunk_past_the_end_or_larger_than_offered_ends_the_transfer() -> None:
    for offset, length in ((8, 4), (0, 5)):
        machine = transfers()
        fetch(machine)
        (reply,) = replies(ask(machine, offset, length), PULLER)
        assert reply.error is not None and reply.error[0] == p.BAD_REQUEST


def test_while_requests_run_the_pacer_spreads_the_reads_over_time() -> None:
    # 4 bytes a second, at most two chunks (8 bytes) saved up: two reads at once, then one a second.
    config = TransferConfig(chunk=CHUNK, window=WINDOW, rate=0.0, busy_rate=4.0, idle_timeout=1e9)
    busy = transfers(config, busy=True)
    idle = transfers(config, busy=False)
    for machine in (busy, idle):
        fetch(machine)
        for offset in (0, 4):
            ask(machine, offset, 4)
    # answer both, ask for the next: idle goes on at once, busy waits for the bucket
    for machine in (busy, idle):
        for key, read in list(_outstanding(machine)):
            answer(machine, W1, key, read)
    assert reads(ask(idle, 8, 2), W1)
    assert reads(ask(busy, 8, 2), W1) == []
    assert 0.0 < busy.next_wakeup() <= 2.0
    assert reads(busy.tick(busy.next_wakeup()), W1)


def test_the_busy_pace_holds_a_moment_after_the_last_request() -> None:
    """Between two requests of a stream's client the mesh is not idle: no burst in that gap."""
    for hold, paced in ((2.0, True), (0.0, False)):
        config = TransferConfig(chunk=CHUNK, window=WINDOW, busy_rate=4.0, busy_hold=hold, idle_timeout=1e9)
        requests_in_flight = [True]
        machine = Transfers(config, busy=lambda flag=requests_in_flight: flag[0])
        machine.add_holder(W1, "w1", "a:tiny.gguf", MODEL)
        fetch(machine)
        issued = reads(ask(machine, 0, 4) + ask(machine, 4, 4), W1)  # the two chunks saved up
        for key, read in issued:
            answer(machine, W1, key, read)
        requests_in_flight[0] = False
        assert bool(reads(ask(machine, 8, 2, now=0.1), W1)) is not paced
        if paced:
            assert machine.next_wakeup() == pytest.approx(0.5)
            assert reads(machine.tick(0.5), W1)


def test_transfers_take_turns_chunk_by_chunk() -> None:
    machine = Transfers(replace(CONFIG, window=3, holder_reads=1), busy=lambda: False)  # one read at a time
    machine.add_holder(W1, "w1", "a:tiny.gguf", MODEL)
    fetch(machine, PULLER, tid=b"a")
    fetch(machine, PULLER_2, tid=b"b")
    issued = []
    for client, tid in ((PULLER, b"a"), (PULLER_2, b"b")):
        for offset, length in ((0, 4), (4, 4), (8, 2)):
            issued += reads(ask(machine, offset, length, client, tid), W1)
    order = []
    while issued:
        key, read = issued.pop()
        order.append(machine.transfers[machine.reads[key]].transfer_id)
        issued += reads(answer(machine, W1, key, read), W1)
    assert order == [b"a", b"a", b"b", b"a", b"b", b"b"]


def _outstanding(machine: Transfers) -> list[tuple[bytes, p.HolderRead]]:
    return [
        (key, p.HolderRead(t.model.sha256, offset, length))
        for t in machine.transfers.values()
        for key, (offset, length, _) in t.reads.items()
    ]


# ------------------------------------------------------------------------------------------------ pushes


def store_answer(machine: Transfers, frames: list[bytes]) -> list:
    out = machine.on_store_reply(frames, 0.0)
    machine.check_invariants()
    return out


def test_a_push_is_relayed_to_the_store_and_its_acknowledgements_are_the_clients_credit() -> None:
    machine = Transfers(CONFIG)
    machine.set_store([])
    out = machine.on_message(PULLER, p.parse_inbound(p.model_push(b"up", MODEL)), 0.0)
    ((store_push,),) = [[p.parse_inbound(frames)] for frames in to(out, STORE)]
    assert isinstance(store_push, p.ModelPush) and store_push.model == MODEL
    key = store_push.transfer_id
    (offer,) = replies(store_answer(machine, p.push_ack(key, 0)), PULLER)
    assert (offer.command, offer.offset, offer.chunk, offer.window) == (p.C_OFFER, 0, CHUNK, WINDOW)
    out = machine.on_message(PULLER, p.parse_inbound(p.push_chunk(b"up", 0, b"abcd")), 0.0)
    assert [p.parse_inbound(f) for f in to(out, STORE)] == [p.PushChunk(key, 0, b"abcd")]
    (ack,) = replies(store_answer(machine, p.push_ack(key, 4)), PULLER)
    assert (ack.command, ack.offset) == (p.C_ACK, 4)
    (done,) = replies(store_answer(machine, p.transfer_ended(key, None, MODEL)), PULLER)
    assert (done.command, done.model) == (p.C_ENDED, MODEL)
    assert machine.catalogue()[0]["stores"] == ["the broker's store"] and not machine.transfers


def test_pushes_the_store_cannot_take_are_refused_before_any_byte() -> None:
    no_store = Transfers(CONFIG)
    (reply,) = replies(no_store.on_message(PULLER, p.parse_inbound(p.model_push(b"up", MODEL)), 0.0), PULLER)
    assert reply.error is not None and reply.error[0] == p.UNKNOWN_MODEL and "--models-dir" in reply.error[1]
    machine = transfers()
    machine.set_store([])
    other = p.ModelInfo("tiny", OTHER_SHA, 10)
    (reply,) = replies(machine.on_message(PULLER, p.parse_inbound(p.model_push(b"up", other)), 0.0), PULLER)
    assert reply.error is not None and reply.error[0] == p.CONFLICT and SHA in reply.error[1]
    machine.set_store([MODEL])
    (reply,) = replies(machine.on_message(PULLER, p.parse_inbound(p.model_push(b"up", MODEL)), 0.0), PULLER)
    assert (reply.command, reply.error, reply.model) == (p.C_ENDED, None, MODEL), "stored already: nothing to send"


def test_a_push_out_of_order_ends_and_the_store_is_told() -> None:
    machine = Transfers(CONFIG)
    machine.set_store([])
    out = machine.on_message(PULLER, p.parse_inbound(p.model_push(b"up", MODEL)), 0.0)
    key = p.parse_inbound(to(out, STORE)[0]).transfer_id
    store_answer(machine, p.push_ack(key, 0))
    out = machine.on_message(PULLER, p.parse_inbound(p.push_chunk(b"up", 4, b"abcd")), 0.0)
    assert p.parse_inbound(to(out, STORE)[0]) == p.TransferEnd(key, p.OUTCOME_CANCELLED)
    assert replies(out, PULLER)[0].error[0] == p.BAD_REQUEST


def test_a_client_that_goes_away_ends_its_transfers_and_its_push() -> None:
    machine = transfers()
    machine.set_store([])
    fetch(machine)
    out = machine.on_message(PULLER, p.parse_inbound(p.model_push(b"up", p.ModelInfo("new", OTHER_SHA, 3))), 0.0)
    key = p.parse_inbound(to(out, STORE)[0]).transfer_id
    out = machine.peer_gone(PULLER, 1.0)
    machine.check_invariants()
    assert [p.parse_inbound(f) for f in to(out, STORE)] == [p.TransferEnd(key, p.OUTCOME_CANCELLED)]
    assert not machine.transfers and not to(out, PULLER)


# ------------------------------------------------------------------------------------------------ in the core


def ready(core: BrokerCore, identity: bytes, sha256: str, now: float = 0.0) -> list:
    info = {"slots": 1, "name": identity.decode(), "sha256": sha256, "size": 10, "worker_id": identity.hex()}
    return core.on_message(identity, p.ready("tiny", info), now)


def test_a_second_file_under_one_name_is_refused_with_409_naming_both_digests() -> None:
    core = BrokerCore(BrokerConfig())
    ready(core, W1, SHA)
    ((identity, frames),) = ready(core, W2, OTHER_SHA)
    refusal = p.parse_for_worker(frames).refusal
    assert identity == W2 and refusal is not None and refusal[0] == p.CONFLICT
    assert SHA in refusal[1] and OTHER_SHA in refusal[1]
    assert list(core.workers) == [W1]
    assert p.parse_for_worker(ready(core, b"worker-3", SHA)[0][1]).command == p.W_HEARTBEAT, "the same file is fine"
    core.check_invariants()


def test_a_ready_with_a_malformed_digest_is_refused() -> None:
    core = BrokerCore(BrokerConfig())
    ((_, frames),) = core.on_message(W1, p.ready("tiny", {"slots": 1, "sha256": "not hex", "size": 10}), 0.0)
    refusal = p.parse_for_worker(frames).refusal
    assert refusal is not None and refusal[0] == p.BAD_REQUEST and "sha256" in refusal[1]


def test_the_core_hands_transfers_on_and_lists_them_in_mmi_models() -> None:
    core = BrokerCore(BrokerConfig())
    ready(core, W1, SHA)
    (reply,) = [p.parse_transfer_reply(f) for _, f in core.on_message(PULLER, p.model_fetch(b"t", "tiny"), 0.0)]
    assert reply.command == p.C_OFFER
    ((_, final),) = core.on_message(b"client", p.client_request("mmi.models", [], b"q"), 0.0)
    (listing,) = p.unpack(p.parse_for_client(final).body[0])
    assert listing["workers"] == ["worker-1"] and listing["transfers"] == 1
    out = core.on_message(W1, p.disconnect(), 1.0)  # the holder leaves: the pull ends, naming why
    assert p.parse_transfer_reply(to(out, PULLER)[0]).error[0] == p.WORKER_FAILED
    core.check_invariants()


# ------------------------------------------------------------------------------------------------ random histories


class TransfersMachine(RuleBasedStateMachine):
    """Random pulls, chunks, answers, failures, holders that come and go, clients that leave, and time. Checks that
    a client gets only bytes it asked for, each range at most once, and that the tables stay consistent."""

    @initialize()
    def start(self) -> None:
        self.now = 0.0
        config = TransferConfig(chunk=4, window=3, busy_rate=8.0, rate=0.0, read_timeout=3.0, idle_timeout=20.0)
        self.busy = False
        self.machine = Transfers(config, busy=lambda: self.busy)
        self.holders: set[bytes] = set()
        self.asked: dict[tuple[bytes, bytes], set[tuple[int, int]]] = defaultdict(set)  # ranges not yet received
        self.tids = 0

    def _apply(self, out: list[tuple[bytes, list[bytes]]]) -> None:
        for identity, frames in out:
            if identity in self.holders or identity == STORE:
                continue
            reply = p.parse_transfer_reply(frames)
            if reply.command == p.C_DATA:
                asked = self.asked[(identity, reply.transfer_id)]
                assert (reply.offset, len(reply.data)) in asked, "bytes the client did not ask for (or twice)"
                asked.remove((reply.offset, len(reply.data)))
            elif reply.command == p.C_ENDED:
                self.asked.pop((identity, reply.transfer_id), None)
        self.machine.check_invariants()

    @rule(index=st.integers(0, 2))
    def holder_joins(self, index: int) -> None:
        identity = b"holder-%d" % index
        if identity not in self.holders:
            self.holders.add(identity)
            self.machine.add_holder(identity, identity.decode(), identity.decode(), MODEL)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def holder_leaves(self, data: st.DataObject) -> None:
        identity = data.draw(st.sampled_from(sorted(self.holders)))
        self.holders.discard(identity)
        self._apply(self.machine.remove_holder(identity, self.now))

    @rule(peer=st.sampled_from([PULLER, PULLER_2]))
    def fetch(self, peer: bytes) -> None:
        self.tids += 1
        tid = b"t%d" % self.tids
        out = self.machine.on_message(peer, p.ModelFetch(tid, "tiny"), self.now)
        if any(p.parse_transfer_reply(f).command == p.C_OFFER for i, f in out if i == peer):
            self.asked[(peer, tid)] = set()
        self._apply(out)

    @precondition(lambda self: self.asked)
    @rule(data=st.data())
    def ask(self, data: st.DataObject) -> None:
        peer, tid = data.draw(st.sampled_from(sorted(self.asked)))
        transfer = self.machine.by_peer.get(peer, {}).get(tid)
        if transfer is None or len(self.asked[(peer, tid)]) >= 3:
            return
        taken = {offset for offset, _ in self.asked[(peer, tid)]}
        free = [offset for offset in (0, 4, 8) if offset not in taken]
        if free:
            offset = data.draw(st.sampled_from(free))
            self.asked[(peer, tid)].add((offset, min(4, MODEL.size - offset)))
            self._apply(
                self.machine.on_message(peer, p.ChunkRequest(tid, offset, min(4, MODEL.size - offset)), self.now)
            )

    @precondition(lambda self: self.machine.reads)
    @rule(data=st.data(), fail=st.sampled_from([None, p.RANGE_NOT_SATISFIABLE, p.WORKER_FAILED]))
    def holder_answers(self, data: st.DataObject, fail: int | None) -> None:
        key = data.draw(st.sampled_from(sorted(self.machine.reads)))
        transfer = self.machine.transfers[self.machine.reads[key]]
        offset, length, _ = transfer.reads[key]
        assert transfer.holder is not None
        message = p.HolderData(key, offset, bytes(length)) if fail is None else p.HolderReadFailed(key, fail, "failed")
        self._apply(self.machine.on_message(transfer.holder, message, self.now))

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), outcome=st.sampled_from(sorted(p.TRANSFER_OUTCOMES)))
    def client_ends(self, data: st.DataObject, outcome: str) -> None:
        peer, tid = data.draw(st.sampled_from(sorted(self.asked)))
        del self.asked[(peer, tid)]
        self._apply(self.machine.on_message(peer, p.TransferEnd(tid, outcome), self.now))

    @rule(peer=st.sampled_from([PULLER, PULLER_2]))
    def client_goes(self, peer: bytes) -> None:
        for key in [k for k in self.asked if k[0] == peer]:
            del self.asked[key]
        self._apply(self.machine.peer_gone(peer, self.now))

    @rule(seconds=st.sampled_from([0.1, 1.0, 4.0, 25.0]), busy=st.booleans())
    def time_passes(self, seconds: float, busy: bool) -> None:
        self.busy = busy
        self.now += seconds
        self._apply(self.machine.tick(self.now))
        assert self.machine.next_wakeup() > self.now, "a tick leaves nothing due: the loop would spin"


TestTransfersMachine = TransfersMachine.TestCase
TestTransfersMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
