"""Chaos run: whatever gets killed, every request ends in a full answer or an explicit error, and none hangs.

Starts a broker and M workers as real processes on loopback and sends N prompts through the SDK a few at a
time. Meanwhile, at moments drawn from a seeded RNG (each armed after a random number of answers, then fired
while a request is streaming, so kills land mid-stream), it SIGKILLs worker processes and restarts each a few
seconds later, SIGKILLs llama-server sidecars (their worker's manager restarts them) and restarts the broker
(SIGKILL, then a new broker on the same endpoint; once unless ``--broker-kills`` says otherwise).

With ``--pair`` the mesh has a primary/backup broker pair instead (workers and the client are given both), and
the broker's fault is a SIGKILL of the *active* broker (the one that answers ``mmi.broker``; the passive one
answers 421), started again a moment later (it comes back passive): three times unless ``--broker-kills`` says.

A request counts as *lost* when it ended "successfully" but its FINAL disagrees with what was streamed (token
count, empty text, more tokens than asked for), and as *hung* when it has not ended by its hard deadline. The
exit status is 0 only if both are 0. Everything started is stopped at the end, on Ctrl-C and on SIGTERM.

Run from the repository root: ``scripts/chaos --prompts 40 --workers 3 --seed 7``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psutil

from qmesh.client.sdk import QMeshClient, Request
from qmesh.common.errors import QMeshError
from qmesh.testing import (
    Child,
    WaitTimeout,
    free_endpoint,
    llama_servers,
    qmesh_command,
    start_broker,
    wait_for_workers,
)
from qmesh.testing.pair import ROLES, BrokerPair

MODEL = "smollm2-135m"
SUBJECTS = ["a lighthouse", "the moon", "a red fox", "bread", "a glacier", "the river Nile", "chess", "a violin"]
TASKS = [
    "Describe {} in three sentences.",
    "Write a short poem about {}.",
    "Tell a children's story about {}.",
    "List five facts about {}.",
    "Explain {} to a ten-year-old.",
]


# ---------------------------------------------------------------------------------------------- processes


class Mesh:
    """The broker (or broker pair) and worker processes of the run, restartable one by one, and everything they
    spawned.

    Every process is started from the main thread: their parent-death signal follows the thread that forked."""

    def __init__(self, workers: int, heartbeat_ms: int, log_dir: Path, pair: bool) -> None:
        self.heartbeat_ms = heartbeat_ms
        self.log_dir = log_dir
        self.pair = BrokerPair(log_dir, heartbeat_ms) if pair else None
        self.address = self.pair.address if self.pair else free_endpoint()  # --broker of the workers and clients
        self.broker: Child | None = None  # without a pair
        self.workers: list[Child | None] = [None] * workers
        self._serial = count(1)
        self._spawned: dict[int, psutil.Process] = {}  # every process and sidecar seen, to check none is left

    def start_brokers(self) -> None:
        for role in ROLES if self.pair else [None]:
            self.start_broker(role)

    def start_broker(self, role: str | None = None) -> Child:
        """Start the broker (or the pair's broker ``role``) on its endpoint and wait until it listens."""
        if self.pair is not None:
            assert role is not None
            broker = self.pair.start(role)
        else:
            heartbeat = str(self.heartbeat_ms)
            command = qmesh_command("qmesh-broker", "--bind", self.address, "--heartbeat-ms", heartbeat)
            broker = self.broker = start_broker(
                lambda: Child("broker", command, self.log_dir / f"broker-{next(self._serial)}.log")
            )
        self._remember(broker.pid)
        return broker

    @property
    def brokers(self) -> list[Child]:
        if self.pair is not None:
            return list(self.pair.brokers.values())
        return [self.broker] if self.broker else []

    def start_worker(self, index: int) -> Child:
        heartbeat = str(self.heartbeat_ms)
        options = ["--model", MODEL, "--broker", self.address, "--heartbeat-ms", heartbeat, "--grace", "5"]
        command = qmesh_command("qmesh-worker", *options, "--slots", "1", "--threads", "1", "--cpu-threads", "1")
        home = self.log_dir / f"home-{index}"  # its own persistent worker id, as on its own machine
        log_path = self.log_dir / f"worker{index}-{next(self._serial)}.log"
        worker = Child(f"worker {index}", command, log_path, {"QMESH_HOME": str(home)})
        self.workers[index] = worker
        self._remember(worker.pid)
        return worker

    def live_workers(self) -> list[tuple[int, Child]]:
        return [(i, w) for i, w in enumerate(self.workers) if w is not None and w.alive()]

    def remember_sidecars(self) -> None:
        for _, worker in self.live_workers():
            for sidecar in llama_servers(worker.pid):
                self._spawned.setdefault(sidecar.pid, sidecar)

    def _remember(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self._spawned[pid] = psutil.Process(pid)

    def stop(self, grace: float = 15.0) -> list[str]:
        """SIGTERM workers then the broker(s), SIGKILL what is left after ``grace``; returns what survived."""
        self.remember_sidecars()
        children = [w for w in self.workers if w is not None] + self.brokers
        for child in children:
            if child.alive():
                child.popen.terminate()
        deadline = time.monotonic() + grace
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            if child.alive():
                print(f"chaos: {child.name} (pid {child.pid}) ignored SIGTERM; killing it", file=sys.stderr)
                child.kill()
        time.sleep(0.5)  # sidecars die with their worker (parent-death signal): give the kernel a moment
        leftovers = []
        for process in self._spawned.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(f"{process.name()} (pid {process.pid})")
                    process.kill()
        return leftovers


# ---------------------------------------------------------------------------------------------- traffic


@dataclass(slots=True)
class Outcome:
    index: int
    prompt: str
    kind: str  # "answered", "failed", "lost", "hung"
    code: int | None = None
    message: str = ""
    tokens: int = 0  # the FINAL's count
    token_ids: list[int] = field(default_factory=list)  # what was streamed
    text: str = ""
    failovers: int = 0
    resumes: int = 0  # times the SDK sent it again after losing the broker
    worker: str | None = None


def judge(index: int, request: Request, max_tokens: int) -> Outcome:
    """Classify a finished request: an error is explicit; a success must agree with what was streamed."""
    result = request.result()
    token_ids = [t for chunk in request.chunks for t in chunk.tokens]
    outcome = Outcome(
        index,
        request.generation.prompt or "",
        "answered",
        tokens=result.tokens,
        token_ids=token_ids,
        text=result.text,
        failovers=result.failovers,
        resumes=request.resumes,
        worker=result.worker,
    )
    if result.error is not None:
        outcome.kind, outcome.code, outcome.message = "failed", result.error.code, str(result.error)
        return outcome
    problems = []
    if result.tokens != len(token_ids):
        problems.append(f"FINAL says {result.tokens} tokens, {len(token_ids)} were streamed")
    if not result.text:
        problems.append("empty text")
    if len(token_ids) > max_tokens:
        problems.append(f"{len(token_ids)} tokens streamed, max_tokens was {max_tokens}")
    if result.finish_reason == "length" and len(token_ids) != max_tokens:
        problems.append(f"finish_reason length after {len(token_ids)} of {max_tokens} tokens")
    if problems:
        moves = f"{result.failovers} failover(s), resumed by the SDK {request.resumes} time(s), last on {result.worker}"
        outcome.kind, outcome.message = "lost", f"{'; '.join(problems)} ({moves})"
    return outcome


class Traffic(threading.Thread):
    """Sends the prompts, ``concurrency`` at a time, and judges each one as it ends or passes its deadline."""

    def __init__(self, address: str, prompts: list[str], concurrency: int, max_tokens: int, deadline: float) -> None:
        super().__init__(name="chaos-traffic", daemon=True)
        self.address = address
        self.prompts = prompts
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.deadline = deadline
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self.streaming: list[str] = []  # names of the workers streaming a request right now (for the chaos)
        self.crash: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def finished(self) -> int:
        return len(self.outcomes)

    def run(self) -> None:
        try:
            # The SDK's own timeout is past our hard deadline, so that a hang shows as a hang, not as a 504.
            with QMeshClient(self.address, timeout=self.deadline + 60, connect_timeout=10) as client:
                self._pump(client)
        except BaseException as exc:  # reported as the run's failure, never swallowed
            self.crash = exc

    def _pump(self, client: QMeshClient) -> None:
        waiting = collections.deque(enumerate(self.prompts))
        in_flight: dict[int, tuple[Request, float]] = {}
        while (waiting or in_flight) and not self._stop_event.is_set():
            while waiting and len(in_flight) < self.concurrency:
                index, prompt = waiting.popleft()
                request = client.submit(prompt, model=MODEL, max_tokens=self.max_tokens, temperature=0)
                in_flight[index] = (request, time.monotonic() + self.deadline)
                self.sent += 1
            client.poll(0.1)
            now = time.monotonic()
            for index, (request, deadline) in list(in_flight.items()):
                if request.done:
                    self.outcomes.append(judge(index, request, self.max_tokens))
                elif now >= deadline:
                    self.outcomes.append(self._hung(index, request, f"no FINAL within {self.deadline:g} s"))
                    request.cancel()
                else:
                    continue
                del in_flight[index]
            self.streaming = [r.status.get("worker", "") for r, _ in in_flight.values() if r.chunks and not r.done]
        for index, (request, _) in in_flight.items():  # stopped early: what has not ended is hung
            self.outcomes.append(self._hung(index, request, "still running when the run was stopped"))

    @staticmethod
    def _hung(index: int, request: Request, why: str) -> Outcome:
        token_ids = [t for chunk in request.chunks for t in chunk.tokens]
        return Outcome(index, request.generation.prompt or "", "hung", message=why, token_ids=token_ids)


# ---------------------------------------------------------------------------------------------- chaos


@dataclass(slots=True)
class Event:
    kind: str  # "worker", "sidecar" or "broker" (with a pair: the active one)
    after: int  # requests that must have ended before it is armed
    armed_at: float | None = None


class Chaos:
    """Fires the planned events from the main thread (which owns every process) and restarts killed workers and
    (with a pair) killed brokers."""

    VICTIM_WAIT = 3.0  # seconds an armed event waits for a request to be streaming before it fires anyway
    QUIET = 2.0  # seconds between two events, so that each one's recovery is visible on its own

    def __init__(self, mesh: Mesh, traffic: Traffic, rng: random.Random, plan: list[Event], started: float) -> None:
        self.mesh, self.traffic, self.rng, self.plan = mesh, traffic, rng, plan
        self.started = started
        self.restarts: dict[int, float] = {}  # worker index -> when to start it again
        self.broker_restarts: dict[str, float] = {}  # broker of the pair (role) -> when to start it again
        self.done: collections.Counter[str] = collections.Counter()
        self._quiet_until = 0.0

    def say(self, text: str) -> None:
        print(f"chaos: t+{time.monotonic() - self.started:6.1f}s {text}", flush=True)

    def step(self) -> None:
        now = time.monotonic()
        for index, when in list(self.restarts.items()):
            if now >= when:
                del self.restarts[index]
                self.say(f"restart worker {index} (pid {self.mesh.start_worker(index).pid})")
        for role, when in list(self.broker_restarts.items()):
            if now >= when:
                del self.broker_restarts[role]
                self.say(f"restart broker {role} (pid {self.mesh.start_broker(role).pid})")
        self.mesh.remember_sidecars()
        if not self.plan or now < self._quiet_until or self.traffic.finished < self.plan[0].after:
            return
        event = self.plan[0]
        if event.armed_at is None:
            event.armed_at = now
        streaming = self._streaming_pids()
        if not streaming and now - event.armed_at < self.VICTIM_WAIT:
            return
        if getattr(self, f"_fire_{event.kind}")(streaming):
            self.plan.pop(0)
            self.done[event.kind] += 1
            self._quiet_until = time.monotonic() + self.QUIET

    def finish(self, restart: bool) -> None:
        """Start at once the workers and brokers still waiting for their restart (if ``restart``), so that the mesh
        ends whole."""
        for index in list(self.restarts):
            del self.restarts[index]
            if restart:
                self.say(f"restart worker {index} (pid {self.mesh.start_worker(index).pid}) for the end of the run")
        for role in list(self.broker_restarts):
            del self.broker_restarts[role]
            if restart:
                self.say(f"restart broker {role} (pid {self.mesh.start_broker(role).pid}) for the end of the run")

    def _streaming_pids(self) -> set[int]:
        pids = set()
        for name in self.traffic.streaming:
            with contextlib.suppress(ValueError, IndexError):
                pids.add(int(name.split("/")[-2]))  # worker names are host/pid/thread
        return pids

    def _pick(self, candidates: list[tuple[int, Child]], streaming: set[int]) -> tuple[int, Child] | None:
        busy = [c for c in candidates if c[1].pid in streaming]
        pool = busy or candidates
        return self.rng.choice(pool) if pool else None

    def _fire_worker(self, streaming: set[int]) -> bool:
        victim = self._pick(self.mesh.live_workers(), streaming)
        if victim is None:
            return False
        index, worker = victim
        worker.kill()
        delay = self.rng.uniform(2.0, 5.0)
        self.restarts[index] = time.monotonic() + delay
        mid = "mid-stream" if worker.pid in streaming else "idle"
        self.say(f"SIGKILL worker {index} (pid {worker.pid}, {mid}); restart in {delay:.1f} s")
        return True

    def _fire_sidecar(self, streaming: set[int]) -> bool:
        with_sidecar = [(i, w) for i, w in self.mesh.live_workers() if llama_servers(w.pid)]
        victim = self._pick(with_sidecar, streaming)
        if victim is None:
            return False
        index, worker = victim
        running = llama_servers(worker.pid)
        if not running:
            return False
        with contextlib.suppress(psutil.Error):
            running[0].kill()
        mid = "mid-stream" if worker.pid in streaming else "idle"
        self.say(f"SIGKILL llama-server pid {running[0].pid} of worker {index} ({mid})")
        return True

    def _fire_broker(self, streaming: set[int]) -> bool:
        if self.mesh.pair is not None:
            return self._fire_active_broker(self.mesh.pair, streaming)
        assert self.mesh.broker is not None
        old = self.mesh.broker.pid
        self.mesh.broker.kill()
        new = self.mesh.start_broker()
        self.say(f"SIGKILL broker (pid {old}, {len(streaming)} worker(s) streaming); new broker pid {new.pid}")
        return True

    def _fire_active_broker(self, pair: BrokerPair, streaming: set[int]) -> bool:
        """SIGKILL the broker of the pair that says it is active; it starts again 1-3 s later, passive. Only while
        the other broker runs and one is active: two dead brokers are more than a pair is meant to survive."""
        if self.broker_restarts or not all(broker.alive() for broker in pair.brokers.values()):
            return False
        actives = pair.actives()
        if len(actives) != 1:  # none yet: the survivor of the last kill has not been asked for service
            return False
        role = actives[0]
        victim = pair.brokers[role]
        victim.kill()
        delay = self.rng.uniform(1.0, 3.0)
        self.broker_restarts[role] = time.monotonic() + delay
        self.say(
            f"SIGKILL the active broker, the {role} (pid {victim.pid}, {len(streaming)} worker(s) streaming); "
            f"restart in {delay:.1f} s"
        )
        return True


def make_plan(
    rng: random.Random, prompts: int, worker_kills: int, sidecar_kills: int, broker_kills: int
) -> list[Event]:
    """Events in a random order, armed after random numbers of answers spread over the run."""
    kinds = ["worker"] * worker_kills + ["sidecar"] * sidecar_kills + ["broker"] * broker_kills
    rng.shuffle(kinds)
    low, high = max(1, prompts // 10), max(1, prompts * 8 // 10)
    marks = sorted(rng.randint(low, high) for _ in kinds)
    return [Event(kind, mark) for kind, mark in zip(kinds, marks, strict=True)]


def make_prompts(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(TASKS).format(rng.choice(SUBJECTS)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- the run


def all_registered(address: str, workers: int, timeout: float) -> bool:
    """True once ``workers`` workers of the model are registered with the broker, False if not within ``timeout``."""
    try:
        wait_for_workers(address, MODEL, workers, timeout)
    except WaitTimeout:
        return False
    return True


def registered_workers(address: str) -> int:
    with contextlib.suppress(QMeshError), QMeshClient(address, connect_timeout=5) as client:
        return int(client.models().get(MODEL, {}).get("workers", 0))
    return 0


def check_seams(address: str, outcomes: list[Outcome], max_tokens: int) -> list[str]:
    """Ask again, on the calm mesh, every prompt that failed over or was resumed by the SDK; temperature 0 must give
    the same tokens.

    The seam is where the stream moved to another worker, or to another broker (the worker that kept generating
    handed it on): text lost or repeated there shows up as a difference.
    """
    mismatches = []
    with QMeshClient(address, timeout=120, connect_timeout=5) as client:
        for outcome in outcomes:
            again = client.submit(outcome.prompt, model=MODEL, max_tokens=max_tokens, temperature=0)
            result = again.result()
            calm = [t for chunk in again.chunks for t in chunk.tokens]
            if result.ok and calm != outcome.token_ids:
                at = next(
                    (i for i, (a, b) in enumerate(zip(calm, outcome.token_ids, strict=False)) if a != b),
                    min(len(calm), len(outcome.token_ids)),
                )
                mismatches.append(f"#{outcome.index} differs from token {at}: {outcome.text!r} vs {result.text!r}")
    return mismatches


def report(args: argparse.Namespace, traffic: Traffic, chaos: Chaos, extra: dict[str, str]) -> tuple[int, int]:
    """Print the table; returns (lost, hung)."""
    by_kind = collections.Counter(o.kind for o in traffic.outcomes)
    codes = collections.Counter(o.code for o in traffic.outcomes if o.kind == "failed")
    failovers = sum(o.failovers for o in traffic.outcomes)
    moved = sum(1 for o in traffic.outcomes if o.failovers)
    resumed = sum(1 for o in traffic.outcomes if o.resumes)
    kills = ", ".join(f"{k} {chaos.done[k]}" for k in ("worker", "sidecar", "broker"))
    rows = [
        ("sent", f"{traffic.sent} of {args.prompts}"),
        ("answered", str(by_kind["answered"])),
        ("failed (explicit error)", f"{by_kind['failed']}" + (f"  ({_codes(codes)})" if codes else "")),
        ("lost", str(by_kind["lost"])),
        ("hung", str(by_kind["hung"])),
        ("failovers (sum)", f"{failovers}  ({moved} request(s) moved; {resumed} resumed by the SDK)"),
        ("kills done", f"{kills}  (planned: {args.worker_kills}, {args.sidecar_kills}, {args.broker_kills})"),
        *extra.items(),
    ]
    print()
    print(
        f"QMesh chaos run: seed {args.seed}, {args.prompts} prompts, {args.workers} workers, "
        f"{'a broker pair' if args.pair else 'one broker'}, max_tokens {args.max_tokens}, "
        f"concurrency {args.concurrency}"
    )
    for name, value in rows:
        print(f"  {name:<26} {value}")
    for outcome in traffic.outcomes:
        if outcome.kind in ("failed", "lost", "hung"):
            print(f"  {outcome.kind} #{outcome.index}: {outcome.message}")
    return by_kind["lost"], by_kind["hung"]


def _codes(codes: collections.Counter) -> str:
    return ", ".join(f"{code} x{n}" for code, n in sorted(codes.items(), key=lambda kv: str(kv[0])))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=40, help="prompts to send (default 40)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes, 1 slot each (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the chaos and the prompts (default: random)")
    parser.add_argument("--duration-limit", type=float, default=600.0, help="seconds for the whole run (default 600)")
    parser.add_argument("--max-tokens", type=int, default=48, help="per prompt (default 48)")
    parser.add_argument("--concurrency", type=int, default=4, help="prompts in flight at once (default 4)")
    parser.add_argument("--worker-kills", type=int, default=2, help="worker processes to SIGKILL (default 2)")
    parser.add_argument("--sidecar-kills", type=int, default=2, help="llama-servers to SIGKILL (default 2)")
    parser.add_argument("--pair", action="store_true", help="a primary/backup broker pair instead of one broker")
    parser.add_argument(
        "--broker-kills",
        type=int,
        default=None,
        help="broker restarts, or with --pair SIGKILLs of the active broker (default 1, or 3 with --pair)",
    )
    parser.add_argument("--heartbeat-ms", type=int, default=300, help="broker and worker heartbeat (default 300)")
    parser.add_argument(
        "--request-deadline",
        type=float,
        default=120.0,
        help="seconds after which a request without FINAL counts as hung (default 120)",
    )
    parser.add_argument("--no-seam-check", action="store_true", help="skip re-asking failed-over prompts calmly")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs even when the run passes")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if args.broker_kills is None:
        args.broker_kills = 3 if args.pair else 1
    if args.prompts < 1 or args.workers < 1 or args.concurrency < 1:
        parser.error("--prompts, --workers and --concurrency must be at least 1")
    return args


def _terminate(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop like Ctrl-C, through the same clean-up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (a bg job)
    started = time.monotonic()
    hard_stop = started + args.duration_limit
    rng = random.Random(args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="qmesh-chaos-"))
    mesh = Mesh(args.workers, args.heartbeat_ms, log_dir, args.pair)
    prompts = make_prompts(rng, args.prompts)
    traffic = Traffic(mesh.address, prompts, args.concurrency, args.max_tokens, args.request_deadline)
    plan = make_plan(rng, args.prompts, args.worker_kills, args.sidecar_kills, args.broker_kills)
    chaos = Chaos(mesh, traffic, rng, plan, started)
    status, extra = 1, {}
    print(f"chaos: seed {args.seed}; broker {mesh.address}; logs in {log_dir}", flush=True)
    try:
        mesh.start_brokers()
        for index in range(args.workers):
            mesh.start_worker(index)
        if not all_registered(mesh.address, args.workers, max(1.0, min(180.0, hard_stop - time.monotonic()))):
            print(f"chaos: the workers did not all register; see {log_dir}", file=sys.stderr)
            return 2
        chaos.say(f"{args.workers} workers registered; sending {args.prompts} prompts")
        traffic.start()
        while traffic.is_alive():
            if time.monotonic() >= hard_stop:
                chaos.say(f"duration limit of {args.duration_limit:g} s reached; stopping")
                traffic.stop()
                traffic.join(timeout=10)
                break
            chaos.step()
            traffic.join(timeout=0.1)
        chaos.finish(restart=time.monotonic() < hard_stop)
        if traffic.crash is not None:
            raise RuntimeError(f"the traffic thread crashed: {traffic.crash!r}") from traffic.crash
        extra, one_active = after_run(args, mesh, traffic, hard_stop)
        lost, hung = report(args, traffic, chaos, extra)
        status = 0 if lost == 0 and hung == 0 and traffic.sent == args.prompts and one_active else 1
    except KeyboardInterrupt:
        print("\nchaos: interrupted; stopping everything", file=sys.stderr)
        traffic.stop()
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        traffic.stop()
        leftovers = mesh.stop()
        if leftovers:
            print(f"chaos: killed leftover processes: {', '.join(leftovers)}", file=sys.stderr)
            status = status or 1
        if status == 0 and not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"chaos: logs kept in {log_dir}", file=sys.stderr)
    verdict = {0: "PASS", 130: "INTERRUPTED"}.get(status, "FAIL")
    print(f"chaos: {verdict} in {time.monotonic() - started:.1f} s", flush=True)
    return status


def after_run(args: argparse.Namespace, mesh: Mesh, traffic: Traffic, hard_stop: float) -> tuple[dict[str, str], bool]:
    """Figures taken once the traffic is over: the mesh whole again, the seams compared with calm runs and, with a
    pair, its brokers asked one by one which is active. Returns them and whether exactly one broker is active."""
    whole = all_registered(mesh.address, args.workers, max(1.0, min(60.0, hard_stop - time.monotonic())))
    extra = {
        "workers registered at end": f"{registered_workers(mesh.address)}/{args.workers}"
        + ("" if whole else " (not all came back)")
    }
    one_active = True
    if mesh.pair is not None:
        actives = mesh.pair.actives()
        one_active = len(actives) == 1
        extra["active brokers at end"] = f"{', '.join(actives) or 'none'}" + ("" if one_active else " (must be one)")
    moved = [o for o in traffic.outcomes if o.kind == "answered" and (o.failovers or o.resumes)]
    if not args.no_seam_check and moved and time.monotonic() < hard_stop:
        mismatches = check_seams(mesh.address, moved, args.max_tokens)
        extra["seams equal to calm rerun"] = f"{len(moved) - len(mismatches)}/{len(moved)}"
        for line in mismatches:
            print(f"chaos: seam differs: {line}")
    return extra, one_active


if __name__ == "__main__":
    sys.exit(main())
