"""Shared fixtures (the real default model and llama-server, one llama-server for the session, fake workers) and
the ``sidecar`` mark on every test that needs a real llama-server, which the fast lane leaves out
(``scripts/test -m "not sidecar"``).

A missing binary or model fails the tests instead of skipping them: scripts/setup is responsible for
providing both, and a silently skipped suite would hide that it did not.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from meshkit import WorkerProcess, worker_threads
from qmesh.common.errors import LlamaServerNotFound, ModelNotFound, NotAGGUF
from qmesh.testing.fakeworker import FakePlan, FakeWorkersThread
from qmesh.worker.binary import ENV_VAR, LlamaServerBinary, find_llama_server
from qmesh.worker.engine import InferenceEngine
from qmesh.worker.models import DEFAULT_MODEL, resolve_model
from qmesh.worker.node import WorkerNode
from qmesh.worker.process import LlamaProcessManager

# Hypothesis checks behaviour, not speed: its default 200 ms deadline per example is a timing assertion, which a
# busy 2-core machine (CI, the suite's own llama-servers) fails now and then for a parser that takes 1 ms.
settings.register_profile("qmesh", deadline=None)
settings.load_profile("qmesh")

# Small and quick on a 2-core machine; two slots so a stream and a /slots poll can overlap.
FAST_SIDECAR = {"ctx_size": 2048, "threads": 2, "parallel": 2}

# ------------------------------------------------------------------------------------- the sidecar mark
#
# A test needs a real llama-server when it uses one of SIDECAR_FIXTURES, or when it, one of its fixtures, or a
# function or class of their own module that they name, names one of SIDECAR_STARTERS: that covers the
# session's engine, the meshes built in module fixtures and those a test builds in its body. A module that starts
# llama-servers another way (a subprocess script, network namespaces) says so: ``pytestmark = pytest.mark.sidecar``.
# What the rule cannot see it still cannot miss silently: a test without the mark gets a tripwire for a
# llama-server (SIDECAR_TRIPWIRE below), and fails if anything it runs tries to start one.

SIDECAR_FIXTURES = frozenset({"model_path", "llama_binary", "engine", "llama_manager"})
SIDECAR_STARTERS = (worker_threads, WorkerProcess, WorkerNode, InferenceEngine, LlamaProcessManager)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("sidecar") is None and _needs_a_sidecar(item):
            item.add_marker(pytest.mark.sidecar)


def _needs_a_sidecar(item: pytest.Item) -> bool:
    fixture_info = getattr(item, "_fixtureinfo", None)  # pytest.Function's fixture closure, with definitions
    if fixture_info is None:
        return False
    if SIDECAR_FIXTURES.intersection(fixture_info.names_closure):
        return True
    functions = [item.function] if isinstance(item, pytest.Function) else []
    functions += [definition.func for defs in fixture_info.name2fixturedefs.values() for definition in defs]
    seen: set[object] = set()
    return any(_names_a_starter(function, seen) for function in functions)


def _names_a_starter(function: Any, seen: set[object]) -> bool:
    """Whether ``function``'s code names a starter, itself or through the functions and classes of its module."""
    function = getattr(function, "__func__", function)  # a method of a test class
    if not isinstance(function, types.FunctionType) or function in seen:
        return False
    seen.add(function)
    for name in _names_in(function.__code__):
        target = function.__globals__.get(name)
        if any(target is starter for starter in SIDECAR_STARTERS):
            return True
        if getattr(target, "__module__", None) != function.__module__:
            continue
        if isinstance(target, type):
            if any(_names_a_starter(member, seen) for member in vars(target).values()):
                return True
        elif _names_a_starter(target, seen):
            return True
    return False


def _names_in(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object uses, with those of the lambdas and functions nested in it."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_in(constant)
    return names


SIDECAR_TRIPWIRE = """#!/bin/sh
# Stands in for llama-server during tests not marked sidecar: records that something tried to start it, and fails.
echo "tripwire: a test not marked 'sidecar' tried to start llama-server" >&2
touch "$0.tripped"
exit 97
"""


@pytest.fixture(scope="session")
def sidecar_tripwire(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tripwire") / "llama-server"
    path.write_text(SIDECAR_TRIPWIRE)
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def _no_sidecar_unless_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Outside ``sidecar`` tests, llama-server discovery (here and in every child process) finds the tripwire."""
    if request.node.get_closest_marker("sidecar") is not None:
        yield
        return
    tripwire: Path = request.getfixturevalue("sidecar_tripwire")
    monkeypatch.setenv(ENV_VAR, str(tripwire))
    yield
    tripped = tripwire.with_name(f"{tripwire.name}.tripped")
    if tripped.exists():
        tripped.unlink()
        pytest.fail(
            f"{request.node.nodeid} tried to start llama-server but is not marked 'sidecar': give its module "
            "`pytestmark = pytest.mark.sidecar`, or start llama-server through a fixture or starter of conftest.py",
            pytrace=False,
        )


# ------------------------------------------------------------------------------------- fixtures


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


@pytest.fixture
def fake_workers() -> Iterator[Callable[..., FakeWorkersThread]]:
    """Starts fake streaming workers (no llama-server) on a broker: ``fake_workers(endpoint, plan, service)``.

    For tests where a fake is the point (the broker's routing and flow control, not generation). Each call runs
    one ``FakeStreamingWorker`` in a thread; ``stop()`` on what it returns gives its counters. All stop after the test.
    """
    started: list[FakeWorkersThread] = []

    def start(endpoint: str, plan: FakePlan, service: str) -> FakeWorkersThread:
        fake = FakeWorkersThread(endpoint, service, plan)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
