"""The OpenAI-compatible gateway, driven by the official ``openai`` client against a real broker and worker."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import openai
import pytest
import requests

from meshkit import FAST, MODEL, BrokerThread, GatewayThread, worker_threads
from qmesh.broker.security import BrokerSecurity
from qmesh.client.sdk import Result
from qmesh.common.errors import MeshError
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.gateway.bridge import Bridge, BridgedRequest, Delta
from qmesh.gateway.cli import split_keys
from qmesh.testing import ROOT, free_endpoint, qmesh_command, wait_for

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def gateway(endpoint: str, **options: Any) -> GatewayThread:
    return GatewayThread(Bridge(endpoint, connect_timeout=5), **options)


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[BrokerThread, Any, GatewayThread]]:
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=2) as nodes,
        gateway(broker.endpoint) as front,
    ):
        yield broker, nodes[0], front


@pytest.fixture
def api(mesh) -> openai.OpenAI:
    return mesh[2].client()


def slots_busy(node) -> bool:
    slots = requests.get(f"{node.manager.base_url}/slots", timeout=5).json()
    return any(slot.get("is_processing") for slot in slots)


# ------------------------------------------------------------------------------------------ happy paths


def test_models_are_those_live_workers_serve(api):
    (model,) = api.models.list()
    assert model.id == MODEL
    assert model.context_length == 2048  # tokens per request, prompt and answer: what each llama-server slot has


def test_max_tokens_beyond_the_context_is_400_before_it_travels(mesh):
    """A fresh gateway learns each model's context by itself (nobody lists the models here) and refuses at once
    what cannot fit. Until it has learned it, a request goes to the worker, which answers this one briefly."""
    recent = mesh[0].broker.core.recent  # every request the broker ends, numbered (mmi.requests)
    with gateway(mesh[0].endpoint) as front:
        api = front.client()

        def refused() -> tuple[openai.BadRequestError, bool] | None:
            ended = recent[-1].seq if recent else 0
            try:
                api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000, temperature=0)
            except openai.BadRequestError as exc:
                return exc, (recent[-1].seq if recent else 0) != ended
            return None

        caught, travelled = wait_for(refused, 30, "the gateway to learn the model's context")
    assert caught.status_code == 400 and "5000" in caught.message and "2048" in caught.message, caught.message
    assert not travelled, "the broker ended the request: it travelled"


def test_chat_completion_has_the_answer_and_usage(api):
    answer = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_conversations_next_turn_reports_its_cached_prompt_tokens_stream_and_not(mesh, api):
    broker = mesh[0]
    document = "Read this note and answer briefly. " + "The river runs from the hills to the sea. " * 25
    history = [{"role": "user", "content": document + "What runs to the sea?"}]
    first = api.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, user="ada")
    history += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    second = api.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0, user="ada")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 200 and cached <= second.usage.prompt_tokens, second.usage
    assert cached > first.usage.prompt_tokens_details.cached_tokens
    streamed = list(
        api.chat.completions.create(
            model=MODEL,
            messages=history,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-Id": "conversation-7"},
        )
    )
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 200
    sessions = broker.broker.core.sessions
    assert (MODEL, "ada") in sessions and (MODEL, "conversation-7") in sessions  # the header names it over `user`


def test_a_session_name_the_broker_cannot_take_is_a_400_naming_the_field(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, user="x" * 500)
    assert caught.value.body["param"] == "user"


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage(api):
    whole = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    *body, last_choice, usage_chunk = chunks
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in body)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_stream_and_not(api):
    prompt = "The capital of France is"
    whole = api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text.strip()
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_max_completion_tokens_stop_and_seed_are_passed_on(api):
    short = api.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, seed=7, temperature=0.7)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    full = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    word = full.choices[0].message.content.split()[1]
    stopped = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=[word])
    assert word not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_the_one_connection(mesh, api):
    broker = mesh[0].broker
    clients_seen: set[bytes] = set()
    results: list[str] = []

    def ask() -> None:
        answer = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
        results.append(answer.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        clients_seen.update(dict(broker.core.client_requests))  # a snapshot from another thread: good enough
        time.sleep(0.01)
    assert len(results) == 4 and len(set(results)) == 1
    assert len(clients_seen) == 1, "every HTTP request went through the gateway's one broker connection"


# ------------------------------------------------------------------------------------------ errors


def test_bad_requests_are_400_with_the_parameter_named(mesh, api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=CHAT, n=17)  # more choices than MAX_CHOICES
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.body["param"] == "messages"
    raw = requests.post(f"{mesh[2].url}/chat/completions", data="{not json", timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    huge = requests.post(f"{mesh[2].url}/chat/completions", data=b"x" * ((8 << 20) + 1024), timeout=10)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    assert MODEL in caught.value.body["message"], "the message lists the models that are served"


def test_api_keys_are_enforced_when_configured(mesh):
    with gateway(mesh[0].endpoint, api_keys=("sk-one", "sk-two")) as front:
        with pytest.raises(openai.AuthenticationError) as caught:
            front.client("sk-wrong").models.list()
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        without_key = requests.post(f"{front.url}/chat/completions", json={"model": MODEL, "messages": CHAT})
        assert without_key.status_code == 401 and without_key.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in front.client("sk-two").models.list()] == [MODEL]
    assert split_keys(["sk-a, sk-b", "sk-c"]) == ["sk-a", "sk-b", "sk-c"]  # how QMESH_API_KEYS=a,b arrives


def test_the_command_serves_with_keys_from_the_environment(mesh, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = qmesh_command("qmesh-gateway", "--port", str(port), "--broker", mesh[0].endpoint)
    env = {**os.environ, "QMESH_API_KEYS": "sk-a,sk-b", "QMESH_HOME": str(tmp_path)}
    process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _health(url), 20, "the gateway command to serve")
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-b", max_retries=0)
        assert [m.id for m in keyed.models.list()] == [MODEL]
        assert requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-c"}).status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    assert process.returncode in (0, -signal.SIGTERM), err  # uvicorn shuts down cleanly, then re-raises the signal
    assert "Application shutdown complete" in err


def _health(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_a_key_the_broker_does_not_list_as_a_client_is_403(tmp_path):
    """A gateway whose CURVE key was taken off the broker's client list, but is still a key the broker knows (a
    worker's), gets 403 FINALs from the broker: OpenAI clients see a PermissionDeniedError, not a server error."""
    broker_public, broker_secret = generate_keys(tmp_path / "broker")
    allow_workers, allow_clients = tmp_path / "allow-workers", tmp_path / "allow-clients"
    allow_workers.mkdir()
    allow_clients.mkdir()
    shutil.copy(generate_keys(tmp_path / "worker")[0], allow_workers)
    shutil.copy(generate_keys(tmp_path / "client")[0], allow_clients)
    security = BrokerSecurity(broker_secret, allow_workers, allow_clients)
    worker_keys = CurveClientKeys.load(tmp_path / "worker.key_secret", broker_public)
    with (
        BrokerThread(security=security) as broker,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=5, curve=worker_keys)) as front,
    ):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            front.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        with pytest.raises(openai.PermissionDeniedError) as listing:
            front.client().models.list()
    for refusal in (caught.value, listing.value):
        assert refusal.status_code == 403 and "allow-list" in refusal.body["message"]
        assert refusal.body["type"] == "permission_error" and refusal.body["code"] == "forbidden"


def test_queue_full_is_503():
    # A queue of length 0: nothing may wait. With no worker registered yet, every request would have to wait.
    with (
        BrokerThread(config=replace(FAST, max_queue=0)) as broker,
        gateway(broker.endpoint) as front,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        front.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "queue_full"


def test_queue_timeout_is_504():
    # No worker serves the model yet (a mesh starting up): the request waits, then times out in the queue.
    with BrokerThread(config=replace(FAST, queue_timeout=0.3)) as broker, gateway(broker.endpoint) as front:
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            front.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True)
        assert time.monotonic() - start < 10
    assert caught.value.status_code == 504 and caught.value.body["code"] == "queue_timeout"


# Long enough that an answer which waited for it is told apart from one at once on any machine, however busy.
UNREACHABLE_CONNECT_TIMEOUT = 30.0


def _broker_unreachable_everywhere(front: GatewayThread, reason: str = "cannot reach the broker") -> None:
    """Each endpoint answers 503 broker_unreachable at once, not after the bridge's connect timeout."""
    api = front.client()
    calls = {
        "chat": lambda: api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4),
        "chat stream": lambda: api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True),
        "text": lambda: api.completions.create(model=MODEL, prompt="Hello", max_tokens=4),
        "models": lambda: api.models.list(),
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        took = time.monotonic() - start
        assert caught.value.status_code == 503 and caught.value.body["code"] == "broker_unreachable", name
        assert caught.value.body["type"] == "server_error" and reason in caught.value.message, name
        assert took < UNREACHABLE_CONNECT_TIMEOUT / 2, f"{name}: {took:.1f} s; the gateway knew it had no broker"


def test_no_broker_is_503_broker_unreachable_at_once():
    with GatewayThread(Bridge(free_endpoint(), connect_timeout=UNREACHABLE_CONNECT_TIMEOUT)) as front:
        _broker_unreachable_everywhere(front)


def test_a_lost_broker_is_503_broker_unreachable_at_once():
    broker = BrokerThread().start()
    try:
        with GatewayThread(Bridge(broker.endpoint, connect_timeout=UNREACHABLE_CONNECT_TIMEOUT)) as front:
            assert front.client().models.list().data == []  # connected: a mesh without workers
            broker.stop()
            _broker_unreachable_everywhere(front)
    finally:
        broker.stop()


def test_a_key_the_broker_refuses_at_the_handshake_is_503_at_once(tmp_path):
    broker_public, broker_secret = generate_keys(tmp_path / "broker")
    (tmp_path / "workers").mkdir()
    (tmp_path / "clients").mkdir()
    generate_keys(tmp_path / "gateway")  # on no list
    security = BrokerSecurity(broker_secret, tmp_path / "workers", tmp_path / "clients")
    keys = CurveClientKeys.load(tmp_path / "gateway.key_secret", broker_public)
    with (
        BrokerThread(security=security) as broker,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=UNREACHABLE_CONNECT_TIMEOUT, curve=keys)) as front,
    ):
        _broker_unreachable_everywhere(front, "refused this key: it is not on the broker's allow-list")


class FailingBridge:
    """A bridge whose generation streams one chunk and then fails, as when a worker dies mid-stream."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def stop(self) -> None:
        pass

    def observe(self, observer: Any) -> None:
        pass  # the dashboard's sampler: never called here

    def submit(self, model: str, **options: Any) -> BridgedRequest:
        bridged = BridgedRequest(model)
        bridged.events.put_nowait(Delta("Hello", []))
        error = MeshError(502, "worker w1 failed mid-stream (missed heartbeats)")
        bridged.events.put_nowait(Result(text="Hello", model=model, error=error))
        return bridged

    def cancel(self, bridged: BridgedRequest) -> None:
        raise AssertionError("a generation that ended is not cancelled")


def test_an_error_mid_stream_is_an_sse_error_event():
    with GatewayThread(FailingBridge()) as front:
        stream = front.client().chat.completions.create(model=MODEL, messages=CHAT, stream=True)
        received: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "Hello" and "failed mid-stream" in caught.value.message
        assert caught.value.body["code"] == "worker_failed"
        raw = requests.post(f"{front.url}/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True})
        events = [line for line in raw.text.splitlines() if line]
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        assert events[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------------ disconnects


def _post(port: int, body: dict[str, Any]) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection


def test_a_client_that_disconnects_mid_stream_frees_the_slot(mesh):
    broker, node, front = mesh
    # A long answer, cut short: it would take minutes to finish on its own.
    connection = _post(front.port, {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "stream": True})
    response = connection.getresponse()
    assert response.status == 200
    while b'"content":"' not in (line := response.readline()) or b'"content":""' in line:
        pass  # until the first token
    assert slots_busy(node)
    connection.close()
    wait_for(lambda: not slots_busy(node), 10, "llama-server's slot to be freed")
    wait_for(lambda: not broker.broker.core.requests, 5, "the broker to forget the request")


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_frees_the_slot(mesh):
    broker, node, front = mesh
    connection = _post(front.port, {"model": MODEL, "messages": CHAT, "max_tokens": 2000})
    wait_for(lambda: slots_busy(node), 20, "the generation to start")
    connection.close()
    wait_for(lambda: not slots_busy(node), 10, "llama-server's slot to be freed")
    wait_for(lambda: not broker.broker.core.requests, 5, "the broker to forget the request")
