"""Shared fixtures: the real default model, the real llama-server, and one llama-server for the session.

A missing binary or model fails the tests instead of skipping them: scripts/setup is responsible for
providing both, and a silently skipped suite would hide that it did not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qmesh.common.errors import LlamaServerNotFound, ModelNotFound, NotAGGUF
from qmesh.worker.binary import LlamaServerBinary, find_llama_server
from qmesh.worker.engine import InferenceEngine
from qmesh.worker.models import DEFAULT_MODEL, resolve_model
from qmesh.worker.process import LlamaProcessManager

# Small and quick on a 2-core machine; two slots so a stream and a /slots poll can overlap.
FAST_SIDECAR = {"ctx_size": 2048, "threads": 2, "parallel": 2}


@pytest.fixture(scope="session")
def model_path() -> Path:
    try:
        return resolve_model(DEFAULT_MODEL).path
    except (ModelNotFound, NotAGGUF) as exc:
        pytest.fail(f"the default model is not usable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def llama_binary() -> LlamaServerBinary:
    try:
        return find_llama_server()
    except LlamaServerNotFound as exc:
        pytest.fail(f"no llama-server: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def engine(model_path: Path, llama_binary: LlamaServerBinary) -> Iterator[InferenceEngine]:
    """One started engine (and llama-server) shared by the session's sidecar tests.

    It finds the same binary as ``llama_binary``, which it requests so that a missing one fails with that message.
    """
    shared = InferenceEngine(model_path, **FAST_SIDECAR)
    shared.start()
    yield shared
    shared.dispose()


@pytest.fixture(scope="session")
def llama_manager(engine: InferenceEngine) -> LlamaProcessManager:
    """The session's started LlamaProcessManager (parallel=2)."""
    return engine.manager
