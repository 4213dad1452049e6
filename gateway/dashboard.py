"""The gateway's live dashboard: ``/dashboard``, a page of plain HTML, CSS and JavaScript served from the package's
``static/`` folder, and ``/dashboard/data``, the JSON it reads every second (docs/DASHBOARD.md has its shape).

Everything on it comes from the broker over the mesh, never from logs: a ``MeshSampler`` asks ``mmi.workers``,
``mmi.services`` and ``mmi.requests`` once a second on the gateway's own broker connection. The bridge calls it on
every turn, in the gateway's event loop, and it never waits there: it sends the three questions, and builds the
next snapshot on a later turn once all three are answered. It also keeps a few minutes of mesh-wide tokens/s,
queue depth and busy slots for the charts. A page request only reads the last snapshot it published.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from qmesh.client.sdk import MMICall, QMeshClient
from qmesh.client.status import worker_rows
from qmesh.common.errors import MeshError, QMeshError
from qmesh.gateway.bridge import Bridge

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0  # with the page's one-second polling, what it shows is at most about two seconds old
HISTORY_SECONDS = 300.0  # the charts' window
MMI_SERVICES = ("mmi.workers", "mmi.services", "mmi.requests")  # the order ``MeshSampler._settle`` reads them in
UNREADABLE = "the broker's answers could not be read (see the gateway's log)"
PACKAGE = "qmesh.gateway"  # whose ``static/`` folder holds the page (package data in pyproject.toml)


@dataclass(frozen=True, slots=True)
class Sample:
    """The whole mesh at one moment, for the charts."""

    at: float  # wall-clock seconds (the page labels the time axis with them)
    tokens_per_second: float  # the sum of what each worker's last heartbeat reported
    queued: int
    busy: int
    slots: int


class History:
    """The samples of the last ``seconds``, oldest first, at most ``limit`` of them. Pruned by age as well as by
    count, so a gap (the broker was unreachable) shows as a gap rather than as old points stretched over it."""

    def __init__(self, seconds: float = HISTORY_SECONDS, limit: int = int(HISTORY_SECONDS / SAMPLE_SECONDS) + 1):
        self.seconds = seconds
        self._samples: deque[Sample] = deque(maxlen=limit)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        while self._samples[0].at < sample.at - self.seconds:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def columns(self) -> dict[str, Any]:
        """One list per series (about half the JSON of one object per sample)."""
        samples = self._samples
        return {
            "seconds": self.seconds,
            "t": [round(s.at, 3) for s in samples],
            "tokens_per_second": [s.tokens_per_second for s in samples],
            "queued": [s.queued for s in samples],
            "busy": [s.busy for s in samples],
            "slots": [s.slots for s in samples],
        }


def mesh_tables(
    workers: list[dict[str, Any]], services: dict[str, dict[str, Any]], requests: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    """The tables of ``/dashboard/data`` from the answers of ``mmi.workers``, ``mmi.services`` and ``mmi.requests``,
    received at wall-clock time ``now``."""
    return {
        "workers": worker_rows(workers),
        "models": model_rows(workers, services),
        "requests": [request_row(record, now) for record in reversed(requests)],  # newest first
    }


def model_rows(workers: list[dict[str, Any]], services: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: the broker's counts, and what its workers' READY info says of it. ``sha256`` lists the
    distinct values its workers announce (more than one: workers serve different files under one name), and
    ``capabilities`` the union of theirs and of what the broker lists for the model; both are empty while nobody
    says."""
    rows = []
    for name, service in sorted(services.items()):
        serving = [w for w in workers if w.get("service") == name]
        infos = [w["info"] for w in serving if isinstance(w.get("info"), dict)]
        announced = [i["capabilities"] for i in infos if isinstance(i.get("capabilities"), list)]
        if isinstance(service.get("capabilities"), list):
            announced.append(service["capabilities"])
        rows.append(
            {
                "name": name,
                "sha256": sorted({i["sha256"] for i in infos if isinstance(i.get("sha256"), str)}),
                "capabilities": sorted({c for listed in announced for c in listed if isinstance(c, str)}),
                "workers": sorted(str(w.get("name", "")) for w in serving),
                "slots": service.get("slots", 0),
                "busy": service.get("busy", 0),
                "queued": service.get("queued", 0),
                "context": service.get("context"),
            }
        )
    return rows


def request_row(record: dict[str, Any], now: float) -> dict[str, Any]:
    """An ``mmi.requests`` record with the wall-clock time it ended instead of its age at the broker's answer."""
    row = {key: value for key, value in record.items() if key != "ended_s_ago"}
    row["ended_at"] = round(now - float(record.get("ended_s_ago", 0.0)), 3)
    return row


def sample_of(tables: dict[str, Any], now: float) -> Sample:
    """The whole mesh in the tables of ``mesh_tables``, for the charts."""
    speeds = [w["tokens_per_second"] for w in tables["workers"] if isinstance(w["tokens_per_second"], (int, float))]
    models = tables["models"]
    return Sample(
        at=now,
        tokens_per_second=round(float(sum(speeds)), 1),
        queued=sum(m["queued"] for m in models),
        busy=sum(m["busy"] for m in models),
        slots=sum(m["slots"] for m in models),
    )


class MeshSampler:
    """Asks the broker for the mesh's state every ``interval`` seconds; ``state`` is the last snapshot.

    ``tick`` runs on the bridge's turns, in the gateway's event loop. ``state`` is replaced by a new dict each time
    and never changed afterwards: a page handler reads a whole snapshot.
    """

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.history = History()
        self._broker: str | None = None
        self._calls: list[MMICall] = []
        self._next_at = 0.0
        self._tables: dict[str, Any] = {"workers": [], "models": [], "requests": []}
        self._sampled_at: float | None = None
        self.state = self._publish("no answer from the broker yet")

    def tick(self, client: QMeshClient) -> None:
        """Settle the last round of questions once all are answered; ask the next round when it is due."""
        self._broker = client.broker
        if self._calls:
            if not all(call.done for call in self._calls):
                return
            calls, self._calls = self._calls, []
            self._settle(calls)
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self.interval
        unreachable = client.known_unreachable()
        if unreachable is not None:  # a question now would only wait in the socket's queue
            self.state = self._publish(unreachable.message)
            return
        self._calls = [client.ask_mmi(service) for service in MMI_SERVICES]

    def _settle(self, calls: list[MMICall]) -> None:
        error = next((call.error for call in calls if call.error is not None), None)
        if error is not None:  # keep the last tables: the page shows them with the error and their age
            self.state = self._publish(_message(error))
            return
        now = time.time()
        workers, services, requests = (call.answer for call in calls)
        try:
            tables = mesh_tables(workers, services, requests, now)
            sample = sample_of(tables, now)
        except Exception:  # an answer this code cannot read must not end the bridge, and the gateway with it
            if self.state["error"] != UNREADABLE:  # once, not every second
                log.exception("the dashboard could not read the broker's answers")
            self.state = self._publish(UNREADABLE)
            return
        self._tables, self._sampled_at = tables, now
        self.history.add(sample)
        self.state = self._publish(None)

    def _publish(self, error: str | None) -> dict[str, Any]:
        return {
            "broker": self._broker,
            "sampled_at": self._sampled_at,
            "error": error,
            "interval_s": self.interval,
            **self._tables,
            "history": self.history.columns(),
        }


def _message(error: QMeshError) -> str:
    return error.message if isinstance(error, MeshError) else str(error)


def routes(bridge: Bridge, authorize: Callable[[Request], None]) -> list[BaseRoute]:
    """The dashboard's routes; its sampler starts with ``bridge``. ``authorize`` guards the data (the page itself
    and its assets hold none: the page asks for a key when the data answers 401)."""
    sampler = MeshSampler()
    bridge.observe(sampler.tick)
    page = (resources.files(PACKAGE) / "static" / "dashboard.html").read_bytes()

    async def dashboard(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def data(request: Request) -> Response:
        authorize(request)
        return JSONResponse({**sampler.state, "now": time.time()}, headers={"Cache-Control": "no-store"})

    async def home(request: Request) -> Response:
        return RedirectResponse("dashboard")  # relative, so it also works behind a proxy that adds a path prefix

    return [
        Route("/", home, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
        Route("/dashboard/data", data, methods=["GET"]),
        Mount("/dashboard/static", StaticFiles(packages=[(PACKAGE, "static")]), name="dashboard-static"),
    ]
