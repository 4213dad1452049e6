"""Broker metrics (Prometheus) and ``qmesh-status``, against a real broker process and a real worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from meshkit import MODEL, worker_threads
from qmesh.broker.core import BrokerCore, FinishedRequest
from qmesh.broker.loop import Broker
from qmesh.broker.metrics import BrokerMetrics
from qmesh.client.sdk import QMeshClient
from qmesh.testing import ROOT, free_endpoint, qmesh_command, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[str, str]]:
    """``qmesh-broker --metrics-port`` as a real process, one in-process worker; yields (endpoint, metrics URL)."""
    endpoint, port = free_endpoint(), free_port()
    command = qmesh_command("qmesh-broker", "--bind", endpoint, "--heartbeat-ms", "200")
    broker = subprocess.Popen([*command, "--metrics-port", str(port)], cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _reachable(url), 20, "the metrics port")
        with worker_threads(endpoint, count=1, slots=2):
            yield endpoint, url
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=10)


def _reachable(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.ConnectionError:
        return False


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as ``{(name, sorted labels): value}``."""
    text = requests.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def status(endpoint: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    command = qmesh_command("qmesh-status", "--broker", endpoint, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_count_requests_tokens_and_latencies(mesh):
    endpoint, url = mesh
    with QMeshClient(endpoint) as client:
        results = [client.submit("Say hi.", model=MODEL, max_tokens=6, temperature=0).result() for _ in range(2)]
        assert client.submit("Hi.", model="no-such-model", max_tokens=4).result().error.code == 404
        assert client.submit("word " * 3000, model=MODEL, max_tokens=4).result().error.code == 400  # too long
    assert all(r.ok for r in results)
    ok = ("qmesh_requests_total", (("model", MODEL), ("outcome", "ok")))
    running = ("qmesh_requests_running", (("model", MODEL),))

    def settled() -> dict | None:  # gauges are refreshed every 0.5 s, counters at once
        samples = scrape(url)
        return samples if samples.get(ok) == 2 and samples.get(running) == 0 else None

    samples = wait_for(settled, 10, "2 ok requests and none running")
    assert samples["qmesh_requests_total", (("model", "other"), ("outcome", "404"))] == 1, "unknown names are 'other'"
    assert samples["qmesh_requests_total", (("model", MODEL), ("outcome", "400"))] == 1, "the caller's error, not 502"
    model = (("model", MODEL),)
    assert samples["qmesh_tokens_generated_total", model] == sum(r.tokens for r in results)
    counts = {"queue_wait": 3, "time_to_first_token": 2, "request_duration": 3}  # the 400 streamed nothing
    for histogram, count in counts.items():
        assert samples[f"qmesh_{histogram}_seconds_count", model] == count
        assert samples[f"qmesh_{histogram}_seconds_sum", model] >= 0
    sums = {name: samples[f"qmesh_{name}_seconds_sum", model] for name in ("time_to_first_token", "request_duration")}
    assert sums["request_duration"] >= sums["time_to_first_token"]
    assert samples["qmesh_requests_waiting", model] == 0 and samples["qmesh_requests_running", model] == 0
    assert samples["qmesh_worker_slots", model] == 2
    states = {state: samples["qmesh_workers", (("model", MODEL), ("state", state))] for state in ("ready", "busy")}
    assert states == {"ready": 1, "busy": 0}
    names = {name for name, _ in samples}
    assert all(name.startswith("qmesh_") and ":" not in name for name in names)


def test_running_requests_and_busy_workers_are_gauged_while_they_run(mesh):
    endpoint, url = mesh

    def gauges() -> tuple[float | None, float | None]:
        samples = scrape(url)
        busy = samples.get(("qmesh_workers", (("model", MODEL), ("state", "busy"))))
        return samples.get(("qmesh_requests_running", (("model", MODEL),))), busy

    with QMeshClient(endpoint) as client:
        long_ones = [client.submit("Write a long story.", model=MODEL, max_tokens=2000) for _ in range(2)]
        deadline, seen = time.monotonic() + 30, gauges()
        while time.monotonic() < deadline and seen != (2, 1):
            client.poll(0.1)
            seen = gauges()
        for request in long_ones:
            request.cancel()
    assert seen == (2, 1), "2 requests running, the worker's 2 slots busy"
    cancelled = ("qmesh_requests_total", (("model", MODEL), ("outcome", "499")))
    wait_for(lambda: scrape(url).get(cancelled) == 2, 10, "2 cancelled requests")


def test_without_metrics_the_broker_keeps_no_records():
    broker = Broker(free_endpoint())
    try:
        core = broker.core
        core.finished.append(FinishedRequest(MODEL, "ok", 0.0, 0.1, 0.2, 3))
        assert len(core.finished) == 0, "records are dropped as they are made"
    finally:
        broker.socket.close(linger=0)


def test_metrics_update_drains_records_and_bounds_labels():
    core = BrokerCore()
    core.known_services[MODEL] = set()
    core.finished.extend(
        [
            FinishedRequest(MODEL, "ok", 0.01, 0.05, 0.5, 10),
            FinishedRequest(MODEL, "504", 60.0, None, 60.0, 0),
            FinishedRequest("made-up-name-1234", "ok", 0.0, 0.1, 0.2, 3),
        ]
    )
    metrics = BrokerMetrics()
    metrics.update(core, now=0.0)
    assert not core.finished
    value = metrics.registry.get_sample_value
    assert value("qmesh_requests_total", {"model": MODEL, "outcome": "504"}) == 1
    assert value("qmesh_requests_total", {"model": "other", "outcome": "ok"}) == 1
    assert value("qmesh_tokens_generated_total", {"model": MODEL}) == 10
    assert value("qmesh_time_to_first_token_seconds_count", {"model": MODEL}) == 1  # none for the 504
    assert value("qmesh_queue_wait_seconds_bucket", {"model": MODEL, "le": "0.01"}) == 1


# ------------------------------------------------------------------------------------------ status


def test_status_table_shows_each_worker_and_the_queue_per_model(mesh):
    endpoint, _ = mesh
    done = status(endpoint)
    assert done.returncode == 0, done.stderr
    header, worker, blank, model_header, model = done.stdout.splitlines()
    expected = ["NAME", "HOST", "MODEL", "SLOTS", "TOK/S", "CACHE", "HITS", "CPU", "MEM", "LAST", "SEEN", "STATE"]
    assert header.split() == expected
    assert f" {socket.gethostname()} " in worker and MODEL in worker and "/2 " in worker and worker.endswith("ready")
    assert blank == "" and model_header.split() == ["MODEL", "WORKERS", "SLOTS", "BUSY", "QUEUED", "CONTEXT"]
    assert model.split() == [MODEL, "1", "2", "0", "0", "2048"]


def test_status_json_has_load_and_last_heartbeat(mesh):
    endpoint, _ = mesh
    with QMeshClient(endpoint) as client:  # the same prompt twice: the second comes from llama-server's cache
        prompt = "Repeat after me: " + "the quick brown fox jumps over the lazy dog. " * 12
        assert all(client.submit(prompt, model=MODEL, max_tokens=2).result().ok for _ in range(2))
    done = status(endpoint, "--json")
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    (worker,) = snap["workers"]
    assert worker["host"] == socket.gethostname() and worker["model"] == MODEL
    assert worker["slots"] == 2 and worker["state"] == "ready"
    assert 0 <= worker["last_seen_s"] < 2, "heartbeats every 0.2 s"
    assert 0 <= worker["cpu_percent"] <= 100 and 0 < worker["memory_percent"] <= 100
    assert isinstance(worker["tokens_per_second"], float)
    assert 0 < worker["prompt_cache_hit_ratio"] < 1
    assert snap["models"][MODEL] == {
        "workers": 1,
        "slots": 2,
        "busy": 0,
        "queued": 0,
        "capabilities": ["chat"],
        "by_capability": {"chat": {"workers": 1, "slots": 2, "busy": 0}},
        "context": 2048,
    }


def test_heartbeats_report_tokens_per_second_while_generating(mesh):
    endpoint, _ = mesh
    rates = []
    with QMeshClient(endpoint) as client:
        request = client.submit("Count from one to twenty.", model=MODEL, max_tokens=16)
        finished_at = None
        while finished_at is None or time.monotonic() - finished_at < 1.0:  # and a heartbeat or more after it
            rates += [w["load"].get("tokens_per_second", 0) for w in client.workers()]
            if request.done and finished_at is None:
                finished_at = time.monotonic()
            time.sleep(0.05)
    assert request.result().ok
    assert max(rates) > 0


def test_status_watch_refreshes_until_ctrl_c(mesh):
    endpoint, _ = mesh
    command = qmesh_command("qmesh-status", "--broker", endpoint, "--json", "--watch", "0.2")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when run from a background job
    )
    lines = [process.stdout.readline() for _ in range(3)]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0
    assert all(json.loads(line)["models"][MODEL]["workers"] == 1 for line in lines)


def test_status_without_a_broker_is_a_clear_error():
    done = status(free_endpoint(), "--connect-timeout", "0.5")
    assert done.returncode == 1 and "cannot reach the broker" in done.stderr


def test_metrics_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = qmesh_command("qmesh-broker", "--bind", free_endpoint(), "--metrics-port", str(port))
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
