"""The broker's own models (``qmesh-broker --models-dir DIR``): the files ``DIR/NAME.gguf``, served to pullers like
a worker's model, and the folder that ``qmesh-models push`` fills.

The store is the far end of the transfers the core addresses to ``broker.transfers.STORE``: the loop hands it those
frames (``handle``) and feeds its answers back to the core. It runs in the loop's thread, so it does only what is
quick: ``pread`` and ``pwrite`` of one chunk (page cache), hashing as it writes. A push that breaks off starts over
(resuming would mean hashing the bytes already there first, seconds of the loop for a large file), and a pushed
file is renamed into place without waiting for the disk (the kernel writes it back; a broker that restarts hashes
it again, as it has no digest cached for it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from qmesh.common import protocol as p
from qmesh.common.modelfiles import (
    GGUF_SUFFIX,
    DigestCache,
    FileDigest,
    IncomingFile,
    ModelReader,
    free_bytes,
    space_problem,
)

log = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, folder: Path, digests: DigestCache, free_space: Callable[[Path], int] = free_bytes) -> None:
        """``free_space``: how many bytes are free in a folder (the check before a push; tests pass a figure)."""
        self.folder = folder
        self._free_space = free_space
        self._reader = ModelReader()
        self._incoming: dict[bytes, IncomingFile] = {}  # transfer key -> the push it writes
        self.models: dict[str, p.ModelInfo] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob(f"*{GGUF_SUFFIX}")):
            problem = p.model_name_problem(path.stem)
            if problem is not None or not path.is_file():
                log.warning("store: %s left out: %s", path, problem or "not a file")
                continue
            digest = digests.digest(path)
            self._reader.add(path, digest)
            self.models[path.stem] = p.ModelInfo(path.stem, digest.sha256, digest.size)
        log.info("store %s: %d model(s): %s", folder, len(self.models), ", ".join(sorted(self.models)) or "none")

    def handle(self, frames: list[bytes]) -> list[list[bytes]]:
        """What the core sent the store; returns the answers (none to END). A file that cannot be written or renamed
        ends that push with the reason: nothing here may take the broker's loop down."""
        message = p.parse_for_store(frames)
        if isinstance(message, p.BrokerToWorker):
            assert message.read is not None  # parse_for_store passes READs only
            return [self._reader.answer(message.route_key, message.read)]
        if isinstance(message, p.TransferEnd):
            self._drop(message.transfer_id)
            return []
        try:
            if isinstance(message, p.ModelPush):
                return [self._open(message.transfer_id, message.model)]
            return [self._write(message)]
        except OSError as exc:
            log.error("store: a push into %s failed: %s", self.folder, exc)
            self._drop(message.transfer_id)
            return [p.transfer_ended(message.transfer_id, (p.WORKER_FAILED, f"the broker's store failed: {exc}"))]

    def _drop(self, key: bytes) -> None:
        incoming = self._incoming.pop(key, None)
        if incoming is not None:
            incoming.discard()

    def close(self) -> None:
        for incoming in self._incoming.values():
            incoming.discard()
        self._incoming.clear()
        self._reader.close()

    def _open(self, key: bytes, model: p.ModelInfo) -> list[bytes]:
        incoming = IncomingFile(self.folder, model, resume=False)
        problem = space_problem(self.folder, model, 0, self._free_space(self.folder))
        if problem is not None:
            incoming.discard()
            return p.transfer_ended(key, (p.INSUFFICIENT_STORAGE, f"the broker's store: {problem}"))
        self._incoming[key] = incoming
        return p.push_ack(key, 0)

    def _write(self, chunk: p.PushChunk) -> list[bytes]:
        key = chunk.transfer_id
        incoming = self._incoming.get(key)
        if incoming is None:
            return p.transfer_ended(key, (p.UNKNOWN_MODEL, "the store has no such push"))
        if chunk.offset != incoming.have:  # the core passes a push's chunks on in order: a bug if not
            del self._incoming[key]
            incoming.discard()
            return p.transfer_ended(key, (p.BAD_REQUEST, f"expected bytes from {incoming.have}, got {chunk.offset}"))
        incoming.append(chunk.data)
        if not incoming.complete:
            return p.push_ack(key, incoming.have)
        del self._incoming[key]
        model = incoming.model
        if not incoming.finish(durable=False):
            text = f"the pushed bytes do not hash to sha256 {model.sha256}: the store dropped them"
            return p.transfer_ended(key, (p.BAD_REQUEST, text))
        self._reader.add(incoming.final_path, FileDigest(model.sha256, model.size))
        self.models[model.name] = model
        log.info("store: %s (%s, %.1f MB) written to %s", model.name, model.sha256[:12], model.size / 1e6, self.folder)
        return p.transfer_ended(key, None, model)
