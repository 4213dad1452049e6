"""The sidecar against a real llama-server and the real default model.

Fake binaries appear only where the point is forcing a crash; each is named for what it does.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qmesh.common.errors import (
    LlamaServerNotFound,
    ModelNotFound,
    PromptTooLong,
    SidecarError,
    SidecarRefused,
    SidecarStartError,
)
from qmesh.testing import pid_alive, wait_for
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.engine import InferenceEngine
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.process import LlamaProcessManager

pytestmark = pytest.mark.sidecar

SMALL = {"ctx_size": 512, "threads": 1}  # for the extra llama-servers some tests start


def fake_binary(path: Path, body: str, real: LlamaServerBinary) -> LlamaServerBinary:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return LlamaServerBinary(path=path, env=real.env, source="argument")


# -- a healthy sidecar ---------------------------------------------------------------------------------------


def test_starts_and_is_healthy(llama_manager: LlamaProcessManager) -> None:
    assert llama_manager.state == "ready"
    assert llama_manager.is_healthy()
    assert llama_manager.pid is not None and pid_alive(llama_manager.pid)
    assert llama_manager.base_url == f"http://127.0.0.1:{llama_manager.port}"
    assert llama_manager.output_tail(), "llama-server's output should be collected"


def test_props_report_slots_and_model(engine: InferenceEngine, model_path: Path) -> None:
    props = engine.client.props()
    assert props["total_slots"] == 2
    assert Path(props["model_path"]).resolve() == model_path


def test_tokenize_round_trip(engine: InferenceEngine) -> None:
    ids = engine.client.tokenize("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert engine.client.detokenize(ids) == "Hello world"


def test_generate_returns_text_and_token_ids(engine: InferenceEngine) -> None:
    completion = engine.generate("The capital of France is", max_tokens=8, temperature=0)
    assert completion.text.strip()
    assert len(completion.token_ids) == completion.tokens_predicted > 0
    assert engine.client.detokenize(completion.token_ids) == completion.text
    assert completion.tokens_evaluated > 0
    assert completion.stop_reason in ("stop", "length")
    again = engine.generate("The capital of France is", max_tokens=8, temperature=0)
    assert again.text == completion.text


def test_generate_from_token_ids(engine: InferenceEngine) -> None:
    prompt = engine.client.tokenize("The capital of France is")
    completion = engine.generate(prompt, max_tokens=4, temperature=0)
    assert completion.tokens_evaluated == len(prompt)
    assert completion.token_ids


def test_stream_yields_chunks_then_result_with_timings(engine: InferenceEngine) -> None:
    with engine.generate_stream("Once upon a time", max_tokens=12, temperature=0) as stream:
        chunks = list(stream)
    assert len(chunks) >= 3
    assert all(chunk.text or chunk.token_ids for chunk in chunks)
    result = stream.result
    assert result is not None
    assert result.text == "".join(chunk.text for chunk in chunks)
    assert result.token_ids == [i for chunk in chunks for i in chunk.token_ids]
    assert result.stop_reason == "length" and result.tokens_predicted == 12
    assert result.timings["predicted_n"] == 12 and result.timings["predicted_ms"] > 0


def test_stop_word_ends_with_reason_stop(engine: InferenceEngine) -> None:
    completion = engine.generate("1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=["8"])
    assert completion.stop_reason == "stop"
    assert "8" not in completion.text


def test_chat_keeps_history(engine: InferenceEngine) -> None:
    engine.reset_history()
    with engine.chat_stream("What is the capital of France?", system="Answer briefly.", max_tokens=16,
                            temperature=0) as first:  # fmt: skip
        first_answer = "".join(chunk.text for chunk in first)
    assert first_answer.strip()
    assert [m["role"] for m in engine.history] == ["system", "user", "assistant"]
    assert engine.history[-1]["content"] == first_answer

    second = engine.chat("And what is the capital of Italy?", max_tokens=16, temperature=0)
    assert [m["role"] for m in engine.history] == ["system", "user", "assistant", "user", "assistant"]
    assert engine.history[-1]["content"] == second.text
    # The second turn's prompt renders the first answer, and it is exactly what llama-server evaluated.
    second_prompt = engine.client.apply_template(engine.history[:-1])
    assert first_answer.strip() in second_prompt
    assert second.tokens_evaluated == len(engine.client.tokenize(second_prompt))
    engine.reset_history()
    assert engine.history == []


def test_chat_stream_closed_early_keeps_the_partial_reply(engine: InferenceEngine) -> None:
    engine.reset_history()
    stream = engine.chat_stream("Write a long story about a dragon.", max_tokens=200, temperature=0)
    received = list(itertools.islice(stream, 3))
    stream.close()
    assert stream.result is not None and stream.result.stop_reason == "cancelled"
    assert engine.history[-1] == {"role": "assistant", "content": "".join(c.text for c in received)}
    engine.reset_history()


def test_closing_a_stream_early_frees_the_slot(engine: InferenceEngine) -> None:
    client = engine.client
    # Counting goes on without an end-of-text; 900 tokens take this CPU many seconds, far beyond the wait below.
    stream = client.generate_stream("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=900, temperature=0)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    busy = [slot for slot in client.slots() if slot["is_processing"]]
    assert len(busy) == 1 and busy[0]["next_token"][0]["n_remain"] > 800
    stream.close()
    wait_for(lambda: not any(slot["is_processing"] for slot in client.slots()), 15.0, "the slot to be freed")


def test_close_from_another_thread_ends_the_iteration_quietly(engine: InferenceEngine) -> None:
    """How a worker cancels: its network thread closes the stream a slot thread is reading."""
    client = engine.client
    stream = client.generate_stream("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=900, temperature=0)
    chunks = iter(stream)
    next(chunks)
    closer = threading.Timer(0.3, stream.close)
    closer.start()
    started = time.monotonic()
    rest = list(chunks)
    assert time.monotonic() - started < 3
    closer.join()
    assert stream.result is not None and stream.result.stop_reason == "cancelled"
    assert len(stream.result.token_ids) == 1 + sum(len(chunk.token_ids) for chunk in rest)
    wait_for(lambda: not any(slot["is_processing"] for slot in client.slots()), 15.0, "the slot to be freed")


def test_http_error_body_becomes_sidecar_error(engine: InferenceEngine) -> None:
    with pytest.raises(SidecarError, match="404") as info:
        engine.client._call("GET", "/no-such-endpoint")
    assert "/no-such-endpoint" in str(info.value)


def test_a_request_llama_server_calls_invalid_is_the_callers_error_naming_the_field(engine: InferenceEngine) -> None:
    with pytest.raises(SidecarRefused) as info:
        engine.generate("hi", max_tokens=1, temperature="hot")  # llama-server refuses a field of the wrong type
    assert "temperature" in str(info.value) and "http" not in str(info.value)


def test_a_prompt_longer_than_the_context_is_the_callers_error_with_both_sizes(engine: InferenceEngine) -> None:
    too_long = "word " * 3000  # more tokens than a slot's context holds
    with pytest.raises(PromptTooLong) as info:
        engine.generate(too_long, max_tokens=1)
    assert info.value.prompt_tokens > 3000 and info.value.context == engine.client.slot_context()


def test_unreachable_server_is_sidecar_error_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LlamaHttpClient(f"http://127.0.0.1:{port}", connect_timeout=0.5)
    assert client.health_check() is False
    with pytest.raises(SidecarError, match=f"127.0.0.1:{port}/props") as info:
        client.props()
    assert info.value.__cause__ is not None


# -- crashes and restarts ------------------------------------------------------------------------------------


def test_sigkill_breaks_the_stream_and_triggers_a_restart(engine: InferenceEngine) -> None:
    manager = engine.manager
    restarts, pid = manager.restarts, manager.pid
    assert pid is not None
    stream = engine.generate_stream("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=900, temperature=0)
    next(iter(stream))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(SidecarError, match="stream"):
        list(stream)
    wait_for(lambda: manager.restarts == restarts + 1 and manager.state == "ready", 30.0, "the restart")
    assert manager.pid != pid and manager.is_healthy()
    assert engine.generate("Hello", max_tokens=4, temperature=0).token_ids


def test_crashes_in_a_row_end_in_failed(tmp_path: Path, model_path: Path, llama_binary: LlamaServerBinary) -> None:
    marker = tmp_path / "started-once"
    crash_after_first_start = fake_binary(
        tmp_path / "crash-after-first-start-llama-server",
        f"""\
        # Forces crashes: the first run is the real llama-server, every later run exits 1 at once.
        if [ -e "{marker}" ]; then echo "fake llama-server: crashing on purpose"; exit 1; fi
        touch "{marker}"
        exec "{llama_binary.path}" "$@"
        """,
        llama_binary,
    )
    manager = LlamaProcessManager(model_path, crash_after_first_start, max_restarts=3, restart_backoff=0.05, **SMALL)
    with manager:
        pid = manager.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: manager.state == "failed", 15.0, 'state "failed"')
        assert manager.restarts == 3
        assert manager.pid is None and not manager.is_healthy()
        failure = manager.failure or ""
        assert "exited with code 1" in failure
        assert "fake llama-server: crashing on purpose" in failure
        assert "gave up after 3 restarts in a row" in failure
    assert manager.state == "stopped"


def test_sigill_is_explained(tmp_path: Path, model_path: Path, llama_binary: LlamaServerBinary) -> None:
    dies_of_sigill = fake_binary(
        tmp_path / "dies-of-sigill-llama-server",
        """\
        # Forces the crash an AVX-512 build gives on an AVX2-only CPU.
        echo "fake llama-server: executing an unsupported instruction"
        kill -ILL $$
        """,
        llama_binary,
    )
    manager = LlamaProcessManager(model_path, dies_of_sigill, **SMALL)
    started = time.monotonic()
    with pytest.raises(SidecarStartError) as info:
        manager.start()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "SIGILL" in message and "built for instructions this CPU lacks" in message
    assert "fake llama-server: executing an unsupported instruction" in message
    assert manager.state == "failed"
    manager.stop()


# -- clear errors, quickly -----------------------------------------------------------------------------------


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "llama-server"
    with pytest.raises(LlamaServerNotFound, match="does not exist") as info:
        InferenceEngine("smollm2-135m", llama_server=str(missing))
    assert str(missing) in str(info.value)


def test_missing_model_is_a_clear_error() -> None:
    with pytest.raises(ModelNotFound) as info:
        InferenceEngine("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message and "smollm2-135m" in message and "scripts/setup" in message


def test_corrupt_gguf_fails_fast_with_llama_server_output(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    engine = InferenceEngine(corrupt, **SMALL)
    started = time.monotonic()
    with pytest.raises(SidecarStartError) as info:
        engine.start()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert str(corrupt) in message and "last" in message and "lines of llama-server output" in message
    assert engine.manager.state == "failed"
    engine.dispose()


def test_taken_port_moves_to_a_free_one(model_path: Path, llama_binary: LlamaServerBinary) -> None:
    manager = LlamaProcessManager(model_path, llama_binary, **SMALL)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", manager.port))
        squatter.listen()
        taken = manager.port
        with manager:
            assert manager.port != taken and manager.is_healthy()


# -- llama-server never outlives its manager -----------------------------------------------------------------


def test_no_process_left_after_stop(model_path: Path, llama_binary: LlamaServerBinary) -> None:
    manager = LlamaProcessManager(model_path, llama_binary, **SMALL)
    manager.start()
    pid = manager.pid
    assert pid is not None and pid_alive(pid)
    manager.stop()
    assert not pid_alive(pid)
    assert manager.state == "stopped" and manager.pid is None
    manager.stop()  # idempotent


def test_survives_the_thread_that_started_it(model_path: Path, llama_binary: LlamaServerBinary) -> None:
    """PDEATHSIG follows the forking thread: starting from a short-lived thread must not kill llama-server."""
    manager = LlamaProcessManager(model_path, llama_binary, **SMALL)
    starter = threading.Thread(target=manager.start)
    starter.start()
    starter.join()
    try:
        pid = manager.pid
        assert pid is not None
        time.sleep(0.5)
        assert pid_alive(pid) and manager.is_healthy() and manager.restarts == 0
    finally:
        manager.stop()


CHILD = """\
import sys, time
from qmesh.worker.binary import find_llama_server
from qmesh.worker.process import LlamaProcessManager
manager = LlamaProcessManager(sys.argv[1], find_llama_server(), ctx_size=512, threads=1)
manager.start()
print(manager.pid, flush=True)
if sys.argv[2] == "linger":
    time.sleep(120)
"""


@pytest.mark.parametrize("ending", ["normal exit", "SIGKILL"])
def test_no_process_left_after_parent_python_ends(model_path: Path, ending: str) -> None:
    mode = "linger" if ending == "SIGKILL" else "exit"
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(model_path), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the child printed {line!r}"
        pid = int(line)
        if ending == "SIGKILL":
            assert pid_alive(pid)
            parent.kill()
        assert parent.wait(timeout=30) is not None
        wait_for(lambda: not pid_alive(pid), 15.0, f"llama-server (pid {pid}) to go away after the parent's {ending}")
    finally:
        parent.kill()
        parent.wait()
