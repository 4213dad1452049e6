"""``qmesh-models``: the model files of the mesh, by content.

``list`` shows each model (name, sha256, size, the workers and stores that hold it); ``pull NAME`` fetches one
through the broker into the local models folder; ``push PATH`` copies a file into the broker's store
(``qmesh-broker --models-dir``), from where workers pull it. Every subcommand takes the usual ``--broker``, CURVE
and ``--config`` options (its ``[models]`` table) and ``--json`` for scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from qmesh.client.sdk import QMeshClient
from qmesh.client.status import table_lines
from qmesh.common import protocol as p
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
from qmesh.common.modelfiles import GGUF_SUFFIX, default_digest_cache
from qmesh.common.paths import models_dirs
from qmesh.common.pull import ProgressReport, pull_model, push_model

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def options(version: bool = version_option()) -> None:
    """The model files of the mesh: list, pull, push."""


COLUMNS = ("NAME", "SHA256", "SIZE", "HELD BY")


def _json() -> Any:
    return typer.Option(False, "--json", envvar="QMESH_MODELS_JSON", help="JSON instead of text.")


def render(models: list[dict[str, Any]]) -> str:
    if not models:
        return "no models in the mesh\n"
    rows = []
    for model in models:
        holders = [*model.get("workers", []), *model.get("stores", [])]
        bad = model.get("bad_copies") or []
        held = ", ".join(holders) or "-"
        rows.append(
            (
                str(model.get("name")),
                str(model.get("sha256", ""))[:16],
                f"{model.get('size', 0) / 1e6:.1f} MB",
                held + (f" (bad copy: {', '.join(bad)})" if bad else ""),
            )
        )
    return "\n".join(table_lines(COLUMNS, rows)) + "\n"


@app.command("list")
def list_models(
    json_output: bool = _json(),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    connect_timeout: float = connect_timeout_option(),
    config: Path = config_option("models"),
) -> None:
    """Each model in the mesh: name, sha256, size, and the workers and stores that hold it."""
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
        with QMeshClient(broker, connect_timeout=connect_timeout, curve=curve) as client:
            models = client.model_files()
    except QMeshError as exc:
        _fail(str(exc), 1)
    sys.stdout.write(json.dumps(models, indent=2) + "\n" if json_output else render(models))


@app.command()
def pull(
    name: str = typer.Argument(..., help="The model's name in the mesh (qmesh-models list)."),
    json_output: bool = _json(),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    connect_timeout: float = connect_timeout_option(),
    config: Path = config_option("models"),
) -> None:
    """Fetch a model through the broker into the first models folder ($QMESH_MODELS_DIR, else ./models), verified by
    its sha256; an interrupted pull goes on from the bytes it left."""
    problem = p.model_name_problem(name)
    if problem is not None:
        _fail(problem, 2)
    folder = models_dirs()[0]
    target = folder / f"{name}{GGUF_SUFFIX}"
    if target.exists():
        _fail(f"{target} exists already: remove it first to pull {name!r} again", 1)
    digests = default_digest_cache()
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
        result = pull_model(
            name,
            folder,
            broker,
            curve=curve,
            digests=digests,
            report=ProgressReport(),
            connect_timeout=connect_timeout,
        )
    except QMeshError as exc:
        _fail(str(exc), 1)
    if json_output:
        summary = {
            "name": result.model.name,
            "sha256": result.model.sha256,
            "size": result.model.size,
            "path": str(result.path),
            "received": result.received,
            "resumed_at": result.resumed_at,
            "seconds": round(result.seconds, 3),
            "attempts": result.attempts,
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        resumed = f", resumed at {result.resumed_at / 1e6:.1f} MB" if result.resumed_at else ""
        sys.stdout.write(
            f"{result.path}: {result.model.size / 1e6:.1f} MB, sha256 {result.model.sha256} "
            f"({result.received / 1e6:.1f} MB received{resumed}, {result.seconds:.1f} s)\n"
        )


@app.command()
def push(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="The GGUF file to copy into the store."),
    name: str = typer.Option(None, "--name", help="Its name in the mesh (default: the file's name less .gguf)."),
    json_output: bool = _json(),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    connect_timeout: float = connect_timeout_option(),
    config: Path = config_option("models"),
) -> None:
    """Copy a model file into the broker's store (qmesh-broker --models-dir), from where workers pull it."""
    name = name or path.stem
    problem = p.model_name_problem(name)
    if problem is not None:
        _fail(f"{problem}; give --name", 2)
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
        model = push_model(
            path,
            name,
            broker,
            default_digest_cache(),
            curve=curve,
            report=ProgressReport(),
            connect_timeout=connect_timeout,
        )
    except QMeshError as exc:
        _fail(str(exc), 1)
    if json_output:
        sys.stdout.write(json.dumps({"name": model.name, "sha256": model.sha256, "size": model.size}) + "\n")
    else:
        sys.stdout.write(f"{model.name}: sha256 {model.sha256}, {model.size / 1e6:.1f} MB, in the broker's store\n")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"qmesh-models: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="qmesh-models")


if __name__ == "__main__":
    sys.exit(main())
