"""A split worker (issue 19): ``qmesh-worker --model X --shards N|auto`` serves a model whose layers live on shard
hosts of the mesh (worker/shard.py), through the broker like any worker.

It forms, serves, and forms again:

1. It asks the broker for N shard hosts, or as few as fit, with the memory the model needs (``memory_needed``),
   on a connection of its own (a *lease*, ``ShardLink``); while none fit it asks again every few seconds.
2. It reaches each host: through the CURVE bridge (``common.tunnel.Entrance``, a loopback port for
   llama-server) when the host offers one, else its rpc-server directly. A host it cannot reach is left out of
   the next ask.
3. It runs a ``WorkerNode`` whose llama-server takes ``--rpc`` (those ports or endpoints), ``-dev RPC0,...``
   (so that it refuses to start without every host: given only ``--rpc`` it skips an unreachable one and loads
   the whole model here), every layer offloaded (``-ngl``) and ``--tensor-split`` in proportion to each host's
   share; its own device computes the rest (the token embeddings). READY says it is split, over which hosts.
4. A host lost (the broker says LOST, or the lease's connection ends) or llama-server gone (it aborts when an
   RPC connection breaks) ends the formation: the node leaves the broker, which resumes its streams on other
   workers, and the worker asks for a new set of hosts (giving back the old ones, which the broker RELEASEs) and
   comes back.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import zmq

from qmesh.common import protocol as p
from qmesh.common.endpoints import broker_endpoints
from qmesh.common.errors import QMeshError
from qmesh.common.tunnel import Entrance
from qmesh.worker.gguf import kv_bytes_per_token
from qmesh.worker.node import WorkerNode, WorkerSettings
from qmesh.worker.shard import ShardLink

log = logging.getLogger(__name__)

COMPUTE_MARGIN = 1.1  # llama.cpp's compute buffers and RPC bookkeeping on top of weights and KV cache
REACH_TIMEOUT = 5.0  # seconds a granted host may take to answer before it is left out
MAX_FAILED_FORMATIONS = 3  # formations in a row whose llama-server never served before the worker gives up
ALL_LAYERS = 999  # -ngl: every layer a model has


def memory_needed(model: Path, context_tokens: int) -> int:
    """MiB a split model takes on its shard hosts: its weights (the GGUF file), the KV cache of ``context_tokens``
    (every slot's context) and a tenth more for compute buffers."""
    kv = (kv_bytes_per_token(model) or 0) * context_tokens
    return math.ceil((model.stat().st_size + kv) * COMPUTE_MARGIN / 2**20)


def split_args(endpoints: list[str], shares: list[int]) -> tuple[str, ...]:
    """llama-server's arguments for a model spread over these rpc-servers, in proportion to ``shares``."""
    devices = ",".join(f"RPC{i}" for i in range(len(endpoints)))
    return ("--rpc", ",".join(endpoints), "-dev", devices, "--tensor-split", ",".join(map(str, shares)))


class SplitWorker(threading.Thread):
    """Serves one model spread over shard hosts until ``stop()``, forming again whenever a host is lost. Looks like
    a ``WorkerNode`` to its owner: ``stop``, ``failure``, ``registered``, ``node`` (the current formation's)."""

    def __init__(
        self, settings: WorkerSettings, index: int = 0, shards: int = 0, context: zmq.Context | None = None
    ) -> None:
        super().__init__(name=f"qmesh-split-{index}", daemon=True)
        self.settings = settings
        self.index = index
        self.shards = shards  # hosts to ask for; 0: as few as fit
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}/{index}"
        self.context = context or zmq.Context.instance()
        self.memory = memory_needed(settings.model.path, settings.ctx_size * settings.slots)
        self.failure: str | None = None
        self.registered = threading.Event()
        self.formations = 0  # formations that registered with the broker
        self.node: WorkerNode | None = None
        self.link = ShardLink(
            broker_endpoints(settings.broker), settings.curve, settings.heartbeat_interval, settings.liveness, context
        )
        self._entrances: list[Entrance] = []
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        try:
            self._run()
        except QMeshError as exc:
            self.failure = str(exc)
            log.error("%s: %s", self.worker_name, exc)
        except Exception as exc:  # a bug: report it rather than let the thread vanish silently
            log.exception("%s crashed", self.worker_name)
            self.failure = f"internal error: {exc!r}"
        finally:
            if self.node is not None:
                self.node.stop()
                self.node.join()
            self._close_entrances()
            self.link.close(leave=True)  # the broker RELEASEs our hosts at once
            self.registered.clear()

    def _run(self) -> None:
        exclude: list[str] = []  # hosts that did not answer: not to be granted again at once
        failed = 0
        while not self._stop_requested.is_set():
            grant = self._acquire(exclude)
            if grant is None:
                return
            endpoints = self._reach(grant, exclude)
            if endpoints is None:
                continue
            exclude.clear()
            broke = self._serve(grant, endpoints)
            self._close_entrances()
            if self._stop_requested.is_set():
                return
            failed = failed + 1 if broke else 0
            if failed >= MAX_FAILED_FORMATIONS:
                node_failure = self.node.failure if self.node is not None else None
                raise QMeshError(f"llama-server over shard hosts failed {failed} times in a row: {node_failure}")

    # ------------------------------------------------------------------------------------------ forming

    def _acquire(self, exclude: list[str]) -> tuple[p.ShardPlace, ...] | None:
        """Ask for hosts until the broker grants some; None if stopped first. A new ask gives back what the lease
        held (the broker RELEASEs those hosts)."""
        excluded = tuple(exclude[-p.MAX_SHARDS :])
        ask = p.ShardAsk(self.worker_name, self.settings.service, self.memory, self.shards, excluded)
        told, next_ask = False, None  # said once that it waits; when to ask again after a 503
        retry = min(max(self.settings.heartbeat_interval, 0.5), 5.0)
        self._ask(ask)
        while not self._stop_requested.is_set():
            for message in self.link.poll(0.25):  # polling keeps the lease's heartbeats going while it waits
                if message.command != p.W_SHARD_GRANT:
                    continue
                if message.refusal is None:
                    names = ", ".join(f"{place.name} ({place.memory} MiB)" for place in message.grant)
                    log.info("%s: %d MiB of %s over %s", self.worker_name, self.memory, self.settings.service, names)
                    return message.grant
                code, text = message.refusal
                if code != p.QUEUE_FULL:
                    raise QMeshError(f"the broker refused shard hosts to this worker: {text}")
                if not told:
                    told = True
                    log.warning("%s: waiting for shard hosts: %s", self.worker_name, text)
                next_ask = time.monotonic() + retry
            if next_ask is not None and time.monotonic() >= next_ask:
                next_ask = None
                self._ask(ask)
            if self.link.fatal is not None:
                raise QMeshError(self.link.fatal)
            if self.link.lost is not None:
                log.warning("%s: %s; asking again", self.worker_name, self.link.lost)
                self._ask(ask, reconnect=True)
        return None

    def _ask(self, ask: p.ShardAsk, reconnect: bool = False) -> None:
        if reconnect or not self.link.is_open:
            self.link.close(leave=True)  # whatever the broker still gives that connection, it gives back
            self.link.open(p.shard_request(ask))
        else:
            self.link.send(p.shard_request(ask))

    def _reach(self, grant: tuple[p.ShardPlace, ...], exclude: list[str]) -> list[str] | None:
        """Where llama-server finds each granted host (a bridge entrance's loopback port, or the host's rpc-server);
        None if one did not answer within REACH_TIMEOUT (it is added to ``exclude``)."""
        curve = self.settings.curve
        endpoints = []
        for place in grant:
            if place.bridged:
                if curve is None or place.key is None:
                    raise QMeshError(f"shard host {place.name} is reached through CURVE: this worker needs keys")
                entrance = Entrance(f"tcp://{place.endpoint}", curve.own, place.key)
                entrance.start()
                self._entrances.append(entrance)
                reached = entrance.connected.wait(REACH_TIMEOUT)
                endpoint = f"127.0.0.1:{entrance.port}"
            else:
                endpoint = place.endpoint
                reached = _answers(endpoint)
            if not reached:
                log.warning(
                    "%s: shard host %s at %s does not answer; asking for another",
                    self.worker_name,
                    place.name,
                    place.endpoint,
                )
                exclude.append(place.name)
                self._close_entrances()
                return None
            endpoints.append(endpoint)
        return endpoints

    def _serve(self, grant: tuple[p.ShardPlace, ...], endpoints: list[str]) -> bool:
        """Run llama-server over the granted hosts until a host is lost, it fails, or a stop. True if it broke by
        itself: it failed before it ever served, with every host still there."""
        hosts: list[dict[str, object]] = [
            {"name": pl.name, "host": pl.host, "device": pl.device, "memory": pl.memory, "bridged": pl.bridged}
            for pl in grant
        ]
        settings = replace(
            self.settings,
            # llama-server aborts when an RPC connection breaks; ggml would first spend seconds printing a backtrace
            # through gdb (when gdb is there), while its streams wait to move elsewhere.
            binary=replace(self.settings.binary, env={**self.settings.binary.env, "GGML_NO_BACKTRACE": "1"}),
            gpu_layers=ALL_LAYERS,
            max_restarts=0,  # llama-server dies with an RPC connection: a new one needs a new set of hosts
            sidecar_args=split_args(endpoints, [place.memory for place in grant]),
            split=hosts,
        )
        node = self.node = WorkerNode(settings, self.index, self.context)
        node.start()
        served, lost, cut = False, None, False
        while node.is_alive():
            node.join(0.05)
            if self._stop_requested.is_set():
                node.stop()
            for message in self.link.poll(0.2):
                if message.command == p.W_SHARD_LOST:
                    lost = f"shard host {message.lost} is gone"
            if lost is None and self.link.lost is not None:
                lost = f"the lease on its shard hosts ended ({self.link.lost})"
            if lost is not None and not cut and not self._stop_requested.is_set():
                log.warning("%s: %s; forming again", self.worker_name, lost)
                node.stop()
                if node.manager is not None:  # at once: its hosts are gone, or about to be given to someone else
                    # From another thread, so that this one keeps the lease's heartbeats going while it stops.
                    threading.Thread(target=node.manager.stop, name=f"{self.name}-cut", daemon=True).start()
                cut = True
            if node.registered.is_set():
                self.formations += 0 if served else 1
                served = True
                self.registered.set()
            else:
                self.registered.clear()
        node.join()
        self.registered.clear()
        if lost is None and node.failure is not None and not self._stop_requested.is_set():
            log.warning("%s: llama-server over shard hosts ended: %s; forming again", self.worker_name, node.failure)
        self.link.close(leave=True)  # the hosts go back now; the next formation asks on a new connection
        return not served and lost is None and not self._stop_requested.is_set()

    def _close_entrances(self) -> None:
        for entrance in self._entrances:
            entrance.close()
        self._entrances.clear()


def _answers(endpoint: str) -> bool:
    """Whether an rpc-server takes a TCP connection at ``host:port`` (closed at once; it serves the next one)."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT).close()
    except OSError:
        return False
    return True
