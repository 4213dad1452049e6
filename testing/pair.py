"""``qmesh.testing.pair``: a primary/backup broker pair as two ``qmesh-broker`` processes, started one way for the
tests (loopback and network-namespace hosts) and for ``scripts/chaos --pair``.

Each broker has a client endpoint and an HA endpoint of its own; the two publish their state to each other over
the HA link. With ``curve``, each broker has a key pair of its own (``primary.key``, ``backup.key`` in ``keys``) and
admits the keys ``worker.key`` and ``client.key`` (also made there); workers and clients then list both brokers'
public keys in ``--broker``'s order (``client_keys``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.errors import BrokerUnreachable, MeshError
from qmesh.common.keys import CurveClientKeys, generate_keys
from qmesh.testing import Child, free_endpoint, qmesh_command, start_broker

ROLES = ("primary", "backup")
# How a broker's command line becomes a running process: (role, argv, log path) -> the process. By default a
# Child on this machine; a test of namespace hosts runs each broker inside its own host.
Launcher = Callable[[str, list[str], Path], Child]


def says_active(endpoint: str, curve: CurveClientKeys | None = None, timeout: float = 1.0) -> bool:
    """Whether the broker at ``endpoint``, asked on its own (``mmi.broker``), says it is active: a passive one answers
    421, and one that does not answer within ``timeout`` (dead, frozen, cut off) is not serving either."""
    with QMeshClient(endpoint, connect_timeout=timeout, curve=curve) as client:
        try:
            client.broker_info()
        except BrokerUnreachable:
            return False
        except MeshError as exc:
            if exc.code != p.NOT_ACTIVE:
                raise
            return False
    return True


class BrokerPair:
    """Two brokers, primary and backup; ``start(role)`` (again after a kill: it comes back passive) and ``stop()``.

    ``endpoints`` and ``ha`` (by role) default to free loopback endpoints; a broker binds where the others reach it.
    """

    def __init__(
        self,
        log_dir: Path,
        heartbeat_ms: int | None,
        *,
        curve: bool = False,
        endpoints: Mapping[str, str] | None = None,
        ha: Mapping[str, str] | None = None,
        launch: Launcher | None = None,
        args: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.heartbeat_ms = heartbeat_ms
        self.endpoints = dict(endpoints or {role: free_endpoint() for role in ROLES})
        self.ha = dict(ha or {role: free_endpoint() for role in ROLES})
        self.brokers: dict[str, Child] = {}
        self.args = dict(args or {})  # more of each broker's options, by role
        self._launch = launch or (lambda role, argv, log_path: Child(f"broker {role}", argv, log_path))
        self.keys: Path | None = None
        if curve:
            self.keys = log_dir / "keys"
            for name in ("primary", "backup", "worker", "client"):
                generate_keys(self.keys / name)
            for name, allow in (("worker", "allow-workers"), ("client", "allow-clients")):
                (self.keys / allow).mkdir()
                shutil.copy(self.keys / f"{name}.key", self.keys / allow / f"{name}.key")

    @property
    def address(self) -> str:
        """``--broker`` for workers and clients: both endpoints, the primary's first."""
        return f"{self.endpoints['primary']},{self.endpoints['backup']}"

    @property
    def broker_keys(self) -> str:
        """``--broker-key``: both brokers' public keys, in ``address``'s order."""
        assert self.keys is not None
        return f"{self.keys / 'primary.key'},{self.keys / 'backup.key'}"

    def client_keys(self, name: str) -> list[str]:
        """``--curve-secret`` and ``--broker-key`` for the key pair ``name`` ("worker", "client")."""
        assert self.keys is not None
        return ["--curve-secret", str(self.keys / f"{name}.key_secret"), "--broker-key", self.broker_keys]

    def command(self, role: str, key: str | None = None) -> list[str]:
        """Broker ``role``'s command line; with CURVE, under key pair ``key`` (its own unless told: an impostor's)."""
        peer = "backup" if role == "primary" else "primary"
        command = qmesh_command(
            "qmesh-broker",
            "--bind", self.endpoints[role],
            "--ha", role,
            "--ha-bind", self.ha[role],
            "--ha-peer", self.ha[peer],
            "--log-level", "info",
        )  # fmt: skip
        if self.heartbeat_ms is not None:  # None: the broker's default
            command += ["--heartbeat-ms", str(self.heartbeat_ms)]
        command += self.args.get(role, [])
        if self.keys is not None:
            command += [
                "--curve-secret", str(self.keys / f"{key or role}.key_secret"),
                "--allow-workers", str(self.keys / "allow-workers"),
                "--allow-clients", str(self.keys / "allow-clients"),
                "--ha-peer-key", str(self.keys / f"{peer}.key"),
            ]  # fmt: skip
        return command

    def start(self, role: str, key: str | None = None) -> Child:
        """Start broker ``role`` (see ``command``) and wait until it listens; its log is a new file in ``log_dir``
        each time."""

        def launch() -> Child:
            log_path = self.log_dir / f"broker-{role}-{time.monotonic_ns()}.log"
            return self._launch(role, self.command(role, key), log_path)

        self.brokers[role] = start_broker(launch)
        return self.brokers[role]

    def actives(self, timeout: float = 1.0) -> list[str]:
        """The roles of the running brokers that say they are active, asking each on its own (``mmi.broker``: a
        passive one answers 421; one that does not answer within ``timeout`` counts as not active)."""
        running = [role for role in ROLES if role in self.brokers and self.brokers[role].alive()]
        return [role for role in running if self._serves(role, timeout)]

    def active(self) -> str | None:
        """Which broker says it is active (the primary, if both would)."""
        return next(iter(self.actives()), None)

    def _serves(self, role: str, timeout: float) -> bool:
        curve = None
        if self.keys is not None:
            curve = CurveClientKeys.load(self.keys / "client.key_secret", self.keys / f"{role}.key")
        return says_active(self.endpoints[role], curve, timeout)

    def stop(self) -> None:
        for broker in self.brokers.values():
            broker.stop()
