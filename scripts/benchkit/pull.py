"""``pull``: models through the broker: the default model (98 MB) pulled from the broker's store and from a worker,
end to end with verification, against raw figures measured in the same run (sha256 of the file; a direct ZeroMQ
transfer on loopback, with no broker); then a token stream's inter-token latency while pulls run from the very worker
that streams, against the same stream without them, interleaved (ABBA).

Pulls run in a spawned process of their own (``common.pull.pull_model``, what ``qmesh-models pull`` and a worker
run), into a fresh folder each time; the broker and the worker are the real CLIs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from qmesh.broker.transfers import TransferConfig
from qmesh.client.sdk import QMeshClient
from qmesh.testing import free_endpoint, wait_for, wait_for_workers
from qmesh.worker.models import resolve_model

from . import procs, rig
from .report import Section, Table
from .stats import LoadResult, fmt, median, percentile, verdict
from .streamload import MeshLoad, prompts

GOAL_MB_S = 200.0
GOAL_ITL_RATIO = 1.25
RAW_WINDOW = 8  # chunks in flight in the direct ZeroMQ transfer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pulls", type=int, default=5, help="timed pulls from each holder")
    parser.add_argument("--rounds", type=int, default=4, help="stream rounds per condition, interleaved ABBA")
    parser.add_argument("--streams", type=int, default=3, help="streams per round, one at a time")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument(
        "--transfer-rate-busy",
        type=float,
        default=TransferConfig().busy_rate / 1e6,
        help="the broker's --transfer-rate-busy (MB/s) in the stream rounds (default: the broker's default)",
    )


def quick(args: argparse.Namespace) -> None:
    args.pulls, args.rounds, args.streams, args.max_tokens = 2, 2, 2, 64


def run(args: argparse.Namespace, command: str) -> Section:
    section = Section("pull", command)
    model = resolve_model(rig.MODEL)
    size = model.path.stat().st_size
    defaults = TransferConfig()
    section.settings = {
        "model": f"{rig.MODEL} ({size / 1e6:.1f} MB)",
        "chunk": f"{defaults.chunk // 1024} KiB",
        "window": defaults.window,
        "--transfer-rate-busy": f"{args.transfer_rate_busy:g} MB/s",
        "timed pulls per holder": args.pulls,
        "stream rounds per condition": args.rounds,
        "streams per round": args.streams,
        "max_tokens": args.max_tokens,
    }
    raw = {"sha256 of the file": _hash_rate(model.path)}
    for chunk in (256 * 1024, 1024 * 1024):
        raw[f"direct ZeroMQ, {RAW_WINDOW} x {chunk // 1024} KiB in flight"] = _direct_rate(model.path, chunk, False)
    raw[f"direct ZeroMQ, {RAW_WINDOW} x 1024 KiB, written and verified"] = _direct_rate(model.path, 1024 * 1024, True)
    print("pull: raw: " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in raw.items()), flush=True)

    with procs.Processes() as ps:
        store = ps.log_dir / "store"
        store.mkdir()
        os.link(model.path, store / f"{rig.MODEL}.gguf")
        store_endpoint, worker_endpoint = free_endpoint(), free_endpoint()
        store_broker = ps.broker(store_endpoint, "--models-dir", str(store))
        worker_broker = ps.broker(worker_endpoint, "--transfer-rate-busy", str(args.transfer_rate_busy))
        worker = ps.worker(worker_endpoint, *rig.worker_args(1, rig.default_cpu_threads()))
        wait_for_workers(worker_endpoint, rig.MODEL, 1, 180, watch=[store_broker, worker_broker, worker])
        with QMeshClient(store_endpoint, connect_timeout=30) as client:
            wait_for(lambda: client.model_files(), 60, "the store broker to list its model")
        holders = {"the broker's store": store_endpoint, "a worker (idle)": worker_endpoint}
        pull_rates: dict[str, list[float]] = {}  # MB/s of each timed pull, by holder
        for label, endpoint in holders.items():
            runs = _pulls(ps, endpoint, args.pulls + 1)[1:]  # the first warms the page cache
            pull_rates[label] = [size / run["seconds"] / 1e6 for run in runs]
            print(f"pull: from {label}: {', '.join(f'{r:.0f}' for r in pull_rates[label])} MB/s", flush=True)
        alone, during = _itl_rounds(ps, worker_endpoint, args)

    table = Table(["path", "MB/s (median)", "MB/s (best)", "runs"])
    for label, rate in raw.items():
        table.add(label, fmt(rate, 0), "", "best of 3")
    for label, rates in pull_rates.items():
        label = f"pull through the broker from {label}, verified"
        table.add(label, fmt(median(rates), 0), fmt(max(rates), 0), len(rates))
    section.table("Throughput (end to end: FETCH to a verified file renamed into place)", table)

    columns = ["condition", "streams", "tokens", "ITL p50 ms", "ITL p99 ms", "tokens/s", "pulled MB", "pull MB/s"]
    itl = Table([*columns, "other programs' cores"])
    for label, condition in (("stream alone", alone), ("stream + pulls from its worker", during)):
        result = condition.result
        itl.add(
            label,
            len(result.records),
            result.tokens,
            fmt(percentile(result.itls_ms(), 50)),
            fmt(percentile(result.itls_ms(), 99)),
            fmt(result.tokens_per_s(), 1),
            f"{condition.moved / 1e6:.0f}" if condition.moved else "-",
            f"{condition.moved / condition.pulling / 1e6:.0f}" if condition.pulling else "-",
            f"{median(condition.other):.2f} (max {max(condition.other):.2f})",
        )
    section.table("A token stream while pulls run from the worker that streams (rounds in ABBA order)", itl)

    worker_rates, store_rates = pull_rates["a worker (idle)"], pull_rates["the broker's store"]
    ratio = percentile(during.result.itls_ms(), 99) / percentile(alone.result.itls_ms(), 99)
    # Rounds side by side in ABBA order, compared pair by pair: what other programs did to one round they did to the
    # round next to it, so the median of these ratios is the steadier figure on a shared machine.
    paired = median([b / a for a, b in zip(alone.round_p99s, during.round_p99s, strict=True)])
    section.notes.append(
        f"goal >= {GOAL_MB_S:.0f} MB/s end to end: from a worker {median(worker_rates):.0f} MB/s, from the store "
        f"{median(store_rates):.0f} MB/s (medians): "
        + verdict(min(median(worker_rates), median(store_rates)) >= GOAL_MB_S)
    )
    section.notes.append(
        f"goal ITL p99 x <= {GOAL_ITL_RATIO}: x {ratio:.2f} with pulls running (pooled), x {paired:.2f} round by "
        f"round (median of {len(alone.round_p99s)} neighbouring pairs): "
        + verdict(max(ratio, paired) <= GOAL_ITL_RATIO)
    )
    section.data = {
        "raw_mb_s": raw,
        "pull_mb_s": pull_rates,
        "itl_p99_ms": {"alone": alone.round_p99s, "with_pulls": during.round_p99s},
        "itl_p99_ratio": ratio,
        "itl_p99_paired_ratio": paired,
    }
    return section


@dataclass
class Condition:
    """The streams of one condition (alone, or with pulls) over its rounds."""

    result: LoadResult = field(default_factory=LoadResult)
    round_p99s: list[float] = field(default_factory=list)  # ITL p99 of each round, in order
    other: list[float] = field(default_factory=list)  # cores other programs used during each round
    moved: int = 0  # bytes the pulls moved meanwhile
    pulling: float = 0.0  # seconds the pulls took


def _itl_rounds(ps: procs.Processes, endpoint: str, args: argparse.Namespace) -> tuple[Condition, Condition]:
    """Rounds of one stream at a time, without and with pulls looping from the streaming worker, in ABBA order (each
    condition as often first as second, so a drift of the machine's speed favours neither)."""
    alone, during = Condition(), Condition()
    load = MeshLoad(endpoint, rig.MODEL, 1, chat=True)
    offset = 0
    try:
        load.run(prompts(1, offset=50_000), 16)  # warm up
        for with_pulls in ([False, True, True, False] * args.rounds)[: 2 * args.rounds]:
            texts = prompts(args.streams, offset)
            offset += len(texts)
            condition = during if with_pulls else alone
            if with_pulls:
                stop = procs.SPAWN.Event()
                _, results = ps.function(_pull_loop, endpoint, str(ps.log_dir / "pulls"), stop)
                results.get(timeout=60)  # the puller is connected and pulling
            other = procs.OtherLoad()
            result = load.run(texts, args.max_tokens)
            condition.other.append(other.cores())
            condition.result.extend(result)
            condition.round_p99s.append(percentile(result.itls_ms(), 99))
            if with_pulls:
                stop.set()
                runs = results.get(timeout=120)  # after the pull under way ends: the next round is alone
                condition.moved += sum(run["received"] for run in runs)
                condition.pulling += sum(run["seconds"] for run in runs)
            print(
                f"pull: round {'with pulls' if with_pulls else 'alone'}: ITL p99 {condition.round_p99s[-1]:.1f} ms",
                flush=True,
            )
    finally:
        load.close()
    return alone, during


def _pulls(ps: procs.Processes, endpoint: str, count: int) -> list[dict[str, Any]]:
    _, results = ps.function(_pull_times, endpoint, str(ps.log_dir / "pulls"), count)
    return results.get(timeout=600)


def _pull_times(endpoint: str, folder: str, count: int, results: Any) -> None:
    """Process entry point: ``count`` pulls into fresh folders; their figures on ``results``."""
    results.put([_one_pull(endpoint, Path(folder) / f"{index}") for index in range(count)])


def _pull_loop(endpoint: str, folder: str, stop: Any, results: Any) -> None:
    """Process entry point: pull again and again until ``stop``; the figures of the pulls that ended on ``results``."""
    results.put("started")
    runs, index = [], 0
    while not stop.is_set():
        index += 1
        runs.append(_one_pull(endpoint, Path(folder) / f"loop-{index}"))
    results.put(runs)


def _one_pull(endpoint: str, folder: Path) -> dict[str, Any]:
    from qmesh.common.pull import pull_model  # in the spawned process

    result = pull_model(rig.MODEL, folder, endpoint)
    shutil.rmtree(folder)
    return {"seconds": result.seconds, "received": result.received}


def _hash_rate(path: Path) -> float:
    """MB/s of sha256 over the file, read from the page cache (best of 3)."""
    from qmesh.common.modelfiles import sha256_of

    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sha256_of(path)
        best = min(best, time.perf_counter() - start)
    return path.stat().st_size / best / 1e6


def _direct_rate(path: Path, chunk: int, verify: bool) -> float:
    """MB/s of a plain ZeroMQ transfer on loopback (best of 3): a ROUTER thread reads chunks with pread for a DEALER
    that keeps ``RAW_WINDOW`` asked for; with ``verify`` the DEALER also writes them to a file and hashes them, as a
    pull does. No broker, no protocol: what the machine can do."""
    size = path.stat().st_size
    context = zmq.Context.instance()
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                if not server.poll(100):
                    continue
                identity, offset, length = server.recv_multipart()
                data = os.pread(descriptor, int.from_bytes(length, "big"), int.from_bytes(offset, "big"))
                server.send_multipart([identity, offset, data], copy=False)
        finally:
            os.close(descriptor)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{port}")
    best = float("inf")
    try:
        for _ in range(3):
            with tempfile.TemporaryFile() as sink:
                hasher = hashlib.sha256()
                start = time.perf_counter()
                asked = got = 0
                while got < size:
                    while asked < size and asked - got < RAW_WINDOW * chunk:
                        length = min(chunk, size - asked)
                        client.send_multipart([asked.to_bytes(8, "big"), length.to_bytes(4, "big")])
                        asked += length
                    _, data = client.recv_multipart()
                    got += len(data)
                    if verify:
                        sink.write(data)
                        hasher.update(data)
                best = min(best, time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
        client.close()
        server.close()
    return size / best / 1e6
