"""``qmesh-status``: what the mesh is doing, like ``ollama ps``: one line per worker, then the queue per model.

Everything comes from the broker's MMI services (``mmi.workers``, ``mmi.services``), so it works from any
machine that reaches the broker. ``--json`` prints one object (one per line with ``--watch``) for scripts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer

from qmesh.client.sdk import QMeshClient
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

app = typer.Typer(add_completion=False, help="Show the mesh's workers and queues (like 'ollama ps').")

WORKER_COLUMNS = ("NAME", "HOST", "MODEL", "SLOTS", "TOK/S", "CACHE HITS", "CPU", "MEM", "LAST SEEN", "STATE")
MODEL_COLUMNS = ("MODEL", "WORKERS", "SLOTS", "BUSY", "QUEUED", "CONTEXT")
SHARD_COLUMNS = ("SHARD HOST", "HOST", "DEVICE", "MEMORY", "USED", "FREE", "WORKER", "LAST SEEN")


def snapshot(client: QMeshClient) -> dict[str, Any]:
    """The mesh right now, in the shape ``--json`` prints."""
    return {
        "broker": client.broker_info(),
        "workers": worker_rows(client.workers()),
        "models": client.models(),
        "shards": client.shards(),
    }


def worker_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``mmi.workers`` as the rows ``qmesh-status`` and the gateway's dashboard show, by model, host and name."""
    rows = [_worker_row(worker) for worker in workers]
    rows.sort(key=lambda w: (w["model"], w["host"] or "", w["name"]))
    return rows


def _worker_row(worker: dict[str, Any]) -> dict[str, Any]:
    load = worker.get("load") or {}
    name = str(worker.get("name", ""))
    host = load.get("host") or (name.split("/")[0] if "/" in name else None)  # QMesh names are host/pid/index
    busy, slots = int(worker.get("busy", 0)), int(worker.get("slots", 1))
    state = "draining" if worker.get("draining") else "busy" if busy >= slots else "ready"
    prompt, cached = worker.get("prompt_tokens"), worker.get("cached_tokens")
    return {
        "name": name,
        "host": host,
        "model": worker.get("service"),
        "slots": slots,
        "busy": busy,
        "tokens_per_second": load.get("tokens_per_second"),
        # Prompt tokens its llama-server took from its cache, of all it was given: what cache-aware routing earns.
        "prompt_cache_hit_ratio": round(cached / prompt, 3) if isinstance(cached, int) and prompt else None,
        "cpu_percent": load.get("cpu"),
        "memory_percent": load.get("memory"),
        "last_seen_s": worker.get("last_seen_s"),
        "health": worker.get("health"),
        "state": state,
    }


def render(snap: dict[str, Any]) -> str:
    """Aligned tables: workers, models, shard hosts (after a line naming the active broker, for a pair); a mesh
    without workers says so rather than printing empty headers."""
    lines: list[str] = []
    broker = snap.get("broker") or {}
    if broker.get("pair_role"):  # which broker of the pair serves: after a takeover, the backup
        role, epoch = broker["pair_role"], broker["epoch"]
        lines += [f"broker {broker['endpoint']}: active, the {role} of its pair, epoch {epoch}", ""]
    if snap["workers"]:
        rows = [
            (
                w["name"],
                w["host"] or "-",
                w["model"] or "-",
                f"{w['busy']}/{w['slots']}",
                _number(w["tokens_per_second"], "{:.1f}"),
                _number(w["prompt_cache_hit_ratio"], "{:.0%}"),
                _number(w["cpu_percent"], "{:.0f}%"),
                _number(w["memory_percent"], "{:.0f}%"),
                _number(w["last_seen_s"], "{:.1f}s ago"),
                w["state"],
            )
            for w in snap["workers"]
        ]
        lines += table_lines(WORKER_COLUMNS, rows)
    else:
        lines.append("no workers registered")
    if snap["models"]:
        lines.append("")
        rows = [
            (
                name,
                str(m.get("workers", 0)),
                str(m.get("slots", 0)),
                str(m.get("busy", 0)),
                str(m.get("queued", 0)),
                _number(m.get("context"), "{}"),  # tokens per request; unknown while a worker does not announce it
            )
            for name, m in sorted(snap["models"].items())
        ]
        lines += table_lines(MODEL_COLUMNS, rows)
    if snap.get("shards"):  # shard hosts lend memory to split workers (qmesh-shard; a worker's --shards)
        lines.append("")
        rows = [
            (
                s["name"],
                s["host"],
                s["device"],
                f"{s['memory']} MiB",
                f"{s['used']} MiB",
                f"{s['free']} MiB",
                s["worker"] or "-",
                _number(s["last_seen_s"], "{:.1f}s ago"),
            )
            for s in snap["shards"]
        ]
        lines += table_lines(SHARD_COLUMNS, rows)
    return "\n".join(lines) + "\n"


def _number(value: Any, template: str) -> str:
    return template.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def table_lines(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell, three spaces apart (qmesh-status and qmesh-models print these)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


@app.command()
def run(
    json_output: bool = typer.Option(False, "--json", envvar="QMESH_STATUS_JSON", help="JSON instead of tables."),
    watch: float = typer.Option(
        0.0,
        "--watch",
        "-w",
        envvar="QMESH_STATUS_WATCH",
        min=0.0,
        help="Refresh every N seconds until Ctrl-C (0: print once).",
    ),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    connect_timeout: float = connect_timeout_option(5.0),
    config: Path = config_option("status"),
    version: bool = version_option(),
) -> None:
    try:
        client = QMeshClient(
            broker, connect_timeout=connect_timeout, curve=client_keys_from_options(curve_secret, broker_key, broker)
        )
    except QMeshError as exc:
        _fail(str(exc), 2)
    with client:
        try:
            while True:
                show(snapshot(client), json_output, watching=watch > 0, out=sys.stdout)
                if not watch:
                    return
                time.sleep(watch)
        except QMeshError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:  # the way to leave --watch
            return


def show(snap: dict[str, Any], json_output: bool, watching: bool, out: TextIO) -> None:
    if json_output:
        out.write(json.dumps(snap, separators=(",", ":") if watching else None, indent=None if watching else 2))
        out.write("\n")
    else:
        if watching and out.isatty():
            out.write("\033[H\033[2J")  # clear the screen, as watch(1) does
        out.write(render(snap))
        if watching and not out.isatty():
            out.write("\n")
    out.flush()


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"qmesh-status: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="qmesh-status")


if __name__ == "__main__":
    sys.exit(main())
