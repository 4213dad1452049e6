"""Turning a model spec (a path or a short name like ``smollm2-135m``) into a checked GGUF file.

Checking the magic bytes here means a wrong file is reported by name at once, instead of as a load failure
buried in llama-server's output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qmesh.common.errors import ModelNotFound, NotAGGUF
from qmesh.common.modelfiles import FileDigest
from qmesh.common.paths import models_dirs as default_models_dirs

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"
_SUFFIX = ".gguf"


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file (symlinks followed) and the short name it is known by in the mesh; ``digest`` (its sha256 and
    size) once known, which READY announces so that the mesh knows the file by its content."""

    path: Path
    name: str
    digest: FileDigest | None = None


def available_models(models_dirs: Sequence[Path] | None = None) -> list[str]:
    """Short names of the usable ``*.gguf`` files (broken links left out) in the model directories."""
    dirs = default_models_dirs() if models_dirs is None else list(models_dirs)
    return sorted({path.stem for path in _gguf_files(dirs)})


def resolve_model(spec: str, models_dirs: Sequence[Path] | None = None) -> ModelFile:
    """Find and check the model ``spec`` names.

    A spec with a path separator or a ``.gguf`` suffix is a path; anything else is a short name looked up as
    ``<dir>/<spec>.gguf``, then as any ``*.gguf`` whose stem matches it ignoring case.
    """
    dirs = default_models_dirs() if models_dirs is None else list(models_dirs)
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelNotFound(_not_found_message(spec, dirs, f"no file at {path}"))
        return ModelFile(path=_checked(path), name=path.stem.lower())

    for directory in dirs:
        candidate = directory / f"{spec}{_SUFFIX}"
        if candidate.is_file():
            return ModelFile(path=_checked(candidate), name=spec)
    wanted = spec.lower()
    for candidate in _gguf_files(dirs):
        if candidate.stem.lower() == wanted:
            return ModelFile(path=_checked(candidate), name=spec)
    raise ModelNotFound(_not_found_message(spec, dirs, "no such model"))


def is_path_spec(spec: str) -> bool:
    """A spec that names a file (a path separator or the .gguf suffix), not a model by its short name."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(sep in spec for sep in separators) or spec.lower().endswith(_SUFFIX)


def _gguf_files(dirs: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for directory in dirs:
        if directory.is_dir():
            found.extend(sorted(p for p in directory.iterdir() if p.suffix.lower() == _SUFFIX and p.is_file()))
    return found


def _checked(path: Path) -> Path:
    """The file with symlinks resolved, once its first bytes prove it is a GGUF."""
    resolved = path.resolve()
    with resolved.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise NotAGGUF(f"{path} is not a GGUF model file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return resolved


def _not_found_message(spec: str, dirs: Sequence[Path], why: str) -> str:
    available = available_models(dirs)
    searched = ", ".join(str(d) for d in dirs) or "(no directories)"
    listing = ", ".join(available) if available else "none"
    return (
        f"model {spec!r} not found ({why}); searched: {searched}; available models: {listing}. "
        f"Run scripts/setup to fetch the default model {DEFAULT_MODEL}."
    )
