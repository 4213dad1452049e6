"""Test hosts as Linux network namespaces joined by veth pairs, and processes run inside them.

Each namespace stands for a machine: its own interfaces, its own loopback (llama-server binds 127.0.0.1 inside
it), and links that a test can cut with ``ip link set ... down``. Everything is created under one unique prefix
and removed by ``Network.close()``; addresses come from 10.231.0.0/16, used only inside these namespaces.

Run as a program (inside a namespace), this file is a tiny SDK client that prints JSON lines:
``python netkit.py stream ENDPOINT PROMPT MAX_TOKENS`` or ``python netkit.py workers ENDPOINT`` (the workers' names
and the shard hosts), with keys from QMESH_CURVE_SECRET and QMESH_BROKER_KEY when the mesh uses CURVE.
``python netkit.py active BROKER_A,BROKER_B`` asks each broker of a pair on its own and prints those that say they
are active; ``stream`` takes a fourth argument, the client's ``liveness`` (how long it bears a silent broker).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmesh.testing import ROOT, Child

SUBNET = "10.231"


def netns_unavailable() -> str | None:
    """Why this machine cannot host namespaced test hosts, or None if it can (checked by making one)."""
    if os.geteuid() != 0:
        return f"running as uid {os.geteuid()}, not root"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (`apt-get install -y iproute2` provides it)"
    probe = f"qmt-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def remove_stale() -> None:
    """Delete namespaces left by test processes that died without cleaning up (their pid is in the name)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^(qmt-(\d+)-\S+)", listing, flags=re.MULTILINE):
        if not Path(f"/proc/{name[1]}").exists():
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)


def ip(*args: str) -> None:
    """Run ``ip`` and fail loudly: a half-built network would make the test's failure meaningless."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Namespace:
    name: str

    def exec(self, *argv: str) -> list[str]:
        """The command line that runs ``argv`` inside this namespace (``ip netns exec`` execs, keeping the pid)."""
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass(frozen=True)
class Link:
    """One veth pair: ``left`` side (address ``.1``) in one namespace, ``right`` (``.2``) in another."""

    left: Namespace
    left_dev: str
    left_addr: str
    right: Namespace
    right_dev: str
    right_addr: str

    def set_right(self, up: bool) -> None:
        """Cut or restore the link at the right side, as if that machine's cable were pulled."""
        ip("-n", self.right.name, "link", "set", self.right_dev, "up" if up else "down")


class Network:
    """Namespaces and veth links under one prefix (unique per test process), and the processes started in them;
    all removed by ``close()``."""

    def __init__(self) -> None:
        self.prefix = f"qmt-{os.getpid()}"
        self._dev_prefix = f"qmt{os.getpid()}"  # interface names are limited to 15 characters
        self.namespaces: list[Namespace] = []
        self.processes: list[HostProcess] = []
        self._links = 0

    def add_host(self, suffix: str) -> Namespace:
        namespace = Namespace(f"{self.prefix}-{suffix}")
        ip("netns", "add", namespace.name)
        self.namespaces.append(namespace)
        ip("-n", namespace.name, "link", "set", "lo", "up")
        return namespace

    def connect(self, left: Namespace, right: Namespace) -> Link:
        """A point-to-point /30 between two namespaces; made inside them, so it never appears in ours."""
        self._links += 1
        n = self._links
        left_dev, right_dev = f"{self._dev_prefix}l{n}", f"{self._dev_prefix}r{n}"
        left_addr, right_addr = f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"
        ip("-n", left.name, "link", "add", left_dev, "type", "veth", "peer", "name", right_dev, "netns", right.name)
        for namespace, dev, addr in ((left, left_dev, left_addr), (right, right_dev, right_addr)):
            ip("-n", namespace.name, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", namespace.name, "link", "set", dev, "up")
        return Link(left, left_dev, left_addr, right, right_dev, right_addr)

    def lan(self, hosts: list[Namespace]) -> dict[Namespace, Link]:
        """One switch (a Linux bridge in a namespace of its own) with every host on it, in 10.231.200.0/24, so that
        any host reaches any other. Each host's link has the switch on its left and the host on its right: its
        ``right_addr`` is the host's address, ``set_right`` its cable."""
        switch = self.add_host("switch")
        ip("-n", switch.name, "link", "add", "br0", "type", "bridge")
        ip("-n", switch.name, "link", "set", "br0", "up")
        links = {}
        for number, host in enumerate(hosts, start=1):
            self._links += 1
            n = self._links
            left_dev, right_dev, addr = f"{self._dev_prefix}l{n}", f"{self._dev_prefix}r{n}", f"{SUBNET}.200.{number}"
            veth = ("type", "veth", "peer", "name", right_dev, "netns", host.name)
            ip("-n", switch.name, "link", "add", left_dev, *veth)
            ip("-n", switch.name, "link", "set", left_dev, "master", "br0")
            ip("-n", switch.name, "link", "set", left_dev, "up")
            ip("-n", host.name, "addr", "add", f"{addr}/24", "dev", right_dev)
            ip("-n", host.name, "link", "set", right_dev, "up")
            links[host] = Link(switch, left_dev, "", host, right_dev, addr)
        return links

    def start(self, host: Namespace, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> HostProcess:
        """Run ``argv`` inside ``host`` until ``close()``."""
        process = HostProcess(host, argv, log_path, env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop the processes started in it (the last first), then delete the namespaces (and with them their
        veths)."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace.name], capture_output=True)
        self.namespaces.clear()


class HostProcess(Child):
    """A process run inside a namespace (``ip netns exec`` execs, so it keeps the pid), its output in a log file."""

    def __init__(self, namespace: Namespace, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        super().__init__(log_path.stem, namespace.exec(*argv), log_path, env)


class JsonLines(Child):
    """A client program run inside a namespace that reports on stdout, one JSON object a line."""

    def __init__(self, namespace: Namespace, *args: str, log_path: Path) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), *args]
        # stderr goes to the log file, not a pipe: a chatty client can never block on it
        super().__init__("client", namespace.exec(*argv), log_path, stdout_pipe=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float) -> dict[str, Any]:
        """The next object; AssertionError (with the program's stderr) if it ends or stays silent first."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from the client within {timeout:g} s") from None
        if line is None:
            self.popen.wait(timeout=5)
            raise AssertionError(f"the client ended (status {self.popen.returncode}) early:\n{self.log()}")
        return json.loads(line)


@contextmanager
def network(log_dir: Path) -> Iterator[Network]:
    """The hosts of one test, which is skipped unless this machine can make namespaces. At the end the network is
    closed and the tail of each log in ``log_dir`` printed (pytest shows that only when the test failed)."""
    reason = netns_unavailable()
    if reason is not None:
        import pytest  # here, not at the top: this file also runs as the client program, which needs no pytest

        pytest.skip(f"needs root and iproute2 to create network namespaces: {reason}")
    remove_stale()
    net = Network()
    try:
        yield net
    finally:
        net.close()
        for path in sorted(log_dir.glob("*.log")):
            print(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")


def listed(namespace: Namespace, endpoint: str) -> dict[str, Any]:
    """The workers' names and the shard hosts the broker at ``endpoint`` lists, asked from ``namespace``; none of
    either while the broker does not answer yet (a loaded machine): the caller waits and asks again."""
    try:
        return run_json(namespace, "workers", endpoint)
    except AssertionError:
        return {"workers": [], "shards": []}


def run_json(namespace: Namespace, *args: str, timeout: float = 30) -> Any:
    """Run this file's client once inside ``namespace`` and return its last JSON line."""
    argv = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(namespace.exec(*argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise AssertionError(f"client {args} failed with {done.returncode}:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the client program


def _curve() -> Any:
    """The client's keys when the test runs the mesh with CURVE: QMESH_CURVE_SECRET and QMESH_BROKER_KEY."""
    from qmesh.common.config import client_keys_from_options

    secret, broker_key = os.environ.get("QMESH_CURVE_SECRET"), os.environ.get("QMESH_BROKER_KEY")
    return client_keys_from_options(Path(secret) if secret else None, Path(broker_key) if broker_key else None)


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _stream(endpoint: str, prompt: str, max_tokens: int, liveness: float | None) -> None:
    """One request: a line per chunk (with the worker serving it), then the result and every streamed token id.
    ``liveness``: the seconds of a broker's silence the client bears while it waits (the SDK's default if None)."""
    from qmesh.client.sdk import QMeshClient

    pair = {} if liveness is None else {"liveness": liveness}
    with QMeshClient(endpoint, timeout=60, connect_timeout=10, curve=_curve(), **pair) as client:
        request = client.submit(prompt, model="smollm2-135m", max_tokens=max_tokens, temperature=0)
        reported = 0
        while not request.done:
            client.poll(0.05)
            if len(request.chunks) > reported:
                reported = len(request.chunks)
                tokens = sum(len(chunk.tokens) for chunk in request.chunks)
                _emit(event="chunk", chunks=reported, tokens=tokens, worker=request.status.get("worker"))
        result = request.result()
        _emit(
            event="result",
            error=None if result.error is None else str(result.error),
            text=result.text,
            tokens=result.tokens,
            failovers=result.failovers,
            resumes=request.resumes,
            worker=result.worker,
            token_ids=[token for chunk in request.chunks for token in chunk.tokens],
        )


def _workers(endpoint: str) -> None:
    from qmesh.client.sdk import QMeshClient

    with QMeshClient(endpoint, connect_timeout=10, curve=_curve()) as client:
        _emit(workers=[worker["name"] for worker in client.workers()], shards=client.shards())


def _active(address: str) -> None:
    """Each broker of a pair asked on its own which it is: the endpoints of those that say they are active."""
    from qmesh.common.endpoints import broker_endpoints
    from qmesh.common.keys import CurveClientKeys
    from qmesh.testing.pair import says_active

    keys, active = _curve(), []
    for index, endpoint in enumerate(broker_endpoints(address)):
        curve = None
        if keys is not None:  # this broker's public key: one per broker in --broker's order, or one the pair shares
            curve = CurveClientKeys(keys.own, (keys.broker_publics[index % len(keys.broker_publics)],))
        if says_active(endpoint, curve, timeout=2.0):
            active.append(endpoint)
    _emit(active=active)


def main(argv: list[str]) -> int:
    command, endpoint, *rest = argv
    if command == "stream":
        _stream(endpoint, rest[0], int(rest[1]), float(rest[2]) if len(rest) > 2 else None)
    elif command == "workers":
        _workers(endpoint)
    elif command == "active":
        _active(endpoint)
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
