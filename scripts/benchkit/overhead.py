"""``overhead``: the same streaming load straight to llama-server and through broker + worker, interleaved.

Identical llama-servers (same binary, model, slots, threads, context): one used directly over HTTP/SSE, one behind
a real broker and worker; with ``--ref REF`` one more, behind the working tree's broker and the worker of git ref
REF, so that a worker is measured before and after a change in the same run. With ``--gateway`` the load is chat
over OpenAI's streaming API: llama-server's own ``/v1/chat/completions``, the SDK's chat through the mesh, and
qmesh-gateway's ``/v1/chat/completions`` in front of the same mesh. Loads never overlap, and their order rotates
and mirrors from one load to the next (ABBA for two paths, ABC CBA BCA ACB CAB BAC for three): every path takes
every place equally often and a drift in the machine's speed favours none. At concurrency 1 and at saturation
(concurrency = slots). Each process's CPU per output token shows where the cores went.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import floor, procs, rig
from .report import Section, Table
from .stats import LoadResult, StreamRecord, fmt, median, percentile, ratio, verdict
from .streamload import ChatHttpLoad, DirectLoad, MeshLoad, prompts

GOAL_ADDED_TTFT_MS = 1.0
GOAL_TOKENS_RATIO = 0.98
GOAL_GATEWAY_TTFT_MS = 3.0  # through qmesh-gateway, chat (--gateway)
GOAL_GATEWAY_TOKENS_RATIO = 0.97
GATEWAY_MAX_TOKENS = 64  # --gateway's default answer length

# The paths, in this order: llama-server directly, the working tree's worker, REF's (or with --gateway: directly,
# the SDK through the mesh, the gateway in front of the same mesh)
DIRECT, MESH, REF = 0, 1, 2
GATEWAY = 2
CLIENT, GATEWAY_PROCESS, BROKER, WORKER, LLAMA = (
    "client (this process)",
    "gateway",
    "broker",
    "worker (Python)",
    "llama-server",
)
ROLES = (
    CLIENT,
    GATEWAY_PROCESS,
    BROKER,
    WORKER,
    LLAMA,
)  # a path's own processes; LLAMA is the direct one or the worker's
IDLE = "the other paths' processes (idle)"


@dataclass(frozen=True)
class LoadPath:
    """One way from this process to a llama-server: its name in tables, the processes that serve it, its load."""

    label: str
    short: str  # its initial, in cells that list every path
    pids: dict[str, int]  # by role (ROLES)
    load: Callable[[int], Load]  # this path's load at a concurrency
    prompts: int = 0  # offset of its prompts' numbers: paths that share a llama-server must not share prompts


Load = DirectLoad | MeshLoad | ChatHttpLoad


def load_paths(r: rig.Rig) -> list[LoadPath]:
    me = os.getpid()
    direct = {CLIENT: me, LLAMA: r.direct_pid()}
    if r.gateway is not None:  # chat over OpenAI's API: llama-server's own, the SDK's, the gateway's
        mesh = r.mesh
        pids = {CLIENT: me, BROKER: mesh.broker.pid, WORKER: mesh.worker.pid, LLAMA: mesh.sidecar().pid}
        return [
            LoadPath("direct", "d", direct, functools.partial(ChatHttpLoad, r.base_url, rig.MODEL), prompts=100_000),
            LoadPath(
                "sdk", "s", pids, functools.partial(MeshLoad, mesh.endpoint, rig.MODEL, chat=True), prompts=100_000
            ),
            LoadPath(
                "gateway",
                "g",
                {**pids, GATEWAY_PROCESS: r.gateway.pid},
                functools.partial(ChatHttpLoad, r.gateway_url, rig.MODEL),
                prompts=200_000,  # it shares the sdk path's llama-server; as many digits, as many tokens
            ),
        ]
    paths = [LoadPath("direct", "d", direct, functools.partial(DirectLoad, r.base_url))]
    for mesh, short in zip(r.meshes, "qr", strict=False):
        pids = {CLIENT: me, BROKER: mesh.broker.pid, WORKER: mesh.worker.pid, LLAMA: mesh.sidecar().pid}
        paths.append(LoadPath(mesh.label, short, pids, functools.partial(MeshLoad, mesh.endpoint, rig.MODEL)))
    return paths


@dataclass
class Leg:
    """What one path did in a round, or pooled over rounds: its streams, CPU seconds by role (and IDLE: every
    other path's processes meanwhile), and the most cores other programs used during any of its loads."""

    result: LoadResult = field(default_factory=LoadResult)
    cpu: dict[str, float] = field(default_factory=dict)
    other: float = 0.0

    def add(self, leg: Leg) -> None:
        self.result.extend(leg.result)
        for role, seconds in leg.cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + seconds
        self.other = max(self.other, leg.other)

    def ms_per_token(self, *roles: str) -> float:
        return sum(self.cpu.get(role, 0.0) for role in roles) * 1000 / max(1, self.result.tokens)


@dataclass
class Series:
    """Every path at one concurrency: each round's legs, one per path in path order."""

    concurrency: int
    paths: list[LoadPath]
    rounds: list[list[Leg]] = field(default_factory=list)

    def pooled(self, path: int) -> Leg:
        total = Leg()
        for legs in self.rounds:
            total.add(legs[path])
        return total

    def round_ratios(self, path: int) -> list[float]:
        return [ratio(legs[path].result.tokens_per_s(), legs[DIRECT].result.tokens_per_s()) for legs in self.rounds]

    def quiet_ratios(self, path: int) -> list[float]:
        quiet = [procs.ran_alone(leg.other for leg in legs) for legs in self.rounds]
        return [r for r, alone in zip(self.round_ratios(path), quiet, strict=True) if alone]

    def paired_ms(self, path: int, measure: Callable[[StreamRecord], float | None]) -> list[float]:
        """``path`` - direct of ``measure`` for each prompt both answered, in ms. At concurrency 1 only, where each
        prompt went every way back to back: the k-th record of every leg of a round is the same prompt's."""
        out = []
        for legs in self.rounds:
            for direct, other in zip(legs[DIRECT].result.records, legs[path].result.records, strict=True):
                a, b = measure(direct), measure(other)
                if a is not None and b is not None:
                    out.append((b - a) * 1000)
        return out

    def comparison(self) -> Table:
        pooled = [self.pooled(i).result for i in range(len(self.paths))]
        headers = ["metric", "direct"]
        for path in self.paths[1:]:
            headers += [path.label, f"{path.label} - direct", f"{path.label} / direct"]
        table = Table(headers)
        measures: list[tuple[str, Callable[[LoadResult], float]]] = [
            ("TTFT p50 ms", lambda r: percentile(r.ttfts_ms(), 50)),
            ("TTFT p99 ms", lambda r: percentile(r.ttfts_ms(), 99)),
            ("ITL p50 ms", lambda r: percentile(r.itls_ms(), 50)),
            ("ITL p99 ms", lambda r: percentile(r.itls_ms(), 99)),
            ("output tokens/s", LoadResult.tokens_per_s),
            ("tokens per request", lambda r: r.tokens / max(1, len(r.records))),
        ]
        for name, measure in measures:
            base, *others = (measure(result) for result in pooled)
            cells = [fmt(base)]
            for value in others:
                cells += [fmt(value), fmt(value - base), fmt(ratio(value, base), 3)]
            table.add(name, *cells)
        cells = [f"{len(result.records)} ({result.errors})" for result in pooled]
        table.add("requests (errors)", cells[0], *(cell for c in cells[1:] for cell in (c, "-", "-")))
        return table

    def round_table(self) -> Table:
        meshes = self.paths[1:]
        every, workers = " / ".join(p.short for p in self.paths), " / ".join(p.short for p in meshes)
        headers = ["round", *(f"{p.label} tok/s" for p in self.paths), *(f"{p.label} / direct" for p in meshes)]
        headers += [f"TTFT p50 ms ({every})", f"worker ms CPU/token ({workers})", f"other programs' cores ({every})"]
        table = Table(headers)
        for i, legs in enumerate(self.rounds, 1):
            direct = legs[DIRECT].result.tokens_per_s()
            table.add(
                i,
                *(fmt(leg.result.tokens_per_s(), 1) for leg in legs),
                *(fmt(ratio(leg.result.tokens_per_s(), direct), 3) for leg in legs[1:]),
                " / ".join(fmt(percentile(leg.result.ttfts_ms(), 50)) for leg in legs),
                " / ".join(fmt(leg.ms_per_token(WORKER), 3) for leg in legs[1:]),
                " / ".join(f"{leg.other:.2f}" for leg in legs),
            )
        return table

    def cpu_table(self) -> Table:
        """CPU milliseconds per output token of each process, on each path: where the machine's cores went."""
        legs = [self.pooled(i) for i in range(len(self.paths))]
        headers = ["process", "direct ms CPU/token"]
        for path in self.paths[1:]:
            headers += [f"{path.label} ms CPU/token", f"{path.label} - direct"]
        table = Table(headers)
        present = [role for role in ROLES if any(role in path.pids for path in self.paths)]
        for name, roles in [*((role, [role]) for role in (*present, IDLE)), ("all", [*ROLES, IDLE])]:
            base, *others = (leg.ms_per_token(*roles) for leg in legs)
            table.add(name, fmt(base, 3), *(cell for value in others for cell in (fmt(value, 3), fmt(value - base, 3))))
        return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=2, help="slots of the worker (one thread) and the direct server")
    parser.add_argument("--cpu-threads", type=int, default=rig.default_cpu_threads(), help="llama-server threads")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per concurrency (each path once or more)")
    parser.add_argument("--requests", type=int, default=4, help="requests per round at concurrency 1")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"tokens per request (default 96; {GATEWAY_MAX_TOKENS} with --gateway)",
    )
    parser.add_argument("--ref", default=None, help="also run the worker of this git ref, interleaved (before/after)")
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="chat over OpenAI's API: llama-server's own, the SDK's through the mesh and qmesh-gateway's, side by side",
    )


def quick(args: argparse.Namespace) -> None:
    args.rounds, args.requests, args.max_tokens = 3, 3, 48


def order(load: int, paths: int) -> list[int]:
    """The order of the paths for the load-th load: rotated every two loads, mirrored every other one (AB BA BA AB,
    ABC CBA BCA ACB CAB BAC), so each path takes each place equally often and a steady drift in the machine's speed
    cancels within every mirrored pair."""
    start = (load // 2) % paths
    ring = [*range(start, paths), *range(start)]
    return ring[::-1] if load % 2 else ring


def interleave(r: rig.Rig, args: argparse.Namespace) -> list[Series]:
    """Rounds at concurrency 1 and at slots (there 2 requests per slot), every path in each, in rotating order."""
    paths = load_paths(r)
    meter = procs.CpuMeter({pid for path in paths for pid in path.pids.values()})
    out = []
    offset = 0
    for concurrency in sorted({1, args.slots}):
        series = Series(concurrency, paths)
        loads = [path.load(concurrency) for path in paths]
        try:
            warm = prompts(concurrency, offset=10_000 + concurrency)  # connections, first-request costs
            for load in loads:
                load.run(warm, 8)
            count = args.requests if concurrency == 1 else max(args.requests, 2 * concurrency)
            done = 0  # loads run at this concurrency, for their order
            for _ in range(args.rounds):
                # Paths that share a llama-server get prompts of their own (the same but for a number), else the
                # second would find the whole prompt in that server's cache.
                texts = [prompts(count, offset + path.prompts) for path in paths]
                offset += count
                # At concurrency 1 each prompt goes every way back to back (a step per request); at saturation each
                # path runs the whole round. Either way in rotating order: a machine whose speed drifts during the
                # run (turbo, neighbours of a VM) favours no path.
                steps = [[[each[k]] for each in texts] for k in range(count)] if concurrency == 1 else [texts]
                legs = [Leg() for _ in paths]
                for step in steps:  # step[i]: path i's prompts
                    for i in order(done, len(paths)):
                        legs[i].add(_measure(loads[i], paths[i], meter, step[i], args.max_tokens))
                    done += 1
                series.rounds.append(legs)
                print(f"overhead: concurrency {concurrency}: " + " | ".join(series.round_table().rows[-1]), flush=True)
        finally:
            for load in loads:
                load.close()
        out.append(series)
    return out


def _measure(load: Load, path: LoadPath, meter: procs.CpuMeter, batch: list[str], max_tokens: int) -> Leg:
    other, before = procs.OtherLoad(), meter.reading()
    result = load.run(batch, max_tokens)
    cores, used = other.cores(), meter.used(before, meter.reading())
    own = set(path.pids.values())
    cpu = {role: used[pid] for role, pid in path.pids.items()}
    cpu[IDLE] = sum(seconds for pid, seconds in used.items() if pid not in own)
    return Leg(result, cpu, cores)


def at(all_series: list[Series], concurrency: int) -> Series:
    """The series measured at ``concurrency``."""
    return next(series for series in all_series if series.concurrency == concurrency)


# figures' keys on tokens/s at saturation against direct, that the gateway's goals report too
SATURATION_KEYS = (
    "tokens_ratio_saturation",
    "tokens_ratios_saturation",
    "tokens_ratio_saturation_quiet_median",
    "quiet_rounds_saturation",
)


def figures(all_series: list[Series], path: int, slots: int) -> dict[str, Any]:
    """One path's figures against direct: added TTFT at concurrency 1, tokens/s at saturation, CPU per token."""
    single, saturated = at(all_series, 1), at(all_series, slots)
    net = single.paired_ms(path, lambda r: r.ttft_beyond_prompt)
    raw = single.paired_ms(path, lambda r: r.ttft)
    ttft_p50 = [percentile(single.pooled(i).result.ttfts_ms(), 50) for i in (DIRECT, path)]
    out: dict[str, Any] = {
        "added_ttft_ms": net,
        "added_ttft_p50_ms": percentile(net, 50),
        "added_ttft_p50_ms_with_prompt_time": percentile(raw, 50),
        "added_ttft_ms_with_prompt_time": raw,
        "added_ttft_p50_ms_pooled": ttft_p50[1] - ttft_p50[0],
        "tokens_ratio_saturation": ratio(
            saturated.pooled(path).result.tokens_per_s(), saturated.pooled(DIRECT).result.tokens_per_s()
        ),
        "tokens_ratios_saturation": saturated.round_ratios(path),
        "tokens_ratio_saturation_round_median": median(saturated.round_ratios(path)),
        "tokens_ratio_saturation_quiet_median": median(saturated.quiet_ratios(path)),
        "quiet_rounds_saturation": len(saturated.quiet_ratios(path)),
    }
    for name, series in (("c1", single), ("saturation", saturated)):
        out[f"worker_ms_per_token_{name}"] = series.pooled(path).ms_per_token(WORKER)
        out[f"worker_ms_per_token_{name}_rounds"] = [legs[path].ms_per_token(WORKER) for legs in series.rounds]
        out[f"llama_server_ms_per_token_{name}"] = series.pooled(path).ms_per_token(LLAMA)
    return out


def goals(all_series: list[Series], slots: int) -> tuple[list[str], dict[str, Any]]:
    """The verdicts on the working tree's mesh path, and its figures."""
    data = figures(all_series, MESH, slots)
    net, raw = data["added_ttft_ms"], data["added_ttft_ms_with_prompt_time"]
    added = data["added_ttft_p50_ms"]
    met = verdict(added <= GOAL_ADDED_TTFT_MS)
    lines = [
        f"goal: added TTFT p50 at concurrency 1 <= {GOAL_ADDED_TTFT_MS:g} ms: {added:.2f} ms, {met}. That is the "
        f"median of {len(net)} per-request differences (each prompt sent every way back to back) of TTFT less "
        f"llama-server's own prompt time (its timings.prompt_ms), which varies by several ms from request to "
        f"request on either path; p25-p75 {fmt(percentile(net, 25))} to {fmt(percentile(net, 75))} ms. "
        f"With the prompt time left in: median {fmt(percentile(raw, 50))} ms (p25-p75 {fmt(percentile(raw, 25))} "
        f"to {fmt(percentile(raw, 75))}); difference of the pooled TTFT p50s {data['added_ttft_p50_ms_pooled']:.2f} ms"
    ]
    pooled, ratios = data["tokens_ratio_saturation"], data["tokens_ratios_saturation"]
    met = verdict(pooled >= GOAL_TOKENS_RATIO)
    lines.append(
        f"goal: tokens/s through QMesh >= {GOAL_TOKENS_RATIO:g}x direct at saturation (concurrency {slots}): "
        f"{pooled:.3f}x pooled, {met}; median of the rounds {median(ratios):.3f}x "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}); median of the {data['quiet_rounds_saturation']} quiet "
        f"round(s) (other programs < {procs.QUIET:g} cores) {fmt(data['tokens_ratio_saturation_quiet_median'], 3)}x"
    )
    return lines, data


def gateway_goals(all_series: list[Series], slots: int) -> tuple[Table, list[str], dict[str, Any]]:
    """The gateway path and the SDK path against direct chat: added TTFT (the median of per-prompt differences; the
    gateway sends no prompt time to net out), tokens/s at saturation, each process's CPU per output token."""
    single, saturated = at(all_series, 1), at(all_series, slots)
    table = Table(["measure", "sdk", "gateway", "goal (gateway)"])
    data: dict[str, Any] = {}
    by_path = {path: figures(all_series, path, slots) for path in (MESH, GATEWAY)}
    for path, name in ((MESH, "sdk"), (GATEWAY, "gateway")):
        # The gateway sends no prompt time to net out: the added TTFT with it left in, for both paths alike.
        data[name] = {
            "added_ttft_ms": by_path[path]["added_ttft_ms_with_prompt_time"],
            "added_ttft_p50_ms": by_path[path]["added_ttft_p50_ms_with_prompt_time"],
            **{key: by_path[path][key] for key in SATURATION_KEYS},
        }
        for label, series in (("c1", single), ("saturation", saturated)):
            leg = series.pooled(path)
            data[name][f"ms_per_token_{label}"] = {role: leg.ms_per_token(role) for role in path_roles(series, path)}
    sdk, gateway = data["sdk"], data["gateway"]
    ttft_ok = gateway["added_ttft_p50_ms"] <= GOAL_GATEWAY_TTFT_MS
    rate_ok = gateway["tokens_ratio_saturation"] >= GOAL_GATEWAY_TOKENS_RATIO
    table.add(
        "added TTFT p50 ms at concurrency 1 (p25-p75), paired per prompt",
        _added_cell(sdk["added_ttft_ms"]),
        _added_cell(gateway["added_ttft_ms"]),
        f"<= {GOAL_GATEWAY_TTFT_MS:g} ms: {verdict(ttft_ok)}",
    )
    net = by_path[MESH]["added_ttft_ms"]
    sdk["added_ttft_net_p50_ms"] = by_path[MESH]["added_ttft_p50_ms"]
    table.add("the same less llama-server's prompt time (the gateway does not report it)", _added_cell(net), "-", "-")
    table.add(
        f"tokens/s / direct at saturation (concurrency {slots}), pooled (range of rounds)",
        _ratio_cell(sdk),
        _ratio_cell(gateway),
        f">= {GOAL_GATEWAY_TOKENS_RATIO:g}x: {verdict(rate_ok)}",
    )
    table.add(
        "the same, median of the quiet rounds",
        f"{fmt(sdk['tokens_ratio_saturation_quiet_median'], 3)}x ({sdk['quiet_rounds_saturation']})",
        f"{fmt(gateway['tokens_ratio_saturation_quiet_median'], 3)}x ({gateway['quiet_rounds_saturation']})",
        "-",
    )
    for label, name in (("c1", "concurrency 1"), ("saturation", f"saturation (concurrency {slots})")):
        for role in (GATEWAY_PROCESS, BROKER, WORKER):
            cells = [data[path][f"ms_per_token_{label}"].get(role) for path in ("sdk", "gateway")]
            table.add(f"{role} ms CPU per output token, {name}", *(fmt(cell, 3) for cell in cells), "-")
        added = [
            sum(data[path][f"ms_per_token_{label}"].get(role, 0.0) for role in (GATEWAY_PROCESS, BROKER, WORKER))
            for path in ("sdk", "gateway")
        ]
        table.add(f"gateway + broker + worker ms CPU per output token, {name}", *(fmt(cell, 3) for cell in added), "-")
    lines = [
        f"goal: added TTFT p50 through the gateway <= {GOAL_GATEWAY_TTFT_MS:g} ms: "
        f"{gateway['added_ttft_p50_ms']:.2f} ms, {verdict(ttft_ok)} (median of "
        f"{len(gateway['added_ttft_ms'])} per-prompt differences, each prompt sent every way back to back; "
        "llama-server's prompt time is in it, as the gateway does not report it)",
        f"goal: tokens/s through the gateway >= {GOAL_GATEWAY_TOKENS_RATIO:g}x direct at saturation: "
        f"{gateway['tokens_ratio_saturation']:.3f}x pooled, {verdict(rate_ok)}",
    ]
    return table, lines, data


def _relay_floor(
    ps: procs.Processes, all_series: list[Series], args: argparse.Namespace
) -> dict[str, list[float]] | None:
    """The relays' CPU per message (floor.relay_cpu) at the direct path's saturated token rate, while the direct
    path's saturating load runs; None when the direct path made no tokens at saturation (no rate to pass them at)."""
    saturated = at(all_series, args.slots)
    rate = saturated.pooled(DIRECT).result.tokens_per_s()
    if not rate > 0:  # 0 or NaN: relay_cpu would fail on it, and the run's figures with it
        return None
    load = saturated.paths[DIRECT].load(args.slots)
    batches = iter(range(1_000_000, 2_000_000, 2 * args.slots))
    try:
        return floor.relay_cpu(
            ps,
            rate,
            args.slots,
            lambda: load.run(prompts(2 * args.slots, next(batches)), args.max_tokens),
            rounds=min(3, args.rounds),
        )
    finally:
        load.close()


def relay_floor_report(
    relays: dict[str, list[float]], gateway: dict[str, Any]
) -> tuple[Table, list[str], dict[str, Any]]:
    """The relays' CPU per message, and what the gateway's tokens/s goal leaves the three processes a token crosses:
    this run's tokens/s lost per ms of CPU they add to a token, at saturation, turned into the CPU per token the
    goal allows."""
    table = Table(["relay process", "ms CPU per message, median (range)", "three of them, ms per token"])
    data: dict[str, Any] = dict(relays)
    for kind, values in relays.items():
        table.add(kind, _spread(values), fmt(3 * median(values), 3))
    python = 3 * median(relays[floor.PYTHON_RELAY])
    added = sum(gateway["ms_per_token_saturation"].get(role, 0.0) for role in (GATEWAY_PROCESS, BROKER, WORKER))
    lost = 1 - gateway["tokens_ratio_saturation"]
    if lost <= 0 or added <= 0:
        return table, ["the gateway path lost no tokens/s in this run: no CPU budget to weigh the floor against"], data
    data["lost_per_ms"] = lost / added
    data["budget_ms_per_token"] = budget = (1 - GOAL_GATEWAY_TOKENS_RATIO) / data["lost_per_ms"]
    line = (
        f"tokens/s lost per ms of CPU that gateway, broker and worker add to a token, at saturation: "
        f"{data['lost_per_ms']:.1%} ({lost:.1%} lost for {added:.3f} ms); the goal of >= "
        f"{GOAL_GATEWAY_TOKENS_RATIO:g}x leaves the three processes {budget:.3f} ms of CPU per token together; three "
        f"pyzmq processes that only pass each token on would use {python:.3f} ms ({python / budget:.2f}x that budget)"
    )
    return table, [line], data


def path_roles(series: Series, path: int) -> list[str]:
    return [role for role in ROLES if role in series.paths[path].pids]


def _added_cell(values: list[float]) -> str:
    return f"{fmt(percentile(values, 50))} ({fmt(percentile(values, 25))} to {fmt(percentile(values, 75))})"


def before_after(all_series: list[Series], ref: str, slots: int) -> tuple[Table, dict[str, Any]]:
    """The worker of ``ref`` against the working tree's, side by side (same broker code, same run, interleaved).

    Next to each CPU figure, the spread of the per-round figures, and of the per-round differences (each round ran
    both workers): what a difference must exceed to be more than noise."""
    before, after = figures(all_series, REF, slots), figures(all_series, MESH, slots)
    table = Table(["measure", f"worker @ {ref}", "worker (working tree)", "working tree - ref"])
    for name, series in (("concurrency 1", "c1"), (f"saturation (concurrency {slots})", "saturation")):
        key = f"worker_ms_per_token_{series}"
        b, a = before[key], after[key]
        table.add(
            f"worker (Python) ms CPU/token, {name}", fmt(b, 3), fmt(a, 3), f"{fmt(a - b, 3)} ({ratio(a, b) - 1:+.1%})"
        )
        rounds_b, rounds_a = before[f"{key}_rounds"], after[f"{key}_rounds"]
        deltas = [y - x for x, y in zip(rounds_b, rounds_a, strict=True)]
        spreads = _spread(rounds_b), _spread(rounds_a), _spread(deltas)
        table.add(f"the same per round, {name}: median (range); last column: the rounds' differences", *spreads)
        key = f"llama_server_ms_per_token_{series}"
        table.add(
            f"its llama-server ms CPU/token, {name}",
            fmt(before[key], 3),
            fmt(after[key], 3),
            fmt(after[key] - before[key], 3),
        )
    table.add(
        "tokens/s / direct at saturation, pooled (range of rounds)",
        _ratio_cell(before),
        _ratio_cell(after),
        fmt(after["tokens_ratio_saturation"] - before["tokens_ratio_saturation"], 3),
    )
    table.add(
        "added TTFT p50 ms at concurrency 1 (p25-p75), prompt time netted out",
        _added_cell(before["added_ttft_ms"]),
        _added_cell(after["added_ttft_ms"]),
        fmt(after["added_ttft_p50_ms"] - before["added_ttft_p50_ms"]),
    )
    return table, {"ref": ref, **before}


def _spread(values: list[float]) -> str:
    return f"{fmt(median(values), 3)} ({fmt(min(values), 3)} to {fmt(max(values), 3)})" if values else "-"


def _ratio_cell(data: dict[str, Any]) -> str:
    ratios = data["tokens_ratios_saturation"]
    return f"{fmt(data['tokens_ratio_saturation'], 3)}x ({fmt(min(ratios), 3)}-{fmt(max(ratios), 3)})"


def run(args: argparse.Namespace, command: str) -> Section:
    if args.gateway and args.ref:
        raise SystemExit("overhead: --gateway and --ref cannot be combined")
    if args.max_tokens is None:
        args.max_tokens = GATEWAY_MAX_TOKENS if args.gateway else 96
    section = Section("overhead", command)
    section.settings = {
        "model": rig.MODEL,
        "slots": args.slots,
        "llama-server threads": args.cpu_threads,
        "rounds": args.rounds,
        "requests/round at c=1": args.requests,
        "max_tokens": args.max_tokens,
        "sampling": "greedy, " + ("chat (one user message, the model's template)" if args.gateway else "raw prompt"),
    }
    if args.ref:
        section.settings["also the worker of"] = args.ref
    with procs.Processes() as ps:
        r = rig.start(ps, args.slots, args.cpu_threads, args.ref, gateway=args.gateway)
        all_series = interleave(r, args)
        warnings = sum(procs.warnings_in(child)[0] for child in r.children())
        mesh_floor, zmq_floor = floor.mesh_round_trip(ps, r.mesh.endpoint), floor.zmq_round_trip(ps)
        relays = _relay_floor(ps, all_series, args) if args.gateway else None
        readers = (
            floor.stream_read_cpu(r.base_url, args.max_tokens, rounds=min(3, args.rounds)) if args.gateway else None
        )
    for series in all_series:
        c = series.concurrency
        label = "concurrency 1" if c == 1 else f"saturation: concurrency {c} = slots"
        section.table(label, series.comparison())
        section.table(f"{label}, round by round", series.round_table())
        section.table(f"{label}, CPU per output token of each process", series.cpu_table())
    if args.gateway:
        table, lines, section.data = gateway_goals(all_series, args.slots)
        section.table("the gateway's goals, and the SDK path's figures beside them", table)
    else:
        lines, section.data = goals(all_series, args.slots)
    if args.ref:
        table, section.data["ref"] = before_after(all_series, args.ref, args.slots)
        section.table(f"before/after: the worker of {args.ref} against the working tree's", table)
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
    if relays is not None:
        table, relay_lines, section.data["relay_floor"] = relay_floor_report(relays, section.data["gateway"])
        section.table(
            "CPU floor of the tokens/s ratio: a process that only passes messages on (see benchkit/floor.py)", table
        )
        lines += relay_lines
    elif args.gateway:
        lines.append("no CPU floor of the tokens/s ratio: the direct path made no tokens at saturation to pass on")
    if readers is not None:
        table = Table(["reader", "ms CPU per event, median (range)"])
        for name, values in readers.items():
            table.add(name, _spread(values))
        section.table(
            "reading llama-server's /completion stream in Python, one stream at a time (benchkit/floor.py)", table
        )
        section.data["stream_read_ms_per_event"] = readers
    section.notes += lines
    section.notes.append(
        "every llama-server runs with the same command line but the port: "
        + ("checked" if r.same_sidecar else "NOT the same, see the workers'")
        + f" (`{' '.join(r.sidecar_command[1:])}`)"
    )
    if args.gateway:
        section.notes.append(
            "chat paths: direct = llama-server's /v1/chat/completions, streamed; sdk = QMeshClient with one user "
            "message -> broker -> worker (/apply-template, then /completion) -> llama-server; gateway = the same "
            "HTTP request to qmesh-gateway, whose bridge drives one SDK client to the same broker; the HTTP paths are "
            "read by the same client code (streamload.ChatHttpLoad); loads in rotating, mirrored order; CPU from the "
            "scheduler's per-thread nanosecond counts (procs.cpu_seconds)"
        )
    else:
        section.notes.append(
            "a mesh path: SDK -> broker process -> worker process (which streams /completion with the raw prompt "
            "text) -> llama-server; the direct path: /completion with the same text; loads in rotating, mirrored "
            "order; CPU from the scheduler's per-thread nanosecond counts (procs.cpu_seconds)"
        )
    if args.ref:
        section.notes.append(
            f"the {args.ref} path: the working tree's broker (a second instance) and the worker of {args.ref} "
            f"(its worker/ and common/ exported by git archive, first on PYTHONPATH); round-by-round tables list "
            f"each path by its initial (d: direct, q: working tree, r: {args.ref})"
        )
    if warnings:
        section.notes.append(f"brokers and workers logged {warnings} warning(s)")
    return section
