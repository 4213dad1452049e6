"""CURVE on the broker socket: encryption, plus authentication against two allow-lists (workers and clients).

The ZAP handler (started before the socket binds, as libzmq requires) admits any key on either list. What a
key may *do* is checked on every message against the current lists (``peer``), so a key removed from a list
loses its rights at once, even on a connection that is already open.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from qmesh.broker.core import Peer
from qmesh.common.endpoints import is_loopback_host
from qmesh.common.keys import key_fingerprint, load_keypair, read_allow_list

log = logging.getLogger(__name__)

HA_DOMAIN = "qmesh-ha"  # the ZAP domain of a pair's HA link, which admits the peer broker's key alone


class BrokerSecurity:
    def __init__(self, secret_file: str | Path, allow_workers: str | Path, allow_clients: str | Path) -> None:
        self.keys = load_keypair(secret_file)
        self.directories = (Path(allow_workers), Path(allow_clients))
        self._peers: dict[str, Peer] = {}
        self._stamp: tuple[float, ...] = ()
        self._authenticator: ThreadAuthenticator | None = None
        self._ha_peer: str | None = None  # the peer broker's public key (z85), the one key the HA link admits
        self.reload()

    def reload(self) -> None:
        """Read both allow-lists again (on SIGHUP, and when a directory changes)."""
        workers, clients = (read_allow_list(directory) for directory in self.directories)
        peers = {}
        for key in workers.keys() | clients.keys():
            listed = workers.get(key) or clients[key]
            models = workers[key].models if key in workers else frozenset()
            peers[key.decode()] = Peer(
                listed.name, worker=key in workers, client=key in clients, models=models, key=key.decode()
            )
        self._peers = peers  # one assignment: the ZAP thread sees the old or the new table, never half of one
        self._stamp = self._directory_stamp()
        log.info("allow-lists loaded: %d worker key(s), %d client key(s)", len(workers), len(clients))

    def reload_if_changed(self) -> None:
        if self._directory_stamp() != self._stamp:
            self.reload()

    def start(self, context: zmq.Context) -> None:
        authenticator = ThreadAuthenticator(context, log=logging.getLogger("qmesh.broker.zap"))
        authenticator.start()
        authenticator.configure_curve_callback("*", self)
        authenticator.configure_curve_callback(HA_DOMAIN, self)
        self._authenticator = authenticator

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def configure(self, socket: zmq.Socket) -> None:
        socket.curve_server = True
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public

    def configure_ha_link(self, publisher: zmq.Socket, subscriber: zmq.Socket, peer_key: bytes | None) -> None:
        """The HA link with CURVE: this broker publishes to the peer broker's key alone (its own ZAP domain), and
        hears only a publisher that proves it holds the peer's secret key (the subscriber's server key): nobody else
        can read this broker's state or pose as its peer."""
        if peer_key is None:
            raise ValueError("a broker pair with CURVE needs the peer broker's public key (--ha-peer-key)")
        self.configure(publisher)
        publisher.zap_domain = HA_DOMAIN.encode()
        self._ha_peer = peer_key.decode()
        subscriber.curve_secretkey = self.keys.secret
        subscriber.curve_publickey = self.keys.public
        subscriber.curve_serverkey = peer_key

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a connection whose key is on either list; on the HA link, the peer broker's key only."""
        if domain == HA_DOMAIN:
            allowed = key.decode() == self._ha_peer
            if not allowed:
                log.warning(
                    "refused a connection to the HA link from key %s: not the peer broker's (--ha-peer-key)",
                    key_fingerprint(key),
                )
            return allowed
        allowed = key.decode() in self._peers
        if not allowed:
            log.warning("refused a connection from key %s, which is on no allow-list", key_fingerprint(key))
        return allowed

    def peer(self, user_id: str) -> Peer:
        """What the key ``user_id`` may do; a key no list has (any more) may do nothing, and is named by its
        fingerprint."""
        listed = self._peers.get(user_id)
        if listed is None:
            return Peer(key_fingerprint(user_id), worker=False, client=False, models=frozenset())
        return listed

    def _directory_stamp(self) -> tuple[float, ...]:
        stamps = []
        for directory in self.directories:
            try:
                stamps.append(directory.stat().st_mtime)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)


def is_loopback(endpoint: str) -> bool:
    """True for endpoints that never leave the machine: tcp on a loopback address, ipc://, inproc://."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    return is_loopback_host(endpoint[len("tcp://") :].rsplit(":", 1)[0])
