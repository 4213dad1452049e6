"""``qmesh-client``: prompts from stdin, spread over the mesh, answers on stdout in input order.

Only model text (or ``--jsonl`` records) goes to stdout; progress and errors go to stderr.
Exit status: 0 all prompts answered, 1 any failed, 2 usage error, 130 interrupted (in-flight requests cancelled).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import typer

from qmesh.client.sdk import QMeshClient, Request, Result
from qmesh.common.config import (
    broker_key_option,
    client_keys_from_options,
    config_option,
    curve_secret_option,
    version_option,
)
from qmesh.common.endpoints import DEFAULT_BROKER
from qmesh.common.errors import QMeshError
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging

app = typer.Typer(add_completion=False, help="Send prompts from stdin through the QMesh broker.")

MAX_DEFAULT_CONCURRENCY = 64


@app.command()
def run(
    model: str = typer.Option(
        None, "--model", "-m", envvar="QMESH_MODEL", help="Model (default: the only one served)."
    ),
    system: str = typer.Option(None, "--system", "-s", envvar="QMESH_SYSTEM", help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", envvar="QMESH_MAX_TOKENS", min=1),
    temperature: float = typer.Option(None, "--temperature", envvar="QMESH_TEMPERATURE", min=0.0),
    seed: int = typer.Option(None, "--seed", envvar="QMESH_SEED"),
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        "-c",
        envvar="QMESH_CONCURRENCY",
        min=1,
        help="Prompts in flight at once (default: the model's slots in the mesh).",
    ),
    whole: bool = typer.Option(
        False, "--whole", envvar="QMESH_WHOLE", help="All of stdin is one prompt (default: one prompt per line)."
    ),
    jsonl: bool = typer.Option(
        False, "--jsonl", envvar="QMESH_JSONL", help="One JSON object per prompt instead of plain text."
    ),
    no_stream: bool = typer.Option(
        False, "--no-stream", envvar="QMESH_NO_STREAM", help="Print each answer only once it is complete."
    ),
    timeout: float = typer.Option(300.0, "--timeout", envvar="QMESH_TIMEOUT", min=0.1, help="Seconds per prompt."),
    connect_timeout: float = typer.Option(
        10.0, "--connect-timeout", envvar="QMESH_CONNECT_TIMEOUT", min=0.1, help="Seconds to reach the broker."
    ),
    broker: str = typer.Option(DEFAULT_BROKER, "--broker", envvar="QMESH_BROKER", help="Broker endpoint."),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    log_level: LogLevel = log_level_option(LogLevel.warning),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("client"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    text = sys.stdin.read()
    prompts = ([text] if text.strip() else []) if whole else [line for line in text.splitlines() if line.strip()]
    if not prompts:
        fail("no prompt on stdin (pipe one prompt per line, or use --whole)", 2)
    try:
        curve = client_keys_from_options(curve_secret, broker_key)
        client = QMeshClient(broker, timeout=timeout, connect_timeout=connect_timeout, curve=curve)
    except QMeshError as exc:
        fail(str(exc), 2)
    with client:
        try:
            served = client.models()
            deadline = time.monotonic() + connect_timeout
            while not model and not served and time.monotonic() < deadline:  # a mesh that is just starting
                time.sleep(0.5)
                served = client.models()
        except QMeshError as exc:
            fail(str(exc), 1)
        model = model or pick_model(served)
        slots = served.get(model, {}).get("slots", 1)
        options: dict[str, Any] = {"model": model, "system": system, "max_tokens": max_tokens}
        options.update({"temperature": temperature, "seed": seed})
        batch = Batch(client, prompts, options, concurrency or min(max(slots, 1), MAX_DEFAULT_CONCURRENCY))
        printer = JsonlPrinter(sys.stdout) if jsonl else TextPrinter(sys.stdout, stream=not no_stream)
        try:
            failed = batch.run(printer, progress=Progress(sys.stderr))
        except KeyboardInterrupt:
            batch.cancel_all()
            sys.stdout.flush()
            typer.echo("\nqmesh-client: interrupted; cancelled what was in flight", err=True)
            raise typer.Exit(130) from None
    raise typer.Exit(1 if failed else 0)


def fail(message: str, code: int) -> None:
    typer.echo(f"qmesh-client: {message}", err=True)
    raise typer.Exit(code)


def pick_model(served: dict[str, Any]) -> str:
    if len(served) == 1:
        return next(iter(served))
    if not served:
        fail("no model is served right now (start one: qmesh-worker --model smollm2-135m)", 1)
    fail(f"the mesh serves several models; choose one with -m: {', '.join(sorted(served))}", 2)
    raise AssertionError("unreachable")


class Batch:
    """Keeps up to ``concurrency`` prompts in flight and hands answers to a printer in input order."""

    def __init__(self, client: QMeshClient, prompts: list[str], options: dict[str, Any], concurrency: int) -> None:
        self.client = client
        self.prompts = prompts
        self.options = options
        self.concurrency = concurrency
        self.requests: list[Request] = []

    def run(self, printer: TextPrinter | JsonlPrinter, progress: Progress) -> list[tuple[int, Result]]:
        failed: list[tuple[int, Result]] = []
        head = 0
        while head < len(self.prompts):
            while len(self.requests) < len(self.prompts) and len(self.requests) - head < self.concurrency:
                self.requests.append(self.client.submit(self.prompts[len(self.requests)], **self.options))
            request = self.requests[head]
            printer.progress(request)
            if not request.chunks:
                progress.show(request)
            else:
                progress.clear()
            if request.done:
                progress.clear()
                result = request.result()
                printer.finish(head, self.prompts[head], request, result)
                if result.error is not None:
                    failed.append((head, result))
                    typer.echo(f"qmesh-client: prompt {head + 1} failed: {result.error}", err=True)
                head += 1
                continue
            self.client.poll(0.05)
        return failed

    def cancel_all(self) -> None:
        for request in self.requests:
            request.cancel()


class TextPrinter:
    """Streams the head answer as it arrives; a blank line between answers."""

    def __init__(self, out: TextIO, stream: bool) -> None:
        self.out = out
        self.stream = stream
        self.started = False  # the head answer has printed something
        self.answers = 0

    def _write(self, text: str) -> None:
        if not self.started:
            if self.answers:
                self.out.write("\n")
            self.started = True
        self.out.write(text)
        self.out.flush()

    def progress(self, request: Request) -> None:
        if self.stream and (new := request.new_chunks()):
            self._write("".join(chunk.text for chunk in new))

    def finish(self, index: int, prompt: str, request: Request, result: Result) -> None:
        self.progress(request)
        if not self.stream and result.text:
            self._write(result.text)
        if self.started:
            self.out.write("\n")
            self.out.flush()
            self.answers += 1
        self.started = False


class JsonlPrinter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def progress(self, request: Request) -> None:
        pass

    def finish(self, index: int, prompt: str, request: Request, result: Result) -> None:
        error = None if result.error is None else {"code": result.error.code, "message": result.error.message}
        record = {
            "prompt": prompt,
            "text": result.text,
            "model": result.model,
            "worker": result.worker,
            "tokens": result.tokens,
            "ttft_ms": None if result.ttft_ms is None else round(result.ttft_ms, 2),
            "finish_reason": result.finish_reason,
            "failovers": result.failovers,
            "error": error,
        }
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


class Progress:
    """'queued, position N' on stderr while the head prompt waits; only on a terminal."""

    def __init__(self, err: TextIO, isatty: Callable[[], bool] | None = None) -> None:
        self.err = err
        self.enabled = (isatty or err.isatty)()
        self.shown = ""

    def show(self, request: Request) -> None:
        if not self.enabled:
            return
        status = request.status
        line = f"queued, position {status['position']}" if status.get("state") == "queued" else "waiting for model..."
        if line != self.shown:
            self.err.write("\r\033[K" + line)
            self.err.flush()
            self.shown = line

    def clear(self) -> None:
        if self.shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self.shown = ""


def main() -> None:
    app(prog_name="qmesh-client")


if __name__ == "__main__":
    sys.exit(main())
