"""``qmesh-broker``: run the broker in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import typer

from qmesh.broker.core import BrokerConfig
from qmesh.broker.loop import Broker
from qmesh.common.config import config_option, version_option
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging

DEFAULT_BIND = "tcp://127.0.0.1:5555"

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
    )
    metrics = None
    try:
        if metrics_port:
            from qmesh.broker.metrics import BrokerMetrics  # prometheus_client only when asked for

            metrics = BrokerMetrics()
            metrics.serve(metrics_port, metrics_host)
            logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        broker = Broker(bind, settings, metrics=metrics)
    except OSError as exc:
        if metrics is not None:
            metrics.close()
        typer.echo(f"qmesh-broker: {exc}", err=True)
        raise typer.Exit(1) from exc
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.stop())
    try:
        broker.run()
    finally:
        if metrics is not None:
            metrics.close()


def main() -> None:
    app(prog_name="qmesh-broker")


if __name__ == "__main__":
    sys.exit(main())
