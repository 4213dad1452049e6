"""The broker's log of recent requests (``BrokerCore.recent``) and ``mmi.requests``, which serves it: what each
ended request records (its worker, tokens, prompt cache, failovers, outcome, times), and that the log is bounded."""

from __future__ import annotations

from typing import Any

from qmesh.broker.core import RECENT_REQUESTS, BrokerConfig, BrokerCore
from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest

W1, W2 = b"worker-1", b"worker-2"
CLIENT = b"client-1"
MODEL = "smollm2"


def make_core(**overrides: Any) -> BrokerCore:
    return BrokerCore(BrokerConfig(heartbeat_interval=1.0, liveness=3, queue_timeout=10.0, **overrides), now=0.0)


def send(core: BrokerCore, identity: bytes, frames: list[bytes], now: float) -> list[tuple[bytes, list[bytes]]]:
    out = core.on_message(identity, frames, now)
    core.check_invariants()
    return out


def register(core: BrokerCore, worker: bytes, name: str, now: float = 0.0) -> None:
    send(core, worker, p.ready(MODEL, {"name": name, "slots": 1}), now)


def submit(core: BrokerCore, rid: bytes, now: float) -> bytes | None:
    """An extended request (a real body: the broker can resume it elsewhere); its route key at the worker it went
    to, or None if it waits."""
    body = GenerationRequest(prompt="Hello", max_tokens=8).to_body()
    out = send(core, CLIENT, p.client_request(MODEL, [body], rid), now)
    keys = [p.parse_for_worker(frames).route_key for who, frames in out if who != CLIENT]
    return keys[0] if keys else None


def dispatched_key(out: list[tuple[bytes, list[bytes]]], worker: bytes) -> bytes:
    (frames,) = [frames for who, frames in out if who == worker and p.parse_for_worker(frames).command == p.W_REQUEST]
    return p.parse_for_worker(frames).route_key


def chunk(core: BrokerCore, worker: bytes, key: bytes, now: float) -> None:
    send(core, worker, p.worker_reply(False, key, [p.pack({"text": "a", "tokens": [1]})]), now)


def final(core: BrokerCore, worker: bytes, key: bytes, now: float, **summary: Any) -> list[tuple[bytes, list[bytes]]]:
    return send(core, worker, p.worker_reply(True, key, [p.pack(summary)]), now)


def mmi_requests(core: BrokerCore, now: float) -> list[dict[str, Any]]:
    (reply,) = send(core, CLIENT, p.client_request("mmi.requests", [], b"mmi"), now)
    answer = p.parse_for_client(reply[1])
    assert answer.command == p.C_FINAL and answer.request_id == b"mmi"
    return p.unpack(answer.body[0])


def test_a_finished_request_is_logged_with_its_worker_tokens_cache_and_times() -> None:
    core = make_core()
    register(core, W1, "host-a/12/0")
    key = submit(core, b"r1", now=1.0)
    assert key is not None
    for at in (2.0, 2.5, 3.0):
        chunk(core, W1, key, at)
    final(core, W1, key, 3.0, tokens=3, prompt_tokens=100, cached_tokens=60, finish_reason="length")
    (record,) = mmi_requests(core, now=5.0)
    assert record == {
        "seq": 1,
        "ended_s_ago": 2.0,
        "model": MODEL,
        "worker": "host-a/12/0",
        "outcome": "ok",
        "queue_wait_s": 0.0,
        "ttft_s": 1.0,
        "duration_s": 2.0,
        "tokens": 3,
        "tokens_per_second": 2.0,  # two tokens after the first, in the one second between the first and the end
        "prompt_tokens": 100,
        "cached_tokens": 60,
        "failovers": 0,
    }


def test_a_stream_moved_to_another_worker_is_logged_under_the_worker_that_finished_it() -> None:
    core = make_core()
    register(core, W1, "first")
    key = submit(core, b"r1", now=0.0)
    assert key is not None
    chunk(core, W1, key, 0.5)
    register(core, W2, "second", now=0.6)
    out = core.on_unreachable(W1, 1.0)  # W1 is gone mid-stream: the broker resumes the request on W2
    resumed = dispatched_key(out, W2)
    chunk(core, W2, resumed, 1.5)
    final(core, W2, resumed, 2.0, tokens=2, prompt_tokens=5, cached_tokens=0)
    (record,) = mmi_requests(core, now=2.0)
    assert (record["worker"], record["failovers"], record["tokens"], record["outcome"]) == ("second", 1, 2, "ok")


def test_requests_that_never_ran_are_logged_with_their_error_and_no_worker() -> None:
    core = make_core(max_queue=1)
    register(core, W1, "only")
    busy = submit(core, b"runs", now=0.0)
    assert busy is not None
    assert submit(core, b"waits", now=0.0) is None
    assert submit(core, b"refused", now=1.0) is None  # the queue of one is full: 503 at once
    core.tick(11.0)  # "waits" has waited past the queue timeout: 504
    records = mmi_requests(core, now=11.0)
    assert [(r["seq"], r["outcome"], r["worker"], r["tokens"]) for r in records] == [
        (1, str(p.QUEUE_FULL), None, 0),
        (2, str(p.QUEUE_TIMEOUT), None, 0),
    ]
    assert records[1]["queue_wait_s"] is None and records[1]["duration_s"] == 11.0
    assert records[1]["ttft_s"] is None and records[1]["tokens_per_second"] is None


def test_a_cancelled_stream_is_logged_with_the_chunks_its_client_got() -> None:
    core = make_core()
    register(core, W1, "w")
    key = submit(core, b"r1", now=0.0)
    assert key is not None
    chunk(core, W1, key, 1.0)
    chunk(core, W1, key, 2.0)
    send(core, CLIENT, p.client_cancel(b"r1"), 2.5)
    final(core, W1, key, 3.0, tokens=4, prompt_tokens=5, cached_tokens=0)  # the worker stops a little later
    (record,) = mmi_requests(core, now=3.0)
    assert (record["outcome"], record["worker"], record["tokens"], record["duration_s"]) == ("499", "w", 2, 2.5)


def test_the_log_keeps_only_the_most_recent_requests() -> None:
    core = make_core(max_queue=0)  # with no worker every request is refused at once: quick to make many
    for index in range(RECENT_REQUESTS + 5):
        send(core, CLIENT, p.client_request(MODEL, [b"x"], str(index).encode()), float(index))
    records = mmi_requests(core, now=float(RECENT_REQUESTS + 5))
    assert len(records) == RECENT_REQUESTS
    assert [r["seq"] for r in records] == list(range(6, RECENT_REQUESTS + 6))  # oldest first, the first 5 gone
