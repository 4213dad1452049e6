"""Percentiles and the latency figures of streamed generations (TTFT, ITL, tokens/s)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(slots=True)
class StreamRecord:
    """One streamed request: when it was sent, when each chunk arrived (monotonic seconds), tokens, error."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    prompt_s: float | None = None  # llama-server's own prompt evaluation time (its timings.prompt_ms), if known

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def ttft_beyond_prompt(self) -> float | None:
        """TTFT less llama-server's prompt evaluation: the time the path to and from llama-server took."""
        ttft = self.ttft
        return None if ttft is None or self.prompt_s is None else ttft - self.prompt_s

    def gaps(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]


@dataclass(slots=True)
class LoadResult:
    """The streams of one load (a round, or several pooled) and the wall time they took."""

    records: list[StreamRecord] = field(default_factory=list)
    wall: float = 0.0

    def extend(self, other: LoadResult) -> None:
        self.records.extend(other.records)
        self.wall += other.wall

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if r.error is not None)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    def ttfts_ms(self) -> list[float]:
        return [r.ttft * 1000 for r in self.records if r.ttft is not None]

    def itls_ms(self) -> list[float]:
        return [gap * 1000 for r in self.records for gap in r.gaps()]

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else math.nan

    def stream_decode_rates(self) -> list[float]:
        """Tokens/s of each stream after its first chunk (what one user sees)."""
        rates = []
        for r in self.records:
            if len(r.chunk_times) > 1 and r.tokens > 1:
                rates.append((r.tokens - 1) / (r.chunk_times[-1] - r.chunk_times[0]))
        return rates


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table: fixed digits, thousands separators for big ones, '-' for none/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def verdict(ok: bool) -> str:
    """How a benchmark reports a goal: "met", or loud enough to see in a long section, "NOT met"."""
    return "met" if ok else "NOT met"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
