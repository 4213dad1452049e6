"""Unit tests of BrokerCore, the socket-free broker state machine.

The core is driven only through its public methods, frames are built with the protocol module's builders and
outputs are parsed with ``p.parse_for_worker`` / ``p.parse_for_client``. Every helper that feeds the core an event
also calls ``check_invariants()`` afterwards.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qmesh.broker.core import BrokerConfig, BrokerCore
from qmesh.common import protocol as p

Outgoing = tuple[bytes, list[bytes]]

W1, W2, W3 = b"worker-1", b"worker-2", b"worker-3"
C1, C2 = b"client-1", b"client-2"
MODEL = "smollm2"
OTHER = "qwen"

HB = 1.0  # heartbeat interval
LIVENESS = 3
TTL = HB * LIVENESS
QUEUE_TIMEOUT = 10.0
MAX_QUEUE = 3


# ------------------------------------------------------------------------------------------------ helpers


def make_core(**overrides: Any) -> BrokerCore:
    """A core with short, round timings (overridable per test)."""
    settings: dict[str, Any] = {
        "heartbeat_interval": HB,
        "liveness": LIVENESS,
        "max_queue": MAX_QUEUE,
        "queue_timeout": QUEUE_TIMEOUT,
    }
    settings.update(overrides)
    core = BrokerCore(BrokerConfig(**settings), now=0.0)
    core.check_invariants()
    return core


def send(core: BrokerCore, identity: bytes, frames: list[bytes], now: float = 0.0) -> list[Outgoing]:
    """Deliver one message to the core and check its tables afterwards."""
    out = core.on_message(identity, frames, now)
    core.check_invariants()
    return out


def tick(core: BrokerCore, now: float) -> list[Outgoing]:
    out = core.tick(now)
    core.check_invariants()
    return out


def unreachable(core: BrokerCore, identity: bytes, now: float = 0.0) -> list[Outgoing]:
    out = core.on_unreachable(identity, now)
    core.check_invariants()
    return out


def ready(core: BrokerCore, worker: bytes, service: str = MODEL, now: float = 0.0, **info: Any) -> list[Outgoing]:
    """READY from ``worker``: plain MDP when no info is given, extended otherwise. A registration is answered with
    a HEARTBEAT before anything else; that answer is checked here and left out of what is returned."""
    out = send(core, worker, p.ready(service, info or None), now)
    if worker in core.workers:
        assert out[0] == (worker, p.heartbeat()), "a registration must be answered at once"
        return out[1:]
    return out


def xrequest(
    core: BrokerCore, client: bytes, rid: bytes, body: bytes = b"prompt", service: str = MODEL, now: float = 0.0
) -> list[Outgoing]:
    """An extended request (XREQUEST) carrying ``rid``."""
    return send(core, client, p.client_request(service, [body], rid), now)


def request(
    core: BrokerCore, client: bytes, body: bytes = b"prompt", service: str = MODEL, now: float = 0.0
) -> list[Outgoing]:
    """A plain 18/MDP REQUEST."""
    return send(core, client, p.client_request(service, [body]), now)


def reply(core: BrokerCore, worker: bytes, key: bytes, body: bytes, final: bool, now: float = 0.0) -> list[Outgoing]:
    return send(core, worker, p.worker_reply(final, key, [body]), now)


def frames_to(out: list[Outgoing], identity: bytes) -> list[list[bytes]]:
    return [frames for who, frames in out if who == identity]


def to_worker(out: list[Outgoing], worker: bytes) -> list[p.BrokerToWorker]:
    return [p.parse_for_worker(frames) for frames in frames_to(out, worker)]


def to_client(out: list[Outgoing], client: bytes, extended: bool = True) -> list[p.BrokerToClient]:
    return [p.parse_for_client(frames, extended) for frames in frames_to(out, client)]


def recipients(out: list[Outgoing]) -> set[bytes]:
    return {who for who, _ in out}


def requests_to(out: list[Outgoing], worker: bytes) -> list[p.BrokerToWorker]:
    return [m for m in to_worker(out, worker) if m.command == p.W_REQUEST]


def only_request_to(out: list[Outgoing], worker: bytes) -> p.BrokerToWorker:
    (msg,) = requests_to(out, worker)
    return msg


def finals(messages: list[p.BrokerToClient]) -> list[p.BrokerToClient]:
    return [m for m in messages if m.command == p.C_FINAL]


def statuses(messages: list[p.BrokerToClient]) -> list[dict[str, Any]]:
    return [p.unpack(m.body[0]) for m in messages if m.command == p.C_STATUS]


def error_code(message: p.BrokerToClient) -> int:
    """The code of an error FINAL (body ``{"error": {"code": ..., "message": ...}}``)."""
    assert message.command == p.C_FINAL
    (body,) = message.body
    return p.unpack(body)["error"]["code"]


def only_final(out: list[Outgoing], client: bytes, extended: bool = True) -> p.BrokerToClient:
    (final,) = finals(to_client(out, client, extended))
    return final


def snapshot(core: BrokerCore) -> tuple[Any, ...]:
    """A deep copy of every table, to show an event left the state unchanged."""
    return copy.deepcopy(
        (core.workers, core.requests, core.services, core.client_requests, core.known_services, core.next_wakeup())
    )


def is_plain_heartbeat(frames: list[bytes]) -> bool:
    return p.parse_for_worker(frames).command == p.W_HEARTBEAT


# ------------------------------------------------------------------------------------------------ dispatch


def test_ready_then_xrequest_dispatches_with_opaque_route_key() -> None:
    core = make_core()
    assert ready(core, W1, slots=1) == []
    out = xrequest(core, C1, b"req-1", b"hello")
    msg = only_request_to(out, W1)
    assert msg.body == [b"hello"]
    assert msg.route_key and C1 not in msg.route_key and b"req-1" not in msg.route_key
    for frames in frames_to(out, W1):
        assert C1 not in frames and b"req-1" not in frames, "client identity or request id leaked to the worker"
    assert statuses(to_client(out, C1)) == [{"state": "dispatched", "worker": W1.hex()}]
    assert recipients(out) == {W1, C1}


def test_plain_request_to_plain_worker() -> None:
    core = make_core()
    assert ready(core, W1) == []
    out = request(core, C1, b"hi")
    assert recipients(out) == {W1}, "a plain MDP client gets no STATUS"
    msg = only_request_to(out, W1)
    assert msg.body == [b"hi"] and C1 not in msg.route_key


def test_request_before_ready_is_dispatched_on_ready() -> None:
    core = make_core()
    out = xrequest(core, C1, b"r")
    assert statuses(to_client(out, C1)) == [{"state": "queued", "position": 1}]
    out = ready(core, W1, name="gpu-box")
    assert only_request_to(out, W1).body == [b"prompt"]
    assert statuses(to_client(out, C1)) == [{"state": "dispatched", "worker": "gpu-box"}]


def test_replies_routed_to_right_client_with_request_id_first() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    key1 = only_request_to(xrequest(core, C1, b"id-a", b"one"), W1).route_key
    key2 = only_request_to(xrequest(core, C2, b"id-b", b"two"), W1).route_key
    assert key1 != key2

    out = reply(core, W1, key2, b"tok-2", final=False)
    assert frames_to(out, C2) == [[p.CLIENT, p.C_PARTIAL, MODEL.encode(), b"id-b", b"tok-2"]]
    assert recipients(out) == {C2}
    out = reply(core, W1, key1, b"tok-1", final=False)
    assert frames_to(out, C1) == [[p.CLIENT, p.C_PARTIAL, MODEL.encode(), b"id-a", b"tok-1"]]
    out = reply(core, W1, key1, b"done-1", final=True)
    assert frames_to(out, C1) == [[p.CLIENT, p.C_FINAL, MODEL.encode(), b"id-a", b"done-1"]]
    assert recipients(out) == {C1}
    out = reply(core, W1, key2, b"done-2", final=True)
    final = only_final(out, C2)
    assert (final.service, final.request_id, final.body) == (MODEL, b"id-b", [b"done-2"])
    assert core.requests == {} and core.client_requests == {}


def test_plain_request_replies_have_no_request_id() -> None:
    core = make_core()
    ready(core, W1)
    key = only_request_to(request(core, C1), W1).route_key
    assert frames_to(reply(core, W1, key, b"a", final=False), C1) == [[p.CLIENT, p.C_PARTIAL, MODEL.encode(), b"a"]]
    out = send(core, W1, p.worker_reply(True, key, [b"b", b"c"]))
    assert frames_to(out, C1) == [[p.CLIENT, p.C_FINAL, MODEL.encode(), b"b", b"c"]]
    parsed = only_final(out, C1, extended=False)
    assert parsed.request_id is None and parsed.body == [b"b", b"c"]


def test_multiframe_body_forwarded_unchanged() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    out = send(core, C1, p.client_request(MODEL, [b"a", b"", b"c"], b"r"))
    assert only_request_to(out, W1).body == [b"a", b"", b"c"]


def test_slots_two_then_third_waits_until_a_final() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    k1 = only_request_to(xrequest(core, C1, b"1"), W1).route_key
    k2 = only_request_to(xrequest(core, C1, b"2"), W1).route_key
    out = xrequest(core, C1, b"3", b"third")
    assert to_worker(out, W1) == []
    assert statuses(to_client(out, C1)) == [{"state": "queued", "position": 1}]
    assert core.service_table()[MODEL] == {
        "workers": 1,
        "slots": 2,
        "busy": 2,
        "queued": 1,
        "capabilities": ["chat"],
        "by_capability": {"chat": {"workers": 1, "slots": 2, "busy": 2}},
    }

    out = reply(core, W1, k2, b"done", final=True)
    assert only_final(out, C1).request_id == b"2"
    assert only_request_to(out, W1).body == [b"third"]
    assert statuses(to_client(out, C1)) == [{"state": "dispatched", "worker": W1.hex()}]
    assert core.service_table()[MODEL]["busy"] == 2
    assert k1 in core.requests


def request_recipients(out: list[Outgoing]) -> list[bytes]:
    """The workers that were sent a REQUEST, in order."""
    return [who for who, frames in out if frames[:2] == [p.WORKER, p.W_REQUEST]]


def test_least_loaded_worker_gets_next_request() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    ready(core, W2, slots=2)
    first = request_recipients(xrequest(core, C1, b"1"))
    second = request_recipients(xrequest(core, C1, b"2"))
    assert len(first) == len(second) == 1 and first != second, "the idle worker must get the second request"
    third = request_recipients(xrequest(core, C1, b"3"))
    fourth = request_recipients(xrequest(core, C1, b"4"))
    assert sorted(third + fourth) == [W1, W2]
    assert request_recipients(xrequest(core, C1, b"5")) == []


def test_least_loaded_by_fraction_of_slots() -> None:
    core = make_core()
    ready(core, W1, slots=4)
    xrequest(core, C1, b"1")  # W1 is alone: 1/4 busy
    ready(core, W2, slots=1)  # idle
    assert only_request_to(xrequest(core, C1, b"2"), W2)
    # W1 at 1/4, W2 at 1/1 (no free slot): W1
    assert only_request_to(xrequest(core, C1, b"3"), W1)


def test_health_breaks_ties() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    ready(core, W2, slots=2)
    assert send(core, W1, p.heartbeat({"health": 0.3})) == []
    assert send(core, W2, p.heartbeat({"health": 0.9})) == []
    assert only_request_to(xrequest(core, C1, b"1"), W2), "equal load: the healthier worker wins"
    assert only_request_to(xrequest(core, C1, b"2"), W1), "less load beats health"
    send(core, W1, p.heartbeat({"health": 1.0}))
    send(core, W2, p.heartbeat({"health": 0.1}))
    assert only_request_to(xrequest(core, C1, b"3"), W1)


def test_draining_worker_gets_no_new_requests() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    send(core, W1, p.heartbeat({"draining": True}))
    out = xrequest(core, C1, b"1")
    assert to_worker(out, W1) == []
    out = send(core, W1, p.heartbeat({"draining": False}))
    assert only_request_to(out, W1).body == [b"prompt"]


# ------------------------------------------------------------------------------------------------ queueing


def test_queue_position_status_and_duplicate_status() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    k1 = only_request_to(xrequest(core, C1, b"a"), W1).route_key
    assert statuses(to_client(xrequest(core, C1, b"b"), C1)) == [{"state": "queued", "position": 1}]
    assert statuses(to_client(xrequest(core, C2, b"c"), C2)) == [{"state": "queued", "position": 2}]
    # a retry of "c" gets its current status
    out = xrequest(core, C2, b"c")
    assert out == [(C2, p.client_status(MODEL, b"c", {"state": "queued", "position": 2}))]
    reply(core, W1, k1, b"", final=True)  # "b" is dispatched, "c" moves up
    out = xrequest(core, C2, b"c")
    assert statuses(to_client(out, C2)) == [{"state": "queued", "position": 1}]


def test_queue_full_returns_503() -> None:
    core = make_core(max_queue=2)
    ready(core, W1, slots=1)
    xrequest(core, C1, b"running")
    xrequest(core, C1, b"q1")
    xrequest(core, C1, b"q2")
    before = snapshot(core)
    out = xrequest(core, C2, b"q3")
    final = only_final(out, C2)
    assert final.request_id == b"q3" and error_code(final) == p.QUEUE_FULL
    assert "full" in p.unpack(final.body[0])["error"]["message"]
    assert recipients(out) == {C2}
    out = request(core, C2)
    assert error_code(only_final(out, C2, extended=False)) == p.QUEUE_FULL
    assert snapshot(core) == before


def test_queue_timeout_504_via_tick() -> None:
    core = make_core(heartbeat_interval=100.0)
    ready(core, W1, slots=1)
    xrequest(core, C1, b"running")
    xrequest(core, C1, b"waiting", now=1.0)
    assert core.next_wakeup() == 1.0 + QUEUE_TIMEOUT
    send(core, W1, p.heartbeat(), now=1.0 + QUEUE_TIMEOUT - 0.5)
    assert to_client(tick(core, 1.0 + QUEUE_TIMEOUT - 0.1), C1) == []
    out = tick(core, 1.0 + QUEUE_TIMEOUT)
    final = only_final(out, C1)
    assert final.request_id == b"waiting" and error_code(final) == p.QUEUE_TIMEOUT
    assert "busy" in p.unpack(final.body[0])["error"]["message"]
    assert core.service_table()[MODEL]["queued"] == 0
    assert len(core.requests) == 1


def test_unknown_model_404_when_other_models_have_workers() -> None:
    core = make_core()
    ready(core, W1, service=OTHER, slots=1)
    out = xrequest(core, C1, b"r", service=MODEL)
    final = only_final(out, C1)
    assert error_code(final) == p.UNKNOWN_MODEL and final.service == MODEL
    assert OTHER in p.unpack(final.body[0])["error"]["message"]
    assert recipients(out) == {C1} and len(out) == 1
    assert core.requests == {} and MODEL not in core.services
    out = request(core, C1, service=MODEL)
    assert error_code(only_final(out, C1, extended=False)) == p.UNKNOWN_MODEL


def test_no_workers_at_all_queues_then_504() -> None:
    core = make_core(heartbeat_interval=100.0)
    out = request(core, C1, now=2.0)
    assert out == []
    assert core.service_table() == {
        MODEL: {"workers": 0, "slots": 0, "busy": 0, "queued": 1, "capabilities": [], "by_capability": {}}
    }
    assert core.next_wakeup() == 2.0 + QUEUE_TIMEOUT
    out = tick(core, 2.0 + QUEUE_TIMEOUT)
    final = only_final(out, C1, extended=False)
    assert error_code(final) == p.QUEUE_TIMEOUT
    assert "no worker serves it" in p.unpack(final.body[0])["error"]["message"]
    assert core.requests == {} and core.services == {} and core.client_requests == {}


def test_known_model_without_live_workers_is_queued_not_404() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2, service=OTHER, slots=1)
    send(core, W1, p.disconnect())
    out = xrequest(core, C1, b"r")
    assert finals(to_client(out, C1)) == []
    assert statuses(to_client(out, C1)) == [{"state": "queued", "position": 1}]
    out = ready(core, W3, slots=1)
    assert only_request_to(out, W3)


# ------------------------------------------------------------------------------------------------ liveness


def test_heartbeats_sent_to_all_workers_every_interval() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2)
    assert core.next_wakeup() == HB
    assert tick(core, HB * 0.5) == []
    out = tick(core, HB)
    assert sorted(out) == sorted([(W1, p.heartbeat()), (W2, p.heartbeat())])
    assert all(is_plain_heartbeat(frames) for _, frames in out)
    assert tick(core, HB * 1.5) == []
    assert core.next_wakeup() == 2 * HB
    assert sorted(who for who, _ in tick(core, 2 * HB)) == [W1, W2]


def test_heartbeat_round_to_many_workers_is_sent_in_batches() -> None:
    core = make_core(heartbeat_batch=10)
    workers = [bytes([0xA0, n]) for n in range(25)]
    for identity in workers:
        ready(core, identity)
    beaten: list[bytes] = []
    first = tick(core, HB)
    assert len(first) == 10 and core.next_wakeup() == HB  # more to send: the loop comes straight back
    beaten += [who for who, _ in first]
    send(core, workers[-1], p.disconnect(), now=HB)  # leaves mid-round: it gets no heartbeat
    beaten += [who for who, _ in tick(core, HB + 0.001)]
    assert core.next_wakeup() == HB + 0.001
    beaten += [who for who, _ in tick(core, HB + 0.002)]
    assert sorted(beaten) == sorted(workers[:-1])  # each remaining worker exactly once
    assert core.next_wakeup() == 2 * HB
    assert tick(core, HB + 0.003) == []


def test_worker_expires_after_ttl_without_messages() -> None:
    core = make_core()
    ready(core, W1, slots=1, now=0.0)
    ready(core, W2, slots=1, now=0.0)
    send(core, W2, p.heartbeat(), now=2.0)
    tick(core, TTL - 0.01)
    assert set(core.workers) == {W1, W2}
    out = tick(core, TTL)
    assert set(core.workers) == {W2}
    assert all(not (who == W1 and p.parse_for_worker(f).command == p.W_REQUEST) for who, f in out)
    assert [w["name"] for w in core.worker_table()] == [W2.hex()]
    tick(core, 2.0 + TTL)
    assert core.workers == {} and core.services == {}


def test_busy_worker_that_heartbeats_is_not_expired() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"long"), W1).route_key
    now = 0.0
    while now < 10 * TTL:  # a long prefill: no output, only heartbeats
        now += HB
        send(core, W1, p.heartbeat({"health": 1.0}), now=now)
        out = tick(core, now)
        assert to_client(out, C1) == []
    assert W1 in core.workers and core.requests[key].worker == W1
    out = reply(core, W1, key, b"done", final=True, now=now)
    assert only_final(out, C1).body == [b"done"]


def test_any_message_counts_as_life() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    reply(core, W1, key, b"tok", final=False, now=2.0)
    reply(core, W1, b"no-such-key", b"x", final=False, now=4.0)  # dropped, still a sign of life
    tick(core, 4.0 + TTL - 0.1)
    assert W1 in core.workers


def test_dead_workers_unstreamed_requests_requeued_at_head_in_order() -> None:
    core = make_core(max_queue=10)
    ready(core, W1, slots=3)
    for n in range(3):
        xrequest(core, C1, b"r%d" % n, b"body-%d" % n)
    xrequest(core, C2, b"later", b"body-later")  # queued behind W1's three
    out = tick(core, TTL)  # W1 never heartbeated: expired
    assert W1 not in core.workers
    assert all(m.command == p.C_STATUS for m in to_client(out, C1)), "only new queue positions, no FINAL"
    assert to_client(out, C2) == []
    assert core.service_table()[MODEL]["queued"] == 4
    out = ready(core, W2, slots=4, now=TTL)
    assert [m.body for m in requests_to(out, W2)] == [[b"body-0"], [b"body-1"], [b"body-2"], [b"body-later"]]


def test_requeued_requests_go_to_another_live_worker_immediately() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    ready(core, W2, slots=2)
    assert request_recipients(xrequest(core, C1, b"a", b"A")) == [W1]  # a tie goes to the first registered
    assert request_recipients(xrequest(core, C1, b"b", b"B")) == [W2]
    out = send(core, W1, p.disconnect())
    assert only_request_to(out, W2).body == [b"A"]
    assert statuses(to_client(out, C1)) == [{"state": "dispatched", "worker": W2.hex()}]
    assert finals(to_client(out, C1)) == []


def test_mid_stream_request_of_dead_worker_ends_in_502() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    k1 = only_request_to(xrequest(core, C1, b"streaming", b"S"), W1).route_key
    only_request_to(xrequest(core, C2, b"silent", b"Q"), W1)
    reply(core, W1, k1, b"tok", final=False)
    ready(core, W2, slots=1)
    out = unreachable(core, W1)
    final = only_final(out, C1)
    assert final.request_id == b"streaming" and error_code(final) == p.WORKER_FAILED
    assert only_request_to(out, W2).body == [b"Q"]
    assert finals(to_client(out, C2)) == []
    assert k1 not in core.requests


def test_requeued_request_gets_a_fresh_queue_deadline() -> None:
    core = make_core(heartbeat_interval=100.0)
    ready(core, W1, slots=1)
    xrequest(core, C1, b"r", now=0.0)
    send(core, W1, p.heartbeat(), now=QUEUE_TIMEOUT - 1.0)
    unreachable(core, W1, now=QUEUE_TIMEOUT - 0.5)  # requeued: it waits a full queue_timeout again
    assert to_client(tick(core, QUEUE_TIMEOUT + 1.0), C1) == []
    out = tick(core, 2 * QUEUE_TIMEOUT - 0.5)
    assert error_code(only_final(out, C1)) == p.QUEUE_TIMEOUT


def test_cancelled_request_of_dead_worker_ends_silently() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    reply(core, W1, key, b"tok", final=False)
    send(core, C1, p.client_cancel(b"r"))
    out = send(core, W1, p.disconnect())
    assert out == [], "the client already has its 499 FINAL: no 502 after it"
    assert core.requests == {} and core.client_requests == {} and core.services == {}


def test_on_unreachable_worker_removes_it() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    xrequest(core, C1, b"r")
    out = unreachable(core, W1)
    assert [m.command for m in to_client(out, C1)] == [p.C_STATUS]  # back in the queue, at position 1
    assert core.workers == {} and core.worker_table() == []
    assert core.service_table()[MODEL]["queued"] == 1
    assert unreachable(core, W1) == []  # idempotent


def test_worker_disconnect_removes_it() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    assert send(core, W1, p.disconnect()) == []
    assert core.workers == {} and core.services == {}


# ------------------------------------------------------------------------------------------------ cancel


def test_cancel_queued_request_499_and_gone() -> None:
    core = make_core()
    xrequest(core, C1, b"r")
    out = send(core, C1, p.client_cancel(b"r"))
    final = only_final(out, C1)
    assert final.request_id == b"r" and error_code(final) == p.CANCELLED
    assert core.requests == {} and core.client_requests == {} and core.services == {}
    assert send(core, C1, p.client_cancel(b"r")) == []
    assert to_worker(ready(core, W1, slots=1), W1) == []


def test_cancel_running_request_on_extended_worker() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    xrequest(core, C2, b"next", b"N")
    out = send(core, C1, p.client_cancel(b"r"))
    assert error_code(only_final(out, C1)) == p.CANCELLED
    assert [(m.command, m.route_key) for m in to_worker(out, W1)] == [(p.W_CANCEL, key)]
    assert recipients(out) == {C1, W1}
    assert core.service_table()[MODEL]["busy"] == 1, "the slot stays busy until the worker's FINAL"
    assert send(core, C1, p.client_cancel(b"r")) == []
    assert reply(core, W1, key, b"late", final=False) == []
    out = reply(core, W1, key, b"stopped", final=True)
    assert to_client(out, C1) == [], "the FINAL of a cancelled request is not forwarded"
    assert only_request_to(out, W1).body == [b"N"]
    assert core.client_requests == {C2: {b"next": set(core.requests)}}


def test_plain_worker_never_gets_cancel() -> None:
    core = make_core()
    ready(core, W1)  # no info frame: plain 18/MDP
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    out = send(core, C1, p.client_cancel(b"r"))
    assert error_code(only_final(out, C1)) == p.CANCELLED
    assert to_worker(out, W1) == []
    assert core.service_table()[MODEL]["busy"] == 1
    out = reply(core, W1, key, b"end", final=True)
    assert out == [] and core.requests == {}


def test_cancel_unknown_or_other_clients_request_is_ignored() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    xrequest(core, C1, b"r")
    before = snapshot(core)
    assert send(core, C1, p.client_cancel(b"nope")) == []
    assert send(core, C2, p.client_cancel(b"r")) == []
    assert snapshot(core) == before


def test_unreachable_client_cancels_its_requests_silently() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2)  # plain
    k1 = only_request_to(xrequest(core, C1, b"a"), W1).route_key
    k2 = only_request_to(request(core, C1), W2).route_key
    xrequest(core, C1, b"queued")
    xrequest(core, C2, b"other")
    out = unreachable(core, C1)
    assert C1 not in recipients(out)
    assert [(m.command, m.route_key) for m in to_worker(out, W1)] == [(p.W_CANCEL, k1)]
    assert to_worker(out, W2) == []
    assert set(core.client_requests) == {C2}
    assert reply(core, W1, k1, b"x", final=False) == []
    out = reply(core, W1, k1, b"x", final=True)
    assert C1 not in recipients(out)
    assert statuses(to_client(out, C2)) == [{"state": "dispatched", "worker": W1.hex()}]
    assert reply(core, W2, k2, b"x", final=True) == []


def test_unreachable_unknown_identity_is_noop() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    before = snapshot(core)
    assert unreachable(core, b"stranger") == []
    assert snapshot(core) == before


# ------------------------------------------------------------------------------------------------ protocol violations


def test_second_ready_disconnects_and_removes() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    xrequest(core, C1, b"r")
    out = ready(core, W1, slots=2)
    assert frames_to(out, W1) == [p.disconnect()]
    assert core.workers == {}
    assert core.service_table()[MODEL]["queued"] == 1


def test_ready_is_answered_with_a_heartbeat_before_any_request() -> None:
    core = make_core()
    xrequest(core, C1, b"r")
    out = send(core, W1, p.ready(MODEL, {"slots": 1}))
    assert out[0] == (W1, p.heartbeat())
    assert len(requests_to(out, W1)) == 1


def test_the_model_table_gives_the_smallest_context_of_its_workers() -> None:
    core = make_core()
    ready(core, W1, slots=1, context=2048)
    ready(core, W2, slots=1, context=1024)
    assert core.service_table()[MODEL]["context"] == 1024  # a request may land on either
    ready(core, W3, slots=1)  # a worker that does not say: the limit is unknown
    assert "context" not in core.service_table()[MODEL]


def test_ready_for_mmi_service_disconnects() -> None:
    core = make_core()
    out = ready(core, W1, service="mmi.x")
    assert out == [(W1, p.disconnect())]
    assert core.workers == {} and core.services == {}


def test_an_extended_worker_is_told_why_it_was_refused() -> None:
    core = make_core()
    (refusal,) = to_worker(ready(core, W1, service="mmi.x", slots=1), W1)
    assert refusal.command == p.W_DISCONNECT and refusal.refusal is not None
    code, message = refusal.refusal
    assert code == p.BAD_REQUEST and "reserved" in message


@pytest.mark.parametrize("slots", [0, -1, 1025, "2", 2.0, True, None, [1]])
def test_invalid_slots_disconnects(slots: Any) -> None:
    core = make_core()
    (refusal,) = to_worker(send(core, W1, p.ready(MODEL, {"slots": slots})), W1)
    assert refusal.command == p.W_DISCONNECT and refusal.refusal is not None
    assert refusal.refusal[0] == p.BAD_REQUEST and "slots" in refusal.refusal[1]
    assert core.workers == {}


@pytest.mark.parametrize(
    "frames",
    [
        p.heartbeat(),
        p.heartbeat({"health": 0.5}),
        p.worker_reply(False, b"\x00" * 8, [b"x"]),
        p.worker_reply(True, b"\x00" * 8, [b"x"]),
    ],
    ids=["heartbeat", "heartbeat-load", "partial", "final"],
)
def test_messages_from_unknown_worker_get_disconnect(frames: list[bytes]) -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    if frames[1] in (p.W_PARTIAL, p.W_FINAL):
        frames = p.worker_reply(frames[1] == p.W_FINAL, key, [b"x"])  # even with a real route key
    before = snapshot(core)
    assert send(core, W2, frames) == [(W2, p.disconnect())]
    assert snapshot(core) == before


def test_disconnect_from_unknown_worker_is_ignored() -> None:
    core = make_core()
    assert send(core, W1, p.disconnect()) == []


def test_reply_for_another_workers_request_is_dropped() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2, slots=1)
    out = xrequest(core, C1, b"r")
    (holder,) = [w for w in (W1, W2) if requests_to(out, w)]
    thief = W2 if holder == W1 else W1
    key = only_request_to(out, holder).route_key
    assert reply(core, thief, key, b"stolen", final=False) == []
    assert reply(core, thief, key, b"stolen", final=True) == []
    assert core.requests[key].worker == holder
    assert core.service_table()[MODEL]["busy"] == 1
    out = reply(core, holder, key, b"real", final=True)
    assert only_final(out, C1).body == [b"real"]


def test_reply_for_finished_request_is_dropped() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    reply(core, W1, key, b"done", final=True)
    assert reply(core, W1, key, b"again", final=True) == []
    assert reply(core, W1, key, b"again", final=False) == []


def test_duplicate_xrequest_creates_no_second_request() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    out = xrequest(core, C1, b"same")
    key = only_request_to(out, W1).route_key
    out = xrequest(core, C1, b"same")
    assert to_worker(out, W1) == []
    assert statuses(to_client(out, C1)) == [{"state": "dispatched", "worker": W1.hex()}]
    assert finals(to_client(out, C1)) == []
    assert list(core.requests) == [key]
    # the same id from another client is another request
    assert only_request_to(xrequest(core, C2, b"same"), W1)
    assert len(core.requests) == 2


def test_request_id_can_be_reused_after_final() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    reply(core, W1, key, b"", final=True)
    assert only_request_to(xrequest(core, C1, b"r"), W1).route_key != key


def test_plain_requests_from_one_client_are_independent() -> None:
    core = make_core()
    ready(core, W1, slots=2)
    out = request(core, C1, b"1") + request(core, C1, b"2")
    assert len(requests_to(out, W1)) == 2
    assert len(core.requests) == 2


# ------------------------------------------------------------------------------------------------ MMI


def mmi(core: BrokerCore, name: str, body: list[bytes], rid: bytes | None = None) -> p.BrokerToClient:
    out = send(core, C1, p.client_request(name, body, rid))
    assert recipients(out) == {C1}
    return only_final(out, C1, extended=rid is not None)


def test_mmi_service_200_only_with_live_workers() -> None:
    core = make_core()
    assert mmi(core, "mmi.service", [MODEL.encode()]).body == [b"404"]
    request(core, C2)  # merely requested: queued, no worker
    assert mmi(core, "mmi.service", [MODEL.encode()]).body == [b"404"]
    ready(core, W1, slots=1)
    assert mmi(core, "mmi.service", [MODEL.encode()]).body == [b"200"]
    assert mmi(core, "mmi.service", [OTHER.encode()]).body == [b"404"]
    tick(core, TTL)  # W1 dies
    assert core.workers == {}
    assert mmi(core, "mmi.service", [MODEL.encode()]).body == [b"404"]
    assert mmi(core, "mmi.service", []).body == [b"404"]


def test_mmi_extended_reply_carries_request_id() -> None:
    core = make_core()
    ready(core, W1)
    final = mmi(core, "mmi.service", [MODEL.encode()], rid=b"q")
    assert (final.service, final.request_id, final.body) == ("mmi.service", b"q", [b"200"])
    assert core.requests == {}


def test_mmi_unknown_is_501() -> None:
    core = make_core()
    assert mmi(core, "mmi.foo", []).body == [b"501"]
    assert core.services == {} and core.requests == {}


ALPHA_ROW = ("name", "service", "slots", "busy", "health", "draining", "extended", "info", "load")


def test_mmi_services_and_workers_tables() -> None:
    core = make_core()
    ready(core, W1, slots=2, name="alpha")
    ready(core, W2, service=OTHER)
    xrequest(core, C2, b"r")
    services = p.unpack(mmi(core, "mmi.services", []).body[0])
    chat = ["chat"]
    assert services == {
        MODEL: {
            "workers": 1,
            "slots": 2,
            "busy": 1,
            "queued": 0,
            "capabilities": chat,
            "by_capability": {"chat": {"workers": 1, "slots": 2, "busy": 1}},
        },
        OTHER: {
            "workers": 1,
            "slots": 1,
            "busy": 0,
            "queued": 0,
            "capabilities": chat,
            "by_capability": {"chat": {"workers": 1, "slots": 1, "busy": 0}},
        },
    }
    assert services == core.service_table()
    send(core, W1, p.heartbeat({"health": 0.5, "kv": 3}))
    workers = p.unpack(mmi(core, "mmi.workers", []).body[0])
    assert workers == core.worker_table()
    alpha = next(w for w in workers if w["name"] == "alpha")
    assert {k: v for k, v in alpha.items() if k in ALPHA_ROW} == {
        "name": "alpha",
        "service": MODEL,
        "slots": 2,
        "busy": 1,
        "health": 0.5,
        "draining": False,
        "extended": True,
        "info": {"slots": 2, "name": "alpha"},
        "load": {"health": 0.5, "kv": 3},
    }
    plain = next(w for w in workers if w["service"] == OTHER)
    assert plain["extended"] is False and plain["name"] == W2.hex() and plain["info"] == {}


def test_health_is_clamped() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    send(core, W1, p.heartbeat({"health": 7}))
    assert core.worker_table()[0]["health"] == 1.0
    send(core, W1, p.heartbeat({"health": -3.5}))
    assert core.worker_table()[0]["health"] == 0.0
    send(core, W1, p.heartbeat({"health": "bad"}))
    assert core.worker_table()[0]["health"] == 0.0


# ------------------------------------------------------------------------------------------------ malformed input

MALFORMED: list[list[bytes]] = [
    [],
    [p.CLIENT],
    [p.WORKER],
    [b"", b""],
    [b"", b"", *p.client_request(MODEL, [b"x"])],  # one leading empty frame is a delimiter, two are not
    [p.CLIENT_01, b"bad\nname", b"x"],
    [b"", p.CLIENT_01],
    [p.WORKER_01, p.W01_READY],
    [p.WORKER_01, p.W01_READY, MODEL.encode(), p.pack({"slots": 2})],  # 7/MDP has no info frame
    [p.WORKER_01, p.W01_REPLY, b"key"],
    [p.WORKER_01, p.W01_HEARTBEAT, p.pack({"busy": 1})],  # nor a load frame
    [p.WORKER_01, b"\x06", b"key", b"", b"body"],  # no command 0x06 in 7/MDP
    [b"", p.WORKER_01, p.W01_DISCONNECT, b"extra"],
    [b"garbage" * 10, b"\x01", b"x"],
    [p.CLIENT, b"\x99", MODEL.encode()],
    [p.CLIENT, p.C_REQUEST],
    [p.CLIENT, p.C_REQUEST, b""],
    [p.CLIENT, p.C_REQUEST, b"x" * 256],
    [p.CLIENT, p.C_REQUEST, b"\xff\xfe"],
    [p.CLIENT, p.C_REQUEST, b"bad\nname"],
    [p.CLIENT, p.C_XREQUEST, MODEL.encode()],
    [p.CLIENT, p.C_XREQUEST, MODEL.encode(), b""],
    [p.CLIENT, p.C_XREQUEST, MODEL.encode(), b"i" * 65, b"body"],
    [p.CLIENT, p.C_CANCEL],
    [p.CLIENT, p.C_CANCEL, b""],
    [p.CLIENT, p.C_CANCEL, b"r", b"extra"],
    [p.CLIENT, p.C_FINAL, MODEL.encode()],  # a broker->client command sent to the broker
    [p.WORKER, b"\x00"],
    [p.WORKER, p.W_REQUEST, b"key", b"", b"body"],  # broker->worker command
    [p.WORKER, p.W_CANCEL, b"key"],
    [p.WORKER, p.W_READY],
    [p.WORKER, p.W_READY, b""],
    [p.WORKER, p.W_READY, MODEL.encode(), b"\xc1"],  # invalid msgpack
    [p.WORKER, p.W_READY, MODEL.encode(), p.pack([1, 2])],  # info not a map
    [p.WORKER, p.W_READY, MODEL.encode(), p.pack({1: 2})],  # non-string key
    [p.WORKER, p.W_READY, MODEL.encode(), p.pack({"slots": 1}), b"extra"],
    [p.WORKER, p.W_READY, MODEL.encode(), b"\x92\x01"],  # truncated msgpack
    [p.WORKER, p.W_PARTIAL],
    [p.WORKER, p.W_PARTIAL, b"key"],
    [p.WORKER, p.W_PARTIAL, b"key", b"not-empty", b"body"],
    [p.WORKER, p.W_PARTIAL, b"", b"", b"body"],
    [p.WORKER, p.W_FINAL, b"key"],
    [p.WORKER, p.W_FINAL, b"", b""],
    [p.WORKER, p.W_HEARTBEAT, b"\xc1"],
    [p.WORKER, p.W_HEARTBEAT, p.pack("text")],
    [p.WORKER, p.W_HEARTBEAT, p.pack({}), b"extra"],
]


@pytest.mark.parametrize("frames", MALFORMED, ids=range(len(MALFORMED)))
@pytest.mark.parametrize("sender", [W1, C1, W2], ids=["worker", "client", "stranger"])
def test_malformed_frames_are_dropped_without_state_change(frames: list[bytes], sender: bytes) -> None:
    core = make_core()
    ready(core, W1, slots=2)
    key = only_request_to(xrequest(core, C1, b"r"), W1).route_key
    real = [key if f == b"key" else f for f in frames]
    before = snapshot(core)
    assert send(core, sender, real, now=1.0) == []
    assert snapshot(core) == before


# ------------------------------------------------------------------------------------------- limits and failover


def test_a_request_over_the_size_limit_gets_413() -> None:
    core = make_core(max_request_bytes=2048)
    ready(core, W1, slots=1)
    final = only_final(xrequest(core, C1, b"big", b"x" * 4096), C1)
    assert error_code(final) == p.TOO_LARGE and core.requests == {}


def test_too_many_requests_in_flight_on_one_connection_gets_429() -> None:
    core = make_core(max_client_requests=2)
    ready(core, W1, slots=1)
    xrequest(core, C1, b"a")
    xrequest(core, C1, b"b")
    assert error_code(only_final(xrequest(core, C1, b"c"), C1)) == p.TOO_MANY_REQUESTS
    assert to_client(xrequest(core, C2, b"other-client"), C1) == []  # the limit is per connection


def _chunk(*tokens: int) -> bytes:
    return p.pack({"text": "t" * len(tokens), "tokens": list(tokens)})


def test_a_stream_resumes_on_the_next_worker_until_max_failovers() -> None:
    core = make_core(max_failovers=2)
    body = p.pack({"prompt": "tell a story", "max_tokens": 50})
    holder = W1
    ready(core, holder, slots=1)
    (request,) = requests_to(xrequest(core, C1, b"story", body), holder)
    delivered: list[int] = []
    for death, spare in enumerate((W2, W3)):
        token = 100 + death
        out = send(core, holder, p.worker_reply(False, request.route_key, [_chunk(token)]))
        assert [m.command for m in to_client(out, C1)] == [p.C_PARTIAL]
        delivered.append(token)
        unreachable(core, holder)  # dies after streaming: the request must resume, not fail
        (request,) = requests_to(ready(core, spare, slots=1), spare)
        resumed = p.unpack(request.body[0])
        assert resumed["resume"] == {"tokens": delivered, "failovers": death + 1}
        assert resumed["prompt"] == "tell a story" and resumed["max_tokens"] == 50
        holder = spare
    send(core, holder, p.worker_reply(False, request.route_key, [_chunk(999)]))
    final = only_final(unreachable(core, holder), C1)
    assert error_code(final) == p.WORKER_FAILED and "after 2 failover(s)" in p.unpack(final.body[0])["error"]["message"]
    core.check_invariants()
    assert core.requests == {}


def test_a_plain_body_cannot_be_resumed_and_ends_in_502() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    (request,) = requests_to(xrequest(core, C1, b"plain", b"raw text prompt"), W1)
    send(core, W1, p.worker_reply(False, request.route_key, [_chunk(1)]))
    ready(core, W2, slots=1)
    final = only_final(unreachable(core, W1), C1)
    assert error_code(final) == p.WORKER_FAILED and "cannot be resumed" in p.unpack(final.body[0])["error"]["message"]


# ------------------------------------------------------------------------------------------------ capabilities


def embeddings_request(core: BrokerCore, client: bytes, rid: bytes, service: str = MODEL, now: float = 0.0):
    """An embeddings request: a hinted request whose hint asks for the embeddings capability."""
    hint = p.RoutingHint(capability=p.EMBEDDINGS)
    return send(core, client, p.client_request(service, [rid + b" texts"], rid, hint), now)


def error_of(message: p.BrokerToClient) -> dict[str, Any]:
    return p.unpack(message.body[0])["error"]


def test_each_request_goes_only_to_workers_of_its_capability() -> None:
    core = make_core()
    ready(core, W1, slots=2)  # announces no capabilities: a chat worker
    ready(core, W2, slots=2, capabilities=[p.EMBEDDINGS])
    assert [only_request_to(embeddings_request(core, C1, rid), W2).body for rid in (b"e1", b"e2")] == [
        [b"e1 texts"],
        [b"e2 texts"],
    ]
    assert [only_request_to(xrequest(core, C1, rid, rid), W1).body for rid in (b"c1", b"c2")] == [[b"c1"], [b"c2"]]
    table = core.service_table()[MODEL]
    assert table["capabilities"] == ["chat", "embeddings"]
    assert table["by_capability"] == {
        "chat": {"workers": 1, "slots": 2, "busy": 2},
        "embeddings": {"workers": 1, "slots": 2, "busy": 2},
    }


def test_a_waiting_chat_request_does_not_hold_up_an_embeddings_request_behind_it() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2, slots=1, capabilities=[p.EMBEDDINGS])
    embedding = only_request_to(embeddings_request(core, C1, b"e1"), W2).route_key
    only_request_to(xrequest(core, C1, b"c1"), W1)
    assert to_worker(xrequest(core, C1, b"c2"), W1) == []
    assert to_worker(embeddings_request(core, C1, b"e2"), W2) == []
    out = reply(core, W2, embedding, b"vectors", final=True)
    assert only_request_to(out, W2).body == [b"e2 texts"], "the older chat request waits for the chat worker"
    assert requests_to(out, W1) == []


def test_a_kind_of_request_the_model_never_served_is_400_naming_model() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2, service=OTHER, slots=1, capabilities=[p.EMBEDDINGS])
    error = error_of(only_final(embeddings_request(core, C1, b"e"), C1))
    assert error == {"code": p.BAD_REQUEST, "message": f"model '{MODEL}' does not serve embeddings", "param": "model"}
    error = error_of(only_final(request(core, C2, service=OTHER), C2, extended=False))
    assert error == {"code": p.BAD_REQUEST, "message": f"model '{OTHER}' serves embeddings only", "param": "model"}
    assert core.requests == {} and all(not w.active for w in core.workers.values())


def test_a_kind_of_request_whose_workers_left_waits_for_them() -> None:
    """As for a model that lost its workers: a worker of that kind may be restarting."""
    core = make_core()
    ready(core, W1, slots=1)
    ready(core, W2, slots=1, capabilities=[p.EMBEDDINGS])
    unreachable(core, W2)
    out = embeddings_request(core, C1, b"e1", now=1.0)
    assert statuses(to_client(out, C1)) == [{"state": "queued", "position": 1}] and requests_to(out, W1) == []
    only_request_to(ready(core, W3, slots=1, capabilities=[p.EMBEDDINGS], now=2.0), W3)
    unreachable(core, W3, now=2.0)  # before it answered: the request waits again, and then times out
    final = only_final(tick(core, 2.0 + QUEUE_TIMEOUT), C1)
    assert error_code(final) == p.QUEUE_TIMEOUT and "(no worker serves it)" in error_of(final)["message"]


def test_a_dead_workers_request_moves_only_to_a_worker_of_its_kind() -> None:
    core = make_core()
    ready(core, W1, slots=1, capabilities=[p.EMBEDDINGS])
    ready(core, W2, slots=1)
    only_request_to(embeddings_request(core, C1, b"e1"), W1)
    assert requests_to(unreachable(core, W1), W2) == []
    only_request_to(ready(core, W3, slots=1, capabilities=[p.CHAT, p.EMBEDDINGS]), W3)


@pytest.mark.parametrize("capabilities", [[], "chat", [""], ["x" * 33], [1], ["chat", None], {"chat": 1}])
def test_invalid_capabilities_disconnect(capabilities: Any) -> None:
    core = make_core()
    (refusal,) = to_worker(send(core, W1, p.ready(MODEL, {"slots": 1, "capabilities": capabilities})), W1)
    assert refusal.command == p.W_DISCONNECT and refusal.refusal is not None
    assert refusal.refusal[0] == p.BAD_REQUEST and "capabilities" in refusal.refusal[1]
    assert core.workers == {}


# --------------------------------------------------------------------- other framings: leading empty frame, 7/MDP

DELIMITED = p.Framing(delimited=True)
MAJORTOMO = p.Framing(p.Dialect.MAJORTOMO, delimited=True)  # as majortomo 0.2.0's Client sends
OLD = p.Framing(p.Dialect.MDP01, delimited=True)  # 7/MDP as the spec has it (REQ clients, delimited workers)
MDP01_DEALER = p.Framing(p.Dialect.MDP01)


def test_a_delimited_client_gets_every_reply_delimited() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(send(core, C1, p.client_request(MODEL, [b"hi"], framing=DELIMITED)), W1).route_key
    assert frames_to(reply(core, W1, key, b"t1", final=False), C1) == [[b"", p.CLIENT, p.C_PARTIAL, b"smollm2", b"t1"]]
    assert frames_to(reply(core, W1, key, b"done", final=True), C1) == [[b"", p.CLIENT, p.C_FINAL, b"smollm2", b"done"]]
    out = send(core, C2, p.client_request(MODEL, [b"x"], b"r", framing=DELIMITED))  # XREQUEST, delimited
    (status,) = frames_to(out, C2)
    assert status[0] == b"" and p.parse_for_client(status, framing=DELIMITED).command == p.C_STATUS
    out = send(core, C2, p.client_cancel(b"r", DELIMITED))
    assert error_code(p.parse_for_client(frames_to(out, C2)[0], framing=DELIMITED)) == p.CANCELLED


def test_a_delimited_worker_gets_everything_delimited() -> None:
    core = make_core()
    out = send(core, W1, p.ready(MODEL, {"slots": 2}, DELIMITED))
    assert out == [(W1, [b"", p.WORKER, p.W_HEARTBEAT])]
    out = xrequest(core, C1, b"r")
    (job,) = frames_to(out, W1)
    assert job[:3] == [b"", p.WORKER, p.W_REQUEST]
    key = p.parse_for_worker(job, DELIMITED).route_key
    out = send(core, W1, p.worker_reply(False, key, [b"t"], DELIMITED))
    assert [m.command for m in to_client(out, C1)] == [p.C_PARTIAL]
    assert frames_to(send(core, C1, p.client_credit(b"r", 8)), W1) == [[b"", p.WORKER, p.W_CREDIT, key, b"\0\0\0\x08"]]
    assert frames_to(send(core, C1, p.client_cancel(b"r")), W1) == [[b"", p.WORKER, p.W_CANCEL, key]]
    assert tick(core, HB) == [(W1, [b"", p.WORKER, p.W_HEARTBEAT])]
    send(core, W1, p.disconnect(framing=DELIMITED))
    assert core.workers == {}


def test_majortomo_client_gets_worker_codes_and_no_service_frame() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(send(core, C1, p.client_request(MODEL, [b"a", b"b"], framing=MAJORTOMO)), W1).route_key
    assert frames_to(reply(core, W1, key, b"t1", final=False), C1) == [[b"", p.CLIENT, p.MT_PARTIAL, b"t1"]]
    assert frames_to(reply(core, W1, key, b"end", final=True), C1) == [[b"", p.CLIENT, p.MT_FINAL, b"end"]]


def test_an_old_client_gets_the_whole_stream_of_a_new_worker_as_one_reply() -> None:
    core = make_core()
    ready(core, W1, slots=1)
    key = only_request_to(send(core, C1, p.client_request(MODEL, [b"hi"], framing=OLD)), W1).route_key
    for chunk in (b"p1", b"p2"):
        assert reply(core, W1, key, chunk, final=False) == [], "a 7/MDP client has no PARTIAL: held back"
    out = reply(core, W1, key, b"summary", final=True)
    assert frames_to(out, C1) == [[b"", p.CLIENT_01, MODEL.encode(), b"p1", b"p2", b"summary"]]
    assert core.requests == {} and core.finished[-1].chunks == 2


def test_an_old_clients_request_on_a_dead_worker_ends_like_a_plain_one() -> None:
    """Before any chunk it moves to another worker; mid-stream a plain body cannot be resumed: 502, in one REPLY
    with the chunks held so far."""
    core = make_core()
    ready(core, W1, slots=1)
    out = send(core, C1, p.client_request(MODEL, [b"plain prompt"], framing=MDP01_DEALER))
    key = only_request_to(out, W1).route_key
    ready(core, W2, slots=1)
    unreachable(core, W1)
    key = only_request_to(ready(core, W3, slots=1) + unreachable(core, W2), W3).route_key
    assert reply(core, W3, key, b"p1", final=False) == []
    out = unreachable(core, W3)
    ((old, *frames),) = frames_to(out, C1)
    assert old == p.CLIENT_01 and frames[:2] == [MODEL.encode(), b"p1"]
    assert p.unpack(frames[2])["error"]["code"] == p.WORKER_FAILED


def test_an_old_clients_rejection_is_its_reply() -> None:
    core = make_core()
    ready(core, W1)
    out = send(core, C1, p.client_request("nope", [b"x"], framing=OLD))
    ((empty, old, service, body),) = frames_to(out, C1)
    assert (empty, old, service) == (b"", p.CLIENT_01, b"nope") and p.unpack(body)["error"]["code"] == p.UNKNOWN_MODEL


def test_an_old_worker_is_registered_heartbeated_and_disconnected_in_its_framing() -> None:
    core = make_core()
    assert send(core, W1, p.ready(MODEL, framing=OLD)) == [(W1, [b"", p.WORKER_01, p.W01_HEARTBEAT])]
    assert core.worker_table()[0]["slots"] == 1 and not core.worker_table()[0]["extended"]
    assert tick(core, HB) == [(W1, [b"", p.WORKER_01, p.W01_HEARTBEAT])]
    assert send(core, W1, p.ready(MODEL, framing=OLD)) == [(W1, [b"", p.WORKER_01, p.W01_DISCONNECT])]
    assert core.workers == {}
    assert send(core, W2, p.heartbeat(framing=MDP01_DEALER)) == [(W2, [p.WORKER_01, p.W01_DISCONNECT])]
    assert send(core, W2, p.ready("mmi.x", framing=OLD)) == [(W2, [b"", p.WORKER_01, p.W01_DISCONNECT])]


def test_a_new_client_gets_an_old_workers_reply_as_its_final() -> None:
    """7/MDP has no PARTIAL: the worker's one REPLY is the FINAL, and frees the worker for the next request."""
    core = make_core()
    send(core, W1, p.ready(MODEL, framing=OLD))
    out = xrequest(core, C1, b"first", b"one")
    (job,) = frames_to(out, W1)
    assert job[:3] == [b"", p.WORKER_01, p.W01_REQUEST] and job[4:] == [b"", b"one"]
    key = p.parse_for_worker(job, OLD).route_key
    second = request(core, C2, b"two")
    assert frames_to(second, W1) == [], "one request at a time"
    out = send(core, W1, p.worker_reply(True, key, [b"answer"], OLD))
    assert frames_to(out, C1) == [[p.CLIENT, p.C_FINAL, MODEL.encode(), b"first", b"answer"]]
    assert [m.body for m in requests_to_old(out, W1)] == [[b"two"]]


def requests_to_old(out: list[Outgoing], worker: bytes) -> list[p.BrokerToWorker]:
    return [p.parse_for_worker(frames, OLD) for frames in frames_to(out, worker)]


def test_an_old_workers_request_is_not_cancelled_on_it() -> None:
    """A 7/MDP worker has no CANCEL: the client has its 499 at once, the worker's slot frees with its REPLY."""
    core = make_core()
    send(core, W1, p.ready(MODEL, framing=OLD))
    key = requests_to_old(xrequest(core, C1, b"r"), W1)[0].route_key
    out = send(core, C1, p.client_cancel(b"r"))
    assert recipients(out) == {C1} and error_code(only_final(out, C1)) == p.CANCELLED
    assert send(core, W1, p.worker_reply(True, key, [b"late"], OLD)) == []
    assert core.requests == {} and core.worker_table()[0]["busy"] == 0


@pytest.mark.parametrize(
    ("framing", "answer"),
    [
        (p.MDP02, [p.CLIENT, p.C_FINAL, b"mmi.service", b"200"]),
        (DELIMITED, [b"", p.CLIENT, p.C_FINAL, b"mmi.service", b"200"]),
        (MAJORTOMO, [b"", p.CLIENT, p.MT_FINAL, b"200"]),
        (OLD, [b"", p.CLIENT_01, b"mmi.service", b"200"]),
        (MDP01_DEALER, [p.CLIENT_01, b"mmi.service", b"200"]),
    ],
    ids=["18/MDP", "delimited", "majortomo", "7/MDP", "7/MDP-dealer"],
)
def test_mmi_service_answers_in_the_askers_framing(framing: p.Framing, answer: list[bytes]) -> None:
    core = make_core()
    send(core, W1, p.ready(MODEL, framing=OLD))
    assert send(core, C1, p.client_request("mmi.service", [MODEL.encode()], framing=framing)) == [(C1, answer)]
