"""``failover``: a broker pair whose active broker dies under a token stream, again and again: how long the stream
stops (from the kill to the next token at the client), against the same stream's own gaps between tokens in the same
run, and whether each answer equals the uninterrupted one.

Two real brokers (``--ha primary`` and ``--ha backup``), one real worker with its llama-server, and an SDK client,
all with the default heartbeat settings unless told otherwise. Each round starts a stream at temperature 0, waits for
its first tokens, kills the active broker (``kill`` fault: SIGKILL, its connections close; ``stop`` fault: SIGSTOP, a
frozen machine that closes nothing, found only by missed heartbeats), lets the stream finish on the other broker, then
restarts the dead one, which comes back passive: the next round kills the other.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable

from qmesh.broker.core import BrokerConfig
from qmesh.client.sdk import QMeshClient, Request
from qmesh.testing import Child, wait_for, wait_for_workers
from qmesh.testing.pair import ROLES, BrokerPair

from . import procs, rig
from .report import Section, Table
from .stats import fmt, median, percentile, verdict

DEFAULT_HEARTBEAT_MS = BrokerConfig().heartbeat_interval * 1000
LIVENESS = BrokerConfig().liveness
GOAL_RESUME_S = 3.0  # issue 15: the stream resumes within 3 s of the active broker's death (default heartbeats)
PROMPT = "Write a very long story about a lighthouse keeper and a storm, in many chapters."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=20, help="active brokers killed, one per stream")
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill", help="SIGKILL, or SIGSTOP (a freeze)")
    parser.add_argument("--tokens-before", type=int, default=10, help="tokens a stream has when its broker dies")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per stream")
    parser.add_argument("--heartbeat-ms", type=int, default=None, help="of brokers and worker (default: theirs)")


def quick(args: argparse.Namespace) -> None:
    args.kills = 4


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("failover", command)
    heartbeat = [] if args.heartbeat_ms is None else ["--heartbeat-ms", str(args.heartbeat_ms)]  # the worker's
    section.settings = {
        "kills": args.kills,
        "fault": args.fault,
        "tokens before the kill": args.tokens_before,
        "max_tokens": args.max_tokens,
        "heartbeat": f"{args.heartbeat_ms} ms" if args.heartbeat_ms else f"default ({DEFAULT_HEARTBEAT_MS:g} ms)",
    }
    resumes: list[float] = []
    gaps: list[float] = []  # between tokens, away from the seams: the stream's own pace
    exact = complete = 0
    with procs.Processes() as processes:
        pair = BrokerPair(
            processes.log_dir, args.heartbeat_ms, launch=lambda role, argv, _: processes.child(role, argv)
        )
        for role in ROLES:
            pair.start(role)
        processes.worker(pair.address, *rig.worker_args(slots=1, cpu_threads=rig.default_cpu_threads()), *heartbeat)
        interval = (args.heartbeat_ms or DEFAULT_HEARTBEAT_MS) / 1000
        with QMeshClient(pair.address, timeout=300, connect_timeout=10, liveness=interval * LIVENESS) as client:
            wait_for_workers(pair.endpoints["primary"], rig.MODEL, 1, 120)
            reference = client.submit(PROMPT, model=rig.MODEL, max_tokens=args.max_tokens, temperature=0).result()
            if not reference.ok:
                raise RuntimeError(f"the reference stream failed: {reference.error}")
            for round_number in range(args.kills):
                victim = wait_for(pair.active, 30, "an active broker")
                stream = client.submit(PROMPT, model=rig.MODEL, max_tokens=args.max_tokens, temperature=0)
                arrivals = _follow(client, stream, lambda s: len(s.chunks) >= args.tokens_before)
                killed_at = time.monotonic()
                os.kill(pair.brokers[victim].pid, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
                after = _follow(client, stream, lambda s: s.done)
                result = stream.result()
                if args.fault == "stop":
                    pair.brokers[victim].kill()
                if result.ok and result.tokens == reference.tokens:
                    complete += 1
                    exact += result.text == reference.text
                if after:
                    resumes.append(after[0] - killed_at)
                gaps += _gaps(arrivals) + _gaps(after)
                print(
                    f"round {round_number + 1}/{args.kills}: {'killed' if args.fault == 'kill' else 'froze'} the "
                    f"{victim}, the stream resumed after "
                    f"{fmt(resumes[-1] if after else None)} s; {result.tokens} tokens, "
                    f"{'equal to' if result.text == reference.text else 'NOT equal to'} the uninterrupted answer",
                    flush=True,
                )
                _wait_passive(pair.start(victim), victim)
    table = Table(["", "p50", "p90", "max", "per inter-token gap (p50)"])
    pace = median(gaps) if gaps else float("nan")
    for label, values in (("stream stopped for (s)", resumes), ("inter-token gap (s)", gaps)):
        if values:
            table.add(
                label,
                fmt(percentile(values, 50), 3),
                fmt(percentile(values, 90), 3),
                fmt(max(values), 3),
                fmt(percentile(values, 50) / pace, 1) + "x",
            )
    section.table(f"{args.fault} the active broker mid-stream, {args.kills} times", table)
    if args.fault == "kill":
        met = verdict(bool(resumes) and max(resumes) <= GOAL_RESUME_S)
        section.notes.append(
            f"goal (the stream resumes within {GOAL_RESUME_S:g} s of the active broker's death, p50 and max): {met}"
        )
    else:  # nothing closes: the worker, the client and the backup each wait out the heartbeats they miss
        section.notes.append(
            f"a frozen broker is noticed by missed heartbeats: interval x liveness = {interval * LIVENESS:g} s (the "
            "SDK client's liveness, the silence it tolerates while requests wait, set to the same)"
        )
    section.notes.append(
        f"{complete}/{args.kills} answers complete ({reference.tokens} tokens), {exact}/{args.kills} equal to the "
        "uninterrupted answer token for token"
    )
    section.data = {"resume_s": resumes, "gap_s": gaps, "complete": complete, "exact": exact}
    return section


def _wait_passive(broker: Child, role: str) -> None:
    """A restarted broker has heard the active one and calls itself passive: the next round can kill the other."""
    wait_for(lambda: "is passive" in broker.log(), 30, f"the restarted {role} to be passive")


def _follow(client: QMeshClient, stream: Request, until: Callable[[Request], bool]) -> list[float]:
    """The arrival time of each chunk of ``stream`` from now until ``until(stream)`` holds."""
    arrivals, seen = [], len(stream.chunks)
    deadline = time.monotonic() + 300
    while not until(stream):
        if time.monotonic() > deadline:
            raise RuntimeError("a stream stalled for 300 s")
        client.poll(0.01)
        now = time.monotonic()
        arrivals += [now] * (len(stream.chunks) - seen)
        seen = len(stream.chunks)
    return arrivals


def _gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > a]
