"""``overhead``: the same streaming load straight to llama-server and through broker + worker, interleaved.

Two identical llama-servers (same binary, model, slots, threads, context): one behind a real broker and worker,
one used directly over HTTP/SSE. Rounds alternate in ABBA order (direct, mesh, mesh, direct, ...) so both see the
same machine and a drift in its speed favours neither; never both loads at once. At concurrency 1 and at
saturation (concurrency = slots). Each process's CPU per output token shows where the cores went.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from . import floor, procs, rig
from .report import Section, Table
from .stats import LoadResult, StreamRecord, fmt, median, percentile, ratio
from .streamload import DirectLoad, MeshLoad, prompts

GOAL_ADDED_TTFT_MS = 1.0
GOAL_TOKENS_RATIO = 0.98


ROLES = ("client (this process)", "broker", "worker (Python)", "worker's llama-server", "direct llama-server")
QUIET = 0.25  # cores used by other programs below which a round counts as run alone


@dataclass
class Round:
    direct: LoadResult
    mesh: LoadResult
    direct_other: float  # cores other programs used during the direct half
    mesh_other: float

    @property
    def ratio(self) -> float:
        return ratio(self.mesh.tokens_per_s(), self.direct.tokens_per_s())

    @property
    def quiet(self) -> bool:
        return max(self.direct_other, self.mesh_other) < QUIET


@dataclass
class Pair:
    """Both paths at one concurrency: pooled results and each round's figures."""

    concurrency: int
    direct: LoadResult = field(default_factory=LoadResult)
    mesh: LoadResult = field(default_factory=LoadResult)
    rounds: list[Round] = field(default_factory=list)
    ttft_pairs: list[tuple[StreamRecord, StreamRecord]] = field(default_factory=list)  # (direct, mesh), same prompt
    direct_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process role, summed over rounds
    mesh_cpu: dict[str, float] = field(default_factory=dict)

    def cpu_table(self) -> Table:
        """CPU milliseconds per output token of each process, on each path: where the machine's cores went."""
        table = Table(["process", "direct ms CPU/token", "qmesh ms CPU/token", "qmesh - direct"])
        per_token = {}
        for name, result, cpu in (("direct", self.direct, self.direct_cpu), ("mesh", self.mesh, self.mesh_cpu)):
            per_token[name] = {role: seconds * 1000 / max(1, result.tokens) for role, seconds in cpu.items()}
        for role in ROLES:
            d, m = per_token["direct"].get(role, 0.0), per_token["mesh"].get(role, 0.0)
            table.add(role, fmt(d, 3), fmt(m, 3), fmt(m - d, 3))
        d, m = sum(per_token["direct"].values()), sum(per_token["mesh"].values())
        table.add("all", fmt(d, 3), fmt(m, 3), fmt(m - d, 3))
        return table

    def round_table(self) -> Table:
        headers = ["round", "direct tok/s", "qmesh tok/s", "qmesh / direct", "TTFT p50 ms (d / q)"]
        table = Table([*headers, "other programs' cores (d / q)"])
        for i, r in enumerate(self.rounds, 1):
            ttft = f"{fmt(percentile(r.direct.ttfts_ms(), 50))} / {fmt(percentile(r.mesh.ttfts_ms(), 50))}"
            other = f"{r.direct_other:.2f} / {r.mesh_other:.2f}"
            table.add(i, fmt(r.direct.tokens_per_s(), 1), fmt(r.mesh.tokens_per_s(), 1), fmt(r.ratio, 3), ttft, other)
        return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=2, help="slots of the worker (one thread) and the direct server")
    parser.add_argument("--cpu-threads", type=int, default=rig.default_cpu_threads(), help="llama-server threads")
    parser.add_argument("--rounds", type=int, default=8, help="direct/mesh round pairs per concurrency")
    parser.add_argument("--requests", type=int, default=4, help="requests per round at concurrency 1")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request")


def quick(args: argparse.Namespace) -> None:
    args.rounds, args.requests, args.max_tokens = 3, 3, 48


def interleave(r: rig.Rig, args: argparse.Namespace) -> list[Pair]:
    """Rounds in ABBA order at concurrency 1 and at slots; at saturation 2 requests per slot."""
    pairs = []
    offset = 0
    for concurrency in sorted({1, args.slots}):
        pair = Pair(concurrency)
        direct, mesh = DirectLoad(r.base_url, concurrency), MeshLoad(r.endpoint, rig.MODEL, concurrency)
        meter = procs.CpuMeter(dict(zip(ROLES, r.role_pids(), strict=True)))
        try:
            warm = prompts(concurrency, offset=10_000 + concurrency)  # connections, first-request costs
            direct.run(warm, 8)
            mesh.run(warm, 8)
            count = args.requests if concurrency == 1 else max(args.requests, 2 * concurrency)
            for _ in range(args.rounds):
                texts = prompts(count, offset)
                offset += count
                # At concurrency 1 each prompt goes both ways back to back (a pair per request); at saturation
                # each path runs the whole round. Either way in ABBA order: a machine whose speed drifts during
                # the run (turbo, neighbours of a VM) favours neither path.
                batches = [[text] for text in texts] if concurrency == 1 else [texts]
                d, m = LoadResult(), LoadResult()
                d_other: list[float] = []  # cores other programs used, per half
                m_other: list[float] = []
                halves = [(direct, d, d_other, pair.direct_cpu), (mesh, m, m_other, pair.mesh_cpu)]
                for batch in batches:
                    flip = (len(pair.rounds) + len(d.records)) % 2 == 1
                    for load, result, other_cores, cpu_total in reversed(halves) if flip else halves:
                        other, cpu = procs.OtherLoad(), meter.reading()
                        result.extend(load.run(batch, args.max_tokens))
                        other_cores.append(other.cores())
                        _accumulate(cpu_total, meter.used(cpu, meter.reading()))
                if concurrency == 1:
                    pair.ttft_pairs += zip(d.records, m.records, strict=True)
                pair.direct.extend(d)
                pair.mesh.extend(m)
                pair.rounds.append(Round(d, m, max(d_other), max(m_other)))
                print(f"overhead: concurrency {concurrency}: " + " | ".join(pair.round_table().rows[-1]), flush=True)
        finally:
            direct.close()
            mesh.close()
        pairs.append(pair)
    return pairs


def _paired_ms(
    pairs: list[tuple[StreamRecord, StreamRecord]], measure: Callable[[StreamRecord], float | None]
) -> list[float]:
    """mesh - direct of ``measure`` for each request both paths answered, in ms."""
    out = []
    for direct, mesh in pairs:
        a, b = measure(direct), measure(mesh)
        if a is not None and b is not None:
            out.append((b - a) * 1000)
    return out


def _accumulate(total: dict[str, float], used: dict[str, float]) -> None:
    for role, seconds in used.items():
        total[role] = total.get(role, 0.0) + seconds


def comparison(pair: Pair) -> Table:
    d, m = pair.direct, pair.mesh
    table = Table(["metric", "direct", "qmesh", "qmesh - direct", "qmesh / direct"])
    rows = [
        ("TTFT p50 ms", percentile(d.ttfts_ms(), 50), percentile(m.ttfts_ms(), 50)),
        ("TTFT p99 ms", percentile(d.ttfts_ms(), 99), percentile(m.ttfts_ms(), 99)),
        ("ITL p50 ms", percentile(d.itls_ms(), 50), percentile(m.itls_ms(), 50)),
        ("ITL p99 ms", percentile(d.itls_ms(), 99), percentile(m.itls_ms(), 99)),
        ("output tokens/s", d.tokens_per_s(), m.tokens_per_s()),
        ("tokens per request", d.tokens / max(1, len(d.records)), m.tokens / max(1, len(m.records))),
    ]
    for name, a, b in rows:
        table.add(name, fmt(a), fmt(b), fmt(b - a), f"{fmt(ratio(b, a), 3)}")
    table.add("requests (errors)", f"{len(d.records)} ({d.errors})", f"{len(m.records)} ({m.errors})", "-", "-")
    return table


def goals(pairs: list[Pair], slots: int) -> tuple[list[str], dict[str, float]]:
    lines, data = [], {}
    single = next(p for p in pairs if p.concurrency == 1)
    pooled_added = percentile(single.mesh.ttfts_ms(), 50) - percentile(single.direct.ttfts_ms(), 50)
    raw = _paired_ms(single.ttft_pairs, lambda r: r.ttft)
    net = _paired_ms(single.ttft_pairs, lambda r: r.ttft_beyond_prompt)
    added = percentile(net, 50)
    data["added_ttft_p50_ms"] = added
    data["added_ttft_p50_ms_with_prompt_time"] = percentile(raw, 50)
    data["added_ttft_p50_ms_pooled"] = pooled_added
    verdict = "met" if added <= GOAL_ADDED_TTFT_MS else "NOT met"
    lines.append(
        f"goal: added TTFT p50 at concurrency 1 <= {GOAL_ADDED_TTFT_MS:g} ms: {added:.2f} ms, {verdict}. That is the "
        f"median of {len(net)} per-request differences (each prompt sent both ways back to back) of TTFT less "
        f"llama-server's own prompt time (its timings.prompt_ms), which varies by several ms from request to "
        f"request on either path; p25-p75 {fmt(percentile(net, 25))} to {fmt(percentile(net, 75))} ms. "
        f"With the prompt time left in: median {fmt(percentile(raw, 50))} ms (p25-p75 {fmt(percentile(raw, 25))} "
        f"to {fmt(percentile(raw, 75))}); difference of the pooled TTFT p50s {pooled_added:.2f} ms"
    )
    saturated = next(p for p in pairs if p.concurrency == slots)
    pooled = ratio(saturated.mesh.tokens_per_s(), saturated.direct.tokens_per_s())
    ratios = [r.ratio for r in saturated.rounds]
    quiet = [r.ratio for r in saturated.rounds if r.quiet]
    data["tokens_ratio_saturation"] = pooled
    data["tokens_ratio_saturation_round_median"] = median(ratios)
    data["tokens_ratio_saturation_quiet_median"] = median(quiet)
    verdict = "met" if pooled >= GOAL_TOKENS_RATIO else "NOT met"
    lines.append(
        f"goal: tokens/s through QMesh >= {GOAL_TOKENS_RATIO:g}x direct at saturation (concurrency {slots}): "
        f"{pooled:.3f}x pooled, {verdict}; median of the rounds {median(ratios):.3f}x "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}); median of the {len(quiet)} quiet round(s) "
        f"(other programs < {QUIET:g} cores) {fmt(median(quiet), 3)}x"
    )
    return lines, data


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("overhead", command)
    section.settings = {
        "model": rig.MODEL,
        "slots": args.slots,
        "llama-server threads": args.cpu_threads,
        "rounds": args.rounds,
        "requests/round at c=1": args.requests,
        "max_tokens": args.max_tokens,
        "sampling": "greedy, raw prompt",
    }
    with procs.Processes() as ps:
        r = rig.start(ps, args.slots, args.cpu_threads)
        pairs = interleave(r, args)
        warnings = procs.warnings_in(r.broker)[0] + procs.warnings_in(r.worker)[0]
        mesh_floor, zmq_floor = floor.mesh_round_trip(ps, r.endpoint), floor.zmq_round_trip(ps)
    for pair in pairs:
        label = "concurrency 1" if pair.concurrency == 1 else f"saturation: concurrency {pair.concurrency} = slots"
        section.table(label, comparison(pair))
        section.table(f"{label}, round by round", pair.round_table())
        section.table(f"{label}, CPU per output token of each process", pair.cpu_table())
    lines, section.data = goals(pairs, args.slots)
    table = Table(["what (one request at a time, 1 ms apart)", "ms p50 / p90 / p99", "samples"])
    table.add(
        "mesh round trip: SDK -> broker -> instant fake worker -> SDK, first chunk",
        floor.summary(mesh_floor),
        len(mesh_floor),
    )
    table.add(
        "ZeroMQ round trip over TCP loopback between two processes (a request makes two)",
        floor.summary(zmq_floor),
        len(zmq_floor),
    )
    section.table("latency floor of the added TTFT, no llama-server (see benchkit/floor.py)", table)
    section.data["mesh_round_trip_p50_ms"] = percentile(mesh_floor, 50)
    section.data["zmq_round_trip_p50_ms"] = percentile(zmq_floor, 50)
    section.notes += lines
    section.notes.append(
        "both llama-servers run with the same command line but the port: "
        + ("checked" if r.same_sidecar else "NOT the same, see the worker's")
        + f" (`{' '.join(r.sidecar_command[1:])}`)"
    )
    section.notes.append(
        "the mesh path: SDK -> broker process -> worker process (which streams /completion with the raw prompt "
        "text) -> llama-server; the direct path: /completion with the same text; rounds in ABBA order"
    )
    if warnings:
        section.notes.append(f"broker and worker logged {warnings} warning(s)")
    return section
