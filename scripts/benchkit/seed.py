"""``seed``: the seed project's table, measured here: load time, single-stream tokens/s, memory, mesh overhead.

The seed (a JavaScript sidecar prototype) reported TinyLlama 1.1B on a laptop CPU; QMesh's figures are for its
default model on this machine, so the columns compare what is measured, not the same model.
"""

from __future__ import annotations

import argparse
import time

from . import overhead, procs, rig
from .report import Section, Table
from .stats import fmt, median, percentile

MB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", type=int, default=3, help="llama-server starts to time")
    parser.add_argument("--slots", type=int, default=2, help="slots of the one worker thread")
    parser.add_argument("--cpu-threads", type=int, default=rig.default_cpu_threads(), help="llama-server threads")
    parser.add_argument("--rounds", type=int, default=2, help="overhead round pairs")
    parser.add_argument("--requests", type=int, default=4, help="overhead requests per round at concurrency 1")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request")


def quick(args: argparse.Namespace) -> None:
    args.loads, args.rounds, args.requests, args.max_tokens = 1, 1, 3, 48


def load_times(count: int, slots: int, cpu_threads: int) -> list[float]:
    """Seconds from launching llama-server to its first healthy /health answer."""
    times = []
    for _ in range(count):
        manager = rig.direct_manager(slots, cpu_threads)
        start = time.monotonic()
        manager.start()
        times.append(time.monotonic() - start)
        manager.stop()
    return times


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("seed", command)
    section.settings = {
        "model": rig.MODEL,
        "slots": args.slots,
        "llama-server threads": args.cpu_threads,
        "overhead rounds": args.rounds,
        "max_tokens": args.max_tokens,
    }
    loads = load_times(args.loads, args.slots, args.cpu_threads)
    with procs.Processes() as ps:
        r = rig.start(ps, args.slots, args.cpu_threads)
        all_series = overhead.interleave(r, args)
        worker_rss, sidecar_rss = procs.tree_rss(r.mesh.worker.pid)
        broker_rss, _ = procs.tree_rss(r.mesh.broker.pid)
    single = overhead.at(all_series, 1)
    direct, mesh = single.pooled(overhead.DIRECT).result, single.pooled(overhead.MESH).result
    lines, data = overhead.goals(all_series, args.slots)
    table = Table(["metric", "seed project (TinyLlama 1.1B, laptop CPU)", "QMesh here (SmolLM2-135M Q4_1)"])
    table.add(
        "model load time (start to healthy)",
        "2-3 s",
        f"{median(loads):.2f} s (median of {len(loads)}, {min(loads):.2f}-{max(loads):.2f})",
    )
    table.add(
        "single-stream tokens/s",
        "56 tok/s",
        f"direct {fmt(direct.tokens_per_s(), 1)}, through the mesh {fmt(mesh.tokens_per_s(), 1)}",
    )
    table.add(
        "memory (RSS)",
        "~1.5 GB",
        f"worker {worker_rss / MB:.0f} MB + llama-server {sidecar_rss / MB:.0f} MB = "
        f"{(worker_rss + sidecar_rss) / MB:.0f} MB (broker {broker_rss / MB:.0f} MB)",
    )
    table.add(
        "overhead",
        "HTTP: <1 ms",
        f"mesh adds TTFT p50 {data['added_ttft_p50_ms']:.2f} ms (c=1); "
        f"tokens/s {data['tokens_ratio_saturation']:.3f}x direct at c={args.slots}",
    )
    section.table("", table)
    section.notes += [
        f"TTFT p50 at c=1: direct {fmt(percentile(direct.ttfts_ms(), 50))} ms, "
        f"mesh {fmt(percentile(mesh.ttfts_ms(), 50))} ms; a short run of `scripts/bench overhead`",
        *lines,
    ]
    section.data = {
        "load_s": loads,
        "worker_rss": worker_rss,
        "sidecar_rss": sidecar_rss,
        "broker_rss": broker_rss,
        "single_stream_direct": direct.tokens_per_s(),
        "single_stream_mesh": mesh.tokens_per_s(),
        **data,
    }
    return section
