"""A broker pair across machines: the primary and the backup on hosts of their own, a worker on a third and a client
on a fourth, all on one LAN, with CURVE (each broker its own key pair). The active broker's cable is pulled
mid-stream: no FIN, no RST, only silence. The backup takes over, the worker keeps generating and hands the stream to
it, the client follows, and the answer is the uninterrupted one; when the cable is back, the old primary, which kept
believing itself active behind it, yields to the newer epoch: one active broker. Needs root and iproute2; skipped
otherwise (tests/netkit.py has the hosts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit import MODEL
from netkit import HostProcess, JsonLines, Link, Namespace, listed, network, run_json
from qmesh.testing import qmesh_command, wait_for
from qmesh.testing.pair import ROLES, BrokerPair

pytestmark = pytest.mark.sidecar

HEARTBEAT_MS = 200  # brokers and worker: a silent broker is left after 3 heartbeats, 0.6 s
CLIENT_LIVENESS = "1.0"  # seconds the client bears a silent broker while its stream waits
PORT, HA_PORT = 5555, 5565
PROMPT = "Write a long poem about rivers."
MAX_TOKENS = 160
CUT_AFTER = 10  # tokens streamed before the active broker's cable is pulled


@dataclass
class Lan:
    hosts: dict[str, Namespace]  # "primary", "backup", "worker", "client"
    links: dict[str, Link]
    pair: BrokerPair
    log_dir: Path

    def registered(self) -> list[str]:
        """The workers the active broker lists, as the client's host sees it (none while no broker answers)."""
        return listed(self.hosts["client"], self.pair.address)["workers"]

    def active(self) -> list[str]:
        """The roles of the brokers that say they are active, each asked on its own from the client's host."""
        endpoints = run_json(self.hosts["client"], "active", self.pair.address)["active"]
        return [role for role in ROLES if self.pair.endpoints[role] in endpoints]


@pytest.fixture
def lan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lan]:
    with network(tmp_path) as net:

        def start(host: Namespace, name: str, argv: list[str], log_path: Path) -> HostProcess:
            return net.start(host, argv, log_path, {"QMESH_HOME": str(tmp_path / f"home-{name}")})

        hosts = {key: net.add_host(key) for key in (*ROLES, "worker", "client")}
        by_host = net.lan(list(hosts.values()))
        links = {key: by_host[host] for key, host in hosts.items()}
        pair = BrokerPair(
            tmp_path,
            HEARTBEAT_MS,
            curve=True,
            endpoints={role: f"tcp://{links[role].right_addr}:{PORT}" for role in ROLES},
            ha={role: f"tcp://{links[role].right_addr}:{HA_PORT}" for role in ROLES},
            launch=lambda role, argv, log_path: start(hosts[role], role, argv, log_path),
        )
        assert pair.keys is not None
        # The client programs (run_json, JsonLines) read their keys here; every QMesh process gets its own by flags.
        monkeypatch.setenv("QMESH_CURVE_SECRET", str(pair.keys / "client.key_secret"))
        monkeypatch.setenv("QMESH_BROKER_KEY", pair.broker_keys)
        for role in ROLES:
            pair.start(role)
        options = ["--model", MODEL, "--broker", pair.address, *pair.client_keys("worker"), "--cpu-threads", "1"]
        worker = [*options, "--heartbeat-ms", str(HEARTBEAT_MS), "--threads", "1", "--slots", "1", "--grace", "2"]
        start(hosts["worker"], "worker", qmesh_command("qmesh-worker", *worker), tmp_path / "worker.log")
        yield Lan(hosts, links, pair, tmp_path)


def test_the_active_brokers_cable_pulled_mid_stream(lan: Lan) -> None:
    wait_for(lambda: len(lan.registered()) == 1, 120, "the worker to register across the LAN")
    assert lan.active() == ["primary"]
    client = lan.hosts["client"]
    reference = run_json(client, "stream", lan.pair.address, PROMPT, str(MAX_TOKENS), timeout=120)
    assert reference["error"] is None, reference["error"]

    stream = JsonLines(
        client,
        "stream",
        lan.pair.address,
        PROMPT,
        str(MAX_TOKENS),
        CLIENT_LIVENESS,
        log_path=lan.log_dir / "client.log",
    )
    try:
        while (event := stream.next(60))["tokens"] < CUT_AFTER:
            pass
        lan.links["primary"].set_right(up=False)  # the primary's host drops off the LAN, saying nothing
        while (event := stream.next(60))["event"] != "result":
            pass
        result = event
    finally:
        stream.kill()
    assert result["error"] is None, result["error"]
    assert result["tokens"] == len(result["token_ids"]) == reference["tokens"]
    assert result["token_ids"] == reference["token_ids"], "a token lost, repeated or changed at the takeover"
    assert result["resumes"] >= 1, "the client never left the primary: the cut came too late to prove anything"
    # The same generation went on: a stream resumed by a new one would count a failover.
    assert result["failovers"] == 0

    assert lan.active() == ["backup"]  # the primary, cut off, does not answer
    later = run_json(client, "stream", lan.pair.address, "Say hi.", "8", timeout=60)
    assert later["error"] is None, later["error"]

    lan.links["primary"].set_right(up=True)
    primary = lan.pair.brokers["primary"]
    # Once the cable is back the primary hears the backup's newer epoch within a few heartbeats, however long the
    # cut lasted: not when TCP's retransmission timer on the old connection happens to fire (it backs off, up to
    # minutes), while clients that reach the primary first are served by a broker without workers.
    wait_for(lambda: "steps down" in primary.log(), 5, "the old primary to hear the newer epoch and step down")
    assert lan.active() == ["backup"], "two active brokers once the primary is back on the LAN"
    again = run_json(client, "stream", lan.pair.address, "Say bye.", "8", timeout=60)
    assert again["error"] is None, again["error"]
    assert lan.active() == ["backup"]
