"""The broker core's part in a pair (broker/core.py): epochs, answers of a passive broker, stepping down, and
streams that outlive their broker (a worker keeps generating; its client sends the request again; they meet)."""

from __future__ import annotations

from typing import Any

from qmesh.broker.core import BrokerConfig, BrokerCore, Outgoing
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
