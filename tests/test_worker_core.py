"""Unit and property tests of the worker's state machine (worker/core.py): no sockets, no threads, no sleeps.

Time is a number passed in; randomness (reconnect jitter) comes from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qmesh.common import protocol as p
from qmesh.common.bodies import EmbeddingRequest, GenerationRequest
from qmesh.worker.core import (
    CancelJob,
    Close,
    Connect,
    Effect,
    Exit,
    GrantCredit,
    Phase,
    Rebind,
    Send,
    SendHeartbeat,
    ServeRead,
    StartJob,
    WorkerConfig,
    WorkerCore,
)
from qmesh.worker.generation import Job

INTERVAL = 1.0
LIVENESS = 3
TTL = INTERVAL * LIVENESS
GRACE = 5.0
MAX_DELAY = 16.0
SERVICE = "smollm2-135m"
ENDPOINT = "tcp://broker:5555"


def make_core(seed: int = 0, brokers: tuple[str, ...] = (ENDPOINT,), **fields: Any) -> WorkerCore:
    """A worker of SERVICE with 2 slots; ``fields``: more of its WorkerConfig."""
    config = WorkerConfig(
        brokers=brokers,
        service=SERVICE,
        slots=2,
        info={"slots": 2, "name": "host/1/0", "version": 1},
        heartbeat_interval=INTERVAL,
        liveness=LIVENESS,
        grace=GRACE,
        max_reconnect_delay=MAX_DELAY,
        **fields,
    )
    return WorkerCore(config, 0.0, rng=random.Random(seed))


def registered_core() -> WorkerCore:
    core = make_core()
    core.on_sidecar(True, 0.0)
    core.on_broker_message(p.heartbeat(), 0.0)
    assert core.registered
    return core


def request_frames(key: bytes, **fields: Any) -> list[bytes]:
    return p.worker_request(key, [GenerationRequest(prompt="hi", **fields).to_body()])


def sent(effects: list[Effect]) -> list[p.InboundMessage]:
    """What the effects send to the broker, parsed as the broker would."""
    return [p.parse_inbound(e.frames) for e in effects if isinstance(e, Send)]


def of_type(effects: list[Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def started(effects: list[Effect]) -> Job:
    (start,) = of_type(effects, StartJob)
    return start.job


# ------------------------------------------------------------------------------------------------ registering


def test_nothing_is_offered_until_llama_server_is_healthy() -> None:
    core = make_core()
    assert core.tick(100.0) == [] and core.next_wakeup() == float("inf")
    assert core.on_sidecar(False, 100.0) == []
    out = core.on_sidecar(True, 100.0)
    assert out[0] == Connect(1, ENDPOINT)
    (ready,) = sent(out)
    assert isinstance(ready, p.WorkerReady) and ready.service == SERVICE and ready.info["slots"] == 2


def test_registered_only_once_the_broker_answers() -> None:
    core = make_core()
    core.on_sidecar(True, 0.0)
    assert core.phase is Phase.CONNECTING and not core.registered
    core.on_broker_message(p.heartbeat(), 0.5)  # the broker answers READY with a HEARTBEAT
    assert core.registered


def test_heartbeats_each_interval_with_the_number_of_busy_slots() -> None:
    core = registered_core()
    core.on_broker_message(request_frames(b"k1"), 0.1)
    assert core.tick(0.9) == []
    assert core.tick(1.0) == [SendHeartbeat(busy=1, draining=False)]
    assert core.tick(1.5) == []
    core.on_broker_message(p.heartbeat(), 1.5)
    assert core.tick(2.0) == [SendHeartbeat(busy=1, draining=False)]


def test_a_broker_that_never_answers_is_retried_with_growing_delays_and_never_called_registered() -> None:
    core = make_core(seed=7)
    now = 0.0
    core.on_sidecar(True, now)
    attempts = [now]
    for _ in range(8):
        now = core.next_wakeup()
        while core.phase is not Phase.BACKING_OFF:  # heartbeats until the broker's silence ends the attempt
            core.tick(now)
            now = core.next_wakeup()
        out = core.tick(now)
        assert Connect(core.connection, ENDPOINT) in out and not core.registered
        attempts.append(now)
    waits = [later - earlier - TTL for earlier, later in zip(attempts, attempts[1:], strict=False)]
    for attempt, wait in enumerate(waits, start=1):
        nominal = min(INTERVAL * 2 ** (attempt - 1), MAX_DELAY)
        assert 0.5 * nominal <= wait + 1e-9 <= 1.5 * nominal, (attempt, wait)
    assert len(set(round(w, 6) for w in waits)) == len(waits), "no jitter"


def test_a_refusal_that_cannot_be_fixed_ends_the_worker_with_the_brokers_reason() -> None:
    core = make_core()
    core.on_sidecar(True, 0.0)
    reason = "key worker-gpu1 may not serve 'other' (allowed: smollm2-135m)"
    out = core.on_broker_message(p.disconnect((p.FORBIDDEN, reason)), 0.1)
    (exit_,) = of_type(out, Exit)
    assert exit_.failure is not None and reason in exit_.failure and "tcp://broker:5555" in exit_.failure
    assert Close(flush=False) in out and not of_type(out, Connect)
    assert core.stopped
    assert core.tick(1000.0) == [] and core.on_sidecar(False, 1000.0) == [] and core.on_sidecar(True, 1000.0) == []


def test_a_disconnect_before_registration_backs_off_and_one_after_registration_reconnects_at_once() -> None:
    core = make_core()
    core.on_sidecar(True, 0.0)
    out = core.on_broker_message(p.disconnect(), 0.1)
    assert not of_type(out, Connect) and core.phase is Phase.BACKING_OFF
    assert core.next_wakeup() >= 0.1 + 0.5 * INTERVAL
    out = core.tick(core.next_wakeup())
    assert of_type(out, Connect) == [Connect(2, ENDPOINT)]
    core.on_broker_message(p.heartbeat(), 2.0)
    out = core.on_broker_message(p.disconnect(), 2.5)  # a restarted broker that does not know us
    assert out[0] == Close(flush=False) and of_type(out, Connect) == [Connect(3, ENDPOINT)]


def test_a_silent_broker_ends_the_connection_and_its_jobs() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.5))
    out = core.tick(0.5 + TTL)
    assert out[:2] == [CancelJob(job), Close(flush=False)]
    assert of_type(out, Connect) == [Connect(2, ENDPOINT)] and core.jobs == {}
    assert core.on_job_finished(job, p.pack({"tokens": 1}), 4.0) == []  # its FINAL has no connection to go to


# ------------------------------------------------------------------------------------------------ requests


def test_a_request_becomes_a_job_of_the_connection_it_came_on() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1", max_tokens=9), 0.1))
    assert job.route_key == b"k1" and job.connection == 1 and job.request.max_tokens == 9
    assert core.jobs == {b"k1": job}


def test_a_bad_request_body_is_answered_with_a_400_final() -> None:
    core = registered_core()
    out = core.on_broker_message(p.worker_request(b"k1", [p.pack({"prompt": "hi", "bogus": 1})]), 0.1)
    (final,) = sent(out)
    assert isinstance(final, p.WorkerFinal) and final.route_key == b"k1"
    assert p.unpack(final.body[0])["error"]["code"] == p.BAD_REQUEST
    assert core.jobs == {}


def test_an_embeddings_request_becomes_a_job_of_an_embeddings_worker() -> None:
    core = registered_core()
    core.config.capability = p.EMBEDDINGS
    job = started(core.on_broker_message(p.worker_request(b"k1", [EmbeddingRequest(["a", "b"]).to_body()]), 0.1))
    assert job.request == EmbeddingRequest(["a", "b"])
    assert job.credit is None, "it sends no PARTIALs: nothing to give credit for"
    assert core.jobs == {b"k1": job}


@pytest.mark.parametrize(
    ("capability", "body", "reason"),
    [
        (p.CHAT, EmbeddingRequest(["a"]).to_body(), "does not serve embeddings"),
        (p.EMBEDDINGS, GenerationRequest(prompt="hi").to_body(), "serves embeddings only"),
        (p.EMBEDDINGS, b"a plain MDP prompt", "serves embeddings only"),
    ],
    ids=["embeddings-to-chat", "chat-to-embeddings", "plain-to-embeddings"],
)
def test_a_request_of_the_kind_the_worker_does_not_serve_is_a_400(capability: str, body: bytes, reason: str) -> None:
    """The broker never sends one (it routes by capability): the worker refuses it all the same."""
    core = registered_core()
    core.config.capability = capability
    (final,) = sent(core.on_broker_message(p.worker_request(b"k1", [body]), 0.1))
    assert isinstance(final, p.WorkerFinal)
    error = p.unpack(final.body[0])["error"]
    assert error["code"] == p.BAD_REQUEST and reason in error["message"]
    assert core.jobs == {}


def test_cancel_and_credit_reach_the_job_they_name_and_nothing_else() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.1))
    assert core.on_broker_message(p.worker_credit(b"k1", 5), 0.2) == [GrantCredit(job, 5)]
    assert core.on_broker_message(p.worker_cancel(b"k1"), 0.3) == [CancelJob(job)]
    assert core.on_broker_message(p.worker_cancel(b"k2"), 0.3) == []
    assert core.on_broker_message(p.worker_credit(b"k2", 5), 0.3) == []
    assert core.jobs == {b"k1": job}  # a cancelled job still owes the broker its FINAL


def test_a_finished_job_sends_its_final_once() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.1))
    body = p.pack({"finish_reason": "stop", "tokens": 3})
    (final,) = sent(core.on_job_finished(job, body, 0.2))
    assert isinstance(final, p.WorkerFinal) and final.route_key == b"k1" and final.body == [body]
    assert core.on_job_finished(job, body, 0.3) == []


def test_malformed_broker_messages_are_dropped_but_count_as_signs_of_life() -> None:
    core = registered_core()
    assert core.on_broker_message([p.WORKER, b"\x99"], 2.9) == []
    assert not of_type(core.tick(2.9 + TTL - 0.1), Close)


def test_the_worker_core_serves_reads_while_registered() -> None:
    core = registered_core()
    read = p.HolderRead("ab" * 32, 0, 8)
    assert core.on_broker_message(p.holder_read(b"r1", read.sha256, 0, 8), 1.0) == [ServeRead(b"r1", read)]


# ------------------------------------------------------------------------------------------------ llama-server


def test_llama_server_down_leaves_the_broker_and_hands_back_every_job() -> None:
    core = registered_core()
    jobs = [started(core.on_broker_message(request_frames(key), 0.1)) for key in (b"k1", b"k2")]
    out = core.on_sidecar(False, 0.2)
    assert of_type(out, CancelJob) == [CancelJob(job) for job in jobs]
    assert isinstance(sent(out)[-1], p.WorkerDisconnect) and out[-1] == Close(flush=True)
    assert core.jobs == {} and core.phase is Phase.WAITING_SIDECAR
    assert core.tick(100.0) == []  # no reconnection, no heartbeat while llama-server is down
    assert of_type(core.on_sidecar(True, 100.0), Connect) == [Connect(2, ENDPOINT)]


def test_llama_server_failed_for_good_ends_the_worker() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.1))
    out = core.fail("llama-server failed for good: exit 1", 0.2)
    assert out[0] == CancelJob(job) and isinstance(sent(out)[0], p.WorkerDisconnect)
    assert out[-1] == Exit("llama-server failed for good: exit 1") and core.stopped


# ------------------------------------------------------------------------------------------------ stopping


def test_stop_announces_draining_at_once_and_ends_when_the_last_job_finishes() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.1))
    out = core.stop(0.2)
    assert out == [SendHeartbeat(busy=1, draining=True)] and not core.stopped
    out = core.on_job_finished(job, p.pack({"tokens": 1}), 1.0)
    assert isinstance(sent(out)[0], p.WorkerFinal) and isinstance(sent(out)[1], p.WorkerDisconnect)
    assert out[-1] == Exit(None)


def test_stop_hands_unfinished_jobs_back_when_the_grace_period_ends() -> None:
    core = registered_core()
    job = started(core.on_broker_message(request_frames(b"k1"), 0.1))
    core.stop(0.2)
    core.on_broker_message(p.heartbeat(), 0.2 + GRACE - 0.1)
    out = core.tick(0.2 + GRACE)
    assert out[0] == CancelJob(job) and isinstance(sent(out)[0], p.WorkerDisconnect) and out[-1] == Exit(None)


def test_stop_without_a_connection_ends_at_once() -> None:
    core = make_core()
    assert core.stop(0.0) == [Exit(None)]


# ------------------------------------------------------------------------------------------------ properties


class WorkerCoreMachine(RuleBasedStateMachine):
    """Random events against the core, checked through a model of the connection it drives.

    Every job must end exactly once: by a FINAL on its connection, or by being cancelled when that connection
    closes (the broker then resumes it), or (a job whose client named its stream, when its broker died) by being
    kept running and then claimed on a later connection or cancelled. Nothing is sent without an open connection;
    llama-server being down never leaves a job or a connection behind; nothing happens after Exit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.core = make_core(seed=1)
        self.now = 0.0
        self.open: int | None = None  # the connection the effects have opened
        self.live: dict[bytes, Job] = {}  # jobs started and not yet ended, by route key on the open connection
        self.kept: dict[bytes, Job] = {}  # jobs kept running without a broker, by stream id
        self.ended: list[Job] = []
        self.exited = False
        self.keys: dict[int | None, int] = {}  # route keys per connection: a new broker counts from 1 again
        self.streams = 0
        self.steps = 0

    def apply(self, effects: list[Effect]) -> None:
        self.steps += 1
        assert not (self.exited and effects), f"effects after Exit: {effects}"
        cancelled: set[int] = set()
        closed: list[Job] = []  # live when their connection closed, not cancelled: the core must keep them
        for effect in effects:
            if isinstance(effect, Connect):
                assert self.open is None, "a second connection opened over the first"
                self.open = effect.connection
            elif isinstance(effect, (Send, SendHeartbeat)):
                assert self.open is not None, "sent without a connection"
                if isinstance(effect, Send):
                    self._check_sent(p.parse_inbound(effect.frames))
            elif isinstance(effect, Close):
                assert self.open is not None
                closed += [job for job in self.live.values() if id(job) not in cancelled]
                self.ended.extend(job for job in self.live.values() if id(job) in cancelled)
                self.live.clear()
                self.open = None
            elif isinstance(effect, StartJob):
                assert effect.job.connection == self.open and effect.job.route_key not in self.live
                self.live[effect.job.route_key] = effect.job
            elif isinstance(effect, CancelJob):
                kept = [stream for stream, job in self.kept.items() if job is effect.job]
                just_kept = [job for job in closed if job is effect.job]  # kept at a Close, then dropped (a stop)
                assert effect.job in self.live.values() or kept or just_kept, "cancelled a job neither live nor kept"
                cancelled.add(id(effect.job))
                for stream in kept:
                    self.ended.append(self.kept.pop(stream))
                for job in just_kept:
                    closed.remove(job)
                    self.ended.append(job)
            elif isinstance(effect, GrantCredit):
                assert effect.job in self.live.values()
            elif isinstance(effect, Rebind):
                assert effect.job in self.kept.values() and effect.connection == self.open, "rebound a job not kept"
                self.kept = {s: j for s, j in self.kept.items() if j is not effect.job}
                self.live[effect.route_key] = effect.job
            elif isinstance(effect, Exit):
                assert self.open is None, "exited with the connection open"
                self.exited = True
        for job in closed:
            assert job.stream_id is not None and self.core.held.get(job.stream_id, None) is not None, (
                "a connection closed with a job that was neither told to stop nor kept"
            )
            self.kept[job.stream_id] = job

    def _check_sent(self, message: p.InboundMessage) -> None:
        if isinstance(message, p.WorkerFinal) and message.route_key in self.live:
            self.ended.append(self.live.pop(message.route_key))

    # ----------------------------------------------------------------------------------------- events

    @initialize()
    def sidecar_starts(self) -> None:
        self.apply(self.core.on_sidecar(True, self.now))

    @rule(healthy=st.booleans())
    def sidecar(self, healthy: bool) -> None:
        self.apply(self.core.on_sidecar(healthy, self.now))
        if not healthy:
            assert self.open is None and not self.live, "llama-server is down but requests are still held"

    @rule(seconds=st.sampled_from([0.0, 0.3, 1.0, 2.9, 3.0, 10.0, 40.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.core.tick(self.now))

    @rule()
    def broker_heartbeat(self) -> None:
        self.apply(self.core.on_broker_message(p.heartbeat(), self.now))

    @rule(valid=st.booleans(), stream=st.booleans(), resumed=st.booleans())
    def broker_request(self, valid: bool, stream: bool, resumed: bool) -> None:
        self.keys[self.open] = self.keys.get(self.open, 0) + 1
        key = self.keys[self.open].to_bytes(4, "big")
        self.streams += 1
        if not valid:
            frames = p.worker_request(key, [p.pack({"nothing": 1})])
        elif stream:  # its client names the stream: it may outlive the broker; a failover starts after tokens
            request = GenerationRequest(prompt="hi", stream=b"s%d" % self.streams)
            frames = p.worker_request(key, [(request.resumed_after([5, 6]) if resumed else request).to_body()])
        else:
            frames = request_frames(key)
        self.apply(self.core.on_broker_message(frames, self.now))

    @precondition(lambda self: self.kept and self.open is not None)
    @rule(data=st.data(), its_own=st.booleans())
    def client_asks_for_a_kept_stream(self, data: st.DataObject, its_own: bool) -> None:
        """The client has the kept generation's tokens (those it started after, then some of those it sent: the
        last ones may have died with the broker), or one of them came from elsewhere (the stream ran on another
        worker, or the broker that resumed it here had other tokens)."""
        stream = data.draw(st.sampled_from(sorted(self.kept)))
        self.keys[self.open] = self.keys.get(self.open, 0) + 1
        key = self.keys[self.open].to_bytes(4, "big")
        job = self.kept[stream]
        if not job.sent:
            generated(generated(job, 1, 2), 3)
        assert isinstance(job.request, GenerationRequest)
        resumed = job.request.resume_tokens
        chunks = data.draw(st.integers(0 if its_own or resumed else 1, len(job.sent)))  # the rest died in the broker
        tokens = [*resumed, *job.sent_tokens()[: sum(count for _, count in job.sent[:chunks])]]
        if not its_own:
            tokens[data.draw(st.integers(0, len(tokens) - 1))] += 1000
        body = GenerationRequest(prompt="hi", stream=stream, resume_tokens=tokens, failovers=1).to_body()
        out = self.core.on_broker_message(p.worker_request(key, [body]), self.now)
        self.apply(out)
        if self.core.registered and its_own:
            assert any(isinstance(e, Rebind) and e.job is job for e in out), "a kept stream was not handed back"
        elif self.core.registered:
            assert CancelJob(job) in out and of_type(out, StartJob), "another worker's tokens: a new generation"

    @precondition(lambda self: self.kept)
    @rule(data=st.data())
    def a_kept_stream_ends(self, data: st.DataObject) -> None:
        job = self.kept[data.draw(st.sampled_from(sorted(self.kept)))]
        assert self.core.on_job_finished(job, p.pack({"finish_reason": "stop"}), self.now) == [], "sent with no client"

    @rule()
    def broker_gone(self) -> None:
        self.apply(self.core.on_broker_gone(self.now))

    @rule(data=st.data(), cancel=st.booleans())
    def broker_cancel_or_credit(self, data: st.DataObject, cancel: bool) -> None:
        keys = sorted(self.live) + [b"\xff\xff"]
        key = data.draw(st.sampled_from(keys))
        frames = p.worker_cancel(key) if cancel else p.worker_credit(key, 3)
        self.apply(self.core.on_broker_message(frames, self.now))

    @rule(refusal=st.sampled_from([None, (p.WORKER_FAILED, "busy")]))
    def broker_disconnect(self, refusal: tuple[int, str] | None) -> None:
        self.apply(self.core.on_broker_message(p.disconnect(refusal), self.now))

    @rule(frames=st.lists(st.binary(max_size=8), max_size=4))
    def broker_garbage(self, frames: list[bytes]) -> None:
        self.apply(self.core.on_broker_message(frames, self.now))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def slot_finishes(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(list(self.live.values())))
        self.apply(self.core.on_job_finished(job, p.pack({"finish_reason": "stop"}), self.now))
        assert job not in self.live.values()

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def stale_slot_finishes(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.ended))
        out = self.core.on_job_finished(job, p.pack({"finish_reason": "stop"}), self.now)
        assert out == [], "a job that already ended (perhaps under a route key now reused) sent something"

    @rule()
    def connection_lost(self) -> None:
        self.apply(self.core.on_connection_lost("queue full", self.now))

    # Stopping ends a run (so does a fatal refusal): only late in one, so that runs first reach the rarer
    # states (route keys reused by a new connection).
    @precondition(lambda self: self.steps >= 25)
    @rule()
    def stop(self) -> None:
        self.apply(self.core.stop(self.now))

    @precondition(lambda self: self.steps >= 25)
    @rule(code=st.sampled_from([p.FORBIDDEN, p.BAD_REQUEST]))
    def broker_refuses(self, code: int) -> None:
        self.apply(self.core.on_broker_message(p.disconnect((code, "no")), self.now))

    @precondition(lambda self: self.steps >= 25)
    @rule()
    def fail(self) -> None:
        self.apply(self.core.fail("gone", self.now))

    # ----------------------------------------------------------------------------------------- invariants

    @invariant()
    def jobs_are_the_live_ones_of_the_open_connection(self) -> None:
        assert self.core.jobs == self.live, "the core's jobs and the jobs that have not ended differ"
        assert {s: k.job for s, k in self.core.held.items()} == self.kept, "the core keeps other jobs than these"
        assert (self.open is not None) == (self.core.phase in (Phase.CONNECTING, Phase.REGISTERED))
        if self.open is not None:
            assert self.open == self.core.connection

    @invariant()
    def time_always_moves_on(self) -> None:
        if not self.core.stopped and self.core.phase is not Phase.WAITING_SIDECAR:
            assert self.core.next_wakeup() < float("inf"), "nothing would ever wake the loop again"

    @invariant()
    def exit_is_final(self) -> None:
        assert self.exited == self.core.stopped


TestWorkerCoreMachine = WorkerCoreMachine.TestCase
TestWorkerCoreMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


@pytest.mark.parametrize("seed", range(5))
def test_the_backoff_never_drops_below_half_the_nominal_delay(seed: int) -> None:
    core = make_core(seed=seed)
    core.on_sidecar(True, 0.0)
    for attempt in range(1, 12):
        closed_at = core.broker_expires
        core.tick(closed_at)
        nominal = min(INTERVAL * 2 ** (attempt - 1), MAX_DELAY)
        assert core.reconnect_at - closed_at >= 0.5 * nominal - 1e-9
        core.tick(core.reconnect_at)
        assert core.phase is Phase.CONNECTING


# ------------------------------------------------------------------------------------------------ a broker pair

PAIR = ("tcp://a:5555", "tcp://b:5556")


def pair_core() -> WorkerCore:
    core = make_core(brokers=PAIR, hold_streams=20.0)
    core.on_sidecar(True, 0.0)
    return core


def streamed(key: bytes, stream: bytes, **fields: Any) -> list[bytes]:
    return p.worker_request(key, [GenerationRequest(prompt="hi", stream=stream, **fields).to_body()])


def generated(job: Job, *tokens: int) -> Job:
    """``job``'s slot thread sent a PARTIAL of ``tokens`` (as BrokerLink keeps them for a stream that may outlive
    its broker)."""
    job.sent.append((p.pack({"text": "x" * len(tokens), "tokens": list(tokens)}), len(tokens)))
    return job


def test_a_passive_broker_sends_the_worker_to_the_other_at_once_and_a_round_of_refusals_backs_off() -> None:
    core = pair_core()
    out = core.on_broker_message(p.disconnect((p.NOT_ACTIVE, "passive")), 0.1)
    assert of_type(out, Connect) == [Connect(2, PAIR[1])], "the other broker of the pair, at once"
    out = core.on_broker_message(p.disconnect((p.NOT_ACTIVE, "passive")), 0.2)
    assert not of_type(out, Connect) and core.phase is Phase.BACKING_OFF  # both said no: wait a little
    assert of_type(core.tick(core.reconnect_at), Connect) == [Connect(3, PAIR[0])]
    core.on_broker_message(p.heartbeat({"epoch": 3}), 5.0)
    assert core.registered and core.max_epoch == 3


def test_after_its_broker_died_the_worker_asks_the_passive_one_again_until_it_takes_over() -> None:
    """The passive broker may hear of its peer's death a moment after the worker: its 421 then means "not yet", and
    the worker asks it again shortly rather than going back to the dead one, until a heartbeat timeout has passed."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    assert of_type(core.on_broker_gone(1.0), Connect) == [Connect(2, PAIR[1])]
    out = core.on_broker_message(p.disconnect((p.NOT_ACTIVE, "passive")), 1.01)
    assert not of_type(out, Connect) and core.reconnect_at == 1.01 + p.PASSIVE_RETRY
    assert of_type(core.tick(core.reconnect_at), Connect) == [Connect(3, PAIR[1])], "the same broker, not the dead one"
    core.on_broker_message(p.heartbeat({"epoch": 2}), 1.3)
    assert core.registered and core.fled is None and core.failed_attempts == 0
    late = 1.3 + TTL  # a 421 long after the flight: the dead broker may be back and active
    core.on_broker_gone(late)
    out = core.on_broker_message(p.disconnect((p.NOT_ACTIVE, "passive")), late + TTL)
    assert of_type(out, Connect) == [Connect(5, PAIR[1])]


def test_a_pair_broker_that_nobody_listens_for_sends_the_worker_to_the_other_at_once() -> None:
    core = pair_core()  # connecting to PAIR[0]: the connection is refused (its process is not running)
    assert of_type(core.on_broker_gone(0.1), Connect) == [Connect(2, PAIR[1])]
    assert core.fled is None, "a broker never reached is no news: the other may rightly say it is passive"
    alone = make_core()  # a broker alone may be restarting: the connection keeps trying, READY waits in it
    alone.on_sidecar(True, 0.0)
    assert alone.on_broker_gone(0.1) == [] and alone.phase is Phase.CONNECTING


def test_a_broker_of_an_older_epoch_is_left_for_the_other() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 4}), 0.1)
    core.on_broker_gone(0.2)
    out = core.on_broker_message(p.heartbeat({"epoch": 3}), 0.3)  # the old active, woken from a freeze
    assert not core.registered and of_type(out, Connect) == [Connect(3, PAIR[0])]


def test_a_broker_of_an_older_epoch_is_followed_once_a_round_finds_no_broker_of_the_newer_one() -> None:
    """The broker of epoch 4 died and its peer came back alone, never having heard of epoch 4: once the dead one has
    not answered either, the older one is the broker there is (waiting for epoch 4 would keep the worker out)."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 4}), 0.1)
    core.on_broker_gone(0.2)
    core.on_broker_message(p.heartbeat({"epoch": 3}), 0.3)
    assert not core.registered
    core.tick(0.3 + TTL)  # the broker of epoch 4 does not answer
    assert of_type(core.tick(core.reconnect_at), Connect) == [Connect(4, PAIR[1])]
    core.on_broker_message(p.heartbeat({"epoch": 3}), core.reconnect_at + 0.1)
    assert core.registered and core.max_epoch == 3


def test_generations_with_a_stream_outlive_their_broker_and_go_on_for_their_clients() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    kept = generated(started(core.on_broker_message(streamed(b"k1", b"s1", window=8), 0.1)), 5, 6, 7, 8)
    plain = started(core.on_broker_message(request_frames(b"k2"), 0.1))
    out = core.on_broker_gone(1.0)  # its process died
    assert CancelJob(plain) in out and CancelJob(kept) not in out, "only a named stream can be found again"
    assert core.held.keys() == {b"s1"} and core.jobs == {}
    assert of_type(out, Connect) == [Connect(2, PAIR[1])]
    (ready,) = sent(out)
    assert isinstance(ready, p.WorkerReady) and ready.info["kept"] == 1, "READY says a slot runs a kept stream"
    (attach,) = sent(core.on_broker_message(p.heartbeat({"epoch": 2}), 1.1))
    assert attach == p.WorkerAttach(b"s1")
    resent = GenerationRequest(prompt="hi", stream=b"s1", window=8, resume_tokens=[5, 6, 7], failovers=1)
    out = core.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)
    assert out == [Rebind(kept, b"n1", 2, 3, 8)] and core.jobs == {b"n1": kept} and core.held == {}
    assert not of_type(out, StartJob), "the same generation, not a new one"


def test_a_worker_whose_broker_answers_slowly_sends_its_attaches_before_any_heartbeat() -> None:
    """READY says a slot runs a kept stream and the broker holds it until the worker says anything but ATTACH: a
    HEARTBEAT due while the broker's answer was on its way would reach it first and free that slot for a queued
    request, and the ATTACH that follows would find no slot (its stream dropped)."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    core.on_broker_gone(1.0)
    assert core.held.keys() == {b"s1"} and core.phase is Phase.CONNECTING
    assert core.next_wakeup() == 1.0 + TTL, "nothing to send before the broker answers"
    assert core.tick(1.0 + INTERVAL * 2) == [], "no HEARTBEAT before the ATTACHes"
    (attach,) = sent(core.on_broker_message(p.heartbeat({"epoch": 2}), 1.0 + INTERVAL * 2.5))
    assert attach == p.WorkerAttach(b"s1")
    assert core.next_wakeup() <= core.now and of_type(core.tick(core.now), SendHeartbeat), "then at once"


def test_a_kept_generation_that_resumed_a_stream_counts_only_its_own_tokens_as_delivered() -> None:
    """It took the stream over after 2 tokens (a failover) and sent the tokens after those: a client that has 5 in
    all has 3 of its chunks (counting all 5 skipped 2 more, which the client never got: found by scripts/chaos)."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    resumed = GenerationRequest(prompt="hi", stream=b"s1", window=8, resume_tokens=[5, 6], failovers=1)
    kept = generated(started(core.on_broker_message(p.worker_request(b"k1", [resumed.to_body()]), 0.1)), 7, 8, 9)
    core.on_broker_gone(1.0)
    core.on_broker_message(p.heartbeat({"epoch": 2}), 1.1)
    resent = GenerationRequest(prompt="hi", stream=b"s1", window=8, resume_tokens=[5, 6, 7, 8, 9], failovers=2)
    out = core.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)
    assert out == [Rebind(kept, b"n1", 2, 3, 8)]


def test_a_client_behind_where_a_kept_generation_started_gets_a_new_one() -> None:
    """The broker resumed the stream here after 2 tokens, then died before the client got the second: the kept
    generation never made that token, so it cannot go on where the client is; a new generation does."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    resumed = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5, 6], failovers=1)
    kept = started(core.on_broker_message(p.worker_request(b"k1", [resumed.to_body()]), 0.1))
    core.on_broker_gone(1.0)
    core.on_broker_message(p.heartbeat({"epoch": 2}), 1.1)
    resent = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5], failovers=1)
    out = core.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)
    assert CancelJob(kept) in out and not of_type(out, Rebind)
    assert started(out).request.resume_tokens == [5] and core.held == {}


def test_a_client_with_tokens_of_another_worker_gets_a_new_generation() -> None:
    """The broker moved the stream to another worker while this one kept generating it unseen, then died: the
    client has the other worker's tokens, and going on here would splice two different answers."""
    core = pair_core()
    core.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    kept = generated(started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1)), 5, 6, 7)
    core.on_broker_gone(1.0)
    core.on_broker_message(p.heartbeat({"epoch": 2}), 1.1)
    resent = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5, 9, 9, 9], failovers=1)
    out = core.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)
    assert CancelJob(kept) in out and not of_type(out, Rebind)
    assert started(out).request.resume_tokens == [5, 9, 9, 9] and core.held == {}
    more = pair_core()  # more tokens than this generation made: they came from elsewhere too
    more.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    kept = generated(started(more.on_broker_message(streamed(b"k1", b"s1"), 0.1)), 5)
    more.on_broker_gone(1.0)
    more.on_broker_message(p.heartbeat({"epoch": 2}), 1.1)
    resent = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5, 6], failovers=1)
    assert CancelJob(kept) in more.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)
    before = pair_core()  # its own tokens, but after others than those this generation started after
    before.on_broker_message(p.heartbeat({"epoch": 1}), 0.0)
    resumed = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5, 6], failovers=1)
    kept = generated(started(before.on_broker_message(p.worker_request(b"k1", [resumed.to_body()]), 0.1)), 7)
    before.on_broker_gone(1.0)
    before.on_broker_message(p.heartbeat({"epoch": 2}), 1.1)
    resent = GenerationRequest(prompt="hi", stream=b"s1", resume_tokens=[5, 9, 7], failovers=2)
    assert CancelJob(kept) in before.on_broker_message(p.worker_request(b"n1", [resent.to_body()]), 1.2)


def test_a_kept_generation_that_ended_meanwhile_sends_its_final_when_claimed() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat(), 0.0)
    kept = started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    core.tick(0.1 + TTL)  # silent broker
    assert core.on_job_finished(kept, p.pack({"finish_reason": "stop"}), 3.5) == []
    core.on_broker_message(p.heartbeat(), 4.0)
    out = core.on_broker_message(streamed(b"n1", b"s1"), 4.1)
    assert isinstance(out[0], Rebind)
    (final,) = sent(out)
    assert isinstance(final, p.WorkerFinal) and final.route_key == b"n1" and core.jobs == {}


def test_a_kept_generation_nobody_claims_is_cancelled() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat(), 0.0)
    kept = started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    core.on_broker_message(p.disconnect(), 0.5)  # a new broker that does not know us
    assert b"s1" in core.held and core.next_wakeup() <= 20.5
    assert CancelJob(kept) in core.tick(20.5) and core.held == {}
    again = pair_core()
    again.on_broker_message(p.heartbeat(), 0.0)
    kept = started(again.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    again.on_broker_gone(0.2)
    again.on_broker_message(p.heartbeat(), 0.3)
    assert again.on_broker_message(p.worker_cancel(b"s1"), 0.4) == [CancelJob(kept)]  # it runs elsewhere already


def test_a_kept_generation_expires_while_no_broker_is_reachable() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat(), 0.0)
    kept = started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    core.on_broker_gone(0.2)
    core.on_sidecar(False, 0.3)  # llama-server down too: no connection until it is back
    deadline = core.next_wakeup()
    assert CancelJob(kept) in core.tick(deadline) and core.held == {}
    assert core.next_wakeup() > deadline, "an expired stream must not keep the loop waking at once"


def test_a_stopping_worker_drops_what_it_kept() -> None:
    core = pair_core()
    core.on_broker_message(p.heartbeat(), 0.0)
    kept = started(core.on_broker_message(streamed(b"k1", b"s1"), 0.1))
    core.on_broker_gone(0.2)
    assert CancelJob(kept) in core.stop(0.3) and core.held == {}
