"""Reading a GGUF file's metadata (the key-value header, not the tensors), and what follows from it.

The worker needs the size of one token's KV cache to tell the broker how many prompt tokens its llama-server's
host-memory prompt cache (``--cache-ram``) can hold. The header format: magic ``GGUF``, version (2 or 3),
tensor count, key-value count, then the key-value pairs, each a length-prefixed UTF-8 key, a type and a value
(``docs/gguf.md`` of ggml).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from qmesh.common.errors import NotAGGUF

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KV_BYTES_PER_VALUE = 2  # llama-server's default KV cache type is f16


def read_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The header's key-value pairs (arrays skipped), stopping early once every ``wanted`` key is found."""
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise NotAGGUF(f"{path} is not a GGUF model file")
        version, _, count = struct.unpack("<IQQ", handle.read(20))
        if version not in (2, 3):
            raise NotAGGUF(f"{path}: GGUF version {version} is not supported")
        found: dict[str, Any] = {}
        for _ in range(count):
            key = _string(handle)
            kind = struct.unpack("<I", handle.read(4))[0]
            value = _value(handle, kind)
            if kind != _ARRAY:
                found[key] = value
            if wanted is not None and wanted <= found.keys():
                break
        return found


def kv_bytes_per_token(path: Path) -> int | None:
    """Bytes of KV cache one token takes in llama-server (f16 keys and values over every layer); None if the
    header does not say enough."""
    architecture = read_metadata(path, {"general.architecture"}).get("general.architecture")
    if not isinstance(architecture, str):
        return None
    names = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv")
    optional = ("attention.key_length", "attention.value_length")
    keys = {f"{architecture}.{name}" for name in names + optional}
    meta = read_metadata(path, keys)
    layers, embedding, heads = (meta.get(f"{architecture}.{name}") for name in names[:3])
    kv_heads = meta.get(f"{architecture}.attention.head_count_kv", heads)
    if not all(isinstance(n, int) and n > 0 for n in (layers, embedding, heads, kv_heads)):
        return None
    head_size = embedding // heads
    key_length = meta.get(f"{architecture}.attention.key_length", head_size)
    value_length = meta.get(f"{architecture}.attention.value_length", head_size)
    return layers * kv_heads * (key_length + value_length) * KV_BYTES_PER_VALUE


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length).decode("utf-8", "replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item_kind, length = struct.unpack("<IQ", handle.read(12))
        if item_kind in _SCALARS:  # skip a numeric array in one seek
            handle.seek(length * struct.calcsize(_SCALARS[item_kind]), 1)
        else:
            for _ in range(length):
                _value(handle, item_kind)
        return None
    raise NotAGGUF(f"unknown GGUF value type {kind}")
