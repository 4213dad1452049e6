"""Model files on disk, by content: their sha256 (computed once per file version and cached), serving ranges of
them to the mesh, and the file a transfer writes (resumed, verified, then renamed into place).

Used by the worker (its model, what it pulls), the broker's store (what it serves and what is pushed to it) and
``qmesh-models``. Nothing here knows the broker or a socket; frames are built by ``common.protocol``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmesh.common import protocol as p
from qmesh.common.paths import state_dir

log = logging.getLogger(__name__)

DIGEST_CACHE_FILE = "model-digests.json"
MAX_CACHED_DIGESTS = 1000  # files remembered; the least recently hashed are forgotten first
HASH_BLOCK = 4 * 1024 * 1024  # bytes read at a time while hashing a file
GGUF_SUFFIX = ".gguf"


@dataclass(slots=True, frozen=True)
class FileDigest:
    sha256: str
    size: int


def sha256_of(path: Path, length: int | None = None) -> Any:
    """A sha256 hasher fed with the first ``length`` bytes of ``path`` (all of it if None)."""
    hasher = hashlib.sha256()
    buffer = memoryview(bytearray(HASH_BLOCK))
    remaining = length
    with open(path, "rb", buffering=0) as handle:
        while remaining is None or remaining > 0:
            count = handle.readinto(buffer if remaining is None else buffer[: min(HASH_BLOCK, remaining)])
            if not count:
                break
            hasher.update(buffer[:count])
            if remaining is not None:
                remaining -= count
    return hasher


class DigestCache:
    """The sha256 of model files, kept by resolved path, size and modification time in a small JSON file (by default
    ``state_dir()/model-digests.json``): a worker that restarts does not read a 5 GB model again to announce it.

    A file whose size or mtime changed is hashed again. ``path=None`` keeps the digests in memory only. Several
    processes may share the file: each write replaces it whole (the last writer's view wins, never a torn file).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = self._load()

    def digest(self, path: Path) -> FileDigest:
        resolved = path.resolve()
        stat = resolved.stat()
        entry = self._entries.get(str(resolved))
        if entry is not None and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return FileDigest(entry["sha256"], stat.st_size)
        log.info("hashing %s (%.1f MB, once: the digest is cached)", resolved, stat.st_size / 1e6)
        sha256 = sha256_of(resolved).hexdigest()
        after = resolved.stat()
        if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):  # else it changed while we read
            self._store(resolved, sha256, stat.st_size, stat.st_mtime_ns)
        return FileDigest(sha256, stat.st_size)

    def remember(self, path: Path, sha256: str) -> None:
        """Record a digest already verified (a file a transfer just wrote), so nothing hashes it again."""
        resolved = path.resolve()
        stat = resolved.stat()
        self._store(resolved, sha256, stat.st_size, stat.st_mtime_ns)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # a damaged cache costs one hashing pass, nothing more
            log.warning("ignoring the digest cache %s: %s", self.path, exc)
            return {}
        if not isinstance(entries, dict):
            return {}
        return {
            key: value for key, value in entries.items() if isinstance(value, dict) and p.is_sha256(value.get("sha256"))
        }

    def _store(self, path: Path, sha256: str, size: int, mtime_ns: int) -> None:
        self._entries.pop(str(path), None)  # to the end: the most recent last
        self._entries[str(path)] = {"sha256": sha256, "size": size, "mtime_ns": mtime_ns}
        while len(self._entries) > MAX_CACHED_DIGESTS:
            del self._entries[next(iter(self._entries))]
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temporary.write_text(json.dumps(self._entries, indent=0))
            os.replace(temporary, self.path)
        except OSError as exc:  # a read-only state directory: hashing again next time is the only cost
            log.warning("cannot write the digest cache %s: %s", self.path, exc)


def default_digest_cache() -> DigestCache:
    """The cache of this user's (or ``QMESH_HOME``'s) state directory."""
    return DigestCache(state_dir() / DIGEST_CACHE_FILE)


class ModelReader:
    """Answers READs of the model files it was given, by sha256: a worker's one model, the store's many.

    A file is opened once and read with ``pread``; one that turns out shorter than the size announced for it (cut
    short after it was hashed) is refused with 416, so the broker takes the bytes from another holder.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int]] = {}  # sha256 -> (descriptor, size)

    def add(self, path: Path, digest: FileDigest) -> None:
        if digest.sha256 not in self._files:
            self._files[digest.sha256] = (os.open(path, os.O_RDONLY | os.O_CLOEXEC), digest.size)

    def answer(self, read_key: bytes, read: p.HolderRead) -> list[bytes]:
        """DATA with the range asked for, or READ_FAILED saying why not."""
        held = self._files.get(read.sha256)
        if held is None:
            return p.holder_read_failed(read_key, p.UNKNOWN_MODEL, f"no file with sha256 {read.sha256} here")
        descriptor, size = held
        if read.offset + read.length > size:
            message = f"bytes {read.offset}-{read.offset + read.length} are past the end of the file ({size} bytes)"
            return p.holder_read_failed(read_key, p.BAD_REQUEST, message)
        try:
            data = os.pread(descriptor, read.length, read.offset)
        except OSError as exc:
            return p.holder_read_failed(read_key, p.WORKER_FAILED, f"cannot read the model file: {exc}")
        if len(data) != read.length:
            message = f"the file holds {read.offset + len(data)} bytes, not the {size} announced (truncated)"
            return p.holder_read_failed(read_key, p.RANGE_NOT_SATISFIABLE, message)
        return p.holder_data(read_key, read.offset, data)

    def close(self) -> None:
        for descriptor, _ in self._files.values():
            os.close(descriptor)
        self._files.clear()


def free_bytes(folder: Path) -> int:
    """Free space where ``folder`` is (or would be: the nearest existing parent)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def space_problem(folder: Path, model: p.ModelInfo, have: int, free: int) -> str | None:
    """Why ``model`` does not fit in ``folder``, which has ``free`` bytes and ``have`` bytes of it already."""
    needed = model.size - have
    if needed <= free:
        return None
    return (
        f"not enough disk space in {folder} for model {model.name!r}: it needs {needed / 1e6:.1f} MB more, "
        f"{free / 1e6:.1f} MB free"
    )


def partial_path(folder: Path, model: p.ModelInfo) -> Path:
    """Where a transfer of ``model`` writes until it is verified: hidden, and named by content, so that a transfer
    resumes only from bytes of the same file."""
    return folder / f".{model.name}.{model.sha256[:16]}.part"


class IncomingFile:
    """The file a transfer writes: appended in order and hashed as it grows, then verified and renamed to
    ``NAME.gguf`` in ``folder``. With ``resume``, one that starts again finds the bytes already written and goes on
    after them (``have``); they are hashed again first, as a hash's state cannot be kept across processes. Without
    it, they are dropped (the broker's store, whose loop must not spend seconds hashing)."""

    def __init__(self, folder: Path, model: p.ModelInfo, resume: bool = True) -> None:
        self.folder = folder
        self.model = model
        self.path = partial_path(folder, model)
        self.final_path = folder / f"{model.name}{GGUF_SUFFIX}"
        folder.mkdir(parents=True, exist_ok=True)
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.have = os.fstat(self._descriptor).st_size
        if self.have > model.size or not resume:  # not a prefix of this model, or not wanted: start over
            os.ftruncate(self._descriptor, 0)
            self.have = 0
        self._hasher = sha256_of(self.path, length=self.have) if self.have else hashlib.sha256()
        self.resumed_at = self.have

    def append(self, data: bytes) -> None:
        written = os.pwrite(self._descriptor, data, self.have)
        if written != len(data):
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        self._hasher.update(data)
        self.have += len(data)

    @property
    def complete(self) -> bool:
        return self.have == self.model.size

    def finish(self, durable: bool = True) -> bool:
        """Verify the whole file: on a match, rename it into place (True), flushed to disk first if ``durable``;
        on a mismatch, delete it (False). Either way the file is closed."""
        matches = self.complete and self._hasher.hexdigest() == self.model.sha256
        if matches and durable:
            os.fsync(self._descriptor)
        self.close()
        if not matches:
            self.discard()
            return False
        os.replace(self.path, self.final_path)
        if not durable:
            return True
        with contextlib.suppress(OSError):  # the rename is durable once the folder is flushed too
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return True

    def close(self) -> None:
        """Stop writing; the bytes stay for a transfer that resumes them."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
