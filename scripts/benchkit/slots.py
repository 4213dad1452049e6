"""``slots``: aggregate tokens/s of one worker with 1, 2 and 4 slots and of two 1-slot workers, through the mesh.

Every configuration is a real ``qmesh-worker`` process registered under its own service name, all started
before measuring; rounds then go configuration by configuration (an idle llama-server costs no CPU), each at
concurrency = the configuration's total slots.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qmesh.testing import free_endpoint, wait_for_workers

from . import procs, rig
from .report import Section, Table
from .stats import LoadResult, fmt, median, percentile
from .streamload import MeshLoad, prompts

TIE = 0.05  # aggregate tokens/s within this fraction of the best count as a tie, won by fewer slots


@dataclass
class Config:
    service: str
    label: str
    threads: int  # worker threads, each with its own llama-server
    slots: int  # per worker thread
    result: LoadResult = field(default_factory=LoadResult)
    other: list[float] = field(default_factory=list)  # cores other programs used during each of its rounds

    @property
    def concurrency(self) -> int:
        return self.threads * self.slots

    def cpu_threads(self) -> int:
        return max(1, rig.default_cpu_threads() // self.threads)  # qmesh-worker's default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations")
    parser.add_argument("--requests-per-slot", type=int, default=3, help="requests per round per slot")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request")


def quick(args: argparse.Namespace) -> None:
    args.rounds, args.requests_per_slot, args.max_tokens = 1, 2, 48


def configs() -> list[Config]:
    return [
        Config("bench-k1", "1 worker, 1 slot", 1, 1),
        Config("bench-k2", "1 worker, 2 slots", 1, 2),
        Config("bench-k4", "1 worker, 4 slots", 1, 4),
        Config("bench-2w", "2 workers x 1 slot", 2, 1),
    ]


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("slots", command)
    section.settings = {
        "model": rig.MODEL,
        "rounds": args.rounds,
        "requests/slot/round": args.requests_per_slot,
        "max_tokens": args.max_tokens,
        "sampling": "greedy, raw prompt",
    }
    all_configs = configs()
    with procs.Processes() as ps:
        endpoint = free_endpoint()
        broker = ps.broker(endpoint)
        workers = []
        for c in all_configs:
            args_ = rig.worker_args(c.slots, c.cpu_threads(), threads=c.threads, name=c.service)
            workers.append(ps.worker(endpoint, *args_, name=c.service))
        for c in all_configs:
            wait_for_workers(endpoint, c.service, c.threads, 180, watch=[broker, *workers])
        loads = {c.service: MeshLoad(endpoint, c.service, c.concurrency) for c in all_configs}
        offset = 0
        try:
            for c in all_configs:
                loads[c.service].run(prompts(c.concurrency, offset=20_000), 8)  # warm up
            for _ in range(args.rounds):
                for c in all_configs:
                    texts = prompts(c.concurrency * args.requests_per_slot, offset)
                    offset += len(texts)
                    other = procs.OtherLoad()
                    result = loads[c.service].run(texts, args.max_tokens)
                    c.other.append(other.cores())
                    c.result.extend(result)
                    print(f"slots: {c.label}: {result.tokens_per_s():.1f} tok/s", flush=True)
        finally:
            for load in loads.values():
                load.close()
    table = Table(
        [
            "configuration",
            "--threads",
            "--slots",
            "llama threads",
            "concurrency",
            "aggregate tok/s",
            "per-stream tok/s (median)",
            "TTFT p50 ms",
            "ITL p99 ms",
            "errors",
            "other programs' cores",
        ]
    )
    for c in all_configs:
        r = c.result
        table.add(
            c.label,
            c.threads,
            c.slots,
            c.cpu_threads(),
            c.concurrency,
            fmt(r.tokens_per_s(), 1),
            fmt(median(r.stream_decode_rates()), 1),
            fmt(percentile(r.ttfts_ms(), 50)),
            fmt(percentile(r.itls_ms(), 99)),
            r.errors,
            " / ".join(f"{x:.2f}" for x in c.other),
        )
    section.table("", table)
    best = max(all_configs, key=lambda c: c.result.tokens_per_s())
    close = [c for c in all_configs if c.result.tokens_per_s() >= (1 - TIE) * best.result.tokens_per_s()]
    pick = min(close, key=lambda c: (c.concurrency, -c.result.tokens_per_s()))
    section.notes.append(
        f"suggested defaults: --threads {pick.threads} --slots {pick.slots} ({pick.label}): "
        f"{pick.result.tokens_per_s():.1f} tok/s, the fewest slots within {TIE:.0%} of the best "
        f"aggregate ({best.label}, {best.result.tokens_per_s():.1f} tok/s); fewer slots keep each stream faster"
    )
    section.data = {
        c.service: {"tokens_per_s": c.result.tokens_per_s(), "errors": c.result.errors} for c in all_configs
    }
    section.data["suggested"] = {"threads": pick.threads, "slots": pick.slots}
    return section
