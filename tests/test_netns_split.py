"""A model split across machines: a broker, two workers and three shard hosts on six network-namespace hosts of one
LAN, with CURVE (the split worker reaches its shard hosts through the CURVE bridge). A shard host's cable pulled
mid-stream: the stream ends on the other worker with nothing lost, and the split worker forms again over the
hosts that are left. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit import MODEL, Keyring
from netkit import HostProcess, JsonLines, Link, Namespace, listed, network, run_json
from qmesh.common.keys import generate_keys
from qmesh.testing import qmesh_command, wait_for

pytestmark = pytest.mark.sidecar

HEARTBEAT_MS = "200"
PORT = 5555
BRIDGE_PORT = 7000
PROMPT = "Write a long poem about rivers."
MAX_TOKENS = 160
SHARDS = ("a", "b", "c")


@dataclass
class Lan:
    hub: Namespace  # the broker's machine, where the unsplit worker and the client run too
    links: dict[str, Link]  # by host key: "hub", "w", "a", "b", "c"
    split: HostProcess  # the split worker, on "w"
    shards: dict[str, HostProcess]
    log_dir: Path

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.links['hub'].right_addr}:{PORT}"

    def state(self) -> dict:
        return listed(self.hub, self.endpoint)

    def split_names(self) -> list[str]:
        return [name for name in self.state()["workers"] if f"/{self.split.pid}/" in name]

    def held(self) -> list[str]:
        """The shard hosts the split worker holds, by host key (their names are lab/KEY)."""
        split = self.split_names()
        return sorted(s["name"].split("/")[1] for s in self.state()["shards"] if split and s["worker"] in split)


@pytest.fixture
def lan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lan]:
    with network(tmp_path) as net:
        keyring = Keyring(tmp_path)
        for key in SHARDS:
            public, _ = generate_keys(tmp_path / f"shard-{key}")
            shutil.copy(public, keyring.workers / public.name)
        # The client programs (run_json, JsonLines) read their keys here; every QMesh process gets its own by flags.
        monkeypatch.setenv("QMESH_CURVE_SECRET", str(tmp_path / "client.key_secret"))
        monkeypatch.setenv("QMESH_BROKER_KEY", str(keyring.broker_public))

        def start(host: Namespace, name: str, argv: list[str]) -> HostProcess:
            return net.start(host, argv, tmp_path / f"{name}.log", {"QMESH_HOME": str(tmp_path / f"home-{name}")})

        hosts = {key: net.add_host(key) for key in ("hub", "w", *SHARDS)}
        by_host = net.lan(list(hosts.values()))
        links = {key: by_host[host] for key, host in hosts.items()}
        endpoint = f"tcp://{links['hub'].right_addr}:{PORT}"
        broker_key = ["--broker-key", str(keyring.broker_public)]
        worker_keys = ["--curve-secret", str(tmp_path / "worker.key_secret"), *broker_key]
        common = ["--broker", endpoint, "--heartbeat-ms", HEARTBEAT_MS]
        start(
            hosts["hub"],
            "broker",
            qmesh_command(
                "qmesh-broker",
                *("--bind", endpoint, "--heartbeat-ms", HEARTBEAT_MS),
                *("--curve-secret", str(keyring.broker_secret)),
                *("--allow-workers", str(keyring.workers), "--allow-clients", str(keyring.clients)),
            ),
        )
        shards = {
            key: start(
                hosts[key],
                f"shard-{key}",
                qmesh_command(
                    "qmesh-shard",
                    *common,
                    *("--curve-secret", str(tmp_path / f"shard-{key}.key_secret"), *broker_key),
                    *("--bind", f"tcp://{links[key].right_addr}:{BRIDGE_PORT}", "--memory", "100"),
                    *("--threads", "1", "--name", f"lab/{key}"),
                ),
            )
            for key in SHARDS
        }
        worker = ["--model", MODEL, *common, *worker_keys, "--slots", "1", "--cpu-threads", "1", "--grace", "2"]
        split = start(hosts["w"], "split-worker", qmesh_command("qmesh-worker", *worker, "--shards", "auto"))
        start(hosts["hub"], "worker", qmesh_command("qmesh-worker", *worker, "--threads", "1"))
        yield Lan(hosts["hub"], links, split, shards, tmp_path)


def test_a_shard_hosts_cable_pulled_mid_stream(lan: Lan) -> None:
    wait_for(lambda: len(lan.state()["workers"]) == 2 and len(lan.held()) == 2, 120, "both workers, one split")
    first = lan.held()
    streams = [
        JsonLines(lan.hub, "stream", lan.endpoint, PROMPT, str(MAX_TOKENS), log_path=lan.log_dir / f"client-{i}.log")
        for i in range(2)
    ]  # one on each worker (each has one slot)
    try:
        split_pid = f"/{lan.split.pid}/"
        on_split, event = None, None
        while on_split is None:
            for stream in streams:
                event = stream.next(60)
                if event["event"] == "chunk" and split_pid in (event["worker"] or "") and event["tokens"] >= 10:
                    on_split = stream
                    break
        cut = first[0]
        lan.links[cut].set_right(up=False)
        while (event := on_split.next(90))["event"] != "result":
            pass
        result = event
        other = next(stream for stream in streams if stream is not on_split)
        while other.next(90)["event"] != "result":
            pass
    finally:
        for stream in streams:
            stream.kill()
    assert result["error"] is None, result["error"]
    assert result["failovers"] == 1
    assert result["tokens"] == len(result["token_ids"]) <= MAX_TOKENS

    # The split worker forms again over the two hosts still on the LAN.
    wait_for(lambda: len(lan.held()) == 2 and cut not in lan.held(), 90, "the split worker to form again")
    reference = run_json(lan.hub, "stream", lan.endpoint, PROMPT, str(MAX_TOKENS), timeout=120)
    assert reference["error"] is None
    assert result["token_ids"] == reference["token_ids"], "the failover lost or repeated tokens"

    lan.links[cut].set_right(up=True)  # the cut host comes back, free
    wait_for(lambda: any(re.fullmatch(f"lab/{cut}", s["name"]) for s in lan.state()["shards"]), 60, "the cut host back")
