"""The command-line tools as a user runs them: real processes, real broker, real llama-server."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import threading
import time
from typing import IO

import jsonschema
import psutil
import pytest
import requests

from meshkit import MODEL, BrokerThread, run_cli, worker_threads
from qmesh.client.cli import Progress
from qmesh.testing import ROOT, free_endpoint, qmesh_command, wait_for

PROMPTS = ["What is two plus two?", "Name a fruit.", "Say hello in French."]


@pytest.fixture(scope="module")
def mesh():
    with BrokerThread() as broker, worker_threads(broker.endpoint, count=1, slots=2) as nodes:
        yield broker.endpoint, nodes[0]


@pytest.fixture
def endpoint(mesh):
    return mesh[0]


# Many times what qmesh-client needs (about 40 MiB), far less than buffering an endless input takes.
RSS_LIMIT = 200 * 2**20
# A prompt longer than the worker's context (2048 tokens): the mesh answers it with a 400.
TOO_LONG = "word " * 3000


def client(endpoint: str, *args: str, stdin: str, env: dict[str, str] | None = None):
    command = ("qmesh-client", "--broker", endpoint, "--max-tokens", "12", "--temperature", "0", *args)
    return run_cli(*command, stdin=stdin, env=env)


def start_client(
    endpoint: str, *args: str, stdin: int | IO[bytes] = subprocess.PIPE, stdout: int | IO[bytes] = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """qmesh-client as a running process, fed by the test (or by a producer's pipe) while it runs."""
    return subprocess.Popen(
        qmesh_command("qmesh-client", "--broker", endpoint, "--temperature", "0", *args),
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a CI job may start us with SIGINT ignored
    )


class Output:
    """All a process has written to a pipe so far, gathered by a thread so that a test can wait for it with a
    timeout (and check other things while it waits) instead of blocking in a read."""

    def __init__(self, fd: int) -> None:
        self.data = b""
        self.ended = False
        threading.Thread(target=self._gather, args=(fd,), daemon=True).start()

    def _gather(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, 65536):  # what has arrived, without waiting for a full buffer
                self.data += chunk
        except OSError:  # a terminal's side reads EIO, not an empty read, once the process has closed it
            pass
        self.ended = True

    def text(self) -> str:
        return self.data.decode(errors="replace")

    def records(self) -> list[dict]:
        """The complete JSON lines so far."""
        return [json.loads(line) for line in self.text().splitlines(keepends=True) if line.endswith("\n")]


def on_screen(output: bytes) -> list[str]:
    """The lines a terminal shows for ``output``, as far as carriage returns and erase-to-end-of-line go."""
    lines, column = [""], 0
    for part in re.split("(\r|\n|\x1b\\[K)", output.decode(errors="replace")):
        if part == "\r":
            column = 0
        elif part == "\n":
            lines, column = [*lines, ""], 0
        elif part == "\x1b[K":
            lines[-1] = lines[-1][:column]
        else:
            lines[-1] = lines[-1][:column] + part + lines[-1][column + len(part) :]
            column += len(part)
    return lines


def within_rss_limit(process: subprocess.Popen[bytes]) -> bool:
    rss = psutil.Process(process.pid).memory_info().rss
    assert rss < RSS_LIMIT, f"qmesh-client uses {rss >> 20} MiB: it buffers its input instead of holding it back"
    return True


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_batch_answers_in_input_order_as_jsonl(endpoint):
    done = client(endpoint, "--jsonl", "--concurrency", "3", stdin="\n".join(PROMPTS) + "\n\n")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for record in records:
        assert record["error"] is None and record["text"].strip()
        assert record["model"] == MODEL and record["worker"]
        assert len(record["model_sha256"]) == 64, "the answer names the model file that made it"
        assert record["tokens"] > 0 and record["ttft_ms"] > 0 and record["finish_reason"] in ("stop", "length")
        assert record["prompt_tokens"] > 0 and 0 <= record["cached_tokens"] <= record["prompt_tokens"]


def test_json_schema_turns_lines_into_structured_records(endpoint, tmp_path):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(schema))
    stdin = "Ada is 36.\nBob is 51.\n"
    done = client(endpoint, "--jsonl", "--json-schema", str(schema_file), "--max-tokens", "40", stdin=stdin)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2]
    for record in records:
        jsonschema.validate(record["json"], schema)
        assert json.loads(record["text"]) == record["json"]


def test_a_json_schema_file_that_is_not_one_is_a_usage_error(endpoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    done = client(endpoint, "--json-schema", str(bad), stdin="hi\n")
    assert done.returncode == 2 and "--json-schema" in done.stderr and str(bad) in done.stderr


def test_jsonl_reports_the_prompt_tokens_that_came_from_the_cache(endpoint):
    question = "Read this and say ok. " + "The cat sat on the mat. " * 30
    done = client(endpoint, "--jsonl", "-c", "1", "--max-tokens", "2", stdin=f"{question}\n{question}\n")
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert second["cached_tokens"] > first["cached_tokens"] and second["cached_tokens"] > 150


def test_text_output_is_the_answers_separated_by_blank_lines(endpoint):
    stdin = "\n".join(PROMPTS[:2]) + "\n"
    records = [json.loads(line) for line in client(endpoint, "--jsonl", "-c", "1", stdin=stdin).stdout.splitlines()]
    done = client(endpoint, "-c", "1", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\n\n".join(r["text"] for r in records) + "\n"
    assert "queued" not in done.stderr, "progress is shown only on a terminal"


def test_whole_takes_all_of_stdin_as_one_prompt(endpoint):
    stdin = "Line one of a single prompt.\nLine two of it.\n"
    done = client(endpoint, "--jsonl", "--whole", stdin=stdin)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["prompt"] == stdin and record["line"] == 1 and record["error"] is None


def test_model_is_chosen_when_the_mesh_serves_exactly_one(endpoint):
    done = run_cli("qmesh-client", "--broker", endpoint, "--max-tokens", "4", "--jsonl", stdin="Hi.\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == MODEL


def test_unknown_model_exits_1_and_names_the_failure(endpoint):
    done = client(endpoint, "-m", "no-such-model", stdin="Hi.\n")
    assert done.returncode == 1
    assert done.stdout == "[error: 404 unknown model]\n", "a placeholder keeps the answers aligned with the input"
    assert "line 1 failed: 404" in done.stderr and MODEL in done.stderr


def test_ctrl_c_cancels_in_flight_and_exits_130(mesh):
    endpoint, node = mesh
    command = qmesh_command("qmesh-client", "--broker", endpoint, "--max-tokens", "2000")
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a CI job may start us with SIGINT ignored
    )
    process.stdin.write(b"Write a very long story about a lighthouse.\n")
    process.stdin.close()
    assert process.stdout.read(1), "the answer should start streaming"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 130
    assert b"interrupted" in process.stderr.read()
    slots = lambda: requests.get(f"{node.manager.base_url}/slots", timeout=5).json()  # noqa: E731
    wait_for(lambda: not any(slot.get("is_processing") for slot in slots()), 10, "the slot to be freed")


def test_ctrl_c_while_the_input_is_still_open_cancels_in_flight_and_exits_130(mesh):
    endpoint, node = mesh
    process = start_client(endpoint, "--max-tokens", "2000")
    output = Output(process.stdout.fileno())
    try:
        process.stdin.write(b"Write a very long story about a lighthouse.\n")
        process.stdin.flush()
        wait_for(output.text, 60, "the answer to stream while the input is still open")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 130
    finally:
        stop(process)
    stderr = process.stderr.read()
    assert b"interrupted" in stderr and b"Fatal" not in stderr and b"Traceback" not in stderr, stderr
    slots = lambda: requests.get(f"{node.manager.base_url}/slots", timeout=5).json()  # noqa: E731
    wait_for(lambda: not any(slot.get("is_processing") for slot in slots()), 10, "the slot to be freed")


def test_each_prompt_is_answered_as_soon_as_its_line_is_read(endpoint):
    process = start_client(endpoint, "--jsonl", "--max-tokens", "12")
    output = Output(process.stdout.fileno())
    try:
        process.stdin.write(b"Say hi.\n")
        process.stdin.flush()
        # The producer sends its last line only once the first answer is out: a client that reads to the end of its
        # input before sending anything never answers here.
        wait_for(output.records, 60, "the answer to line 1 while the input is still open")
        process.stdin.write(b"\nSay bye.\n")
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read()
        wait_for(lambda: output.ended, 10, "the end of the client's output")
    finally:
        stop(process)
    records = output.records()
    assert [(r["line"], r["prompt"]) for r in records] == [(1, "Say hi."), (3, "Say bye.")]
    assert all(r["error"] is None and r["text"].strip() for r in records)


def test_at_a_terminal_each_line_is_answered_as_it_is_typed(endpoint):
    answer = json.loads(client(endpoint, "--jsonl", stdin="Say hi.\n").stdout)["text"].strip()
    keyboard, terminal = pty.openpty()
    command = qmesh_command("qmesh-client", "--broker", endpoint, "--max-tokens", "12", "--temperature", "0")
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    output = Output(keyboard)
    try:
        os.write(keyboard, b"Say hi.\n")
        # The progress line ("waiting for model...") shares the terminal with the answer: it must be gone, and not
        # take the answer's first words with it.
        wait_for(lambda: answer in "\n".join(on_screen(output.data)), 60, f"{answer!r} on the terminal before Ctrl-D")
        os.write(keyboard, b"\x04")  # Ctrl-D: the end of the input
        assert process.wait(timeout=30) == 0, output.text()
    finally:
        stop(process)
        wait_for(lambda: output.ended, 10, "the terminal to close")  # before its fd number can be reused
        os.close(keyboard)
    assert not [line for line in on_screen(output.data) if "waiting" in line or "queued" in line], output.text()


def test_an_endless_producer_is_held_back_and_answered_in_bounded_memory(endpoint):
    answers = 30
    producer = subprocess.Popen(["yes", "Say hi."], stdout=subprocess.PIPE)
    process = start_client(endpoint, "--jsonl", "--max-tokens", "2", "-c", "2", stdin=producer.stdout)
    producer.stdout.close()  # the client holds the only read end: the producer stops when the client does
    output = Output(process.stdout.fileno())
    try:
        wait_for(
            lambda: within_rss_limit(process) and len(output.records()) >= answers,
            120,
            f"{answers} answers while the input never ends",
        )
    finally:
        stop(process, producer)
    records = output.records()
    assert [r["line"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["error"] is None and r["prompt"] == "Say hi." for r in records)


def test_a_closed_stdout_ends_the_client_quietly(endpoint):
    producer = subprocess.Popen(["yes", "Say hi."], stdout=subprocess.PIPE)
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    process = start_client(endpoint, "--jsonl", "--max-tokens", "2", stdin=producer.stdout, stdout=reader.stdin)
    producer.stdout.close()
    reader.stdin.close()
    try:
        wait_for(
            lambda: within_rss_limit(process) and process.poll() is not None,
            120,
            "qmesh-client to stop once nobody reads its answers",
        )
        first = reader.stdout.read()  # head has printed its line and exited
    finally:
        stop(process, producer, reader)
    assert json.loads(first)["line"] == 1
    assert process.returncode == 1
    stderr = process.stderr.read()
    assert b"Traceback" not in stderr and b"Exception" not in stderr, stderr


def test_failed_and_skipped_prompts_are_named_by_their_input_line(endpoint):
    stdin = f"\n  \nSay hi.\n{TOO_LONG}\nSay bye.\n"
    done = client(endpoint, "--jsonl", "-c", "1", stdin=stdin)
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["line"] for r in records] == [3, 4, 5], "empty lines are skipped but counted"
    assert [r["error"] and r["error"]["code"] for r in records] == [None, 400, None]
    assert "line 4 failed: 400" in done.stderr
    text = client(endpoint, "-c", "1", stdin=stdin)
    assert text.returncode == 1 and "line 4 failed: 400" in text.stderr
    answers = [records[0]["text"], "[error: 400 bad request]", records[2]["text"]]
    assert text.stdout == "\n\n".join(answers) + "\n", "a placeholder keeps the answers aligned with the input"


def test_placeholders_can_be_left_out(endpoint):
    stdin = f"Say hi.\n{TOO_LONG}\n"
    flag = client(endpoint, "-c", "1", "--no-placeholders", stdin=stdin)
    variable = client(endpoint, "-c", "1", stdin=stdin, env={"QMESH_NO_PLACEHOLDERS": "1"})
    for done in (flag, variable):
        assert done.returncode == 1 and "line 2 failed: 400" in done.stderr
        assert done.stdout.strip() and "[error" not in done.stdout


def test_help_says_what_happens_to_empty_lines():
    done = run_cli("qmesh-client", "--help")
    words = " ".join(done.stdout.replace("│", " ").split())
    assert "QMESH_NO_PLACEHOLDERS" in words and "[error: 502 worker failed]" in words
    assert "Empty and whitespace-only lines are skipped" in words and "line numbers count them" in words, words


def test_queue_position_is_shown_on_a_terminal_only():
    class Waiting:
        status = {"state": "queued", "position": 3}

    terminal, pipe = io.StringIO(), io.StringIO()
    Progress(terminal, isatty=lambda: True).show(Waiting())
    Progress(pipe, isatty=lambda: False).show(Waiting())
    assert "queued, position 3" in terminal.getvalue() and pipe.getvalue() == ""


def test_empty_stdin_is_a_usage_error(endpoint):
    done = client(endpoint, stdin="\n  \n")
    assert done.returncode == 2 and "no prompt" in done.stderr


def test_no_broker_is_a_clear_error_not_a_hang():
    start = time.monotonic()
    done = run_cli("qmesh-client", "--broker", free_endpoint(), "--connect-timeout", "1", stdin="Hi.\n", timeout=30)
    assert done.returncode == 1
    assert "cannot reach the broker" in done.stderr
    assert time.monotonic() - start < 20


def test_worker_with_a_missing_model_exits_2_with_advice():
    done = run_cli("qmesh-worker", "--model", "no-such-model", timeout=30)
    assert done.returncode == 2
    assert "no-such-model" in done.stderr and "scripts/setup" in done.stderr


@pytest.mark.sidecar  # scripts/demo starts a real worker, out of sight of conftest's rule
def test_demo_script_runs_the_main_job_end_to_end():
    done = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [a for a in done.stdout.split("\n\n") if a.strip()]
    assert len(answers) >= 2, done.stdout
    assert "Paris" in done.stdout
