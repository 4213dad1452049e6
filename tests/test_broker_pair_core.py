"""The broker core's part in a pair (broker/core.py): epochs, answers of a passive broker, stepping down, and
streams that outlive their broker (a worker keeps generating; its client sends the request again; they meet)."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from qmesh.broker.core import BrokerConfig, BrokerCore, Outgoing, Peer
from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest

MODEL = "m"
W1, W2, C1, C2 = b"w1", b"w2", b"c1", b"c2"
GRACE = 2.0
STREAM = b"stream-0001"


def make_core(epoch: int = 0) -> BrokerCore:
    core = BrokerCore(BrokerConfig(heartbeat_interval=1000.0, queue_timeout=30.0, attach_grace=GRACE))
    core.epoch = epoch
    return core


def step(core: BrokerCore, identity: bytes, frames: list[bytes], now: float = 0.0) -> list[Outgoing]:
    out = core.on_message(identity, frames, now)
    core.check_invariants()
    return out


def ready(core: BrokerCore, worker: bytes, slots: int = 1) -> list[Outgoing]:
    return step(core, worker, p.ready(MODEL, {"slots": slots, "name": worker.decode()}))


def ask(core: BrokerCore, client: bytes, stream: bytes | None = STREAM, attach: bool = False, now: float = 0.0):
    body = GenerationRequest(prompt="hi", stream=stream).to_body()
    hint = p.RoutingHint(stream=stream, attach=attach) if stream else None
    return step(core, client, p.client_request(MODEL, [body], b"r-" + client, hint), now)


def to(out: list[Outgoing], identity: bytes) -> list[list[bytes]]:
    return [frames for who, frames in out if who == identity]


def requests_to(out: list[Outgoing], worker: bytes) -> list[p.BrokerToWorker]:
    return [m for m in map(p.parse_for_worker, to(out, worker)) if m.command == p.W_REQUEST]


def finals_to(out: list[Outgoing], client: bytes) -> list[dict[str, Any]]:
    replies = [p.parse_for_client(frames) for frames in to(out, client)]
    return [p.unpack_map(r.body[0]) for r in replies if r.command == p.C_FINAL]


# ------------------------------------------------------------------------------------------------ epochs


def test_a_broker_of_a_pair_tells_workers_and_clients_its_epoch() -> None:
    core = make_core(epoch=3)
    (ack,) = ready(core, W1)
    assert p.parse_for_worker(ack[1]).epoch == 3
    out = ask(core, C1, stream=None)
    status = [p.unpack_map(r.body[0]) for r in map(p.parse_for_client, to(out, C1)) if r.command == p.C_STATUS]
    assert status and all(s["epoch"] == 3 for s in status)


def test_a_broker_without_a_peer_says_no_epoch() -> None:
    (ack,) = ready(make_core(), W1)
    assert p.parse_for_worker(ack[1]).epoch is None


# ------------------------------------------------------------------------------------------------ passive


def test_a_passive_broker_sends_clients_and_workers_to_the_other() -> None:
    core = make_core()
    (reply,) = core.answer_passive(C1, p.client_request(MODEL, [b"x"], b"r1"), epoch=4)
    (final,) = finals_to([reply], C1)
    assert final["error"]["code"] == p.NOT_ACTIVE and final["error"]["epoch"] == 4
    (refusal,) = core.answer_passive(W1, p.ready(MODEL, {"slots": 1}), epoch=4)
    assert p.parse_for_worker(refusal[1]).refusal[0] == p.NOT_ACTIVE  # type: ignore[index]
    (plain,) = core.answer_passive(W1, p.ready(MODEL), epoch=4)
    assert p.parse_for_worker(plain[1]) == p.BrokerToWorker(p.W_DISCONNECT)
    (beat,) = core.answer_passive(W1, p.heartbeat(), epoch=4)
    assert p.parse_for_worker(beat[1]) == p.BrokerToWorker(p.W_DISCONNECT)
    (shard,) = core.answer_passive(W1, p.shard_request(p.ShardAsk("split/1", MODEL, 100, 2)), epoch=4)
    assert p.parse_for_shard_peer(shard[1]).refusal[0] == p.NOT_ACTIVE  # type: ignore[index]
    assert core.answer_passive(C1, p.client_cancel(b"r1"), epoch=4) == []
    assert core.answer_passive(C1, [b"garbage"], epoch=4) == []
    assert core.workers == {} and core.requests == {}


def test_stepping_down_hands_every_worker_and_client_to_the_other_broker_and_forgets_everything() -> None:
    core = make_core(epoch=1)
    ready(core, W1)
    ask(core, C1, stream=b"s1")
    ask(core, C2, stream=b"s2")  # queued
    out = core.step_down(5.0)
    (refusal,) = map(p.parse_for_worker, to(out, W1))
    assert refusal.command == p.W_DISCONNECT and refusal.refusal[0] == p.NOT_ACTIVE  # type: ignore[index]
    for client in (C1, C2):
        (final,) = finals_to(out, client)
        assert final["error"]["code"] == p.NOT_ACTIVE
    assert not (core.workers or core.requests or core.services or core.client_requests or core.streams)
    core.check_invariants()


# ------------------------------------------------------------------------------------------------ kept streams


def test_a_kept_stream_goes_back_to_its_keeper_when_its_client_asks_again() -> None:
    core = make_core()
    ready(core, W1)
    ready(core, W2)
    assert step(core, W2, p.attach(STREAM)) == []
    assert core.workers[W2].free_slots == 0, "a kept stream holds its slot"
    (request,) = requests_to(ask(core, C1, attach=True), W2)  # W1 is idle, but W2 has the generation
    assert GenerationRequest.from_body(request.body).stream == STREAM
    assert core.workers[W2].attached == {} and core.workers[W2].active == {request.route_key}


def test_a_kept_stream_holds_its_slot_against_other_requests() -> None:
    core = make_core()
    ready(core, W1)
    ready(core, W2)
    step(core, W1, p.attach(STREAM))  # W1's one slot runs the generation it kept
    assert requests_to(ask(core, C2, stream=b"another"), W2), "a new request goes to the free worker"


def test_a_resent_stream_waits_for_its_keeper_a_moment_and_then_runs_anywhere() -> None:
    core = make_core()
    ready(core, W1)
    assert requests_to(ask(core, C1, attach=True, now=0.0), W1) == [], "it waits for the worker that has it"
    ready(core, W2)
    (request,) = requests_to(step(core, W2, p.attach(STREAM), now=1.0), W2)  # the keeper arrives in time
    assert request.route_key in core.workers[W2].active
    later = make_core()
    ready(later, W1)
    ask(later, C1, attach=True, now=0.0)
    assert later.next_wakeup() <= GRACE
    (request,) = requests_to(later.tick(GRACE), W1)  # no keeper came: a failover from the client's tokens
    assert request.route_key in later.workers[W1].active


def test_a_stream_already_running_elsewhere_is_dropped_by_the_worker_that_kept_it() -> None:
    core = make_core()
    ready(core, W1)
    ask(core, C1)  # not a resend: it runs on W1 at once
    ready(core, W2)
    (cancel,) = map(p.parse_for_worker, to(step(core, W2, p.attach(STREAM)), W2))
    assert cancel == p.BrokerToWorker(p.W_CANCEL, STREAM)
    assert core.workers[W2].attached == {}


def test_a_stream_kept_by_two_workers_is_kept_by_the_first_only() -> None:
    # Both kept generating it through a broker's death (one had taken it over from the other): the second copy is
    # dropped, so the stream is never joined to two workers.
    core = make_core()
    ready(core, W1)
    ready(core, W2)
    assert step(core, W1, p.attach(STREAM)) == []
    (cancel,) = map(p.parse_for_worker, to(step(core, W2, p.attach(STREAM)), W2))
    assert cancel == p.BrokerToWorker(p.W_CANCEL, STREAM) and core.workers[W2].attached == {}
    assert step(core, W1, p.attach(STREAM)) == [], "said again, it changes nothing"
    (request,) = requests_to(ask(core, C1, attach=True), W1)
    assert GenerationRequest.from_body(request.body).stream == STREAM


def test_a_worker_without_a_free_slot_drops_the_stream_its_client_asked_for_first() -> None:
    # READY came before the ATTACH, and a queued request took the slot in between: the broker cannot count the
    # kept generation in a slot, so the worker drops it and the client's request runs anew from its tokens.
    core = make_core()
    ready(core, W1)
    ask(core, C2, stream=None)  # takes W1's one slot
    ask(core, C1, attach=True)  # waits for the worker that kept it
    (cancel,) = map(p.parse_for_worker, to(step(core, W1, p.attach(STREAM)), W1))
    assert cancel == p.BrokerToWorker(p.W_CANCEL, STREAM)
    assert len(core.workers[W1].active) == 1 and core.workers[W1].attached == {}


def test_a_plain_mdp_worker_cannot_take_a_stream_back() -> None:
    # Without QMesh's extension it can be told neither its client's credit nor to stop: even a client that asked
    # first is not joined to it.
    core = make_core()
    step(core, W1, p.ready(MODEL))
    ask(core, C1, attach=True)
    (cancel,) = map(p.parse_for_worker, to(step(core, W1, p.attach(STREAM)), W1))
    assert cancel == p.BrokerToWorker(p.W_CANCEL, STREAM) and core.workers[W1].active == set()


def test_a_kept_stream_goes_back_to_its_keeper_when_the_queue_is_full() -> None:
    core = BrokerCore(BrokerConfig(heartbeat_interval=1000.0, queue_timeout=30.0, max_queue=0))
    ready(core, W1)
    step(core, W1, p.attach(STREAM))  # W1's one slot runs the generation it kept: the model has no free slot
    assert finals_to(ask(core, C2, stream=b"another"), C2)[0]["error"]["code"] == p.QUEUE_FULL
    (request,) = requests_to(ask(core, C1, attach=True), W1)  # not a 503: it waits for nothing
    assert GenerationRequest.from_body(request.body).stream == STREAM


def test_a_worker_that_kept_streams_gets_no_queued_request_in_their_slots() -> None:
    # Its READY says one of its slots runs a stream it kept; the ATTACH follows: a queued request must not take
    # that slot in between, or the broker would have to drop the stream.
    core = make_core()
    ask(core, C2, stream=None)  # queued: no worker yet
    out = step(core, W1, p.ready(MODEL, {"slots": 1, "kept": 1}))
    assert requests_to(out, W1) == [] and core.workers[W1].free_slots == 0
    assert step(core, W1, p.attach(STREAM)) == [], "kept, in the slot held for it"
    (request,) = requests_to(ask(core, C1, attach=True), W1)
    assert GenerationRequest.from_body(request.body).stream == STREAM


def test_slots_held_for_kept_streams_are_freed_once_the_worker_says_anything_else() -> None:
    # The stream ended and expired between READY and registration: no ATTACH comes, and the slot serves the queue.
    core = make_core()
    ask(core, C2, stream=None)
    step(core, W1, p.ready(MODEL, {"slots": 1, "kept": 1}))
    assert len(requests_to(step(core, W1, p.heartbeat()), W1)) == 1


def test_only_a_worker_that_can_send_attach_has_slots_held_for_kept_streams() -> None:
    # A worker with a leading empty frame (majortomo's framing) has no ATTACH: nothing would free a held slot.
    core = make_core()
    step(core, W1, p.ready(MODEL, {"slots": 1, "kept": 1}, p.Framing(delimited=True)))
    assert core.workers[W1].free_slots == 1


def test_a_request_placed_after_waiting_for_its_keeper_waits_no_more_if_it_comes_back() -> None:
    core = make_core()
    ask(core, C1, attach=True)  # waits for the worker that kept it
    ready(core, W1)
    step(core, W1, p.attach(STREAM))  # joined
    assert core.requests[next(iter(core.workers[W1].active))].attach_until == 0.0
    step(core, W1, p.disconnect())
    assert len(requests_to(ready(core, W2), W2)) == 1, "placed at once, not after another grace"


def test_a_ready_that_keeps_more_streams_than_it_has_slots_is_refused() -> None:
    (refusal,) = map(p.parse_for_worker, to(step(core := make_core(), W1, p.ready(MODEL, {"slots": 1, "kept": 2})), W1))
    assert refusal.command == p.W_DISCONNECT and refusal.refusal is not None and refusal.refusal[0] == p.BAD_REQUEST
    assert core.workers == {}


INSTANCE = {"slots": 1, "name": "host/1/0", "instance": "a" * 32}  # READY's info of a worker that connects again


def streaming_one_token(core: BrokerCore) -> None:
    """W1 (INSTANCE) streams C1's request and has sent it token 7; W2 registers, idle: another worker."""
    step(core, W1, p.ready(MODEL, INSTANCE))
    (first,) = requests_to(ask(core, C1), W1)
    step(core, W1, p.worker_reply(False, first.route_key, [p.pack({"text": "a", "tokens": [7]})]))
    ready(core, W2)


def test_a_worker_that_connects_again_takes_its_streams_back_on_the_new_connection() -> None:
    # It thought this broker silent and connected again (a new socket, a new identity), keeping its generations:
    # the old connection is dropped and its streams wait for the new one's ATTACH, not for W2.
    core = make_core()
    streaming_one_token(core)
    again = b"w1-again"
    out = step(core, again, p.ready(MODEL, {**INSTANCE, "kept": 1}))
    assert W1 not in core.workers and requests_to(out, W2) == [], "it waits for the worker that still runs it"
    (request,) = requests_to(step(core, again, p.attach(STREAM)), again)
    resumed = GenerationRequest.from_body(request.body)
    assert resumed.stream == STREAM and resumed.resume_tokens == [7], "it goes on after the client's tokens"
    other = make_core()  # another instance (even under the same name) is another worker
    step(other, W1, p.ready(MODEL, INSTANCE))
    step(other, W2, p.ready(MODEL, {**INSTANCE, "instance": "b" * 32}))
    step(other, b"w4", p.ready("other-model", INSTANCE))  # and so is one of another model
    assert set(other.workers) == {W1, W2, b"w4"}
    keyed = make_core()  # with CURVE, only the key it registered with may replace its connection
    keyed.on_message(W1, p.ready(MODEL, INSTANCE), 0.0, Peer("a", worker=True, client=False, models=None, key="A"))
    keyed.on_message(W2, p.ready(MODEL, INSTANCE), 0.0, Peer("b", worker=True, client=False, models=None, key="B"))
    assert set(keyed.workers) == {W1, W2}


def test_a_worker_that_connects_again_keeping_nothing_has_its_streams_placed_at_once() -> None:
    # It dropped its generations with the old connection (READY says it keeps none): no ATTACH will come, so its
    # stream is placed like any failover at once, not after attach_grace.
    core = make_core()
    streaming_one_token(core)
    out = step(core, b"w1-again", p.ready(MODEL, INSTANCE))
    assert W1 not in core.workers
    (request,) = requests_to(out, W2)
    assert GenerationRequest.from_body(request.body).resume_tokens == [7]


def test_a_slot_held_for_an_attach_that_does_not_take_it_serves_the_queue_at_once() -> None:
    # The stream it offers runs elsewhere already: the offer is dropped, and the slot READY held for it is free.
    core = make_core()
    ready(core, W2)
    assert len(requests_to(ask(core, C1), W2)) == 1  # the stream runs on W2
    ask(core, C2, stream=None)  # queued: W2 is busy
    step(core, W1, p.ready(MODEL, {"slots": 1, "kept": 1}))
    out = step(core, W1, p.attach(STREAM))
    assert [m.command for m in map(p.parse_for_worker, to(out, W1))] == [p.W_CANCEL, p.W_REQUEST]


def test_slots_held_for_kept_streams_are_freed_by_a_final_too() -> None:
    # Its other slot served a queued request; the kept stream expired before the ATTACH: its FINAL frees the slot.
    core = make_core()
    for client in (C1, C2, b"c3"):
        ask(core, client, stream=None)
    (first,) = requests_to(step(core, W1, p.ready(MODEL, {"slots": 2, "kept": 1})), W1)
    out = step(core, W1, p.worker_reply(True, first.route_key, [p.pack({"tokens": 1})]))
    assert len(requests_to(out, W1)) == 2, "both slots serve the queue"


def test_a_kept_stream_nobody_asks_for_is_dropped_after_the_queue_timeout() -> None:
    core = make_core()
    ready(core, W1)
    step(core, W1, p.attach(STREAM), now=0.0)
    assert core.tick(29.0) == [] and core.next_wakeup() <= 30.0
    (cancel,) = map(p.parse_for_worker, to(core.tick(30.0), W1))
    assert cancel == p.BrokerToWorker(p.W_CANCEL, STREAM) and core.workers[W1].free_slots == 1


def test_a_kept_stream_vanishes_with_its_worker() -> None:
    core = make_core()
    ready(core, W1)
    ready(core, W2)
    step(core, W2, p.attach(STREAM))
    step(core, W2, p.disconnect())
    (request,) = requests_to(ask(core, C1, attach=True), W1) or requests_to(core.tick(GRACE), W1)
    assert request.route_key in core.workers[W1].active


# ------------------------------------------------------------------------------------------------ properties

WORKERS = [W1, W2, b"w3"]
CLIENTS = [C1, C2, b"c3"]
STREAMS = [b"stream-a", b"stream-b", b"stream-c"]


class KeptStreams(RuleBasedStateMachine):
    """Random workers that offer kept streams (ATTACH), come and go, answer and finish; random clients that send
    requests naming those streams, as new ones or again after losing their broker; the clock. After every step:
    the core's own invariants; an offer the core kept goes to the first request that names its stream while its
    keeper is there and the offer has not run out (the join); no request is answered after its FINAL, and at the
    end every request has had exactly one FINAL."""

    def __init__(self) -> None:
        super().__init__()
        self.core = BrokerCore(BrokerConfig(heartbeat_interval=1000.0, queue_timeout=30.0, attach_grace=GRACE))
        self.now = 0.0
        self.kept: dict[bytes, tuple[bytes, float]] = {}  # stream -> (its keeper, until when the core keeps it)
        self.open: set[tuple[bytes, bytes]] = set()  # (client, request id) without a FINAL yet
        self.finished: set[tuple[bytes, bytes]] = set()

    def _step(self, out: list[Outgoing]) -> list[Outgoing]:
        self.core.check_invariants()
        for who, frames in out:
            if who in WORKERS:
                message = p.parse_for_worker(frames)
                held = self.kept.get(message.route_key)
                if message.command == p.W_CANCEL and who in self.core.workers:
                    # The worker drops what it is told to: a core that still counted the stream there would hold
                    # its slot, and join its client, to a generation that no longer runs.
                    assert message.route_key not in self.core.workers[who].attached, "dropped, yet still kept"
                if message.command == p.W_CANCEL and held is not None and held[0] == who:
                    del self.kept[message.route_key]  # the core dropped the offer: it ran out
            elif who in CLIENTS:
                reply = p.parse_for_client(frames)
                key = (who, reply.request_id or b"")
                assert key not in self.finished, f"{key} answered after its FINAL"
                if reply.command == p.C_FINAL:
                    assert key in self.open, f"a FINAL for {key}, which was never asked"
                    self.open.discard(key)
                    self.finished.add(key)
        return out

    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 2), kept=st.integers(0, 2))
    def worker_ready(self, worker: bytes, slots: int, kept: int) -> None:
        """``kept``: how many of its slots READY says run streams it kept (their ATTACHes may follow, or not)."""
        if worker not in self.core.workers:
            info = {"slots": slots, "kept": min(kept, slots)}
            out = self._step(self.core.on_message(worker, p.ready(MODEL, info), self.now))
            dispatched = [
                m for who, f in out if who == worker for m in [p.parse_for_worker(f)] if m.command == p.W_REQUEST
            ]
            assert len(dispatched) <= slots - info["kept"], "a queued request took a slot held for a kept stream"

    @rule(worker=st.sampled_from(WORKERS))
    def worker_heartbeat(self, worker: bytes) -> None:
        self._step(self.core.on_message(worker, p.heartbeat(), self.now))

    @rule(worker=st.sampled_from(WORKERS))
    def worker_leaves(self, worker: bytes) -> None:
        self._step(self.core.on_message(worker, p.disconnect(), self.now))
        self.kept = {stream: held for stream, held in self.kept.items() if held[0] != worker}

    @rule(worker=st.sampled_from(WORKERS), stream=st.sampled_from(STREAMS))
    def worker_offers(self, worker: bytes, stream: bytes) -> None:
        registered = worker in self.core.workers
        asked = self.core.streams.get(stream)  # the request that names the stream, if its client asked first
        out = self._step(self.core.on_message(worker, p.attach(stream), self.now))
        messages = [p.parse_for_worker(frames) for who, frames in out if who == worker]
        dropped = any(m.command == p.W_CANCEL and m.route_key == stream for m in messages)
        # (other requests than the one asked: queued ones, sent to the slot its READY held when the offer did not
        # take it)
        joined = any(m.command == p.W_REQUEST and m.route_key == asked for m in messages)
        assert not (joined and dropped), "a stream both handed to its keeper and dropped"
        if registered and not dropped and not joined and self.kept.get(stream, (worker,))[0] == worker:
            self.kept.setdefault(stream, (worker, self.now + self.core.config.queue_timeout))  # kept for its client
        elif registered and not dropped and not joined:
            raise AssertionError(f"{stream!r} kept by two workers")

    @rule(client=st.sampled_from(CLIENTS), stream=st.sampled_from(STREAMS), attach=st.booleans())
    def client_asks(self, client: bytes, stream: bytes, attach: bool) -> None:
        request_id = b"r-" + stream
        if (client, request_id) in self.finished:
            return  # a request id is not used again after its answer
        keeper = self.kept.get(stream)
        new = (client, request_id) not in self.open  # else the same request, asked again: nothing new
        joins = new and keeper is not None and keeper[1] > self.now and stream not in self.core.streams
        body = GenerationRequest(prompt="hi", stream=stream).to_body()
        hint = p.RoutingHint(stream=stream, attach=attach)
        self.open.add((client, request_id))
        out = self._step(self.core.on_message(client, p.client_request(MODEL, [body], request_id, hint), self.now))
        if joins:
            assert keeper is not None
            sent = [p.parse_for_worker(frames) for who, frames in out if who == keeper[0]]
            assert [m.command for m in sent] == [p.W_REQUEST], "a kept stream goes back to its keeper"
            del self.kept[stream]

    @rule(client=st.sampled_from(CLIENTS), stream=st.sampled_from(STREAMS))
    def client_cancels(self, client: bytes, stream: bytes) -> None:
        self._step(self.core.on_message(client, p.client_cancel(b"r-" + stream), self.now))

    @rule(worker=st.sampled_from(WORKERS), final=st.booleans())
    def worker_answers(self, worker: bytes, final: bool) -> None:
        state = self.core.workers.get(worker)
        if state is None or not state.active:
            return
        route_key = sorted(state.active)[0]
        self._step(self.core.on_message(worker, p.worker_reply(final, route_key, [p.pack({"tokens": 1})]), self.now))

    @rule(seconds=st.sampled_from([0.5, 1.0, GRACE, 29.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._step(self.core.tick(self.now))
        late = [stream for stream, (_, until) in self.kept.items() if until <= self.now]
        assert not late, f"offers kept past the queue timeout, never dropped: {late}"

    def teardown(self) -> None:
        for worker in WORKERS:
            self._step(self.core.on_message(worker, p.disconnect(), self.now))
        for _ in range(3):  # queued requests, resends waiting for their keeper: every deadline passes
            self.now += 100.0
            self._step(self.core.tick(self.now))
        assert not self.open, f"requests never answered: {sorted(self.open)}"
        assert not (self.core.requests or self.core.streams or self.core.workers)


TestKeptStreams = KeptStreams.TestCase
TestKeptStreams.settings = settings(max_examples=200, stateful_step_count=40)
