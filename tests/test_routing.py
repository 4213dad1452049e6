"""Cache-aware routing (broker/routing.py and its use in broker/core.py): pure, with hypothesis; no sockets."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qmesh.broker.core import BrokerConfig, BrokerCore, Outgoing
from qmesh.broker.routing import (
    MAX_INDEX_BLOCKS,
    TOKENS_PER_BLOCK,
    Candidate,
    PrefixIndex,
    RoutingConfig,
    cache_aware,
    least_loaded,
)
from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest
from qmesh.common.prefix import BLOCK_CHARS, conversation_text, prefix_hashes, split_hashes

MODEL = "m"
CONFIG = RoutingConfig()


def blocks(text: str) -> list[bytes]:
    return split_hashes(prefix_hashes(text))


# ------------------------------------------------------------------------------------------------ hashes


def test_a_conversations_next_turn_starts_with_every_hash_of_the_turn_before() -> None:
    turn1 = [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "Q" * 500}]
    turn2 = [*turn1, {"role": "assistant", "content": "A" * 400}, {"role": "user", "content": "again?"}]
    first, second = prefix_hashes(conversation_text(turn1)), prefix_hashes(conversation_text(turn2))
    assert second.startswith(first) and len(second) > len(first)
    other = [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "other question " * 40}]
    shared = blocks(conversation_text(other))
    assert shared[:2] == blocks(conversation_text(turn1))[:2]  # the system prompt's full blocks are shared
    assert shared[3] != blocks(conversation_text(turn1))[3]


def test_only_full_blocks_are_hashed() -> None:
    assert prefix_hashes("x" * (BLOCK_CHARS - 1)) == b""
    assert len(prefix_hashes("x" * (2 * BLOCK_CHARS + 5))) == 2 * 8


# ------------------------------------------------------------------------------------------------ the index


def test_the_index_matches_leading_blocks_and_evicts_conversations_from_their_ends() -> None:
    index = PrefixIndex(capacity=6)
    a, b = blocks("a" * BLOCK_CHARS * 4), blocks("b" * BLOCK_CHARS * 4)
    index.add(a)
    assert index.match(a) == 4 and index.match(a[:2]) == 2 and index.match(b) == 0
    index.add(b)  # 8 blocks > 6: the oldest go first, and those are a's last ones
    assert len(index) == 6 and index.match(a) == 2 and index.match(b) == 4


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), max_size=30), st.integers(1, 40))
def test_the_index_stays_within_its_bound_and_prefix_closed(conversations: list[list[int]], capacity: int) -> None:
    index = PrefixIndex(capacity)
    chains = []
    for words in conversations:
        chain = blocks("".join(f"{w:0{BLOCK_CHARS}d}" for w in words))
        chains.append(chain)
        index.add(chain)
        assert len(index) <= capacity
    for chain in chains:
        held = [block in index for block in chain]
        assert held == sorted(held, reverse=True), "a block held without the prefix before it"
        assert index.match(chain) == sum(held)


def test_the_index_bound_is_capped_whatever_a_worker_announces() -> None:
    assert PrefixIndex(10**12).capacity == MAX_INDEX_BLOCKS


# ------------------------------------------------------------------------------------------------ the policies


def candidate(name: str, *, slots: int = 1, active: int = 0, waiting: int = 0, cached: int = 0, **kw: Any) -> Candidate:
    return Candidate(name.encode(), slots, active, waiting, kw.pop("health", 1.0), cached, **kw)


def test_the_longest_cached_prefix_wins_when_it_has_a_free_slot() -> None:
    placement = cache_aware([candidate("a", cached=2), candidate("b", cached=9), candidate("c")], 10, CONFIG)
    assert placement is not None and placement.identity == b"b" and not placement.wait


def test_a_busy_best_match_is_waited_for_until_load_is_imbalanced() -> None:
    busy = candidate("a", active=1, cached=9)
    placement = cache_aware([busy, candidate("b")], 10, CONFIG)
    assert placement is not None and placement.identity == b"a" and placement.wait
    crowded = candidate("a", active=1, waiting=1, cached=9)  # one request already waits for it
    placement = cache_aware([crowded, candidate("b")], 10, CONFIG)
    assert placement is not None and placement.identity == b"b" and not placement.wait


def test_cold_requests_and_small_matches_go_to_the_least_loaded() -> None:
    candidates = [candidate("a", slots=2, active=1, cached=2), candidate("b", slots=2)]
    assert cache_aware(candidates, 10, CONFIG) == least_loaded(candidates, 10, CONFIG)
    assert cache_aware(candidates, 10, CONFIG).identity == b"b"  # type: ignore[union-attr]


def test_a_session_stays_on_its_worker_and_equal_matches_go_to_the_less_loaded() -> None:
    placement = cache_aware([candidate("a", cached=9), candidate("b", session=True)], 10, CONFIG)
    assert placement is not None and placement.identity == b"b"
    twins = [candidate("a", slots=2, active=1, cached=5), candidate("b", slots=2, cached=5)]
    assert cache_aware(twins, 10, CONFIG).identity == b"b"  # type: ignore[union-attr]


def test_nothing_starts_while_every_slot_is_taken() -> None:
    assert cache_aware([candidate("a", active=1, cached=9)], 10, CONFIG) is None
    assert least_loaded([candidate("a", active=1)], 10, CONFIG) is None


candidates_st = st.lists(
    st.builds(
        Candidate,
        identity=st.binary(min_size=1, max_size=4),
        slots=st.integers(1, 4),
        active=st.integers(0, 4),
        waiting=st.integers(0, 4),
        health=st.floats(0, 1),
        cached_blocks=st.integers(0, 10),
        session=st.booleans(),
    ).filter(lambda c: c.active <= c.slots),
    min_size=1,
    max_size=5,
    unique_by=lambda c: c.identity,
)
configs_st = st.builds(
    RoutingConfig,
    balance_abs_threshold=st.sampled_from([0.0, 1.0, 2.0, 4.0]),
    balance_rel_threshold=st.sampled_from([1.0, 1.5, 3.0]),
    cache_threshold=st.sampled_from([0.0, 0.5, 1.0]),
)


@given(candidates_st, st.integers(0, 10), configs_st)
def test_a_request_never_waits_for_a_busy_match_while_another_is_free_beyond_the_thresholds(
    candidates: list[Candidate], total: int, config: RoutingConfig
) -> None:
    placement = cache_aware(candidates, total, config)
    free = [c for c in candidates if c.free > 0]
    if not free:
        assert placement is None
        return
    assert placement is not None
    chosen = next(c for c in candidates if c.identity == placement.identity)
    if not placement.wait:
        assert chosen.free > 0
        return
    least = min(c.load for c in free)
    assert chosen.free == 0
    assert not (
        chosen.load - least > config.balance_abs_threshold and chosen.load > config.balance_rel_threshold * least
    ), "waits for a busy worker although another is free beyond the thresholds"


# ------------------------------------------------------------------------------------------------ in the core


def make_core(**routing: Any) -> BrokerCore:
    return BrokerCore(BrokerConfig(heartbeat_interval=1000.0, routing=RoutingConfig(**routing)))


def ready(core: BrokerCore, worker: bytes, slots: int = 1, capacity: int | None = None) -> None:
    info: dict[str, Any] = {"slots": slots, "context": 2048}
    if capacity is not None:
        info["prefix_capacity"] = capacity
    core.on_message(worker, p.ready(MODEL, info), 0.0)


def ask(core: BrokerCore, client: bytes, rid: bytes, messages: list[dict[str, str]], session: str | None = None):
    hint = p.RoutingHint(prefix_hashes(conversation_text(messages)), session)
    body = GenerationRequest(messages=messages).to_body()
    out = core.on_message(client, p.client_request(MODEL, [body], rid, hint), 0.0)
    core.check_invariants()
    return out


def dispatched(out: list[Outgoing]) -> list[tuple[bytes, bytes]]:
    """(worker, route key) of each REQUEST sent."""
    return [
        (who, message.route_key)
        for who, frames in out
        if frames[0] == p.WORKER and (message := p.parse_for_worker(frames)).command == p.W_REQUEST
    ]


def finish(core: BrokerCore, worker: bytes, key: bytes, prompt: int = 0, cached: int = 0) -> list[Outgoing]:
    summary = {"finish_reason": "stop", "tokens": 3, "prompt_tokens": prompt, "cached_tokens": cached}
    out = core.on_message(worker, p.worker_reply(True, key, [p.pack(summary)]), 1.0)
    core.check_invariants()
    return out


DOC = "A long private document about rivers. " * 40


def turns(n: int, doc: str = DOC) -> list[list[dict[str, str]]]:
    conversation = [{"role": "user", "content": doc + " Summarise it."}]
    result = [list(conversation)]
    for turn in range(1, n):
        conversation += [
            {"role": "assistant", "content": f"Answer {turn}. " * 20},
            {"role": "user", "content": "More?"},
        ]
        result.append(list(conversation))
    return result


@pytest.mark.parametrize(("policy", "places"), [("cache-aware", 1), ("least-loaded", 2)])
def test_each_turn_of_a_conversation_lands_where_the_turn_before_ran(policy: str, places: int) -> None:
    core = make_core(policy=policy)
    ready(core, b"w1")
    ready(core, b"w2")
    workers = []
    for index, messages in enumerate(turns(4)):
        other = turns(1, doc=f"Another document {index}. " * 60)[0]
        sends = [(b"c1", messages), (b"c2", other)]  # other traffic, sometimes first, sometimes second
        out = [o for client, m in (sends if index % 2 else reversed(sends)) for o in ask(core, client, b"r", m)]
        running = dispatched(out)
        assert len(running) == 2
        workers.append(running[0 if index % 2 else 1][0])
        for worker, key in running:
            finish(core, worker, key)
    assert len(set(workers)) == places, workers


@pytest.mark.parametrize(("policy", "warm_again"), [("cache-aware", True), ("least-loaded", False)])
def test_the_policy_chooses_between_the_warm_worker_and_the_least_loaded(policy: str, warm_again: bool) -> None:
    core = make_core(policy=policy)
    ready(core, b"w1", slots=2)
    ready(core, b"w2", slots=2)
    first, second = turns(2)
    ((warm, key),) = dispatched(ask(core, b"c1", b"t1", first))
    assert warm == b"w1"  # both idle: the first registered
    finish(core, warm, key)
    ((other, _),) = dispatched(ask(core, b"c2", b"x", turns(1, doc="Unrelated. " * 90)[0]))
    assert other == b"w1"  # both idle again, so w1 now runs one request and w2 none
    ((worker, _),) = dispatched(ask(core, b"c1", b"t2", second))
    assert (worker == warm) is warm_again


def test_a_turn_waits_for_its_busy_worker_while_the_other_is_idle_and_a_second_spills_over() -> None:
    core = make_core()
    ready(core, b"w1")
    ready(core, b"w2")
    first, second = turns(2)
    ((warm, key),) = dispatched(ask(core, b"c1", b"t1", first))
    finish(core, warm, key)
    ((warm_again, busy_key),) = dispatched(ask(core, b"c9", b"same-doc", second))  # the same prefix: warm worker
    assert warm_again == warm
    assert dispatched(ask(core, b"c1", b"t2", second)) == []  # waits: a warm prefill beats a cold one
    ((cold, _),) = dispatched(ask(core, b"c5", b"t3", second))  # a third would overload the warm one
    assert cold != warm
    ((after, _),) = dispatched(finish(core, warm, busy_key))
    assert after == warm  # the waiting turn got its worker


def test_a_dead_workers_prefixes_and_sessions_vanish_with_it() -> None:
    core = make_core()
    ready(core, b"w1")
    ready(core, b"w2")
    ((first, key),) = dispatched(ask(core, b"c1", b"t1", turns(1)[0], session="s1"))
    finish(core, first, key)
    core.on_message(first, p.disconnect(), 2.0)
    assert first not in core.workers
    ready(core, first)  # the same identity registering again: a new llama-server, nothing cached
    assert len(core.workers[first].prefixes) == 0


def test_the_index_of_a_worker_is_sized_from_what_it_announces() -> None:
    core = make_core()
    ready(core, b"w1", slots=2, capacity=64_000)
    ready(core, b"w2", slots=2)
    assert core.workers[b"w1"].prefixes.capacity == 64_000 // TOKENS_PER_BLOCK
    assert core.workers[b"w2"].prefixes.capacity == 2 * 2048 // TOKENS_PER_BLOCK


def test_a_predicted_hit_that_missed_shrinks_the_index_and_finals_count_cached_tokens() -> None:
    core = make_core()
    ready(core, b"w1")
    first, second = turns(2)
    ((worker, key),) = dispatched(ask(core, b"c1", b"t1", first))
    finish(core, worker, key, prompt=500, cached=0)
    capacity = core.workers[worker].prefixes.capacity
    ((_, key),) = dispatched(ask(core, b"c1", b"t2", second))
    finish(core, worker, key, prompt=700, cached=10)  # predicted most of it; llama-server had evicted it
    assert core.workers[worker].prefixes.capacity < capacity
    (row,) = core.worker_table()
    assert (row["prompt_tokens"], row["cached_tokens"]) == (1200, 10)
    assert [(f.prompt_tokens, f.cached_tokens) for f in core.finished] == [(500, 0), (700, 10)]


def test_plain_and_hintless_requests_are_routed_as_before() -> None:
    core = make_core()
    ready(core, b"w1")
    out = core.on_message(b"plain", p.client_request(MODEL, [b"hello"]), 0.0)
    assert len(dispatched(out)) == 1


class RoutingMachine(RuleBasedStateMachine):
    """Random conversations, finals and worker deaths: the tables agree, every index stays within its bound, and
    the queue is always at rest (dispatching again would place nothing)."""

    @initialize(
        policy=st.sampled_from(["cache-aware", "least-loaded"]),
        slots=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    )
    def start(self, policy: str, slots: list[int]) -> None:
        self.core = make_core(policy=policy)
        self.next_worker = 0
        self.requests = 0
        for count in slots:
            self.add_worker(count)

    def add_worker(self, slots: int) -> None:
        self.next_worker += 1
        ready(self.core, f"w{self.next_worker}".encode(), slots=slots, capacity=40 * TOKENS_PER_BLOCK)

    @rule(slots=st.integers(1, 2))
    def worker_joins(self, slots: int) -> None:
        self.add_worker(slots)

    @rule(conversation=st.integers(0, 5), turn=st.integers(1, 4), session=st.booleans())
    def request(self, conversation: int, turn: int, session: bool) -> None:
        self.requests += 1
        messages = turns(turn, doc=f"Document {conversation}. " * 30)[-1]
        ask(self.core, b"c1", f"r{self.requests}".encode(), messages, session=f"s{conversation}" if session else None)

    @precondition(lambda self: any(w.active for w in self.core.workers.values()))
    @rule(data=st.data())
    def final(self, data: st.DataObject) -> None:
        busy = sorted((w.identity, key) for w in self.core.workers.values() for key in w.active)
        worker, key = data.draw(st.sampled_from(busy))
        finish(self.core, worker, key, prompt=100, cached=data.draw(st.integers(0, 100)))

    @precondition(lambda self: self.core.workers)
    @rule(data=st.data())
    def worker_dies(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(sorted(self.core.workers)))
        self.core.on_message(worker, p.disconnect(), 1.0)
        self.core.check_invariants()

    @invariant()
    def indexes_within_bounds(self) -> None:
        for worker in self.core.workers.values():
            assert len(worker.prefixes) <= worker.prefixes.capacity <= 40

    @invariant()
    def queue_at_rest(self) -> None:
        twin = copy.deepcopy(self.core)
        for name in list(twin.services):
            out: list[Outgoing] = []
            twin._dispatch(name, out)
            assert out == [], "a queued request could have been placed"


TestRoutingMachine = RoutingMachine.TestCase
TestRoutingMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("policy", ["cache-aware", "least-loaded"])
def test_both_policies_are_known_to_the_broker(policy: str) -> None:
    assert make_core(policy=policy).config.routing.policy == policy
