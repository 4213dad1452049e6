"""Across machines: a broker and two workers on three network-namespace hosts; a pulled cable fails over, then heals.

The broker's host is joined to each worker's host by its own veth link (10.231.x.0/30). The client runs on the
broker's host. Cutting a worker's link mid-stream is what a network partition looks like to QMesh: no RST, no
DISCONNECT, just silence, so only heartbeats can tell. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit import MODEL
from netkit import HostProcess, JsonLines, Link, Namespace, Network, listed, network, run_json
from qmesh.testing import qmesh_command, wait_for

pytestmark = pytest.mark.sidecar

HEARTBEAT_MS = 200  # with liveness 3: a silent worker is dropped 0.6 s after its last message
PORT = 5555  # free by construction: the broker's namespace is new
PROMPT = "Write a long poem about rivers."
MAX_TOKENS = 200
CUT_AFTER = 10  # tokens streamed by the first worker before its link is cut


@dataclass
class Hosts:
    hub: Namespace  # the broker's host, where the client runs too
    log_dir: Path
    workers: dict[str, HostProcess]  # "a", "b"
    links: dict[str, Link]

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{PORT}"

    def registered(self) -> list[str]:
        """Worker names the broker lists (names are host/pid/thread); none while the broker is not answering yet."""
        return listed(self.hub, self.endpoint)["workers"]

    def which(self, worker_name: str | None) -> str:
        """Which of our workers a broker-side name belongs to."""
        pid = int(re.fullmatch(r".*/(\d+)/\d+", worker_name or "").group(1))
        return next(key for key, process in self.workers.items() if process.pid == pid)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """A broker on host "hub" and one worker on each of hosts "a" and "b", each behind its own link."""
    with network(tmp_path) as net:
        hub = net.add_host("hub")
        # The test hosts' own private network: plain TCP on purpose (CURVE is tested in test_security*.py).
        broker = qmesh_command("qmesh-broker", "--bind", f"tcp://0.0.0.0:{PORT}", "--insecure")
        net.start(hub, [*broker, "--heartbeat-ms", str(HEARTBEAT_MS)], tmp_path / "broker.log")
        workers, links = {}, {}
        for key in ("a", "b"):
            host = net.add_host(key)
            links[key] = net.connect(hub, host)
            workers[key] = _start_worker(net, host, f"tcp://{links[key].left_addr}:{PORT}", tmp_path, key)
        yield Hosts(hub, tmp_path, workers, links)


def _start_worker(net: Network, host: Namespace, endpoint: str, tmp_path: Path, key: str) -> HostProcess:
    options = ["--model", MODEL, "--broker", endpoint, "--heartbeat-ms", str(HEARTBEAT_MS), "--grace", "2"]
    argv = qmesh_command("qmesh-worker", *options, "--slots", "1", "--threads", "1", "--cpu-threads", "1")
    env = {"QMESH_HOME": str(tmp_path / f"home-{key}")}
    return net.start(host, argv, tmp_path / f"worker-{key}.log", env)


def test_cut_link_fails_over_mid_stream_then_the_worker_comes_back(hosts: Hosts) -> None:
    wait_for(lambda: len(hosts.registered()) == 2, 60, "both workers to register across their links")
    stream = JsonLines(
        hosts.hub, "stream", hosts.endpoint, PROMPT, str(MAX_TOKENS), log_path=hosts.log_dir / "client.log"
    )
    try:
        event = stream.next(60)
        while event["tokens"] < CUT_AFTER:
            event = stream.next(30)
        first = hosts.which(event["worker"])
        second = "b" if first == "a" else "a"
        hosts.links[first].set_right(up=False)
        seam = event["tokens"]  # the last token count reported by the first worker: the seam is here or later
        while (event := stream.next(60))["event"] != "result":
            if hosts.which(event["worker"]) == first:
                seam = event["tokens"]
        result = event
    finally:
        stream.kill()
    assert result["error"] is None, result["error"]
    assert result["failovers"] == 1
    assert hosts.which(result["worker"]) == second
    assert result["tokens"] == len(result["token_ids"]) <= MAX_TOKENS, "the FINAL disagrees with what was streamed"

    hosts.links[first].set_right(up=True)
    first_pid = f"/{hosts.workers[first].pid}/"
    wait_for(lambda: any(first_pid in name for name in hosts.registered()), 30, "the cut-off worker to re-register")

    past_seam = min(seam + 8, MAX_TOKENS)
    reference = run_json(hosts.hub, "stream", hosts.endpoint, PROMPT, str(past_seam), timeout=60)
    assert reference["error"] is None
    assert result["token_ids"][:past_seam] == reference["token_ids"], "the seam lost or repeated text"
