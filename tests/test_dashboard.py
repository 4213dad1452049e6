"""The gateway's dashboard without a browser: the pure parts (history, tables), the sampler against a real broker,
and its HTTP routes on a real gateway, with fake workers (no llama-server: what is tested is the dashboard's view of
the mesh, not generation). tests/test_dashboard_browser.py drives the page in Chromium against a real mesh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from meshkit import BrokerThread, GatewayThread
from qmesh.client.sdk import MMICall, QMeshClient
from qmesh.gateway.bridge import Bridge
from qmesh.gateway.dashboard import (
    MMI_SERVICES,
    History,
    MeshSampler,
    Sample,
    model_rows,
    request_row,
    sample_of,
)
from qmesh.testing import ROOT, free_endpoint, wait_for, wait_for_workers
from qmesh.testing.fakeworker import FakePlan

MODEL = "fake-model"
KEY = "sk-dashboard"


def fake(name: str, slots: int) -> FakePlan:
    """One fake worker that heartbeats well within the test broker's liveness (3 x 0.2 s)."""
    return FakePlan(count=1, slots=slots, name=name, heartbeat=0.1)


def sample(at: float, tokens_per_second: float = 0.0, queued: int = 0) -> Sample:
    return Sample(at=at, tokens_per_second=tokens_per_second, queued=queued, busy=0, slots=2)


# ------------------------------------------------------------------------------------------ pure parts


def test_history_keeps_at_most_its_limit_of_samples_oldest_first():
    history = History(seconds=100.0, limit=3)
    for at in range(5):
        history.add(sample(float(at), tokens_per_second=at * 10.0, queued=at))
    columns = history.columns()
    assert columns["t"] == [2.0, 3.0, 4.0]
    assert columns["tokens_per_second"] == [20.0, 30.0, 40.0] and columns["queued"] == [2, 3, 4]
    assert columns["seconds"] == 100.0 and columns["slots"] == [2, 2, 2]


def test_history_forgets_samples_older_than_its_window_after_a_gap():
    history = History(seconds=10.0, limit=100)
    for at in (0.0, 1.0, 2.0, 9.0):
        history.add(sample(at))
    history.add(sample(11.5))  # 0.0 and 1.0 are now more than 10 s old
    assert history.columns()["t"] == [2.0, 9.0, 11.5]
    history.add(sample(60.0))  # the broker was out of reach for a while: nothing older is kept
    assert history.columns()["t"] == [60.0]


def test_model_rows_show_what_workers_announce_of_a_model():
    workers = [
        {"name": "b/1/0", "service": "chat-model", "info": {"sha256": "ab" * 32, "capabilities": ["chat"]}},
        {"name": "a/1/0", "service": "chat-model", "info": {"sha256": "ab" * 32, "capabilities": ["chat", 7]}},
        {"name": "c/1/0", "service": "embedder", "info": {"capabilities": ["embeddings"]}},
        {"name": "d/1/0", "service": "old-model", "info": {}},
    ]
    services = {
        "chat-model": {"workers": 2, "slots": 4, "busy": 1, "queued": 3, "context": 2048},
        "embedder": {"workers": 1, "slots": 1, "busy": 0, "queued": 0, "capabilities": ["embeddings", "rerank"]},
        "old-model": {"workers": 1, "slots": 2, "busy": 2, "queued": 0, "context": 4096},
    }
    rows = {row["name"]: row for row in model_rows(workers, services)}
    assert rows["chat-model"] == {
        "name": "chat-model",
        "sha256": ["ab" * 32],
        "capabilities": ["chat"],  # what is not a name is left out
        "workers": ["a/1/0", "b/1/0"],
        "slots": 4,
        "busy": 1,
        "queued": 3,
        "context": 2048,
    }
    assert rows["embedder"]["capabilities"] == ["embeddings", "rerank"]  # the broker's list counts too
    assert rows["embedder"]["context"] is None
    assert rows["old-model"]["sha256"] == [] and rows["old-model"]["capabilities"] == []


def test_a_request_row_carries_the_wall_clock_time_it_ended():
    record = {"seq": 4, "ended_s_ago": 2.5, "model": "m", "worker": "w", "tokens": 3}
    assert request_row(record, now=1000.0) == {"seq": 4, "ended_at": 997.5, "model": "m", "worker": "w", "tokens": 3}


def test_a_sample_adds_up_the_mesh():
    tables = {
        "workers": [{"tokens_per_second": 12.5}, {"tokens_per_second": None}, {"tokens_per_second": 3.0}],
        "models": [{"queued": 2, "busy": 3, "slots": 4}, {"queued": 1, "busy": 0, "slots": 2}],
    }
    assert sample_of(tables, now=7.0) == Sample(at=7.0, tokens_per_second=15.5, queued=3, busy=3, slots=6)


def test_answers_the_sampler_cannot_read_become_an_error_not_a_crash(caplog):
    """The sampler runs in the bridge's turns: an exception there would end every request in flight."""
    sampler = MeshSampler()
    answers = [[{"name": "w", "busy": "many"}], {"m": {"slots": 1}}, []]  # "busy" is no number
    for _ in range(2):
        asked = zip(MMI_SERVICES, answers, strict=True)
        calls = [MMICall(service, 0.0, done=True, answer=answer) for service, answer in asked]
        sampler._settle(calls)
    assert "could not be read" in sampler.state["error"] and sampler.state["workers"] == []
    assert len(sampler.history) == 0
    assert len([r for r in caplog.records if "could not read" in r.getMessage()]) == 1  # logged once, not each time


# ------------------------------------------------------------------------------------------ against a broker


def test_the_sampler_publishes_the_mesh_as_the_broker_reports_it(fake_workers):
    with BrokerThread() as broker:
        fake_workers(broker.endpoint, fake("fake-a", 3), MODEL)
        wait_for_workers(broker.endpoint, MODEL, 1, 10)
        with QMeshClient(broker.endpoint, connect_timeout=5) as client:
            answer = client.generate("Hello", model=MODEL, max_tokens=5)
            sampler = MeshSampler(interval=0.05)

            def sampled() -> dict[str, Any] | None:
                client.poll(0.05)
                sampler.tick(client)
                return sampler.state if sampler.state["requests"] else None

            state = wait_for(sampled, 10, "the sampler to see the request")
    assert state["error"] is None and state["broker"] == broker.endpoint
    (worker,) = state["workers"]
    assert (worker["name"], worker["model"], worker["slots"], worker["state"]) == ("fake-a/0", MODEL, 3, "ready")
    (model,) = state["models"]
    assert (model["name"], model["workers"], model["slots"]) == (MODEL, ["fake-a/0"], 3)
    (request,) = state["requests"]
    assert (request["worker"], request["tokens"], request["outcome"]) == ("fake-a/0", answer.tokens, "ok")
    assert len(state["history"]["t"]) >= 1 and state["history"]["slots"][-1] == 3


def test_the_sampler_says_when_the_broker_is_out_of_reach():
    with QMeshClient(free_endpoint(), connect_timeout=5) as client:
        sampler = MeshSampler(interval=0.05)

        def told() -> bool:
            client.poll(0.05)
            sampler.tick(client)
            return "cannot reach the broker" in (sampler.state["error"] or "")

        wait_for(told, 10, "the sampler to report the missing broker")
    assert sampler.state["workers"] == [] and sampler.state["sampled_at"] is None


# ------------------------------------------------------------------------------------------ HTTP


def test_the_page_and_its_assets_come_from_the_gateway_and_home_leads_there():
    with BrokerThread() as broker, GatewayThread(Bridge(broker.endpoint, connect_timeout=5)) as front:
        base = f"http://127.0.0.1:{front.port}/"
        home = requests.get(base, allow_redirects=False, timeout=10)
        assert home.status_code in (302, 307) and home.headers["location"] == "dashboard"
        page = requests.get(base, timeout=10)  # following the redirect
        assert page.status_code == 200 and page.url == base + "dashboard"
        assert page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
        assert "dashboard/static/dashboard.css" in assets and "dashboard/static/dashboard.js" in assets
        types = {".css": "text/css", ".js": "javascript"}
        for asset in assets:
            if asset.startswith("data:"):  # the empty favicon: nothing to load
                continue
            assert not re.match(r"\w+://", asset), f"{asset}: every asset must come from the gateway"
            answer = requests.get(base + asset, timeout=10)
            assert answer.status_code == 200, asset
            assert types[Path(asset).suffix] in answer.headers["content-type"], asset
        missing = requests.get(base + "dashboard/static/nothing.js", timeout=10)
        assert missing.status_code == 404


def test_the_data_shows_a_request_through_the_gateway(fake_workers):
    with BrokerThread() as broker, GatewayThread(Bridge(broker.endpoint, connect_timeout=5)) as front:
        fake_workers(broker.endpoint, fake("fake-b", 2), MODEL)
        wait_for_workers(broker.endpoint, MODEL, 1, 10)
        answer = front.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        data_url = f"http://127.0.0.1:{front.port}/dashboard/data"

        def logged() -> dict[str, Any] | None:
            data = requests.get(data_url, timeout=10).json()
            return data if data["requests"] else None

        data = wait_for(logged, 10, "the request to appear in the dashboard's data")
    assert data["workers"][0]["name"] == "fake-b/0" and data["models"][0]["name"] == MODEL
    (request,) = data["requests"]
    assert request["worker"] == "fake-b/0" and request["tokens"] == answer.usage.completion_tokens
    assert data["sampled_at"] <= data["now"] and data["interval_s"] > 0


def test_with_api_keys_the_data_needs_one_and_the_page_does_not():
    with BrokerThread() as broker, GatewayThread(Bridge(broker.endpoint, connect_timeout=5), (KEY,)) as front:
        base = f"http://127.0.0.1:{front.port}/dashboard"
        assert requests.get(base, timeout=10).status_code == 200  # the page holds no data: it asks for a key
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
            refused = requests.get(f"{base}/data", headers=headers, timeout=10)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["code"] == "invalid_api_key"
        allowed = requests.get(f"{base}/data", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert allowed.status_code == 200 and allowed.json()["broker"] in (broker.endpoint, None)


def test_an_installed_gateway_carries_the_dashboards_files(tmp_path):
    """What setuptools puts in an installed package (build_py, as a wheel or an install does) has every file of
    gateway/static: package data, not only the Python modules."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for package in ("common", "broker", "worker", "client", "gateway", "testing"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-W", "ignore", "-c", "import setuptools; setuptools.setup()", "-q", "build_py"]
        + ["--build-lib", str(tmp_path / "lib")],
        cwd=source,
        check=True,
        capture_output=True,
    )
    shipped = {path.name for path in (tmp_path / "lib" / "qmesh" / "gateway" / "static").iterdir()}
    assert shipped == {path.name for path in (ROOT / "gateway" / "static").iterdir()}
