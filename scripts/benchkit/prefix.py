"""``prefix``: cache-aware against least-loaded routing: multi-turn chats, a shared system prompt, no reuse.

Two complete meshes side by side, identical but for the broker's ``--routing``: each a broker and 2 worker
processes x 2 threads (4 llama-servers, 1 slot each, ``--cpu-threads 1``, the same ``--cache-ram``), all started
once. Two meshes rather than one broker restarted with the other policy between rounds: llama-server's prompt
caches (its slot and its ``--cache-ram`` host cache) outlive a broker restart, so the policy that ran second would
find, or miss, prefixes that the other policy's routing left behind. Here each policy meets only its own caches.

Three workloads, each with the SDK (``QMeshClient.submit(messages=..., system=..., session=...)``, greedy):

1. chat: ``--conversations`` conversations, each over its own document of ``--doc-tokens`` tokens (in its first
   user message), ``--turns`` turns, the answers joining the history; ``--users`` users each take a conversation
   that is not in flight, in random order, send its next turn and wait for the answer. Each conversation is a
   session of its own, as ``client.chat()`` objects are;
2. shared: a system prompt of ``--system-tokens`` tokens shared by ``--shared-requests`` short distinct questions
   (SGLang's "generated shared prefix" shape), ``--users`` in flight;
3. control: ``--control-requests`` distinct one-shot prompts of about the shared workload's length, no reuse.

Every workload runs ``--rounds`` rounds. A round sends the same seeded content to both meshes, one after the other
and never both at once (an idle llama-server costs nothing), in ABBA order from round to round (``overhead.order``)
so that a drift in the machine's speed favours neither. Each round has content of its own, so every round starts
cold on both meshes: what a mesh's caches keep from its earlier rounds matches nothing.
"""

from __future__ import annotations

import argparse
import math
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from qmesh.broker.routing import MAX_INDEX_BLOCKS, TOKENS_PER_BLOCK, PrefixIndex, RoutingConfig
from qmesh.client.sdk import QMeshClient, Request, Result
from qmesh.common.prefix import split_hashes
from qmesh.testing import Child, free_endpoint, llama_servers, wait_for_workers

from . import procs, rig
from .overhead import order
from .report import Section, Table
from .stats import fmt, percentile, ratio, verdict

POLICIES = ("least-loaded", "cache-aware")  # the baseline first
BASELINE, CACHE_AWARE = 0, 1
PROCESSES, THREADS = 2, 2  # per mesh: worker processes x threads, one llama-server (1 slot) per thread
SERVERS = PROCESSES * THREADS
CHAT, SHARED, CONTROL = "chat", "shared", "control"
WORKLOADS = {
    CHAT: "1. multi-turn chat over private documents",
    SHARED: "2. a long system prompt shared by all requests",
    CONTROL: "3. control: distinct one-shot prompts, no reuse",
}
FIRST, FOLLOW_UP, WARM_UP, ONE_SHOT = "first turn", "follow-up", "warm-up", "one-shot"  # kinds of request
TOKENS_PER_SENTENCE = 20  # what the model's tokenizer makes of one generated sentence (measured: ~4 chars/token)

GOAL_FOLLOW_UP_VS_FIRST = 0.15
GOAL_FOLLOW_UP_VS_BASELINE = 4.0
GOAL_HIT_RATIO = 0.90
GOAL_TOKENS_RATIO = 0.97
GOAL_MAX_SHARE = 1.5

# Seeded content: invented facts, so no document is in the model's training data and no two rounds share text.
NAMES = ("Ada", "Bram", "Cleo", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca")
NAMES += ("Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wren", "Yusuf")
PLACES = ("harbour", "mill", "library", "orchard", "bridge", "market", "school", "bakery", "forge", "lighthouse")
PLACES += ("vineyard", "station", "quarry", "chapel", "garden", "workshop")
THINGS = ("barrels of apples", "crates of salt", "copper pots", "wool blankets", "oak planks", "glass jars")
THINGS += ("sacks of flour", "iron nails", "maps of the coast", "jars of honey", "bolts of linen", "candles")
VERBS = ("repaired", "counted", "painted", "delivered", "inspected", "sold", "stored", "measured", "carried")
TIMES = ("on Monday", "before dawn", "in early spring", "after the storm", "during the fair", "at noon")
TIMES += ("late in autumn", "on the last day of the month", "while it rained", "the week before the wedding")


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(TIMES).capitalize()}, {rng.choice(NAMES)} {rng.choice(VERBS)} {rng.randint(2, 90)} "
        f"{rng.choice(THINGS)} at the {rng.choice(PLACES)} near the {rng.choice(PLACES)}."
    )


def document(rng: random.Random, tokens: int) -> str:
    return " ".join(_sentence(rng) for _ in range(max(1, round(tokens / TOKENS_PER_SENTENCE))))


def question(rng: random.Random) -> str:
    return f"What did {rng.choice(NAMES)} do at the {rng.choice(PLACES)}? Answer in one sentence."


# ---------------------------------------------------------------------------------------------- the loads


@dataclass
class Conversation:
    session: str
    messages: list[str]  # the user's message of each turn; the first carries the document
    history: list[dict[str, str]] = field(default_factory=list)
    in_flight: bool = False

    @property
    def turn(self) -> int:
        return len(self.history) // 2


@dataclass
class Turn:
    """One request to send: its messages (the history and the new user message), and what it is."""

    kind: str
    messages: list[dict[str, str]]
    system: str | None = None
    session: str | None = None
    conversation: Conversation | None = None
    turn: int = 1  # of its conversation


class Source(Protocol):
    def take(self) -> Turn | None:
        """The next request a free user sends, or None if no user can send one now."""

    def give(self, turn: Turn, result: Result) -> None:
        """A request ended."""


class Chats:
    """Workload 1: users take conversations that are not in flight, in random order, and send their next turn."""

    def __init__(self, conversations: list[Conversation], rng: random.Random) -> None:
        self.conversations = conversations
        self.rng = rng

    def take(self) -> Turn | None:
        ready = [c for c in self.conversations if not c.in_flight and c.turn < len(c.messages)]
        if not ready:
            return None
        conversation = self.rng.choice(ready)
        conversation.in_flight = True
        message = {"role": "user", "content": conversation.messages[conversation.turn]}
        kind = FIRST if conversation.turn == 0 else FOLLOW_UP
        turn = conversation.turn + 1
        return Turn(kind, [*conversation.history, message], None, conversation.session, conversation, turn)

    def give(self, turn: Turn, result: Result) -> None:
        conversation = turn.conversation
        assert conversation is not None
        conversation.in_flight = False
        conversation.history = [*turn.messages, {"role": "assistant", "content": result.text}]


class OneShots:
    """Workloads 2 and 3: independent requests, sent in order as users free up."""

    def __init__(self, turns: list[Turn]) -> None:
        self.turns = list(reversed(turns))

    def take(self) -> Turn | None:
        return self.turns.pop() if self.turns else None

    def give(self, turn: Turn, result: Result) -> None:
        pass


def content(workload: str, round_: int, args: argparse.Namespace) -> Source:
    """Round ``round_``'s content of ``workload``: the same for both meshes, new in every round."""
    rng = random.Random(f"{args.seed}/{workload}/{round_}")
    if workload == CHAT:
        conversations = []
        for i in range(args.conversations):
            messages = [document(rng, args.doc_tokens) + "\n\n" + question(rng)]
            messages += [question(rng) for _ in range(args.turns - 1)]
            conversations.append(Conversation(f"round{round_}-conversation{i}", messages))
        return Chats(conversations, rng)
    if workload == SHARED:
        system = "You answer questions about this record of the town's trade. " + document(rng, args.system_tokens)
        return OneShots(
            [Turn(ONE_SHOT, [{"role": "user", "content": question(rng)}], system) for _ in range(args.shared_requests)]
        )
    return OneShots(
        [
            Turn(ONE_SHOT, [{"role": "user", "content": document(rng, args.system_tokens) + "\n\n" + question(rng)}])
            for _ in range(args.control_requests)
        ]
    )


@dataclass(slots=True)
class Sample:
    """One request as it ended."""

    kind: str
    turn: int
    sent: float
    ttft_ms: float | None
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    server: str | None  # the worker thread that ran it (Result.worker): one llama-server
    queued: bool  # it waited in the broker's queue: for a busy llama-server that holds its prefix, or for any slot
    prompt_ms: float | None  # llama-server's own prompt evaluation time
    hint: bytes  # the prefix hashes the SDK sent with it
    error: str | None

    @property
    def hit_ratio(self) -> float:
        return ratio(self.cached_tokens, self.prompt_tokens)

    @property
    def wait_ms(self) -> float | None:
        """TTFT less llama-server's prompt evaluation: the time it waited for a slot (and the path, ~1 ms)."""
        return None if self.ttft_ms is None or self.prompt_ms is None else self.ttft_ms - self.prompt_ms


def drive(client: QMeshClient, source: Source, concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    """Keep ``concurrency`` users' requests in flight on one SDK connection until ``source`` has nothing left."""
    flight: dict[Request, Turn] = {}
    samples: list[Sample] = []
    start = time.monotonic()
    while True:
        while len(flight) < concurrency and (turn := source.take()) is not None:
            request = client.submit(
                model=rig.MODEL,
                messages=turn.messages,
                system=turn.system,
                session=turn.session,
                max_tokens=max_tokens,
                temperature=0,
            )
            flight[request] = turn
        if not flight:
            return samples, time.monotonic() - start
        client.poll(0.5)
        for request, turn in list(flight.items()):
            if request.final is None:
                continue
            del flight[request]
            result = request.final
            source.give(turn, result)
            samples.append(_sample(turn, request, result))


def _sample(turn: Turn, request: Request, result: Result) -> Sample:
    prompt_ms = result.timings.get("prompt_ms")
    return Sample(
        turn.kind,
        turn.turn,
        request.sent_at,
        result.ttft_ms,
        result.tokens,
        result.prompt_tokens or 0,
        result.cached_tokens or 0,
        result.worker,
        request.was_queued,
        prompt_ms if isinstance(prompt_ms, (int, float)) else None,
        request.hint.prefix if request.hint is not None else b"",
        None if result.error is None else str(result.error),
    )


def mark_warm_ups(samples: list[Sample]) -> None:
    """The first request each llama-server ran in a leg of the shared workload pays for the system prompt. With one
    slot a llama-server runs its requests one after the other, so that is the one whose first token came first
    (not the first sent: cache-aware may hold an earlier request back for a busy llama-server)."""
    seen: set[str | None] = set()
    for sample in sorted(samples, key=lambda s: s.sent + (s.ttft_ms or math.inf) / 1000):
        if sample.server not in seen:
            seen.add(sample.server)
            sample.kind = WARM_UP


# ---------------------------------------------------------------------------------------------- figures


@dataclass
class Pool:
    """The requests of one leg (a workload's round on one mesh), or of several pooled, and the wall time taken."""

    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    other: float = 0.0  # the most cores other programs used during any of its legs

    def add(self, other: Pool) -> None:
        self.samples += other.samples
        self.wall += other.wall
        self.other = max(self.other, other.other)

    def ok(self, *kinds: str) -> list[Sample]:
        return [s for s in self.samples if s.error is None and (not kinds or s.kind in kinds)]

    def ttfts(self, *kinds: str) -> list[float]:
        return [s.ttft_ms for s in self.ok(*kinds) if s.ttft_ms is not None]

    def ttft(self, q: float, *kinds: str) -> float:
        return percentile(self.ttfts(*kinds), q)

    def mean_ttft(self, *kinds: str) -> float:
        values = self.ttfts(*kinds)
        return sum(values) / len(values) if values else math.nan

    def of_turn(self, turn: int) -> Pool:
        return Pool([s for s in self.samples if s.turn == turn])

    def prompt(self, *kinds: str) -> int:
        return sum(s.prompt_tokens for s in self.ok(*kinds))

    def cached(self, *kinds: str) -> int:
        return sum(s.cached_tokens for s in self.ok(*kinds))

    def evaluated(self, *kinds: str) -> int:
        return self.prompt(*kinds) - self.cached(*kinds)

    def hit_ratio(self, *kinds: str) -> float:
        return ratio(self.cached(*kinds), self.prompt(*kinds))

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.error is not None)

    def tokens_per_s(self) -> float:
        return ratio(sum(s.tokens for s in self.ok()), self.wall)

    def queued(self, *kinds: str) -> int:
        return sum(1 for s in self.ok(*kinds) if s.queued)

    def per_server(self, servers: list[str]) -> list[int]:
        return [sum(1 for s in self.samples if s.server == server) for server in servers]

    def largest_share(self, servers: list[str]) -> float:
        """The busiest llama-server's requests over its fair share (all requests / llama-servers)."""
        counts = self.per_server(servers)
        return ratio(max(counts), sum(counts) / len(counts))


@dataclass
class Mesh:
    policy: str
    endpoint: str
    broker: Child
    workers: list[Child]
    client: QMeshClient
    servers: dict[str, str] = field(default_factory=dict)  # worker thread name -> short label "process/thread"

    def names(self) -> list[str]:
        return sorted(self.servers, key=self.servers.__getitem__)

    def llama_commands(self) -> list[list[str]]:
        return [rig.without_port(sidecar.cmdline()) for worker in self.workers for sidecar in llama_servers(worker.pid)]


def start_meshes(ps: procs.Processes, args: argparse.Namespace) -> list[Mesh]:
    meshes = []
    for policy in POLICIES:
        endpoint = free_endpoint()
        broker = ps.broker(endpoint, "--routing", policy, name=f"broker-{policy}")
        worker_args = [*rig.worker_args(1, 1, threads=THREADS), "--cache-ram", str(args.cache_ram)]
        workers = [ps.worker(endpoint, *worker_args, name=f"worker-{policy}") for _ in range(PROCESSES)]
        meshes.append(Mesh(policy, endpoint, broker, workers, QMeshClient(endpoint, timeout=900)))
        ps.callback(meshes[-1].client.close)
    for mesh in meshes:
        wait_for_workers(mesh.endpoint, rig.MODEL, SERVERS, 180, watch=[mesh.broker, *mesh.workers])
        number = {worker.pid: i for i, worker in enumerate(mesh.workers, 1)}
        for row in mesh.client.workers():
            _, pid, thread = row["name"].rsplit("/", 2)  # worker/node.py: host/pid/thread
            mesh.servers[row["name"]] = f"{number[int(pid)]}/{thread}"
    return meshes


def warm_up(mesh: Mesh) -> None:
    """A short request on every llama-server first: a fresh one's first request pays one-off costs."""
    turns = [Turn(ONE_SHOT, [{"role": "user", "content": f"Say {word}."}]) for word in ("one", "two", "three", "four")]
    drive(mesh.client, OneShots(turns * 2), SERVERS, 4)


Legs = list[Pool]  # one per policy, in POLICIES order


def interleave(meshes: list[Mesh], args: argparse.Namespace) -> dict[str, list[Legs]]:
    """Every round: each workload on both meshes in turn, ABBA from round to round."""
    rounds: dict[str, list[Legs]] = {workload: [] for workload in WORKLOADS}
    for round_ in range(args.rounds):
        for workload in WORKLOADS:
            legs = [Pool() for _ in meshes]
            for i in order(round_, len(meshes)):
                other = procs.OtherLoad()
                samples, wall = drive(meshes[i].client, content(workload, round_, args), args.users, args.max_tokens)
                if workload == SHARED:
                    mark_warm_ups(samples)
                legs[i] = Pool(samples, wall, other.cores())
            rounds[workload].append(legs)
            row = " | ".join(_round_row(workload, meshes, legs))
            print(f"prefix: round {round_ + 1} {workload}: {row}", flush=True)
    return rounds


def pooled(rounds: list[Legs], policy: int) -> Pool:
    total = Pool()
    for legs in rounds:
        total.add(legs[policy])
    return total


def _both(legs: Legs, measure: Callable[[Pool], float], digits: int = 0) -> str:
    return " / ".join(fmt(measure(leg), digits) for leg in legs)


def _round_row(workload: str, meshes: list[Mesh], legs: Legs) -> list[str]:
    chat = workload == CHAT
    return [
        _both(legs, lambda p: p.ttft(50, FIRST) if chat else p.ttft(50)),
        _both(legs, lambda p: p.ttft(50, FOLLOW_UP)) if chat else "-",
        _both(legs, lambda p: p.hit_ratio(), 3),
        _both(legs, Pool.tokens_per_s, 1),
        fmt(ratio(legs[CACHE_AWARE].tokens_per_s(), legs[BASELINE].tokens_per_s()), 3),
        *("/".join(map(str, leg.per_server(mesh.names()))) for mesh, leg in zip(meshes, legs, strict=True)),
        " / ".join(str(leg.queued()) for leg in legs),
        " / ".join(f"{leg.other:.2f}" for leg in legs),
    ]


def round_table(meshes: list[Mesh], rounds: dict[str, list[Legs]]) -> Table:
    table = Table(
        [
            "workload",
            "round",
            "order",
            "TTFT p50 ms (l / c; chat: first turns)",
            "follow-up TTFT p50 ms (l / c)",
            "hit ratio (l / c)",
            "output tok/s (l / c)",
            "c / l tok/s",
            "requests per llama-server, l",
            "requests per llama-server, c",
            "queued (l / c)",
            "other programs' cores (l / c)",
        ]
    )
    for workload, legs_by_round in rounds.items():
        for i, legs in enumerate(legs_by_round):
            place = "".join("lc"[j] for j in order(i, len(legs)))
            table.add(workload, i + 1, place, *_round_row(workload, meshes, legs))
    return table


def summary_table(workload: str, legs: Legs, servers: list[list[str]]) -> Table:
    """One workload, each policy pooled over the rounds."""
    rows: list[tuple[str, Callable[[Pool, list[str]], float], int]] = []
    if workload == CHAT:
        for kind in (FIRST, FOLLOW_UP):
            rows += [
                (f"TTFT p50 ms, {kind}s", lambda p, s, k=kind: p.ttft(50, k), 0),
                (f"TTFT p99 ms, {kind}s", lambda p, s, k=kind: p.ttft(99, k), 0),
                (f"TTFT mean ms, {kind}s", lambda p, s, k=kind: p.mean_ttft(k), 0),
            ]
        rows += [
            ("follow-ups queued (waited for a slot)", lambda p, s: p.queued(FOLLOW_UP), 0),
            ("follow-ups: wait p50 ms (TTFT - llama-server's prompt time)", lambda p, s: _wait(p, 50, FOLLOW_UP), 0),
            ("follow-ups: wait p90 ms", lambda p, s: _wait(p, 90, FOLLOW_UP), 0),
            ("follow-ups with < half their prompt cached", lambda p, s: _cold(p, FOLLOW_UP), 0),
            ("hit ratio, follow-ups", lambda p, s: p.hit_ratio(FOLLOW_UP), 3),
        ]
    else:
        rows += [
            ("TTFT p50 ms", lambda p, s: p.ttft(50), 0),
            ("TTFT p99 ms", lambda p, s: p.ttft(99), 0),
            ("requests queued (waited for a slot)", lambda p, s: p.queued(), 0),
        ]
        if workload == SHARED:
            rows += [
                ("TTFT p50 ms after warm-up (a llama-server's 2nd request on)", lambda p, s: p.ttft(50, ONE_SHOT), 0),
                ("hit ratio after warm-up", lambda p, s: p.hit_ratio(ONE_SHOT), 3),
            ]
    rows += [
        ("prompt tokens evaluated", lambda p, s: p.evaluated(), 0),
        ("prompt tokens cached", lambda p, s: p.cached(), 0),
        ("hit ratio (cached / prompt tokens)", lambda p, s: p.hit_ratio(), 3),
        ("output tokens/s", lambda p, s: p.tokens_per_s(), 1),
        # Greedy answers can differ in length between the meshes (how much of a prompt came from the cache changes
        # how llama-server batches the rest, and so the last bits of the logits): tokens/s moves with equal walls.
        ("output tokens", lambda p, s: sum(x.tokens for x in p.ok()), 0),
        ("wall s", lambda p, s: p.wall, 1),
        ("busiest llama-server's requests / fair share", lambda p, s: p.largest_share(s), 2),
    ]
    table = Table(["metric", POLICIES[BASELINE], POLICIES[CACHE_AWARE], "cache-aware / least-loaded"])
    for name, measure, digits in rows:
        base, ours = (measure(leg, names) for leg, names in zip(legs, servers, strict=True))
        table.add(name, fmt(base, digits), fmt(ours, digits), fmt(ratio(ours, base), 3))
    table.add("requests (errors)", *(f"{len(leg.samples)} ({leg.errors})" for leg in legs), "-")
    return table


def turn_table(legs: Legs, turns: int) -> Table:
    """The chat turn by turn: least-loaded finds more of a conversation's history the more llama-servers it visited."""
    table = Table(
        [
            "turn",
            "TTFT p50 ms (l / c)",
            "TTFT mean ms (l / c)",
            "hit ratio (l / c)",
            "< half the prompt cached (l / c)",
            "queued (l / c)",
            "wait p50 ms (l / c)",
        ]
    )
    for turn in range(1, turns + 1):
        pools = [leg.of_turn(turn) for leg in legs]
        table.add(
            turn,
            _both(pools, lambda p: p.ttft(50)),
            _both(pools, lambda p: p.mean_ttft()),
            _both(pools, lambda p: p.hit_ratio(), 3),
            " / ".join(str(_cold(p)) for p in pools),
            " / ".join(str(p.queued()) for p in pools),
            _both(pools, lambda p: _wait(p, 50)),
        )
    return table


def _wait(pool: Pool, q: float, *kinds: str) -> float:
    return percentile([s.wait_ms for s in pool.ok(*kinds) if s.wait_ms is not None], q)


def _cold(pool: Pool, *kinds: str) -> int:
    return sum(1 for s in pool.ok(*kinds) if s.hit_ratio < 0.5)


def server_table(meshes: list[Mesh], pools: dict[str, Legs], broker_rows: list[list[dict[str, Any]]]) -> Table:
    """Each llama-server's requests and prompt tokens by workload, and what its broker's index held at the end."""
    table = Table(
        [
            "policy",
            "llama-server (process/thread)",
            *(f"{workload}: requests (x fair)" for workload in WORKLOADS),
            *(f"{workload}: hit ratio" for workload in WORKLOADS),
            "broker: prompt / cached tokens",
            "broker: index blocks at the end",
        ]
    )
    for policy, mesh in enumerate(meshes):
        rows = {row["name"]: row for row in broker_rows[policy]}
        for name in mesh.names():
            shares, hits = [], []
            for workload in WORKLOADS:
                pool = pools[workload][policy]
                count = sum(1 for s in pool.samples if s.server == name)
                fair = len(pool.samples) / SERVERS
                shares.append(f"{count} ({fmt(ratio(count, fair), 2)})")
                mine = Pool([s for s in pool.samples if s.server == name])
                hits.append(fmt(mine.hit_ratio(), 3))
            row = rows.get(name, {})
            table.add(
                mesh.policy,
                mesh.servers[name],
                *shares,
                *hits,
                f"{row.get('prompt_tokens', '-')} / {row.get('cached_tokens', '-')}",
                row.get("cached_prefix_blocks", "-"),
            )
    return table


def index_memory(samples: list[Sample]) -> tuple[int, int]:
    """Blocks and bytes of the broker's prefix indexes filled with this run's real hints.

    Replayed as ``broker.core`` does it: each request's hint split into 8-byte hashes and added to the
    ``PrefixIndex`` of the llama-server it ran on, in the order they were sent, with no capacity limit reached.
    tracemalloc counts what the indexes keep: the hash objects and the ordered dicts' entries."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        indexes: dict[str, PrefixIndex] = {}
        for sample in sorted(samples, key=lambda s: s.sent):
            if sample.server is not None and sample.hint:
                indexes.setdefault(sample.server, PrefixIndex(MAX_INDEX_BLOCKS)).add(split_hashes(sample.hint))
        used = tracemalloc.get_traced_memory()[0] - start
        return sum(len(index) for index in indexes.values()), used
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------- goals


def goals(pools: dict[str, Legs], servers: list[str]) -> tuple[list[str], dict[str, Any]]:
    chat = pools[CHAT]
    first = chat[CACHE_AWARE].ttft(50, FIRST)
    follow = [leg.ttft(50, FOLLOW_UP) for leg in chat]
    vs_first, vs_baseline = ratio(follow[CACHE_AWARE], first), ratio(follow[BASELINE], follow[CACHE_AWARE])
    warm = Pool()
    warm.add(pools[CHAT][CACHE_AWARE])
    warm.add(pools[SHARED][CACHE_AWARE])
    hit = warm.hit_ratio(FOLLOW_UP, ONE_SHOT)
    tokens = {w: ratio(legs[CACHE_AWARE].tokens_per_s(), legs[BASELINE].tokens_per_s()) for w, legs in pools.items()}
    share = chat[CACHE_AWARE].largest_share(servers)
    met = {
        "follow_up_vs_first": vs_first <= GOAL_FOLLOW_UP_VS_FIRST,
        "follow_up_vs_least_loaded": vs_baseline >= GOAL_FOLLOW_UP_VS_BASELINE,
        "hit_ratio": hit >= GOAL_HIT_RATIO,
        "tokens_per_s": all(r >= GOAL_TOKENS_RATIO for r in tokens.values()),
        "fair_share": share <= GOAL_MAX_SHARE,
    }

    lines = [
        f"goal 1a: chat follow-up TTFT p50 <= {GOAL_FOLLOW_UP_VS_FIRST:g}x the first-turn p50 with cache-aware: "
        f"{fmt(follow[CACHE_AWARE], 0)} ms / {fmt(first, 0)} ms = {fmt(vs_first, 3)}x, "
        f"{verdict(met['follow_up_vs_first'])}",
        f"goal 1b: chat follow-up TTFT p50 >= {GOAL_FOLLOW_UP_VS_BASELINE:g}x lower than least-loaded's: "
        f"{fmt(follow[BASELINE], 0)} ms / {fmt(follow[CACHE_AWARE], 0)} ms = {fmt(vs_baseline, 2)}x, "
        f"{verdict(met['follow_up_vs_least_loaded'])}",
        f"goal 2: hit ratio after warm-up >= {GOAL_HIT_RATIO:.0%} with cache-aware (chat follow-ups, and shared-prefix "
        f"requests after each llama-server's first of the round): {hit:.1%}, {verdict(met['hit_ratio'])}; chat "
        f"follow-ups alone {pools[CHAT][CACHE_AWARE].hit_ratio(FOLLOW_UP):.1%}, shared alone "
        f"{pools[SHARED][CACHE_AWARE].hit_ratio(ONE_SHOT):.1%}",
        f"goal 3a: output tokens/s with cache-aware >= {GOAL_TOKENS_RATIO:g}x least-loaded, each workload pooled: "
        + ", ".join(f"{w} {fmt(r, 3)}x" for w, r in tokens.items())
        + f", {verdict(met['tokens_per_s'])}",
        f"goal 3b: no llama-server above {GOAL_MAX_SHARE:g}x its fair share of requests (chat, cache-aware, pooled): "
        f"busiest {fmt(share, 2)}x, {verdict(met['fair_share'])}",
    ]
    data = {
        "first_turn_ttft_p50_ms": first,
        "follow_up_ttft_p50_ms": dict(zip(POLICIES, follow, strict=True)),
        "follow_up_vs_first": vs_first,
        "follow_up_least_loaded_over_cache_aware": vs_baseline,
        "hit_ratio_after_warm_up": hit,
        "tokens_per_s_ratio": tokens,
        "largest_share_chat_cache_aware": share,
        "met": met,
    }
    return lines, data


def figures(pool: Pool, servers: list[str]) -> dict[str, Any]:
    kinds = sorted({s.kind for s in pool.samples})
    return {
        "requests": len(pool.samples),
        "errors": pool.errors,
        "wall_s": pool.wall,
        "ttft_ms": {kind: {"p50": pool.ttft(50, kind), "p99": pool.ttft(99, kind)} for kind in kinds},
        "prompt_tokens": {kind: pool.prompt(kind) for kind in kinds},
        "cached_tokens": {kind: pool.cached(kind) for kind in kinds},
        "hit_ratio": pool.hit_ratio(),
        "output_tokens_per_s": pool.tokens_per_s(),
        "queued": pool.queued(),
        "requests_per_server": dict(zip(servers, pool.per_server(servers), strict=True)),
    }


# ---------------------------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=int, default=8, help="chat: conversations per round")
    parser.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    parser.add_argument("--users", type=int, default=4, help="requests in flight (users), every workload")
    parser.add_argument("--doc-tokens", type=int, default=750, help="chat: tokens of each conversation's document")
    parser.add_argument("--system-tokens", type=int, default=1000, help="shared: system prompt tokens (and control)")
    parser.add_argument("--shared-requests", type=int, default=16, help="shared: requests per round")
    parser.add_argument("--control-requests", type=int, default=8, help="control: requests per round")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (each workload once on each mesh)")
    parser.add_argument("--cache-ram", type=int, default=512, help="MiB of prompt cache per llama-server")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated documents and questions")


def quick(args: argparse.Namespace) -> None:
    args.conversations, args.turns, args.users, args.doc_tokens = 3, 2, 2, 150
    args.system_tokens, args.shared_requests, args.control_requests = 200, 4, 3
    args.max_tokens, args.rounds = 8, 1


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("prefix", command)
    routing = RoutingConfig()
    section.settings = {
        "model": rig.MODEL,
        "each mesh": f"1 broker, {PROCESSES} worker processes x {THREADS} threads = {SERVERS} llama-servers, 1 slot, "
        f"--cpu-threads 1, --cache-ram {args.cache_ram} MiB",
        "cache-aware broker": f"--balance-abs-threshold {routing.balance_abs_threshold:g} "
        f"--balance-rel-threshold {routing.balance_rel_threshold:g} --cache-threshold {routing.cache_threshold:g}",
        "rounds": args.rounds,
        "users (in flight)": args.users,
        "chat": f"{args.conversations} conversations x {args.turns} turns, ~{args.doc_tokens}-token documents",
        "shared": f"{args.shared_requests} questions under a ~{args.system_tokens}-token system prompt",
        "control": f"{args.control_requests} distinct ~{args.system_tokens}-token prompts",
        "max_tokens": args.max_tokens,
        "sampling": "greedy, chat template",
        "seed": args.seed,
    }
    with procs.Processes() as ps:
        meshes = start_meshes(ps, args)
        commands = [command for mesh in meshes for command in mesh.llama_commands()]
        same = len(commands) == len(meshes) * SERVERS and all(command == commands[0] for command in commands)
        for mesh in meshes:
            warm_up(mesh)
        rounds = interleave(meshes, args)
        broker_rows = [mesh.client.workers() for mesh in meshes]
        children = [child for mesh in meshes for child in (mesh.broker, *mesh.workers)]
        warnings = sum(procs.warnings_in(child)[0] for child in children)
    servers = [mesh.names() for mesh in meshes]
    pools = {workload: [pooled(legs, policy) for policy in range(len(POLICIES))] for workload, legs in rounds.items()}
    for workload, title in WORKLOADS.items():
        section.table(f"{title}, pooled over the rounds", summary_table(workload, pools[workload], servers))
        if workload == CHAT:
            section.table("the chat turn by turn, pooled over the rounds", turn_table(pools[CHAT], args.turns))
    section.table(
        "round by round (l: least-loaded, c: cache-aware; order: which mesh ran first)", round_table(meshes, rounds)
    )
    section.table("each llama-server, pooled over the rounds", server_table(meshes, pools, broker_rows))
    blocks, used = index_memory([s for legs in pools.values() for s in legs[CACHE_AWARE].samples])
    capacity = min(
        (row["info"].get("prefix_capacity", 0) // TOKENS_PER_BLOCK for row in broker_rows[CACHE_AWARE]), default=0
    )
    per_block = ratio(used, blocks)
    memory = Table(["broker prefix index (cache-aware run's hints, replayed)", "value"])
    memory.add("blocks held (4 llama-servers)", blocks)
    memory.add("bytes traced (tracemalloc)", used)
    memory.add("bytes per block (8-byte hash + its ordered-dict entry)", fmt(per_block, 1))
    memory.add("blocks a llama-server announces (its prefix_capacity / 32 tokens)", capacity)
    memory.add("bytes per llama-server with a full index", fmt(per_block * min(capacity, MAX_INDEX_BLOCKS), 0))
    section.table("broker memory per cached prefix entry", memory)
    lines, data = goals(pools, servers[CACHE_AWARE])
    section.notes += lines
    quiet = [procs.ran_alone(leg.other for leg in legs) for legs in rounds[CHAT]]
    section.data = {
        "goals": data,
        "index_bytes_per_block": per_block,
        "index_blocks": blocks,
        "announced_blocks_per_server": capacity,
        "warnings": warnings,
        **{
            workload: {POLICIES[i]: figures(pools[workload][i], servers[i]) for i in range(len(POLICIES))}
            for workload in WORKLOADS
        },
        "quiet_rounds": sum(quiet),
    }
    section.notes.append(
        "every llama-server of both meshes runs with the same command line but the port: "
        + ("checked" if same else "NOT the same, see the workers'")
        + f" (`{' '.join(commands[0][1:])}`)"
    )
    section.notes.append(
        "TTFT: from submit to the first chunk, as the SDK stamps them, queue wait included; wait = TTFT less "
        "llama-server's own prompt evaluation time (timings.prompt_ms); hit ratio = cached_tokens / prompt_tokens "
        "from each FINAL; a request is queued if the broker's STATUS ever said so (cache-aware places a request to "
        "wait for a busy llama-server that holds its prefix unless load is imbalanced)"
    )
    section.notes.append(
        f"{sum(quiet)} of {len(quiet)} chat rounds ran with other programs below {procs.QUIET:g} cores (round table, "
        "last column); every figure is a ratio within the run, but other load lengthens TTFTs of both policies"
    )
    if warnings:
        section.notes.append(f"brokers and workers logged {warnings} warning(s)")
    if math.isnan(per_block):
        section.notes.append("no hints were replayed: the prompts were shorter than one block")
    return section
