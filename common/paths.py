"""Where QMesh keeps its files: ``QMESH_HOME`` if set, else the XDG base directories."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def state_dir() -> Path:
    """Persistent state such as the worker id: ``$QMESH_HOME/state`` or ``$XDG_STATE_HOME/qmesh``."""
    home = os.environ.get("QMESH_HOME")
    return Path(home) / "state" if home else _xdg("XDG_STATE_HOME", ".local/state") / "qmesh"


def config_dir() -> Path:
    """Configuration and keys: ``$QMESH_HOME/config`` or ``$XDG_CONFIG_HOME/qmesh``."""
    home = os.environ.get("QMESH_HOME")
    return Path(home) / "config" if home else _xdg("XDG_CONFIG_HOME", ".config") / "qmesh"


MODELS_DIR_ENV = "QMESH_MODELS_DIR"


def models_dirs() -> list[Path]:
    """Where models are looked for, first to last: $QMESH_MODELS_DIR (os.pathsep-separated) if set, else ./models
    and the project's models/. A pull writes into the first."""
    configured = os.environ.get(MODELS_DIR_ENV)
    if configured:
        candidates = [Path(part).expanduser() for part in configured.split(os.pathsep) if part]
    else:
        candidates = [Path.cwd() / "models", Path(__file__).resolve().parents[1] / "models"]
    unique: list[Path] = []
    seen: set[Path] = set()
    for directory in candidates:
        key = directory.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(directory)
    return unique
