"""System monitor: CPU, memory and sidecar health folded into one health score for the broker.

The score (0..1) breaks ties between equally loaded workers: a worker on a machine that is short of CPU or
memory, or whose llama-server is not answering, ranks below a comfortable one.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class SystemLoad:
    cpu_percent: float
    memory_percent: float
    sidecar_healthy: bool

    @property
    def health(self) -> float:
        if not self.sidecar_healthy:
            return 0.0
        cpu_headroom = 1.0 - min(self.cpu_percent, 100.0) / 100.0
        memory_headroom = 1.0 - min(self.memory_percent, 100.0) / 100.0
        return round(0.5 + 0.3 * cpu_headroom + 0.2 * memory_headroom, 3)


class SystemMonitor:
    def __init__(self) -> None:
        psutil.cpu_percent(None)  # the first call only primes the counter

    def sample(self, sidecar_healthy: bool) -> SystemLoad:
        return SystemLoad(psutil.cpu_percent(None), psutil.virtual_memory().percent, sidecar_healthy)
