"""``scale``: one broker, many simulated workers and paced streams: added inter-token latency, stalls, memory.

Fake workers (many DEALER sockets in a few processes) pace every stream at ``rate`` chunks/s and stamp each
chunk with its send time; synthetic clients compare each receive gap with the matching send gap. The difference
is the latency added between two tokens. The same processes first stream straight to sinks, with no broker (the
baseline: what the machine and the load generators add by themselves), then through the broker. Loopback only;
each phase is bounded by ``duration``.
"""

from __future__ import annotations

import argparse
import queue
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from qmesh.testing import free_endpoint, wait_for_workers
from qmesh.testing.fakeworker import FakePlan

from . import fakeclient, procs
from .report import Section, Table
from .stats import fmt, percentile, ratio, verdict

SERVICE = "fake-model"
GOAL_ADDED_ITL_P99_MS = 5.0
MB = 1024 * 1024


@dataclass
class Phase:
    """What the client side (or sinks) and the fake workers reported, and the broker's figures if there was one."""

    clients: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    wall: float
    broker_cpu: float = 0.0
    rss_idle: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    warnings: tuple[int, list[str]] = (0, [])

    def series(self, key: str) -> list[float]:
        values = array("d")
        for c in self.clients:
            values.frombytes(c[key])
        return [x * 1000 for x in values]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1000, help="simulated workers (one DEALER each)")
    parser.add_argument("--slots", type=int, default=2, help="slots per simulated worker")
    parser.add_argument("--streams", type=int, default=2000, help="concurrent streams through the broker")
    parser.add_argument("--rate", type=float, default=20.0, help="chunks/s of each stream")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each stream lasts")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds over which the streams start")
    parser.add_argument("--worker-procs", type=int, default=2, help="processes holding the simulated workers")
    parser.add_argument("--client-procs", type=int, default=2, help="processes holding the streams")
    parser.add_argument("--no-baseline", action="store_true", help="skip the phase without a broker")
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        help="niceness of the fake workers, clients and sinks: with 10, the broker gets a core when it wakes, as "
        "on a machine of its own (both phases alike)",
    )


def quick(args: argparse.Namespace) -> None:
    args.workers, args.streams, args.duration, args.ramp = 100, 200, 10.0, 1.0
    args.worker_procs = args.client_procs = 1


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("scale", command)
    chunks = int(args.rate * args.duration)
    section.settings = {
        "workers": args.workers,
        "slots": args.slots,
        "streams": args.streams,
        "rate": f"{args.rate:g}/s",
        "duration": f"{args.duration:g} s",
        "chunks/stream": chunks,
        "ramp": f"{args.ramp:g} s",
        "processes": f"{args.worker_procs} worker + {args.client_procs} client",
        "load generators' nice": args.generator_nice,
    }
    timeout = args.ramp + 2 * args.duration + 15  # streams that cannot keep pace end unfinished, and are counted
    with procs.Processes() as ps:
        baseline = None if args.no_baseline else no_broker(ps, args, chunks, timeout)
        mesh = through_broker(ps, args, chunks, timeout)
    summarise(section, args, chunks, baseline, mesh)
    return section


def no_broker(ps: procs.Processes, args: argparse.Namespace, chunks: int, timeout: float) -> Phase:
    """Every slot of every fake worker streams straight to a sink process (a ROUTER), paced the same way."""
    sinks = [free_endpoint() for _ in range(args.client_procs)]
    counts = _split(args.workers, args.worker_procs)
    expected = [sum(len(range(i, n, len(sinks))) for n in counts) * args.slots for i in range(len(sinks))]
    plan = fakeclient.StreamPlan(0, 0, chunks, stall_gap=2 / args.rate, timeout=timeout)
    sink_queues = []
    for endpoint, streams in zip(sinks, expected, strict=True):
        _, results = ps.function(fakeclient.sink_main, endpoint, streams, plan, nice=args.generator_nice)
        results.get(timeout=30)
        sink_queues.append(results)
    stop = procs.SPAWN.Event()
    start = time.monotonic()
    worker_queues = []
    for i, count in enumerate(counts):
        fake = FakePlan(count, args.slots, args.rate, f"direct{i}", direct_chunks=chunks, ramp=args.ramp)
        worker_queues.append(ps.fake_workers(sinks, SERVICE, fake, stop, nice=args.generator_nice))
    clients = [q.get(timeout=timeout + 30) for q in sink_queues]
    wall = time.monotonic() - start
    stop.set()
    for c, streams in zip(clients, expected, strict=True):
        c.update(ok=c["finals"], errors=0, unfinished=streams - c["finals"], lost_chunks=streams * chunks - c["chunks"])
        c.update(extra_chunks=0, wall=wall)
    return Phase(clients, [q.get(timeout=60) for q in worker_queues], wall)


def through_broker(ps: procs.Processes, args: argparse.Namespace, chunks: int, timeout: float) -> Phase:
    endpoint = free_endpoint()
    broker = ps.broker(endpoint)
    stop = procs.SPAWN.Event()
    worker_queues = []
    for i, count in enumerate(_split(args.workers, args.worker_procs)):
        fake = FakePlan(count, args.slots, args.rate, f"sim{i}")
        worker_queues.append(ps.fake_workers([endpoint], SERVICE, fake, stop, nice=args.generator_nice))
    wait_for_workers(endpoint, SERVICE, args.workers, 120, watch=[broker])
    rss_idle = procs.tree_rss(broker.pid)[0]
    cpu0 = procs.cpu_seconds(broker.pid)
    start = time.monotonic()
    client_queues = []
    for i, count in enumerate(_split(args.streams, args.client_procs)):
        plan = fakeclient.StreamPlan(
            count, count, chunks, ramp=args.ramp, timed=True, stall_gap=2 / args.rate, timeout=timeout
        )
        client_queues.append(
            ps.function(fakeclient.clients_main, endpoint, SERVICE, plan, i, nice=args.generator_nice)[1]
        )
    clients, samples = _collect(client_queues, broker.pid, start, timeout)
    cpu1 = procs.cpu_seconds(broker.pid)
    wall = time.monotonic() - start
    warnings = procs.warnings_in(broker)
    broker.stop()
    stop.set()
    workers = [q.get(timeout=60) for q in worker_queues]
    return Phase(clients, workers, wall, cpu1 - cpu0, rss_idle, samples, warnings)


def _collect(
    client_queues: list[Any], broker_pid: int, start: float, timeout: float
) -> tuple[list[dict[str, Any]], list[tuple[float, int]]]:
    """Wait for every client process while sampling the broker's RSS twice a second."""
    clients: list[dict[str, Any]] = []
    samples: list[tuple[float, int]] = []
    pending = list(client_queues)
    while pending and time.monotonic() - start < timeout + 30:
        samples.append((time.monotonic() - start, procs.tree_rss(broker_pid)[0]))
        try:
            clients.append(pending[0].get(timeout=0.5))
            pending.pop(0)
        except queue.Empty:
            continue
    if pending:
        raise RuntimeError(f"{len(pending)} client process(es) did not report within {timeout:g} s")
    return clients, samples


def _column(phase: Phase | None, args: argparse.Namespace, chunks: int) -> list[str]:
    if phase is None:
        return ["-"] * 6
    added, one_way = phase.series("added_itl"), phase.series("one_way")
    received = sum(c["chunks"] for c in phase.clients)
    streams = sum(c["ok"] + c["errors"] + c["unfinished"] for c in phase.clients)
    lost = sum(c["lost_chunks"] + c["extra_chunks"] for c in phase.clients)
    failed = sum(c["errors"] + c["unfinished"] for c in phase.clients)
    wall = max(c["wall"] for c in phase.clients)
    late = [w["lateness_ms"][99] for w in phase.workers if "lateness_ms" in w]
    return [
        " / ".join(fmt(percentile(added, q)) for q in (50, 99, 99.9, 100)),
        f"{sum(c['stalls'] for c in phase.clients)} of {len(added):,} gaps",
        f"{fmt(percentile(one_way, 50))} / {fmt(percentile(one_way, 99))}",
        f"{fmt(streams * args.rate, 0)} / {fmt(ratio(received, wall), 0)}",
        f"{received:,} / {streams * chunks:,}; {lost}; {failed}",
        " / ".join(fmt(x) for x in late),
    ]


def summarise(section: Section, args: argparse.Namespace, chunks: int, baseline: Phase | None, mesh: Phase) -> None:
    p99 = percentile(mesh.series("added_itl"), 99)
    base_p99 = percentile(baseline.series("added_itl"), 99) if baseline else float("nan")
    table = Table(["measure", "no broker (baseline)", "through the broker", "goal"])
    names = [
        "added ITL p50 / p99 / p99.9 / max ms",
        f"stalls (receive gap > {2000 / args.rate:.0f} ms)",
        "one-way latency worker -> client p50 / p99 ms",
        "chunks/s offered / delivered",
        "chunks received / expected; lost; failed streams",
        "fake worker send lateness p99 ms, per process",
    ]
    met = verdict(p99 <= GOAL_ADDED_ITL_P99_MS)
    goals = [f"p99 <= {GOAL_ADDED_ITL_P99_MS:g} ms (broker): {met}", "-", "-", "-", "0; 0", "small"]
    rows = zip(names, _column(baseline, args, chunks), _column(mesh, args, chunks), goals, strict=True)
    for row in rows:
        table.add(*row)
    peak = max(rss for _, rss in mesh.rss_samples)
    after_ramp = next((rss for t, rss in mesh.rss_samples if t >= args.ramp + 1), peak)
    table.add(
        "broker CPU busy", "-", f"{100 * mesh.broker_cpu / mesh.wall:.0f}% of one core over {mesh.wall:.0f} s", "-"
    )
    table.add("broker RSS: workers registered -> peak", "-", f"{mesh.rss_idle / MB:.0f} MB -> {peak / MB:.0f} MB", "-")
    per_stream = (
        f"{(after_ramp - mesh.rss_idle) / args.streams / 1024:.1f} KiB just after the ramp, "
        f"{(peak - mesh.rss_idle) / args.streams / 1024:.1f} KiB at peak"
    )
    table.add("broker memory per stream (RSS delta / streams)", "-", per_stream, "-")
    section.table("", table)
    section.notes.append(
        "added ITL = receive gap - send gap of consecutive chunks of one stream (send times stamped by the fake "
        "worker; CLOCK_MONOTONIC is shared by the processes); it includes the receiving process's own delays, "
        "which the no-broker baseline measures on their own"
    )
    if baseline is not None:
        section.notes.append(f"difference of the added ITL p99s (broker - baseline): {p99 - base_p99:.2f} ms")
    if mesh.warnings[0]:
        section.notes.append(f"the broker logged {mesh.warnings[0]} warning(s), e.g. {mesh.warnings[1][:1]}")
    disconnects = sum(w["disconnects"] for w in mesh.workers)
    if disconnects:
        section.notes.append(f"simulated workers were sent DISCONNECT {disconnects} time(s) (the broker dropped them)")
    section.data = {
        "added_itl_p99_ms": p99,
        "baseline_added_itl_p99_ms": base_p99,
        "stalls": sum(c["stalls"] for c in mesh.clients),
        "chunks_received": sum(c["chunks"] for c in mesh.clients),
        "lost_chunks": sum(c["lost_chunks"] + c["extra_chunks"] for c in mesh.clients),
        "broker_busy": mesh.broker_cpu / mesh.wall,
        "rss_idle": mesh.rss_idle,
        "rss_peak": peak,
    }
