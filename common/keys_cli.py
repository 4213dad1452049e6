"""``qmesh-keys``: make CurveZMQ key pairs for brokers, workers and clients."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from qmesh.common.config import in_config_dir, version_option
from qmesh.common.errors import ConfigError
from qmesh.common.paths import config_dir

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def options(version: bool = version_option()) -> None:
    """CurveZMQ keys for a secure QMesh."""


@app.command()
def generate(
    name: str = typer.Argument(
        ...,
        help="PATH/NAME (writes PATH/NAME.key and PATH/NAME.key_secret), or just NAME for "
        f"{in_config_dir('keys/NAME')}.",
    ),
    models: str = typer.Option(
        None, "--models", help="Comma-separated models a worker key may serve (written into the key files)."
    ),
) -> None:
    """Write NAME.key (public: copy it into the broker's allow-list) and NAME.key_secret (private, mode 0600)."""
    from qmesh.common.keys import generate_keys

    prefix = Path(name) if ("/" in name or name.startswith(".")) else config_dir() / "keys" / name
    try:
        public, secret = generate_keys(prefix, [m.strip() for m in models.split(",")] if models else None)
    except ConfigError as exc:
        typer.echo(f"qmesh-keys: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")


@app.command()
def show(path: Annotated[Path, typer.Argument(help="A NAME.key or NAME.key_secret file.")]) -> None:
    """Print the public key in a key file."""
    from qmesh.common.keys import load_public_key

    if not path.exists():  # pyzmq would call it an "invalid certificate file"
        typer.echo(f"qmesh-keys: {path}: no such key file", err=True)
        raise typer.Exit(1)
    try:
        typer.echo(load_public_key(path).decode())
    except ConfigError as exc:
        typer.echo(f"qmesh-keys: {exc}", err=True)
        raise typer.Exit(1) from exc


def main() -> None:
    app(prog_name="qmesh-keys")


if __name__ == "__main__":
    sys.exit(main())
