"""Model files by content, with real files in a temporary folder: the digest cache, serving ranges, the file a
transfer writes (resumed, verified, renamed), the space check, a puller's chunk order (hypothesis), the broker's
store, and the worker core's answer to READ."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmesh.broker.models_store import ModelStore
from qmesh.common import protocol as p
from qmesh.common.errors import TransferFailed
from qmesh.common.modelfiles import DigestCache, IncomingFile, ModelReader, partial_path, space_problem
from qmesh.common.transfer import Download, Progress


def model_file(folder: Path, name: str = "tiny", size: int = 100_000, seed: int = 1) -> tuple[Path, p.ModelInfo]:
    data = b"GGUF" + hashlib.shake_256(bytes([seed])).digest(size - 4)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.gguf"
    path.write_bytes(data)
    return path, p.ModelInfo(name, hashlib.sha256(data).hexdigest(), size)


def test_a_digest_is_computed_once_per_file_version_and_survives_a_restart(tmp_path: Path) -> None:
    path, model = model_file(tmp_path)
    cache_path = tmp_path / "state" / "digests.json"
    assert DigestCache(cache_path).digest(path).sha256 == model.sha256
    stat = path.stat()
    with path.open("r+b") as handle:  # same size, same mtime: the cache is trusted (that is what it is for)
        handle.seek(50)
        handle.write(b"X")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    restarted = DigestCache(cache_path)
    assert restarted.digest(path).sha256 == model.sha256
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a new version: hashed again
    assert restarted.digest(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != model.sha256


def test_a_damaged_digest_cache_costs_only_a_hash(tmp_path: Path) -> None:
    path, model = model_file(tmp_path)
    cache_path = tmp_path / "digests.json"
    cache_path.write_text("{not json")
    assert DigestCache(cache_path).digest(path).sha256 == model.sha256


def test_a_reader_serves_ranges_and_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    path, model = model_file(tmp_path)
    reader = ModelReader()
    reader.add(path, DigestCache(None).digest(path))
    data = p.parse_inbound(reader.answer(b"k", p.HolderRead(model.sha256, 10, 20)))
    assert data == p.HolderData(b"k", 10, path.read_bytes()[10:30])
    unknown = p.parse_inbound(reader.answer(b"k", p.HolderRead("00" * 32, 0, 1)))
    assert isinstance(unknown, p.HolderReadFailed) and unknown.code == p.UNKNOWN_MODEL
    os.truncate(path, 50)  # cut short after it was hashed
    short = p.parse_inbound(reader.answer(b"k", p.HolderRead(model.sha256, 40, 20)))
    assert isinstance(short, p.HolderReadFailed) and short.code == p.RANGE_NOT_SATISFIABLE
    reader.close()


def test_an_incoming_file_is_renamed_into_place_only_once_verified(tmp_path: Path) -> None:
    source, model = model_file(tmp_path / "src")
    data = source.read_bytes()
    folder = tmp_path / "models"
    incoming = IncomingFile(folder, model)
    incoming.append(data[:30_000])
    incoming.close()
    assert partial_path(folder, model).stat().st_size == 30_000 and not (folder / "tiny.gguf").exists()
    resumed = IncomingFile(folder, model)  # a new process: the bytes are there, and hashed again
    assert resumed.have == resumed.resumed_at == 30_000
    resumed.append(data[30_000:])
    assert resumed.complete and resumed.finish()
    assert (folder / "tiny.gguf").read_bytes() == data and not partial_path(folder, model).exists()


def test_bytes_that_do_not_verify_are_dropped(tmp_path: Path) -> None:
    _, model = model_file(tmp_path / "src")
    incoming = IncomingFile(tmp_path / "models", model)
    incoming.append(bytes(model.size))
    assert not incoming.finish()
    assert list((tmp_path / "models").iterdir()) == []


def test_a_store_starts_over_where_a_pull_resumes(tmp_path: Path) -> None:
    _, model = model_file(tmp_path / "src")
    IncomingFile(tmp_path / "models", model).append(b"GGUF")
    assert IncomingFile(tmp_path / "models", model, resume=False).have == 0


def test_the_space_check_names_the_space_needed_and_the_folder(tmp_path: Path) -> None:
    model = p.ModelInfo("big", "ab" * 32, 98_400_000)
    assert space_problem(tmp_path, model, have=0, free=10**10) is None
    assert space_problem(tmp_path, model, have=90_000_000, free=9_000_000) is None, "a resume needs only the rest"
    problem = space_problem(tmp_path, model, have=0, free=12_000_000)
    assert problem == f"not enough disk space in {tmp_path} for model 'big': it needs 98.4 MB more, 12.0 MB free"


@given(
    size=st.integers(1, 60),
    start_at=st.integers(0, 60),
    chunk=st.integers(1, 9),
    window=st.integers(1, 5),
    picks=st.lists(st.integers(0, 10), max_size=200),
)
def test_a_puller_writes_in_order_whatever_the_order_of_arrival(
    size: int, start_at: int, chunk: int, window: int, picks: list[int]
) -> None:
    """Chunks arrive in any order (a moved transfer); what is written is the file, in order, and what is asked for
    and held in memory never exceeds the window."""
    content = bytes(range(size))
    start = min(start_at, size)
    download = Download(size, start, chunk, window)
    written, outstanding, picks = bytearray(content[:start]), [], list(picks)
    while not download.complete:
        outstanding += download.requests()
        assert len(download.asked) + len(download.early) <= window
        offset, length = outstanding.pop(picks.pop() % len(outstanding) if picks else 0)
        for piece in download.on_data(offset, content[offset : offset + length]):
            written += piece
    assert bytes(written) == content and download.requests() == []


def test_a_puller_refuses_bytes_it_did_not_ask_for() -> None:
    download = Download(size=10, start=0, chunk=4, window=2)
    download.requests()
    with pytest.raises(TransferFailed, match="not asked for"):
        download.on_data(4, b"abc")
    with pytest.raises(TransferFailed):
        download.on_data(8, b"ab")


def test_the_progress_line_says_bytes_rate_and_eta() -> None:
    progress = Progress("pulling tiny", total=100_000_000, start=20_000_000, started_at=10.0)
    progress.done = 60_000_000
    assert progress.line(12.0) == "pulling tiny: 60.0 of 100.0 MB (60%), 20.0 MB/s, ETA 2 s"
    progress.done = progress.total
    assert progress.line(14.0).endswith("(100%), 20.0 MB/s, done")


# ------------------------------------------------------------------------------------------------ the store


def test_the_store_serves_its_folder_and_takes_a_push(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    path, model = model_file(folder)
    (folder / "not..allowed.gguf").write_bytes(b"GGUF")
    store = ModelStore(folder, DigestCache(None))
    assert store.models == {"tiny": model}, "a file whose name is not a model name is left out"
    (data,) = store.handle(p.holder_read(b"r", model.sha256, 4, 6))
    assert p.parse_inbound(data) == p.HolderData(b"r", 4, path.read_bytes()[4:10])

    source, pushed = model_file(tmp_path, "other", 5000, seed=2)
    content = source.read_bytes()
    (ack,) = store.handle(p.model_push(b"key", pushed))
    assert p.parse_transfer_reply(ack).offset == 0
    (ack,) = store.handle(p.push_chunk(b"key", 0, content[:3000]))
    assert p.parse_transfer_reply(ack).offset == 3000
    (ended,) = store.handle(p.push_chunk(b"key", 3000, content[3000:]))
    assert p.parse_transfer_reply(ended).model == pushed
    assert (folder / "other.gguf").read_bytes() == content and store.models["other"] == pushed
    (served,) = store.handle(p.holder_read(b"r2", pushed.sha256, 0, 10))
    assert p.parse_inbound(served) == p.HolderData(b"r2", 0, content[:10])
    store.close()


def test_the_store_refuses_a_push_that_does_not_fit_or_does_not_verify(tmp_path: Path) -> None:
    _, model = model_file(tmp_path / "src")
    small = ModelStore(tmp_path / "small", DigestCache(None), free_space=lambda folder: 1000)
    (ended,) = small.handle(p.model_push(b"k", model))
    reply = p.parse_transfer_reply(ended)
    assert reply.error is not None and reply.error[0] == p.INSUFFICIENT_STORAGE
    assert f"not enough disk space in {tmp_path / 'small'}" in reply.error[1] and "0.1 MB more" in reply.error[1]
    store = ModelStore(tmp_path / "store", DigestCache(None))
    store.handle(p.model_push(b"k", model))
    (ended,) = store.handle(p.push_chunk(b"k", 0, bytes(model.size)))
    reply = p.parse_transfer_reply(ended)
    assert reply.error is not None and reply.error[0] == p.BAD_REQUEST and model.sha256 in reply.error[1]
    assert "tiny" not in store.models and list((tmp_path / "store").iterdir()) == []
