"""The pure parts of a model transfer on the client's side: which chunks a puller asks for and the order in which
it writes what arrives, and the progress line. No sockets, no files, no clock of its own (times are passed in).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qmesh.common import protocol as p
from qmesh.common.errors import TransferFailed


@dataclass(slots=True)
class Download:
    """A puller's chunks: it asks for them in order from ``start`` (the first byte it lacks), at most ``window`` in
    flight (its credit), and writes what arrives in order. A chunk that arrives before the ones asked for earlier
    (after the broker moved the transfer to another holder) waits, at most a window's worth, for the bytes before it.
    """

    size: int
    start: int
    chunk: int
    window: int
    next_offset: int = 0  # the first byte not yet asked for
    written: int = 0  # the bytes in order so far: everything before this offset is on disk
    asked: deque[tuple[int, int]] = field(default_factory=deque)  # (offset, length) asked for and not yet arrived
    early: dict[int, bytes] = field(default_factory=dict)  # arrived before the bytes in front of them

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.size or self.chunk <= 0 or self.window <= 0:
            raise ValueError("a download starts within the file, with a positive chunk and window")
        self.next_offset = self.written = self.start

    @property
    def complete(self) -> bool:
        return self.written == self.size

    def requests(self) -> list[tuple[int, int]]:
        """The chunks to ask for now: enough to have ``window`` asked for and not yet written (none once everything
        is asked for). Chunks that arrived early count: what waits in memory stays within the window."""
        new = []
        while len(self.asked) + len(self.early) < self.window and self.next_offset < self.size:
            length = min(self.chunk, self.size - self.next_offset)
            new.append((self.next_offset, length))
            self.asked.append((self.next_offset, length))
            self.next_offset += length
        return new

    def on_data(self, offset: int, data: bytes) -> list[bytes]:
        """The chunk at ``offset`` arrived; returns what can now be written, in order. TransferFailed for bytes that
        were not asked for (or of the wrong length): the broker or a holder is broken, and nothing is written."""
        if (offset, len(data)) not in self.asked:
            raise TransferFailed(f"received {len(data)} bytes at offset {offset}, which were not asked for")
        self.asked.remove((offset, len(data)))  # at most ``window`` entries
        self.early[offset] = data
        ready = []
        while self.written in self.early:
            piece = self.early.pop(self.written)
            ready.append(piece)
            self.written += len(piece)
        return ready


@dataclass(slots=True)
class Progress:
    """Bytes, rate and ETA of a transfer, as a line for a terminal and for a log."""

    label: str  # "pulling smollm2-135m"
    total: int
    start: int  # bytes there before this attempt (a resume)
    started_at: float
    done: int = 0

    def __post_init__(self) -> None:
        self.done = self.start

    def rate(self, now: float) -> float:
        """Bytes per second over this attempt."""
        elapsed = now - self.started_at
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        rate = self.rate(now)
        left = self.total - self.done
        eta = f"ETA {left / rate:.0f} s" if rate > 0 and left else "ETA -" if left else "done"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB ({percent:.0f}%), "
            f"{rate / 1e6:.1f} MB/s, {eta}"
        )


def check_model_name(name: str) -> None:
    """TransferFailed unless ``name`` may name a model file (no '/', no '..', a bounded length)."""
    problem = p.model_name_problem(name)
    if problem is not None:
        raise TransferFailed(problem)
