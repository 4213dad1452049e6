"""``qmesh-worker --model X``: N worker threads, each with its own llama-server, serving one model."""

from __future__ import annotations

import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path

import psutil
import typer

from qmesh.common import protocol as p
from qmesh.common.config import (
    broker_key_option,
    broker_option,
    client_keys_from_options,
    config_option,
    curve_secret_option,
    version_option,
)
from qmesh.common.errors import QMeshError
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging
from qmesh.common.modelfiles import default_digest_cache
from qmesh.worker.binary import find_llama_server
from qmesh.worker.identity import worker_id
from qmesh.worker.node import WorkerNode, WorkerSettings
from qmesh.worker.pull import find_or_pull
from qmesh.worker.split import SplitWorker

app = typer.Typer(add_completion=False, help="A QMesh worker: serves one model through the broker.")


class Pooling(str, Enum):
    """How an embeddings worker's llama-server makes one vector of a text's token vectors."""

    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@app.command()
def run(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        envvar="QMESH_WORKER_MODEL",
        help="GGUF path, or a short name from models/ ($QMESH_MODELS_DIR); a name found in neither is pulled "
        "through the mesh into the first models folder.",
    ),
    name: str = typer.Option(
        None, "--name", envvar="QMESH_WORKER_NAME", help="Service name to register (default: the model's short name)."
    ),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    threads: int = typer.Option(
        None,
        "--threads",
        envvar="QMESH_WORKER_THREADS",
        min=1,
        help="Worker threads, each with its own llama-server; 2 x 1 slot was fastest on 2 cores (bench slots). "
        "Default: 2, or 1 with --shards (each thread holds shard hosts of its own).",
    ),
    slots: int = typer.Option(
        1, "--slots", envvar="QMESH_WORKER_SLOTS", min=1, max=64, help="llama-server parallel slots per thread."
    ),
    ctx_size: int = typer.Option(2048, "--ctx-size", envvar="QMESH_CTX_SIZE", min=128, help="Context tokens per slot."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", envvar="QMESH_GPU_LAYERS", min=0, help="Layers to offload."),
    cache_ram: int = typer.Option(
        None,
        "--cache-ram",
        envvar="QMESH_CACHE_RAM",
        min=0,
        help="MiB of host memory per llama-server for prompts that left its slots, so a conversation that comes "
        "back is not evaluated again (default: a quarter of the memory available at start, shared by the "
        "threads, at most 8192; 0: none).",
    ),
    cpu_threads: int = typer.Option(
        None,
        "--cpu-threads",
        envvar="QMESH_CPU_THREADS",
        min=1,
        help="CPU threads per llama-server (default: cores / --threads).",
    ),
    llama_server: str = typer.Option(
        None, "--llama-server", envvar="QMESH_LLAMA_SERVER", help="Path of the llama-server binary."
    ),
    shards: str = typer.Option(
        None,
        "--shards",
        envvar="QMESH_WORKER_SHARDS",
        help="Spread the model's layers over N shard hosts of the mesh (qmesh-shard), or 'auto': as few as hold it "
        "(GGUF size plus context). Per worker thread.",
    ),
    embeddings: bool = typer.Option(
        False,
        "--embeddings",
        envvar="QMESH_EMBEDDINGS",
        help="Serve embeddings (/v1/embeddings, QMeshClient.embed) instead of chat: llama-server in embedding mode.",
    ),
    pooling: Pooling = typer.Option(
        None,
        "--pooling",
        envvar="QMESH_POOLING",
        help="With --embeddings: how a text's token vectors become one vector (default: mean).",
    ),
    heartbeat_ms: int = typer.Option(2500, "--heartbeat-ms", envvar="QMESH_HEARTBEAT_MS", min=10),
    liveness: int = typer.Option(3, "--liveness", envvar="QMESH_LIVENESS", min=1),
    grace: float = typer.Option(
        30.0, "--grace", envvar="QMESH_WORKER_GRACE", min=0.0, help="Seconds to finish requests on shutdown."
    ),
    pause_after: float = typer.Option(
        1.0,
        "--pause-after",
        envvar="QMESH_PAUSE_AFTER",
        min=0.0,
        help="Seconds without the client's credit before llama-server is paused.",
    ),
    stall_timeout: float = typer.Option(
        60.0,
        "--stall-timeout",
        envvar="QMESH_STALL_TIMEOUT",
        min=0.1,
        help="Seconds a stream may wait for a client that reads nothing before it is cancelled.",
    ),
    no_pull: bool = typer.Option(
        False,
        "--no-pull",
        envvar="QMESH_NO_PULL",
        help="A model missing from the models folders is an error, instead of being pulled through the mesh.",
    ),
    log_level: LogLevel = log_level_option(),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("worker"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    shard_count = _shard_count(shards) if shards is not None else None
    if threads is None:
        threads = 2 if shard_count is None else 1
    if pooling is not None and not embeddings:
        typer.echo("qmesh-worker: --pooling applies to an embeddings worker: add --embeddings", err=True)
        raise typer.Exit(2)
    try:
        binary = find_llama_server(llama_server)
        curve = client_keys_from_options(curve_secret, broker_key, broker)
        model_file = find_or_pull(model, broker, default_digest_cache(), curve=curve, pull=not no_pull)
    except QMeshError as exc:
        typer.echo(f"qmesh-worker: {exc}", err=True)
        raise typer.Exit(2) from exc
    settings = WorkerSettings(
        broker=broker,
        model=model_file,
        service=name or model_file.name,
        binary=binary,
        slots=slots,
        ctx_size=ctx_size,
        gpu_layers=gpu_layers,
        cpu_threads=cpu_threads or max(1, (os.cpu_count() or 1) // threads),
        # An embedding reuses no earlier prompt: an embeddings worker keeps no prompt cache unless asked to.
        cache_ram=(0 if embeddings else default_cache_ram(threads)) if cache_ram is None else cache_ram,
        heartbeat_interval=heartbeat_ms / 1000,
        liveness=liveness,
        grace=grace,
        pause_after=pause_after,
        stall_timeout=stall_timeout,
        worker_id=worker_id(),
        curve=curve,
        embeddings=embeddings,
        pooling=(pooling or Pooling.MEAN).value,
    )
    nodes: list[WorkerNode | SplitWorker] = [
        WorkerNode(settings, index) if shard_count is None else SplitWorker(settings, index, shard_count)
        for index in range(threads)
    ]

    def request_stop(*_: object) -> None:
        for node in nodes:
            node.stop()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for node in nodes:
        node.start()
    while any(node.is_alive() for node in nodes):
        time.sleep(0.2)
    failures = [node.failure for node in nodes if node.failure]
    for failure in failures:
        typer.echo(f"qmesh-worker: {failure}", err=True)
    raise typer.Exit(1 if failures else 0)


def _shard_count(value: str) -> int:
    """--shards: a number of hosts, or 'auto' (0: as few as fit)."""
    if value.strip().lower() == "auto":
        return 0
    if not value.strip().isdigit() or not 1 <= int(value) <= p.MAX_SHARDS:
        raise typer.BadParameter(f"a number of shard hosts from 1 to {p.MAX_SHARDS}, or 'auto'", param_hint="--shards")
    return int(value)


def default_cache_ram(threads: int) -> int:
    """What the machine can spare for prompt caches: a quarter of the memory available now, split between the
    worker's llama-servers, at most llama-server's own default (8192 MiB) each. llama-server takes it as used."""
    spare = psutil.virtual_memory().available // 4 // 2**20
    return min(8192, spare // threads)


def main() -> None:
    app(prog_name="qmesh-worker")


if __name__ == "__main__":
    sys.exit(main())
