"""Where a request runs: the routing policies, and what the broker knows of each llama-server's prompt cache.

A policy is a plain function (``POLICIES`` names them; ``qmesh-broker --routing`` picks one) that takes the
candidates of one request and returns a ``Placement``, or None when no candidate can start anything now. It
sees each candidate as a ``Candidate``: free slots, load, health, and how much of the request's prompt prefix
it holds. ``BrokerCore`` builds the candidates and carries the placement out.

``cache_aware`` follows SGLang's router: the llama-server holding the longest prefix of the request wins unless
load is imbalanced, in which case the least loaded does. A request may *wait* for a busy best match (a warm
prefill is seconds shorter than a cold one on these machines), and every request waiting for it adds to its
load, so waiting never builds a hot spot: once its load exceeds the least loaded free candidate's by more than
``balance_abs_threshold`` and ``balance_rel_threshold`` times, requests go elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_POLICY = "cache-aware"

TOKENS_PER_BLOCK = 32  # common.prefix.BLOCK_CHARS (128) characters of English text
MAX_INDEX_BLOCKS = 200_000  # per llama-server, whatever it announces: the broker's memory stays bounded


@dataclass(slots=True, frozen=True)
class RoutingConfig:
    policy: str = DEFAULT_POLICY
    balance_abs_threshold: float = 1.0  # requests of load more than the least loaded free llama-server's ...
    balance_rel_threshold: float = 1.5  # ... and this many times it: imbalanced
    cache_threshold: float = 0.5  # the part of a request's prefix blocks a llama-server must hold to count


@dataclass(slots=True)
class Candidate:
    """One llama-server (worker) as a policy sees it for one request."""

    identity: bytes
    slots: int
    active: int  # requests it runs
    waiting: int  # requests queued for it (placed to wait for it)
    health: float
    cached_blocks: int = 0  # leading prefix blocks of the request it holds
    session: bool = False  # it holds the request's session

    @property
    def free(self) -> int:
        return self.slots - self.active

    @property
    def load(self) -> int:
        return self.active + self.waiting


@dataclass(slots=True, frozen=True)
class Placement:
    identity: bytes
    wait: bool  # True: the worker is busy; the request stays queued for it


Policy = Callable[[Sequence[Candidate], int, RoutingConfig], "Placement | None"]


def least_loaded(candidates: Sequence[Candidate], blocks: int, config: RoutingConfig) -> Placement | None:
    """The candidate with a free slot and the smallest share of its slots in use; the healthiest on a tie."""
    best: Candidate | None = None
    best_rank = (2.0, 0.0)
    for candidate in candidates:
        rank = (candidate.active / candidate.slots, -candidate.health)
        if candidate.free > 0 and rank < best_rank:
            best, best_rank = candidate, rank
    return None if best is None else Placement(best.identity, wait=False)


def cache_aware(candidates: Sequence[Candidate], blocks: int, config: RoutingConfig) -> Placement | None:
    """The candidate with the longest cached prefix (or the request's session), unless load is imbalanced."""
    fallback = least_loaded(candidates, blocks, config)
    if fallback is None:
        return None  # nothing can start now: the request stays in the queue for whichever frees first
    best = max(candidates, key=lambda c: (c.session, c.cached_blocks, -c.load / c.slots, c.health))
    warm = best.session or (best.cached_blocks > 0 and best.cached_blocks >= config.cache_threshold * blocks)
    if not warm:
        return fallback
    if best.free > 0:
        return Placement(best.identity, wait=False)
    least = min(c.load for c in candidates if c.free > 0)
    imbalanced = best.load - least > config.balance_abs_threshold and best.load > config.balance_rel_threshold * least
    return fallback if imbalanced else Placement(best.identity, wait=True)


POLICIES: dict[str, Policy] = {"cache-aware": cache_aware, "least-loaded": least_loaded}


class PrefixIndex:
    """The prompt prefixes one llama-server served recently: chained block hashes, least recently used first.

    A request's blocks are added last to first, so a prefix is always more recent than what continues it and
    eviction takes conversations from their ends: the index stays prefix-closed, and ``match`` can search.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, min(capacity, MAX_INDEX_BLOCKS))
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefixIndex):
            return NotImplemented
        return (self.capacity, list(self._blocks)) == (other.capacity, list(other._blocks))

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def match(self, blocks: Sequence[bytes]) -> int:
        """How many leading ``blocks`` it holds."""
        low, high = 0, len(blocks)  # blocks[:low] held; blocks[high:] not
        while low < high:
            middle = (low + high + 1) // 2
            if blocks[middle - 1] in self._blocks:
                low = middle
            else:
                high = middle - 1
        return low

    def add(self, blocks: Sequence[bytes]) -> None:
        index = self._blocks
        for block in reversed(blocks):
            index[block] = None
            index.move_to_end(block)
        while len(index) > self.capacity:
            index.popitem(last=False)

    def shrink(self, factor: float) -> None:
        """It held less than predicted: it can hold less than announced."""
        self.capacity = max(1, int(min(self.capacity, len(self._blocks)) * factor))
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
