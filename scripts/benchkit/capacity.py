"""``capacity``: chunks/s and CPU per message of the broker with fake workers, against ``zmq.proxy``; CPU per plain
MDP request against majortomo's broker.

Rounds alternate: the broker (its own process, the real ``qmesh-broker``) routes the streams of
``FakeStreamingWorker`` to synthetic clients; then ``zmq.proxy`` (its own process) forwards as many messages of
the same frames. Then the plain MDP load (``plainmdp``: clients sending requests back to back, echo workers
answering each with PARTIALs and a FINAL, in the framing majortomo speaks) goes through ``qmesh-broker`` and
through majortomo 0.2.0's broker twice: its ``Broker`` class with logging unconfigured (a process of ours), and its
command as it runs by default (``python -m majortomo.broker``: every PARTIAL and FINAL logged at INFO, here to a
file), in rotating, mirrored order. CPU time of the broker, proxy or majortomo process is read before and after the
load (procs.cpu_seconds), and of each broker's ZeroMQ I/O thread on its own (procs.zmq_io_seconds).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from qmesh.testing import free_endpoint, wait_for_workers
from qmesh.testing.fakeworker import FakePlan

from . import fakeclient, plainmdp, procs, proxybase
from .overhead import order
from .profiling import PySpy, hot_spots
from .report import Section, Table
from .stats import fmt, ratio, verdict

SERVICE = "fake-model"
GOAL_CHUNKS_PER_CORE = 30_000
GOAL_CPU_RATIO = 8.0
GOAL_MAJORTOMO_RATIO = 3.0  # majortomo's broker CPU per plain MDP request / qmesh-broker's
QMESH, REF = "qmesh-broker", "qmesh-broker @ ref"
MAJORTOMO = "majortomo 0.2.0 Broker, logging unconfigured"
MAJORTOMO_COMMAND = "majortomo 0.2.0 command, its default logging"


@dataclass
class BrokerRound:
    chunks: int
    inbound: int  # messages the broker received during the load: requests, credits, chunks, finals
    cpu: float
    wall: float
    client: dict[str, Any]
    worker: dict[str, Any]
    warnings: tuple[int, list[str]]


@dataclass
class PlainRound:
    """One broker's share of a plain MDP round: requests answered, its CPU seconds, the wall time."""

    requests: int
    bad: int  # requests sent and not answered as they should be
    cpu: float
    io_cpu: float  # of ``cpu``, the broker's ZeroMQ I/O thread's
    wall: float


@dataclass
class ProxyRound:
    messages: int
    cpu: float
    wall: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4, help="fake workers (DEALER sockets, one process)")
    parser.add_argument("--slots", type=int, default=8, help="slots per fake worker")
    parser.add_argument("--requests", type=int, default=None, help="requests per round (default: 12 x streams)")
    parser.add_argument("--chunks", type=int, default=250, help="chunks per request")
    parser.add_argument("--window", type=int, default=64, help="credit window per stream, in chunks (as the SDK)")
    parser.add_argument("--rounds", type=int, default=2, help="broker/proxy round pairs")
    parser.add_argument("--mdp-requests", type=int, default=4000, help="plain MDP requests per broker per round")
    parser.add_argument("--mdp-clients", type=int, default=4, help="plain MDP clients, one request in flight each")
    parser.add_argument("--mdp-workers", type=int, default=2, help="plain MDP echo workers")
    parser.add_argument("--mdp-rounds", type=int, default=4, help="plain MDP rounds (each broker once per round)")
    parser.add_argument("--mdp-only", action="store_true", help="only the plain MDP comparison with majortomo")
    parser.add_argument("--profile", action="store_true", help="one more broker round of each load sampled by py-spy")
    parser.add_argument("--ref", default=None, help="also run the broker of this git ref, interleaved (before/after)")


def quick(args: argparse.Namespace) -> None:
    args.rounds, args.mdp_rounds = 1, 2
    args.requests = args.requests or 80
    args.mdp_requests = min(args.mdp_requests, 1000)


def run(args: argparse.Namespace, command: str) -> Section:
    streams = args.workers * args.slots
    requests = args.requests or 12 * streams
    section = Section("capacity", command)
    section.settings = {
        "fake workers": args.workers,
        "slots": args.slots,
        "streams": streams,
        "requests/round": requests,
        "chunks/request": args.chunks,
        "window": args.window,
        "rounds": args.rounds,
        "plain MDP": f"{args.mdp_clients} clients, {args.mdp_workers} echo workers, {plainmdp.PARTIALS} PARTIALs "
        f"and a FINAL per request, {args.mdp_requests} requests per broker per round, {args.mdp_rounds} rounds",
    }
    if args.ref:
        section.settings["compared with the broker of"] = args.ref
    brokers: list[BrokerRound] = []
    refs: list[BrokerRound] = []
    proxies: list[ProxyRound] = []
    with procs.Processes() as ps:
        ref_code = ps.export(args.ref, "broker", "common") if args.ref else None
        for _ in range(0 if args.mdp_only else args.rounds):
            if ref_code is not None:
                refs.append(broker_round(ps, args, streams, requests, code=ref_code))
            brokers.append(broker_round(ps, args, streams, requests))
            proxies.append(proxy_round(ps, brokers[-1].inbound, brokers[-1].inbound / brokers[-1].wall))
            print(
                f"capacity: round {len(brokers)}: broker {brokers[-1].chunks / brokers[-1].wall:,.0f} chunks/s, "
                f"proxy {proxies[-1].messages / proxies[-1].wall:,.0f} msg/s",
                flush=True,
            )
        if args.profile and not args.mdp_only:
            profiled = broker_round(ps, args, streams, requests, profile_dir=ps.log_dir)
            table, samples = hot_spots(ps.log_dir / "broker.pyspy")
            section.table(f"broker hot spots under this load (py-spy, {samples} samples, % of busy samples)", table)
            section.notes.append(f"the profiled round ran at {profiled.chunks / profiled.wall:,.0f} chunks/s (wall)")
        plain = plain_rounds(ps, args, ref_code)
        if args.profile:
            profiled_plain = plain_round(ps, args, QMESH, None, profile_dir=ps.log_dir)
            table, samples = hot_spots(ps.log_dir / "broker-plain.pyspy")
            title = f"broker hot spots under the plain MDP load (py-spy, {samples} samples, % of busy samples)"
            section.table(title, table)
            rate = 1e6 * ratio(profiled_plain.cpu, profiled_plain.requests)
            section.notes.append(f"the profiled plain MDP round used {rate:.0f} us of broker CPU per request")
    if brokers:
        summarise(section, brokers, proxies)
    if refs:
        compare(section, args.ref, refs, brokers)
    summarise_plain(section, plain, args.ref)
    return section


def plain_rounds(ps: procs.Processes, args: argparse.Namespace, ref_code: Any) -> dict[str, list[PlainRound]]:
    """The plain MDP load through each broker, in rotating, mirrored order (AB BA, ABC CBA BCA ...)."""
    names = [QMESH, MAJORTOMO, MAJORTOMO_COMMAND] + ([REF] if ref_code is not None else [])
    rounds: dict[str, list[PlainRound]] = {name: [] for name in names}
    for index in range(args.mdp_rounds):
        for which in order(index, len(names)):
            name = names[which]
            rounds[name].append(plain_round(ps, args, name, ref_code))
        figures = (f"{name} {1e6 * ratio(rs[-1].cpu, rs[-1].requests):.0f} us/request" for name, rs in rounds.items())
        print(f"capacity: plain MDP round {index + 1}: " + ", ".join(figures), flush=True)
    return rounds


def plain_round(
    ps: procs.Processes, args: argparse.Namespace, name: str, ref_code: Any, profile_dir: Any = None
) -> PlainRound:
    endpoint = free_endpoint()
    if name == MAJORTOMO:
        process, started = ps.function(plainmdp.majortomo_main, endpoint)
        started.get(timeout=30)
        pid = process.pid
        assert pid is not None
        stop_broker = process.kill
    elif name == MAJORTOMO_COMMAND:
        majortomo = ps.child("majortomo", [sys.executable, "-m", "majortomo.broker", "--bind-url", endpoint])
        pid, stop_broker = majortomo.pid, majortomo.stop
    else:
        broker = ps.broker(endpoint, code=ref_code if name == REF else None)
        pid, stop_broker = broker.pid, broker.stop
    stop, go = procs.SPAWN.Event(), procs.SPAWN.Event()
    workers = ps.function(plainmdp.workers_main, endpoint, SERVICE, args.mdp_workers, stop)[1]
    timeout = 60 + args.mdp_requests / 200
    warmup = 25 * args.mdp_clients
    _, clients = ps.function(
        plainmdp.clients_main, endpoint, SERVICE, args.mdp_clients, warmup, args.mdp_requests, go, timeout
    )
    clients.get(timeout=timeout)  # "warm": every worker has registered and answered
    spy = PySpy(pid, profile_dir / "broker-plain.pyspy") if profile_dir is not None else None
    cpu0, io0 = procs.cpu_seconds(pid), procs.zmq_io_seconds(pid)
    go.set()
    counts = clients.get(timeout=timeout + 30)
    cpu1, io1 = procs.cpu_seconds(pid), procs.zmq_io_seconds(pid)
    if spy is not None:
        spy.stop()
    stop_broker()
    stop.set()
    workers.get(timeout=30)
    bad = counts["requests"] - counts["ok"]
    return PlainRound(counts["ok"], bad, cpu1 - cpu0, io1 - io0, counts["wall"])


def summarise_plain(section: Section, rounds: dict[str, list[PlainRound]], ref: str | None) -> None:
    """Broker CPU per plain MDP request, each broker against majortomo's, with the ZeroMQ I/O thread's share."""
    labels = {name: name for name in rounds} | {REF: f"qmesh-broker @ {ref}"}
    requests = {name: sum(r.requests for r in rs) for name, rs in rounds.items()}
    per_request = {name: 1e6 * ratio(sum(r.cpu for r in rs), requests[name]) for name, rs in rounds.items()}
    io_per_request = {name: 1e6 * ratio(sum(r.io_cpu for r in rs), requests[name]) for name, rs in rounds.items()}
    columns = ["broker", "CPU us per request", "of which ZeroMQ's I/O thread", "Broker / this", "command / this"]
    table = Table([*columns, "requests/s (wall)", "failed answers"])
    for name, rs in rounds.items():
        table.add(
            labels[name],
            fmt(per_request[name], 1),
            fmt(io_per_request[name], 1),
            f"{fmt(ratio(per_request[MAJORTOMO], per_request[name]))}x",
            f"{fmt(ratio(per_request[MAJORTOMO_COMMAND], per_request[name]))}x",
            fmt(ratio(requests[name], sum(r.wall for r in rs)), 0),
            sum(r.bad for r in rs),
        )
    section.table("plain MDP requests: broker CPU per request against majortomo's broker (Broker, command)", table)
    by_round = Table(["round", *(f"{labels[name]} us/request" for name in rounds)])
    for index in range(len(rounds[QMESH])):
        by_round.add(index + 1, *(fmt(1e6 * ratio(rs[index].cpu, rs[index].requests), 1) for rs in rounds.values()))
    section.table("plain MDP requests, round by round", by_round)
    quiet = ratio(per_request[MAJORTOMO], per_request[QMESH])
    command = ratio(per_request[MAJORTOMO_COMMAND], per_request[QMESH])
    floor = ratio(per_request[MAJORTOMO], io_per_request[QMESH])
    section.notes.append(
        f"goal >= {GOAL_MAJORTOMO_RATIO:g}x less broker CPU per plain MDP request than majortomo's broker: "
        f"{fmt(command)}x less than its command as it runs by default: "
        f"{verdict(command >= GOAL_MAJORTOMO_RATIO)}; {fmt(quiet)}x less than its Broker with no logging: "
        f"{verdict(quiet >= GOAL_MAJORTOMO_RATIO)}"
    )
    section.notes.append(
        f"ZeroMQ's I/O thread (the same libzmq under both brokers) alone takes {fmt(io_per_request[QMESH], 1)} us of "
        f"qmesh-broker's CPU per request: a broker on pyzmq whose Python cost nothing would be {fmt(floor)}x below "
        "majortomo's quiet Broker on this load"
    )
    section.notes.append(
        "plain MDP: a request is the client's REQUEST, the worker's PARTIALs and FINAL (4 messages in, 4 out); "
        "clients and workers speak majortomo 0.2.0's framing (leading empty frame; MDPC02 with the worker's codes), "
        "which both brokers accept. majortomo's Broker runs in a process of its own with logging unconfigured "
        "(warnings only); its command (python -m majortomo.broker) logs every PARTIAL and FINAL at INFO to stderr, "
        "here a file; qmesh-broker runs with --log-level warning (it logs no line per request at its default info "
        "either). CPU is the broker process's over the timed requests, after a warm-up"
    )
    section.data["plain_mdp_us_per_request"] = {labels[name]: value for name, value in per_request.items()}
    section.data["plain_mdp_io_us_per_request"] = {labels[name]: value for name, value in io_per_request.items()}
    section.data["plain_mdp_majortomo_ratio"] = quiet
    section.data["plain_mdp_majortomo_command_ratio"] = command
    section.data["plain_mdp_requests"] = {labels[name]: count for name, count in requests.items()}
    section.data["plain_mdp_failed"] = sum(r.bad for rs in rounds.values() for r in rs)


def broker_round(
    ps: procs.Processes,
    args: argparse.Namespace,
    streams: int,
    requests: int,
    profile_dir: Any = None,
    code: Any = None,
) -> BrokerRound:
    endpoint = free_endpoint()
    broker = ps.broker(endpoint, code=code)
    stop = procs.SPAWN.Event()
    worker_results = ps.fake_workers([endpoint], SERVICE, FakePlan(args.workers, args.slots), stop)
    wait_for_workers(endpoint, SERVICE, args.workers, 60, watch=[broker])
    spy = PySpy(broker.pid, profile_dir / "broker.pyspy") if profile_dir is not None else None
    cpu0 = procs.cpu_seconds(broker.pid)
    timeout = 60 + requests * args.chunks / 2000
    streams_plan = fakeclient.StreamPlan(streams, requests, args.chunks, args.window, timeout=timeout)
    _, client_results = ps.function(fakeclient.clients_main, endpoint, SERVICE, streams_plan, 0)
    client = client_results.get(timeout=timeout + 30)
    cpu1 = procs.cpu_seconds(broker.pid)
    if spy is not None:
        spy.stop()
    broker.stop()  # first, so that the fake workers' DISCONNECTs at the end are not counted as anomalies
    stop.set()
    worker = worker_results.get(timeout=30)
    inbound = client["requests"] + client["credits"] + worker["chunks"] + worker["finals"]
    return BrokerRound(
        client["chunks"], inbound, cpu1 - cpu0, client["wall"], client, worker, procs.warnings_in(broker)
    )


def proxy_round(ps: procs.Processes, messages: int, rate: float) -> ProxyRound:
    """``zmq.proxy`` forwarding ``messages`` chunk-shaped messages at ``rate`` per second (the broker's own)."""
    frontend, backend = free_endpoint(), free_endpoint()
    proxy, proxy_results = ps.function(proxybase.proxy_main, frontend, backend)
    proxy_results.get(timeout=30)
    _, consumer_results = ps.function(proxybase.consumer_main, backend, messages)
    consumer_results.get(timeout=30)
    cpu0 = procs.cpu_seconds(proxy.pid)  # type: ignore[arg-type]
    _, producer_results = ps.function(proxybase.producer_main, frontend, messages, rate)
    wall = consumer_results.get(timeout=60 + messages / 5000)
    cpu1 = procs.cpu_seconds(proxy.pid)  # type: ignore[arg-type]
    producer_results.get(timeout=30)
    proxy.kill()
    return ProxyRound(messages, cpu1 - cpu0, wall)


def summarise(section: Section, brokers: list[BrokerRound], proxies: list[ProxyRound]) -> None:
    rounds = Table(
        [
            "round",
            "chunks",
            "broker msgs in",
            "wall s",
            "chunks/s (wall)",
            "CPU s: broker",
            "fake workers",
            "clients",
            "proxy CPU s",
            "proxy msgs/s",
        ]
    )
    for i, (b, x) in enumerate(zip(brokers, proxies, strict=True), 1):
        rounds.add(
            i,
            b.chunks,
            b.inbound,
            fmt(b.wall),
            fmt(b.chunks / b.wall, 0),
            f"{b.cpu:.2f} ({100 * b.cpu / b.wall:.0f}% busy)",
            fmt(b.worker["cpu"]),
            fmt(b.client["cpu"]),
            f"{x.cpu:.2f} ({100 * x.cpu / x.wall:.0f}% busy)",
            fmt(x.messages / x.wall, 0),
        )
    chunks = sum(b.chunks for b in brokers)
    inbound = sum(b.inbound for b in brokers)
    broker_cpu, proxy_cpu = sum(b.cpu for b in brokers), sum(x.cpu for x in proxies)
    wall = sum(b.wall for b in brokers)
    us_broker, us_proxy = 1e6 * ratio(broker_cpu, inbound), 1e6 * ratio(proxy_cpu, sum(x.messages for x in proxies))
    per_core = ratio(chunks, broker_cpu)
    cpu_ratio = ratio(us_broker, us_proxy)
    lost = sum(b.client["lost_chunks"] + b.client["extra_chunks"] for b in brokers)
    errors = sum(b.client["errors"] + b.client["unfinished"] for b in brokers)
    table = Table(["measure", "qmesh broker", "zmq.proxy", "ratio", "goal"])
    table.add(
        "CPU us per routed message",
        fmt(us_broker),
        fmt(us_proxy),
        f"{fmt(cpu_ratio)}x",
        f"<= {GOAL_CPU_RATIO:g}x: {verdict(cpu_ratio <= GOAL_CPU_RATIO)}",
    )
    table.add(
        "chunks per CPU-second (one core)",
        fmt(per_core, 0),
        fmt(1e6 * ratio(1, us_proxy), 0),
        "-",
        f">= {GOAL_CHUNKS_PER_CORE:,}: {verdict(per_core >= GOAL_CHUNKS_PER_CORE)}",
    )
    table.add("chunks/s measured (wall, load generators on the same cores)", fmt(chunks / wall, 0), "-", "-", "-")
    table.add("lost or extra chunks / failed requests", f"{lost} / {errors}", "-", "-", "0 / 0")
    section.table("", table)
    section.table("rounds", rounds)
    warn_count = sum(b.warnings[0] for b in brokers)
    section.notes += [
        "a routed message is one the broker received (request, credit, chunk, final) and passed on; the proxy "
        "forwarded the same number of chunk-shaped messages at the same rate (the broker round's messages in / wall "
        "time). One core = chunks per second of broker CPU time.",
        "wall chunks/s is bounded by the fake workers and clients sharing the machine's cores with the broker.",
    ]
    if warn_count:
        section.notes.append(f"the broker logged {warn_count} warning(s), e.g. {brokers[0].warnings[1][:1]}")
    disconnects = sum(b.worker["disconnects"] for b in brokers)
    if disconnects:
        section.notes.append(f"fake workers were sent DISCONNECT {disconnects} time(s)")
    section.data = {
        "us_per_message_broker": us_broker,
        "us_per_message_proxy": us_proxy,
        "cpu_ratio": cpu_ratio,
        "chunks_per_cpu_second": per_core,
        "chunks_per_second_wall": chunks / wall,
        "chunks": chunks,
        "inbound": inbound,
        "lost_chunks": lost,
        "failed_requests": errors,
        "warnings": warn_count,
        "proxy_messages": sum(x.messages for x in proxies),
        "requests_ok": sum(b.client["ok"] for b in brokers),
    }


def compare(section: Section, ref: str, before: list[BrokerRound], after: list[BrokerRound]) -> None:
    """The working tree's broker against ``ref``'s, rounds interleaved (ref, working tree, proxy, ...)."""
    table = Table(["measure", f"broker @ {ref}", "broker (working tree)", "working tree / ref"])
    us = [1e6 * ratio(sum(b.cpu for b in rs), sum(b.inbound for b in rs)) for rs in (before, after)]
    per_core = [ratio(sum(b.chunks for b in rs), sum(b.cpu for b in rs)) for rs in (before, after)]
    wall = [ratio(sum(b.chunks for b in rs), sum(b.wall for b in rs)) for rs in (before, after)]
    table.add("CPU us per routed message", fmt(us[0]), fmt(us[1]), fmt(ratio(us[1], us[0]), 3))
    table.add(
        "chunks per CPU-second", fmt(per_core[0], 0), fmt(per_core[1], 0), fmt(ratio(per_core[1], per_core[0]), 3)
    )
    table.add("chunks/s (wall)", fmt(wall[0], 0), fmt(wall[1], 0), fmt(ratio(wall[1], wall[0]), 3))
    lost = sum(b.client["lost_chunks"] + b.client["errors"] + b.client["unfinished"] for b in before)
    table.add("lost chunks + failed requests", lost, section.data["lost_chunks"] + section.data["failed_requests"], "-")
    section.table(f"before/after: the broker of {ref} against the working tree's", table)
    section.data["ref"] = {"ref": ref, "us_per_message": us[0], "chunks_per_cpu_second": per_core[0]}
