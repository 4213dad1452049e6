"""The benchmark harness works end to end: ``scripts/bench capacity``, ``prefix`` and ``split`` with tiny counts.
Behaviour, not timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmesh.testing import ROOT


def bench(tmp_path: Path, name: str, *options: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``scripts/bench name options``; return its figures (--json) and the section it recorded (--record)."""
    record, figures = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), name, *options]
    command += ["--record", str(record), "--json", str(figures)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(figures.read_text())[name], record.read_text()


def test_capacity_benchmark_routes_every_chunk_and_records_a_section(tmp_path: Path) -> None:
    options = ["--workers", "1", "--slots", "2", "--requests", "6", "--chunks", "20", "--rounds", "1"]
    options += ["--mdp-requests", "50", "--mdp-rounds", "2"]
    data, section = bench(tmp_path, "capacity", *options, timeout=300)
    assert data["requests_ok"] == 6
    assert data["chunks"] == 6 * 20
    assert data["lost_chunks"] == 0 and data["failed_requests"] == 0
    assert data["proxy_messages"] == data["inbound"]  # the baseline forwarded as many messages as the broker got
    assert data["warnings"] == 0
    # the plain MDP load went through qmesh-broker and majortomo's broker both ways, every answer whole
    brokers = [
        "qmesh-broker",
        "majortomo 0.2.0 Broker, logging unconfigured",
        "majortomo 0.2.0 command, its default logging",
    ]
    assert data["plain_mdp_requests"] == dict.fromkeys(brokers, 2 * 50)
    assert 0 < data["plain_mdp_io_us_per_request"]["qmesh-broker"] < data["plain_mdp_us_per_request"]["qmesh-broker"]
    assert data["plain_mdp_failed"] == 0
    assert "### capacity: " in section
    assert "- command: `scripts/bench capacity --workers 1" in section
    assert "| CPU us per routed message" in section
    assert "plain MDP requests: broker CPU per request against majortomo's broker" in section


@pytest.mark.sidecar  # the benchmark's workers start real llama-servers, out of sight of conftest's rule
def test_prefix_benchmark_runs_both_policies_and_keeps_chats_on_their_cache(tmp_path: Path) -> None:
    data, section = bench(tmp_path, "prefix", "--quick", timeout=600)
    for workload, requests in (("chat", 3 * 2), ("shared", 4), ("control", 3)):  # --quick's counts, one round
        for policy in ("least-loaded", "cache-aware"):
            leg = data[workload][policy]
            assert (leg["requests"], leg["errors"]) == (requests, 0), (workload, policy)
            assert len(leg["requests_per_server"]) == 4  # 2 worker processes x 2 threads
            assert sum(leg["requests_per_server"].values()) == requests
    chat = data["chat"]["cache-aware"]
    # Its session keeps each conversation on the llama-server that holds its history (never imbalanced with 2 users).
    assert chat["cached_tokens"]["follow-up"] > chat["prompt_tokens"]["follow-up"] / 2
    assert data["index_bytes_per_block"] > 8
    goals = {"follow_up_vs_first", "follow_up_vs_least_loaded", "hit_ratio", "tokens_per_s", "fair_share"}
    assert set(data["goals"]["met"]) == goals
    assert "### prefix: " in section
    assert "- command: `scripts/bench prefix --quick" in section
    assert "goal 1a: " in section and "broker memory per cached prefix entry" in section


@pytest.mark.sidecar  # its workers and shard hosts start llama-server and rpc-server
def test_split_benchmark_measures_the_model_unsplit_and_over_shard_hosts(tmp_path: Path) -> None:
    data, section = bench(tmp_path, "split", "--quick", timeout=600)
    for service in ("bench-whole", "bench-split-rpc", "bench-split-curve"):
        assert data[service]["errors"] == 0 and data[service]["tokens_per_s"] > 0, service
    assert "| split over 2 hosts, CURVE bridge |" in section


@pytest.mark.sidecar  # the rig's llama-servers and worker are real, out of sight of conftest's rule
def test_overhead_benchmark_runs_the_three_chat_paths_and_measures_the_relay_floor(tmp_path: Path) -> None:
    options = ["--gateway", "--rounds", "1", "--requests", "2", "--max-tokens", "16"]
    data, section = bench(tmp_path, "overhead", *options, timeout=600)
    for path in ("sdk", "gateway"):
        assert len(data[path]["added_ttft_ms"]) == 2  # each prompt went every way, paired with the direct one
        assert data[path]["tokens_ratio_saturation"] > 0
        assert data[path]["ms_per_token_saturation"]["broker"] > 0
    assert data["gateway"]["ms_per_token_saturation"]["gateway"] > 0
    rows = [line for line in section.splitlines() if line.startswith("| requests (errors)")]
    assert len(rows) == 2 and all(line.count("(0)") == 3 for line in rows), rows  # c=1 and saturation, no errors
    floor = data["relay_floor"]
    for kind in ("pyzmq loop (recv_multipart, send_multipart)", "libzmq's C loop (zmq.proxy)"):
        assert len(floor[kind]) == 1 and floor[kind][0] > 0, kind
    assert "CPU floor of the tokens/s ratio" in section
    readers = data["stream_read_ms_per_event"]
    for reader in ("the worker's (requests, sseclient-py)", "http.client, a line at a time"):
        assert len(readers[reader]) == 1 and readers[reader][0] > 0, reader
