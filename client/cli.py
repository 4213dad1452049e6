"""``qmesh-client``: prompts from stdin, spread over the mesh, answers on stdout in input order.

Each line is sent as soon as it is read, so a slow or endless producer (``tail -f``, a person typing) gets its
answers as it goes. Only model text (or ``--jsonl`` records) goes to stdout; progress and errors go to stderr.
Exit status: 0 all prompts answered, 1 any failed, 2 usage error, 130 interrupted (in-flight requests cancelled).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import typer

from qmesh.client.sdk import QMeshClient, Request, Result
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
from qmesh.common.errors import MeshError, QMeshError
from qmesh.common.logs import LogFormat, LogLevel, log_format_option, log_level_option, setup_logging

app = typer.Typer(add_completion=False)

MAX_DEFAULT_CONCURRENCY = 64
# The short reason in a failed prompt's placeholder (the whole message goes to stderr).
REASONS = {
    p.BAD_REQUEST: "bad request",
    p.FORBIDDEN: "key not allowed",
    p.UNKNOWN_MODEL: "unknown model",
    p.CLIENT_STALLED: "client stalled",
    p.TOO_LARGE: "too large",
    p.TOO_MANY_REQUESTS: "too many in flight",
    p.CANCELLED: "cancelled",
    p.WORKER_FAILED: "worker failed",
    p.QUEUE_FULL: "queue full",
    p.QUEUE_TIMEOUT: "queue timeout",
}


@app.command(
    help="Send prompts from stdin through the QMesh broker, one per line, each as soon as it is read; answers come "
    "out in input order. Empty and whitespace-only lines are skipped (not sent, no output), but line numbers count "
    "them: errors and --jsonl records name prompts by their line."
)
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
        False,
        "--whole",
        envvar="QMESH_WHOLE",
        help="All of stdin is one prompt, sent once stdin ends (default: one prompt per line, sent as it is read).",
    ),
    jsonl: bool = typer.Option(
        False, "--jsonl", envvar="QMESH_JSONL", help="One JSON object per prompt instead of plain text."
    ),
    json_schema: Path = typer.Option(
        None,
        "--json-schema",
        envvar="QMESH_JSON_SCHEMA",
        help="Each answer is JSON that matches the JSON schema in this file (with --jsonl, in each record's 'json').",
    ),
    no_stream: bool = typer.Option(
        False, "--no-stream", envvar="QMESH_NO_STREAM", help="Print each answer only once it is complete."
    ),
    no_placeholders: bool = typer.Option(
        False,
        "--no-placeholders",
        envvar="QMESH_NO_PLACEHOLDERS",
        # "\\[": help is rich markup, where a bracket opens a style tag
        help="Print nothing for a failed prompt (default: one line such as \\[error: 502 worker failed] in its place, "
        "so answers stay aligned with the input).",
    ),
    timeout: float = typer.Option(300.0, "--timeout", envvar="QMESH_TIMEOUT", min=0.1, help="Seconds per prompt."),
    connect_timeout: float = connect_timeout_option(),
    broker: str = broker_option(),
    curve_secret: Path = curve_secret_option(),
    broker_key: Path = broker_key_option(),
    log_level: LogLevel = log_level_option(LogLevel.warning),
    log_format: LogFormat = log_format_option(),
    config: Path = config_option("client"),
    version: bool = version_option(),
) -> None:
    setup_logging(log_level, log_format)
    schema = load_schema(json_schema)  # a bad file is a usage error before anything is read or sent
    whole_prompt = read_whole(sys.stdin) if whole else None
    try:
        curve = client_keys_from_options(curve_secret, broker_key, broker)
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
        options.update({"temperature": temperature, "seed": seed, "json_schema": schema})
        window = concurrency or min(max(slots, 1), MAX_DEFAULT_CONCURRENCY)
        prompts = read_lines(sys.stdin, ahead=window) if whole_prompt is None else one_prompt_input(whole_prompt)
        batch = Batch(client, prompts, options, window)
        printer = (
            JsonlPrinter(sys.stdout, structured=json_schema is not None)
            if jsonl
            else TextPrinter(sys.stdout, stream=not no_stream, placeholders=not no_placeholders)
        )
        try:
            batch.run(printer, progress=Progress(sys.stderr))
        except KeyboardInterrupt:
            batch.cancel_all()
            sys.stdout.flush()
            typer.echo("\nqmesh-client: interrupted; cancelled what was in flight", err=True)
            raise typer.Exit(130) from None
    if batch.read_error is not None:
        typer.echo(f"qmesh-client: {batch.read_error}", err=True)
    elif not batch.taken:
        fail(NO_PROMPT, 2)
    raise typer.Exit(1 if batch.failed or batch.read_error else 0)


NO_PROMPT = "no prompt on stdin (pipe one prompt per line, or use --whole)"


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"qmesh-client: {message}", err=True)
    raise typer.Exit(code)


def load_schema(path: Path | None) -> dict[str, Any] | None:
    """The JSON schema of ``--json-schema``; a usage error (exit 2) that names the file when it is not one."""
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"--json-schema {path}: {exc}", 2)
    if not isinstance(schema, dict):
        fail(f"--json-schema {path}: a JSON schema is a JSON object", 2)
    return schema


def _parsed(text: str) -> Any:
    """The answer as JSON; None if it is not (cut short by --max-tokens)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def pick_model(served: dict[str, Any]) -> str:
    if len(served) == 1:
        return next(iter(served))
    if not served:
        fail("no model is served right now (start one: qmesh-worker --model smollm2-135m)", 1)
    fail(f"the mesh serves several models; choose one with -m: {', '.join(sorted(served))}", 2)


@dataclass(frozen=True, slots=True)
class Prompt:
    line: int  # where it starts in the input, counting empty lines (1 for --whole)
    text: str


def read_whole(stream: TextIO) -> Prompt:
    """All of ``stream`` as one prompt (--whole): read before connecting, so empty input is a usage error at once."""
    try:
        text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read stdin: {exc}", 1)
    if not text.strip():
        fail(NO_PROMPT, 2)
    return Prompt(1, text)


def one_prompt_input(prompt: Prompt) -> queue.Queue[Prompt | QMeshError | None]:
    """A finished input of one prompt, in the shape ``read_lines`` gives."""
    prompts: queue.Queue[Prompt | QMeshError | None] = queue.Queue()
    prompts.put(prompt)
    prompts.put(None)
    return prompts


def read_lines(stream: TextIO, ahead: int) -> queue.Queue[Prompt | QMeshError | None]:
    """The non-empty lines of ``stream`` as they are read, then None at its end (or the error that ended it).

    A thread reads them, so the caller keeps receiving answers while the input is quiet; it blocks once ``ahead``
    lines wait, so a producer faster than the mesh is held back by the pipe instead of filling this process."""
    lines: queue.Queue[Prompt | QMeshError | None] = queue.Queue(maxsize=ahead)

    def read() -> None:
        number = 0
        try:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    lines.put(Prompt(number, line.rstrip("\n")))
        except (OSError, UnicodeDecodeError) as exc:
            lines.put(QMeshError(f"stopped reading stdin after line {number}: {exc}"))
            return
        lines.put(None)

    # A daemon: on Ctrl-C or a closed stdout the program ends while it still waits for input.
    threading.Thread(target=read, name="stdin-lines", daemon=True).start()
    return lines


@dataclass(slots=True)
class Sent:
    """A prompt in the window: its request, or the result of a prompt the SDK refused to send."""

    prompt: Prompt
    request: Request | None
    refused: Result | None = None


class Batch:
    """Sends prompts as they arrive, up to ``concurrency`` in flight, and hands answers to a printer in input order.

    The window counts the prompts sent and not yet printed, so a slow head holds back reading, not just sending."""

    def __init__(
        self,
        client: QMeshClient,
        prompts: queue.Queue[Prompt | QMeshError | None],
        options: dict[str, Any],
        concurrency: int,
    ) -> None:
        self.client = client
        self.prompts = prompts
        self.options = options
        self.concurrency = concurrency
        self.window: deque[Sent] = deque()
        self.input_ended = False
        self.read_error: QMeshError | None = None
        self.taken = 0  # prompts taken from the input, sent or refused
        self.failed = 0

    def run(self, printer: TextPrinter | JsonlPrinter, progress: Progress) -> None:
        while True:
            self._take_prompts()
            if not self.window:
                if self.input_ended:
                    return
                self.client.poll(0.05)  # wait for input; the reader thread fills the queue meanwhile
                continue
            head = self.window[0]
            if head.request is not None:
                if head.request.chunks:
                    progress.clear()  # before the text, which shares the terminal's line with it
                    printer.progress(head.request)
                else:
                    progress.show(head.request)
            result = head.refused if head.request is None else head.request.final
            if result is None:
                self.client.poll(0.05)
                continue
            progress.clear()
            printer.finish(head.prompt, result)
            if result.error is not None:
                self.failed += 1
                typer.echo(f"qmesh-client: line {head.prompt.line} failed: {result.error}", err=True)
            self.window.popleft()

    def _take_prompts(self) -> None:
        while not self.input_ended and len(self.window) < self.concurrency:
            try:
                prompt = self.prompts.get_nowait()
            except queue.Empty:
                return
            if not isinstance(prompt, Prompt):
                self.input_ended, self.read_error = True, prompt
                return
            self.taken += 1
            try:
                self.window.append(Sent(prompt, self.client.submit(prompt.text, **self.options)))
            except QMeshError as exc:  # too large to send: that prompt fails, the rest go on
                refused = Result(text="", model=self.options["model"], error=MeshError(p.TOO_LARGE, str(exc)))
                self.window.append(Sent(prompt, None, refused))

    def cancel_all(self) -> None:
        for sent in self.window:
            if sent.request is not None:
                sent.request.cancel()


class TextPrinter:
    """Streams the head answer as it arrives; a blank line between answers; a failed prompt's answer ends with a
    one-line placeholder (or is only what arrived before the error, without ``placeholders``)."""

    def __init__(self, out: TextIO, stream: bool, placeholders: bool) -> None:
        self.out = out
        self.stream = stream
        self.placeholders = placeholders
        self.started = False  # the head answer has printed something
        self.at_line_start = True
        self.answers = 0

    def _write(self, text: str) -> None:
        if not self.started:
            if self.answers:
                self.out.write("\n")
            self.started = True
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")

    def progress(self, request: Request) -> None:
        if self.stream and (new := request.new_chunks()):
            self._write("".join(chunk.text for chunk in new))

    def finish(self, prompt: Prompt, result: Result) -> None:
        if not self.stream and result.text:
            self._write(result.text)
        if result.error is not None and self.placeholders:
            code = result.error.code
            self._write(("" if not self.started or self.at_line_start else "\n") + placeholder(code))
        if self.started:
            self.out.write("\n")
            self.out.flush()
            self.answers += 1
        self.started = False


def placeholder(code: int) -> str:
    return f"[error: {code} {REASONS.get(code, 'failed')}]"


class JsonlPrinter:
    def __init__(self, out: TextIO, structured: bool = False) -> None:
        self.out = out
        self.structured = structured  # answers are JSON (--json-schema): each record carries it parsed

    def progress(self, request: Request) -> None:
        pass

    def finish(self, prompt: Prompt, result: Result) -> None:
        error = None if result.error is None else {"code": result.error.code, "message": result.error.message}
        record = {
            "line": prompt.line,
            "prompt": prompt.text,
            "text": result.text,
            "model": result.model,
            "model_sha256": result.model_sha256,  # which file made the answer
            "worker": result.worker,
            "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens,
            "ttft_ms": None if result.ttft_ms is None else round(result.ttft_ms, 2),
            "finish_reason": result.finish_reason,
            "failovers": result.failovers,
            "error": error,
        }
        if self.structured:
            record["json"] = _parsed(result.text) if result.error is None else None
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
