"""``qmesh-gateway``: serve the OpenAI HTTP API in front of the broker until SIGINT or SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import uvicorn

from qmesh.common.config import (
    broker_key_option,
    broker_option,
    client_keys_from_options,
    config_option,
    connect_timeout_option,
    curve_secret_option,
    version_option,
)
from qmesh.common.errors import QMeshError
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging
from qmesh.gateway.app import create_app
from qmesh.gateway.bridge import Bridge

app = typer.Typer(add_completion=False, help="An OpenAI-compatible HTTP API (/v1/chat/completions...) for the mesh.")


def split_keys(values: list[str] | None) -> list[str]:
    """``--api-key a --api-key b``, ``QMESH_API_KEYS=a,b`` and a TOML list all end up as one list of keys."""
    return [key.strip() for value in values or [] for key in value.split(",") if key.strip()]


@app.command()
def run(
    host: str = typer.Option(
        "127.0.0.1", "--host", envvar="QMESH_GATEWAY_HOST", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8000, "--port", envvar="QMESH_GATEWAY_PORT", min=0, max=65535, help="TCP port."),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    api_key: list[str] = typer.Option(  # noqa: B008 (typer declares options in defaults)
        None,
        "--api-key",
        envvar="QMESH_API_KEYS",
        help="Accept only requests with 'Authorization: Bearer KEY'; repeat for several keys (env: comma-separated; "
        "config file: api_key = a list or one string).",
    ),
    timeout: float = typer.Option(
        300.0, "--timeout", envvar="QMESH_GATEWAY_TIMEOUT", min=0.1, help="Seconds a request may take in all."
    ),
    connect_timeout: float = connect_timeout_option(),
    log_level: LogLevel = log_level_option(),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("gateway"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
    except QMeshError as exc:
        typer.echo(f"qmesh-gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    bridge = Bridge(broker, timeout=timeout, connect_timeout=connect_timeout, curve=curve)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(bridge, split_keys(api_key)),
            host=host,
            port=port,
            http="httptools",  # every token of a stream is written through these two: h11 and asyncio cost more
            loop="uvloop",
            log_config=None,  # keep our handlers: --log-format applies to uvicorn's records too
            log_level=log_level.value,
            timeout_graceful_shutdown=5,
        )
    )
    server.run()
    if not server.started:  # could not bind, or the lifespan (broker address) failed: uvicorn logged why
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="qmesh-gateway")


if __name__ == "__main__":
    sys.exit(main())
