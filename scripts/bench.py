"""``scripts/bench``: QMesh's benchmarks. Each prints a table and appends a dated section to docs/BENCHMARKS.md.

scripts/bench overhead   # the same streaming load straight to llama-server and through the mesh
scripts/bench capacity   # broker CPU per message against zmq.proxy, per plain MDP request against majortomo
scripts/bench scale      # 1,000 simulated workers, 2,000 paced streams: added inter-token latency
scripts/bench slots      # tokens/s of one worker with 1, 2, 4 slots and of two 1-slot workers
scripts/bench seed       # the seed project's table: load time, tokens/s, memory, mesh overhead
scripts/bench prefix     # cache-aware against least-loaded routing: multi-turn chats, a shared system prompt
scripts/bench pull       # the default model pulled through the broker (MB/s), and a token stream's ITL meanwhile
scripts/bench failover   # a broker pair's active broker killed under a stream, 20 times: how long the stream stops
scripts/bench split      # unsplit and split over 2 shard hosts, by direct RPC and through the CURVE bridge
scripts/bench all --quick
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from benchkit import capacity, failover, overhead, prefix, pull, scale, seed, slots, split
from benchkit.procs import OtherLoad
from benchkit.report import DEFAULT_RECORD, command_line, publish

BENCHMARKS = {
    "overhead": overhead,
    "capacity": capacity,
    "scale": scale,
    "slots": slots,
    "seed": seed,
    "prefix": prefix,
    "pull": pull,
    "failover": failover,
    "split": split,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="benchmark", required=True)
    for name, module in [*BENCHMARKS.items(), ("all", None)]:
        doc = (module.__doc__ or "").split("\n")[0].split(": ", 1)[-1] if module else "every benchmark in turn"
        command = sub.add_parser(name, help=doc, description=doc)
        command.add_argument("--quick", action="store_true", help="short settings, for a first look")
        command.add_argument("--record", type=Path, default=DEFAULT_RECORD, help="markdown file to append to")
        command.add_argument("--no-record", action="store_true", help="print only; append nothing")
        command.add_argument("--json", type=Path, default=None, help="also write the raw figures to this file")
        if module is not None:
            module.add_arguments(command)
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    # Ctrl-C or SIGTERM unwind the benchmark, which stops every process it started (even when a shell started
    # it in the background with SIGINT ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = parser().parse_args(argv)
    record = None if args.no_record else args.record
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    for name in names:
        module = BENCHMARKS[name]
        if args.benchmark == "all":  # each benchmark's own defaults, then --quick
            defaults = argparse.ArgumentParser()
            module.add_arguments(defaults)
            options = defaults.parse_args([])
        else:
            options = args
        if args.quick:
            module.quick(options)
        other = OtherLoad()
        section = module.run(options, command_line(argv))
        section.other_load = other.cores()
        publish(section, record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
