"""A worker's persistent id: 64 hex characters kept in the user's state directory across restarts."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from qmesh.common.paths import state_dir

_ID = re.compile(r"^[0-9a-f]{64}$")


def worker_id(path: Path | None = None) -> str:
    """Read the id, or create it (atomically, mode 0600) the first time."""
    path = path or state_dir() / "worker-id"
    try:
        existing = path.read_text().strip()
        if _ID.match(existing):
            return existing
    except FileNotFoundError:
        pass
    new_id = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(new_id + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return new_id
