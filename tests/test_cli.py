"""The command-line tools as a user runs them: real processes, real broker, real llama-server."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest
import requests

from meshkit import MODEL, BrokerThread, run_cli, worker_threads
from qmesh.client.cli import Progress
from qmesh.testing import ROOT, free_endpoint, wait_for

PROMPTS = ["What is two plus two?", "Name a fruit.", "Say hello in French."]


@pytest.fixture(scope="module")
def mesh():
    with BrokerThread() as broker, worker_threads(broker.endpoint, count=1, slots=2) as nodes:
        yield broker.endpoint, nodes[0]


@pytest.fixture
def endpoint(mesh):
    return mesh[0]


def client(endpoint: str, *args: str, stdin: str):
    return run_cli("qmesh-client", "--broker", endpoint, "--max-tokens", "12", "--temperature", "0", *args, stdin=stdin)


def test_batch_answers_in_input_order_as_jsonl(endpoint):
    done = client(endpoint, "--jsonl", "--concurrency", "3", stdin="\n".join(PROMPTS) + "\n\n")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for record in records:
        assert record["error"] is None and record["text"].strip()
        assert record["model"] == MODEL and record["worker"]
        assert record["tokens"] > 0 and record["ttft_ms"] > 0 and record["finish_reason"] in ("stop", "length")


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
    assert record["prompt"] == stdin and record["error"] is None


def test_model_is_chosen_when_the_mesh_serves_exactly_one(endpoint):
    done = run_cli("qmesh-client", "--broker", endpoint, "--max-tokens", "4", "--jsonl", stdin="Hi.\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == MODEL


def test_unknown_model_exits_1_and_names_the_failure(endpoint):
    done = client(endpoint, "-m", "no-such-model", stdin="Hi.\n")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "prompt 1 failed: 404" in done.stderr and MODEL in done.stderr


def test_ctrl_c_cancels_in_flight_and_exits_130(mesh):
    endpoint, node = mesh
    command = [sys.executable, "-m", "qmesh.client.cli", "--broker", endpoint, "--max-tokens", "3000"]
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
