"""``qmesh-broker``: run the broker in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import enum
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

import typer

from qmesh.broker.core import BrokerConfig
from qmesh.broker.loop import Broker, PairSettings
from qmesh.broker.models_store import ModelStore
from qmesh.broker.pair import Role
from qmesh.broker.routing import POLICIES, RoutingConfig
from qmesh.broker.security import BrokerSecurity, is_loopback
from qmesh.broker.transfers import TransferConfig
from qmesh.common.config import config_option, version_option
from qmesh.common.errors import ConfigError, QMeshError
from qmesh.common.keys import load_public_key
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging
from qmesh.common.modelfiles import default_digest_cache

DEFAULT_BIND = "tcp://127.0.0.1:5555"

DEFAULT_ROUTING = RoutingConfig()
DEFAULT_TRANSFERS = TransferConfig()
Routing = enum.Enum("Routing", {name.replace("-", "_"): name for name in POLICIES}, type=str)  # --routing's choices

HaRole = enum.Enum("HaRole", {role.value: role.value for role in Role}, type=str)  # --ha's choices

app = typer.Typer(add_completion=False, help="The QMesh broker: routes prompts from clients to workers (MDP/0.2).")


@app.command()
def run(
    bind: str = typer.Option(DEFAULT_BIND, "--bind", envvar="QMESH_BROKER_BIND", help="ZeroMQ endpoint to bind."),
    heartbeat_ms: int = typer.Option(
        2500, "--heartbeat-ms", envvar="QMESH_HEARTBEAT_MS", min=10, help="Heartbeat interval to workers."
    ),
    liveness: int = typer.Option(
        3, "--liveness", envvar="QMESH_LIVENESS", min=1, help="Heartbeats a worker may miss before it is dead."
    ),
    max_queue: int = typer.Option(
        1000, "--max-queue", envvar="QMESH_MAX_QUEUE", min=0, help="Waiting requests per model before 503."
    ),
    queue_timeout: float = typer.Option(
        60.0, "--queue-timeout", envvar="QMESH_QUEUE_TIMEOUT", min=0.0, help="Seconds a request may wait (then 504)."
    ),
    max_client_requests: int = typer.Option(
        256,
        "--max-client-requests",
        envvar="QMESH_MAX_CLIENT_REQUESTS",
        min=1,
        help="Requests in flight per client connection (then 429); a gateway is one connection for all its users.",
    ),
    max_failovers: int = typer.Option(
        2, "--max-failovers", envvar="QMESH_MAX_FAILOVERS", min=0, help="Times a stream may move to another worker."
    ),
    max_request_bytes: int = typer.Option(
        1024 * 1024, "--max-request-bytes", envvar="QMESH_MAX_REQUEST_BYTES", min=1024, help="Request size limit (413)."
    ),
    routing: Routing = typer.Option(
        Routing.cache_aware,
        "--routing",
        envvar="QMESH_ROUTING",
        help="Where a request runs: on the llama-server that holds the longest prefix of its conversation unless "
        "load is imbalanced (cache-aware), or on the least loaded (least-loaded).",
    ),
    balance_abs_threshold: float = typer.Option(
        DEFAULT_ROUTING.balance_abs_threshold,
        "--balance-abs-threshold",
        envvar="QMESH_BALANCE_ABS_THRESHOLD",
        min=0.0,
        help="cache-aware: load is imbalanced when the best match runs or awaits more than this many requests "
        "more than the least loaded free worker ...",
    ),
    balance_rel_threshold: float = typer.Option(
        DEFAULT_ROUTING.balance_rel_threshold,
        "--balance-rel-threshold",
        envvar="QMESH_BALANCE_REL_THRESHOLD",
        min=1.0,
        help="... and more than this many times as many; then the least loaded gets the request.",
    ),
    cache_threshold: float = typer.Option(
        DEFAULT_ROUTING.cache_threshold,
        "--cache-threshold",
        envvar="QMESH_CACHE_THRESHOLD",
        min=0.0,
        max=1.0,
        help="cache-aware: the share of a request's prefix a worker must hold to be preferred.",
    ),
    ha: HaRole = typer.Option(
        None,
        "--ha",
        envvar="QMESH_HA",
        help="Run as the primary or the backup of a broker pair (with --ha-bind and --ha-peer): one serves, the "
        "other takes over when it dies. Workers and clients list both: --broker tcp://A:5555,tcp://B:5556.",
    ),
    ha_bind: str = typer.Option(
        None, "--ha-bind", envvar="QMESH_HA_BIND", help="Where this broker of a pair publishes its state to its peer."
    ),
    ha_peer: str = typer.Option(
        None, "--ha-peer", envvar="QMESH_HA_PEER", help="The peer broker's --ha-bind endpoint."
    ),
    ha_peer_key: Path = typer.Option(
        None,
        "--ha-peer-key",
        envvar="QMESH_HA_PEER_KEY",
        help="With CURVE: the peer broker's public key file (the one key its HA link admits, and proves).",
    ),
    curve_secret: Path = typer.Option(
        None, "--curve-secret", envvar="QMESH_CURVE_SECRET", help="The broker's key pair (NAME.key_secret): CURVE on."
    ),
    allow_workers: Path = typer.Option(
        None, "--allow-workers", envvar="QMESH_ALLOW_WORKERS", help="Directory of worker public keys (NAME.key)."
    ),
    allow_clients: Path = typer.Option(
        None, "--allow-clients", envvar="QMESH_ALLOW_CLIENTS", help="Directory of client public keys (NAME.key)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", envvar="QMESH_INSECURE", help="Allow a non-loopback --bind without CURVE."
    ),
    metrics_port: int = typer.Option(
        0,
        "--metrics-port",
        envvar="QMESH_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve Prometheus metrics on this TCP port (0: no metrics).",
    ),
    metrics_host: str = typer.Option(
        "127.0.0.1", "--metrics-host", envvar="QMESH_METRICS_HOST", help="Address the metrics port listens on."
    ),
    models_dir: Path = typer.Option(
        None,
        "--models-dir",
        envvar="QMESH_BROKER_MODELS_DIR",
        help="A folder of NAME.gguf files that workers may pull through the broker, and that qmesh-models push "
        "fills (none: the broker keeps no models).",
    ),
    transfer_rate: float = typer.Option(
        DEFAULT_TRANSFERS.rate / 1e6,
        "--transfer-rate",
        envvar="QMESH_TRANSFER_RATE",
        min=0.0,
        help="MB/s that model transfers may take together (0: no cap).",
    ),
    transfer_rate_busy: float = typer.Option(
        DEFAULT_TRANSFERS.busy_rate / 1e6,
        "--transfer-rate-busy",
        envvar="QMESH_TRANSFER_RATE_BUSY",
        min=0.0,
        help="MB/s that model transfers may take while requests are in flight, so that token streams keep their "
        "pace (0: no cap).",
    ),
    log_level: LogLevel = log_level_option(),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("broker"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    settings = BrokerConfig(
        heartbeat_interval=heartbeat_ms / 1000,
        liveness=liveness,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        max_client_requests=max_client_requests,
        max_failovers=max_failovers,
        max_request_bytes=max_request_bytes,
        routing=RoutingConfig(routing.value, balance_abs_threshold, balance_rel_threshold, cache_threshold),
        transfers=replace(DEFAULT_TRANSFERS, rate=transfer_rate * 1e6, busy_rate=transfer_rate_busy * 1e6),
    )
    try:
        security = _security(bind, curve_secret, allow_workers, allow_clients, insecure)
        pair = _pair(ha, ha_bind, ha_peer, ha_peer_key, security, insecure)
        store = None if models_dir is None else ModelStore(models_dir, default_digest_cache())
    except OSError as exc:
        typer.echo(f"qmesh-broker: cannot use --models-dir {models_dir}: {exc}", err=True)
        raise typer.Exit(2) from exc
    except QMeshError as exc:
        typer.echo(f"qmesh-broker: {exc}", err=True)
        raise typer.Exit(2) from exc
    metrics = None
    try:
        if metrics_port:
            from qmesh.broker.metrics import BrokerMetrics  # prometheus_client only when asked for

            metrics = BrokerMetrics()
            metrics.serve(metrics_port, metrics_host)
            logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        broker = Broker(bind, settings, metrics=metrics, security=security, pair=pair, store=store)
    except OSError as exc:
        if metrics is not None:
            metrics.close()
        typer.echo(f"qmesh-broker: {exc}", err=True)
        raise typer.Exit(1) from exc
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.stop())
    signal.signal(signal.SIGHUP, lambda *_: broker.reload_keys())
    try:
        broker.run()
    finally:
        if metrics is not None:
            metrics.close()
        if store is not None:
            store.close()


def _security(
    bind: str, secret: Path | None, allow_workers: Path | None, allow_clients: Path | None, insecure: bool
) -> BrokerSecurity | None:
    if secret is None:
        if allow_workers or allow_clients:
            raise ConfigError("--allow-workers and --allow-clients need --curve-secret (the broker's key pair)")
        if not is_loopback(bind) and not insecure:
            raise ConfigError(
                f"refusing to bind {bind} without CURVE: anyone who reaches it could serve or read prompts. "
                "Give --curve-secret with --allow-workers and --allow-clients (see README), or --insecure."
            )
        return None
    if allow_workers is None or allow_clients is None:
        raise ConfigError("CURVE needs both allow-lists: --allow-workers DIR and --allow-clients DIR")
    return BrokerSecurity(secret, allow_workers, allow_clients)


def _pair(
    role: HaRole | None,
    bind: str | None,
    peer: str | None,
    peer_key: Path | None,
    security: BrokerSecurity | None,
    insecure: bool,
) -> PairSettings | None:
    if role is None:
        if bind or peer:
            raise ConfigError("--ha-bind and --ha-peer need --ha primary or --ha backup")
        return None
    if not bind or not peer:
        raise ConfigError("a broker pair needs --ha-bind (where this broker publishes) and --ha-peer (the other's)")
    if security is None and not insecure and not (is_loopback(bind) and is_loopback(peer)):
        raise ConfigError(f"refusing an HA link over {bind} and {peer} without CURVE (see README), or --insecure")
    if security is not None and peer_key is None:
        raise ConfigError("with CURVE, the HA link needs the peer broker's public key: --ha-peer-key FILE")
    key = load_public_key(peer_key) if peer_key is not None else None
    return PairSettings(Role(role.value), bind, peer, key)


def main() -> None:
    app(prog_name="qmesh-broker")


if __name__ == "__main__":
    sys.exit(main())
