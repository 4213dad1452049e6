"""``split``: what spreading a model over shard hosts costs: tokens/s and TTFT of the default model unsplit, split
over 2 shard hosts with direct RPC, and split over 2 shard hosts through the CURVE bridge, on loopback.

Three meshes run side by side, each model under its own service: a plain broker with an unsplit worker and a split
worker over two plain shard hosts (rpc-server on loopback, reached directly), and a CURVE broker with a split worker
over two keyed shard hosts (reached through the bridge). Every llama.cpp process gets the same CPU threads. Rounds
go configuration by configuration, in a rotating order, one stream at a time (a split model is a pipeline: one
stream is what it is for), so the three share the machine alike.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.testing import free_endpoint, qmesh_command, wait_for_workers
from qmesh.worker.models import resolve_model
from qmesh.worker.split import memory_needed

from . import procs, rig
from .report import Section, Table
from .stats import LoadResult, fmt, median, percentile
from .streamload import MeshLoad, prompts


@dataclass
class Config:
    service: str
    label: str
    result: LoadResult = field(default_factory=LoadResult)

    def rate(self) -> float:
        return median(self.result.stream_decode_rates())

    def ttft(self) -> float:
        return percentile(self.result.ttfts_ms(), 50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the three configurations")
    parser.add_argument("--requests", type=int, default=4, help="requests per configuration per round, one at a time")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every llama-server and rpc-server")


def quick(args: argparse.Namespace) -> None:
    args.rounds, args.requests, args.max_tokens = 1, 2, 48


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("split", command)
    model = resolve_model(rig.MODEL)
    need = memory_needed(model.path, rig.CTX_PER_SLOT)
    host_mib = need // 2 + 1  # each host holds about half: auto would also take two
    section.settings = {
        "model": rig.MODEL,
        "rounds": args.rounds,
        "requests/config/round": args.requests,
        "max_tokens": args.max_tokens,
        "threads per llama.cpp process": args.threads,
        "shard hosts": f"2 x {host_mib} MiB (the model needs {need} MiB)",
        "sampling": "greedy, raw prompt, one stream at a time",
    }
    configs = [
        Config("bench-whole", "unsplit"),
        Config("bench-split-rpc", "split over 2 hosts, direct RPC"),
        Config("bench-split-curve", "split over 2 hosts, CURVE bridge"),
    ]
    keys_dir = Path(tempfile.mkdtemp(prefix="qmesh-bench-split-"))
    try:
        with procs.Processes() as ps:
            client_keys = _keys(keys_dir)
            plain, secure = free_endpoint(), free_endpoint()
            threads = str(args.threads)
            watch = [
                ps.broker(plain, name="broker"),
                ps.broker(
                    secure,
                    *("--curve-secret", str(keys_dir / "broker.key_secret")),
                    *("--allow-workers", str(keys_dir / "workers"), "--allow-clients", str(keys_dir / "clients")),
                    name="broker-curve",
                ),
            ]
            worker = rig.worker_args(1, args.threads)
            keyed = ["--broker-key", str(keys_dir / "broker.key")]
            for i in range(2):
                shard = ["--memory", str(host_mib), "--threads", threads, "--log-level", "warning"]
                watch.append(ps.child(f"shard-{i}", qmesh_command("qmesh-shard", "--broker", plain, *shard)))
                secret = ["--curve-secret", str(keys_dir / f"shard-{i}.key_secret"), *keyed]
                watch.append(
                    ps.child(f"shard-curve-{i}", qmesh_command("qmesh-shard", "--broker", secure, *shard, *secret))
                )
            watch.append(ps.worker(plain, *worker, "--name", "bench-whole", name="worker"))
            watch.append(ps.worker(plain, *worker, "--name", "bench-split-rpc", "--shards", "2", name="split-rpc"))
            secret = ["--curve-secret", str(keys_dir / "worker.key_secret"), *keyed]
            split_curve = ["--name", "bench-split-curve", "--shards", "2", *secret]
            watch.append(ps.worker(secure, *worker, *split_curve, name="split-curve"))
            where = {c.service: (plain, None) for c in configs} | {"bench-split-curve": (secure, client_keys)}
            for config in configs:
                endpoint, curve = where[config.service]
                wait_for_workers(endpoint, config.service, 1, 240, watch=watch, curve=curve)
            loads = {c.service: MeshLoad(where[c.service][0], c.service, 1, curve=where[c.service][1]) for c in configs}
            offset = 0
            try:
                for load in loads.values():
                    load.run(prompts(1, offset=30_000), 8)  # warm up
                for round_ in range(args.rounds):
                    for config in configs[round_ % 3 :] + configs[: round_ % 3]:
                        texts = prompts(args.requests, offset)
                        offset += len(texts)
                        result = loads[config.service].run(texts, args.max_tokens)
                        config.result.extend(result)
                        rate = median(result.stream_decode_rates())
                        print(f"split: {config.label}: {rate:.1f} tok/s", flush=True)
            finally:
                for load in loads.values():
                    load.close()
    finally:
        shutil.rmtree(keys_dir, ignore_errors=True)
    whole = configs[0]
    table = Table(["configuration", "tok/s (median stream)", "vs unsplit", "TTFT p50 ms", "vs unsplit", "errors"])
    for config in configs:
        table.add(
            config.label,
            fmt(config.rate(), 1),
            f"{config.rate() / whole.rate() - 1:+.0%}",
            fmt(config.ttft(), 0),
            f"{config.ttft() / whole.ttft() - 1:+.0%}",
            config.result.errors,
        )
    section.table("", table)
    direct, bridged = configs[1], configs[2]
    section.notes.append(
        f"tokens/s against unsplit: {direct.rate() / whole.rate() - 1:+.0%} split over direct RPC, "
        f"{bridged.rate() / whole.rate() - 1:+.0%} through the CURVE bridge (the bridge against direct RPC: "
        f"{bridged.rate() / direct.rate() - 1:+.0%}); TTFT {direct.ttft() / whole.ttft() - 1:+.0%} and "
        f"{bridged.ttft() / whole.ttft() - 1:+.0%}"
    )
    section.data = {
        c.service: {"tokens_per_s": c.rate(), "ttft_ms": c.ttft(), "errors": c.result.errors} for c in configs
    }
    return section


def _keys(root: Path) -> CurveClientKeys:
    """A CURVE mesh's keys: the broker's, the split worker's and both shard hosts' on its worker list, a client's."""
    for folder in ("workers", "clients"):
        (root / folder).mkdir()
    generate_keys(root / "broker")
    for name, folder in (("worker", "workers"), ("shard-0", "workers"), ("shard-1", "workers"), ("client", "clients")):
        public, _ = generate_keys(root / name)
        shutil.copy(public, root / folder / public.name)
    return CurveClientKeys.load(root / "client.key_secret", root / "broker.key")
