"""``qmesh-broker``: run the broker in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import sys

import typer

from qmesh.broker.core import BrokerConfig
from qmesh.broker.loop import Broker
from qmesh.common.logs import setup_logging

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
    log_level: str = typer.Option("info", "--log-level", envvar="QMESH_LOG_LEVEL", help="debug, info, warning, error."),
) -> None:
    setup_logging(log_level)
    config = BrokerConfig(
        heartbeat_interval=heartbeat_ms / 1000, liveness=liveness, max_queue=max_queue, queue_timeout=queue_timeout
    )
    try:
        broker = Broker(bind, config)
    except OSError as exc:
        typer.echo(f"qmesh-broker: {exc}", err=True)
        raise typer.Exit(1) from exc
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.stop())
    broker.run()


def main() -> None:
    app(prog_name="qmesh-broker")


if __name__ == "__main__":
    sys.exit(main())
