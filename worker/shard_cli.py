"""``qmesh-shard``: offer this machine's memory to split workers (one llama.cpp rpc-server, registered with the
broker) until SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer

from qmesh.common.config import (
    broker_key_option,
    broker_option,
    client_keys_from_options,
    config_option,
    curve_secret_option,
    version_option,
)
from qmesh.common.endpoints import is_loopback_host
from qmesh.common.errors import ConfigError, QMeshError
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging
from qmesh.worker.binary import find_rpc_server
from qmesh.worker.shard import ShardHost, ShardSettings

app = typer.Typer(
    add_completion=False,
    help="A QMesh shard host: lends this machine's memory to workers whose model is bigger than one machine.",
)


@app.command()
def run(
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    memory: int = typer.Option(
        None,
        "--memory",
        envvar="QMESH_SHARD_MEMORY",
        min=1,
        help="MiB to offer (default: what the device has free when rpc-server starts).",
    ),
    threads: int = typer.Option(
        None, "--threads", envvar="QMESH_SHARD_THREADS", min=1, help="rpc-server's CPU threads (default: every core)."
    ),
    gpu: bool = typer.Option(
        False, "--gpu", envvar="QMESH_SHARD_GPU", help="Compute on this machine's GPU instead of its CPU."
    ),
    bind: str = typer.Option(
        "tcp://127.0.0.1:*",
        "--bind",
        envvar="QMESH_SHARD_BIND",
        help="With keys: where the CURVE bridge to rpc-server listens (rpc-server itself stays on loopback).",
    ),
    rpc_host: str = typer.Option(
        "127.0.0.1",
        "--rpc-host",
        envvar="QMESH_SHARD_RPC_HOST",
        help="Without keys: the address rpc-server listens on; anything but loopback needs --insecure.",
    ),
    rpc_port: int = typer.Option(
        None, "--rpc-port", envvar="QMESH_SHARD_RPC_PORT", min=1, max=65535, help="rpc-server's port (default: free)."
    ),
    advertise: str = typer.Option(
        None,
        "--advertise",
        envvar="QMESH_SHARD_ADVERTISE",
        help="HOST:PORT split workers should connect to, when they reach this host another way (NAT, a proxy).",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        envvar="QMESH_INSECURE",
        help="Let rpc-server (no authentication, no encryption) listen beyond loopback without keys.",
    ),
    name: str = typer.Option(None, "--name", envvar="QMESH_SHARD_NAME", help="Name in the mesh (default: host/pid)."),
    rpc_server: str = typer.Option(
        None, "--rpc-server", envvar="QMESH_RPC_SERVER", help="Path of llama.cpp's rpc-server binary."
    ),
    heartbeat_ms: int = typer.Option(2500, "--heartbeat-ms", envvar="QMESH_HEARTBEAT_MS", min=10),
    liveness: int = typer.Option(3, "--liveness", envvar="QMESH_LIVENESS", min=1),
    log_level: LogLevel = log_level_option(),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("shard"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
        check_exposure(curve is not None, rpc_host, insecure)
        binary = find_rpc_server(rpc_server)
    except QMeshError as exc:
        typer.echo(f"qmesh-shard: {exc}", err=True)
        raise typer.Exit(2) from exc
    settings = ShardSettings(
        broker=broker,
        binary=binary,
        name=name or "",
        memory=memory,
        threads=threads or os.cpu_count() or 1,
        gpu=gpu,
        curve=curve,
        bridge_bind=bind,
        rpc_host=rpc_host,
        rpc_port=rpc_port,
        advertise=advertise,
        heartbeat_interval=heartbeat_ms / 1000,
        liveness=liveness,
    )
    host = ShardHost(settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: host.stop())
    host.start()
    while host.is_alive():
        host.join(0.2)
    if host.failure:
        typer.echo(f"qmesh-shard: {host.failure}", err=True)
        raise typer.Exit(1)


def check_exposure(curve: bool, rpc_host: str, insecure: bool) -> None:
    """llama.cpp's RPC protocol has no authentication and no encryption: rpc-server faces only loopback, unless
    the operator says ``--insecure`` (a private network they trust). With keys it is always on loopback, behind
    the CURVE bridge."""
    if is_loopback_host(rpc_host):
        return
    if curve:
        raise ConfigError(
            f"--rpc-host {rpc_host}: with keys rpc-server stays on loopback; --bind says where the CURVE bridge listens"
        )
    if not insecure:
        raise ConfigError(
            f"refusing to let rpc-server listen on {rpc_host} without keys: llama.cpp's RPC protocol has no "
            "authentication or encryption: anyone who reaches it could use this machine's memory and read what "
            "workers compute there. Give --curve-secret and --broker-key (the CURVE bridge), or --insecure."
        )


def main() -> None:
    app(prog_name="qmesh-shard")


if __name__ == "__main__":
    sys.exit(main())
