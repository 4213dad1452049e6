"""Configuration: flag > environment > config file > default, clear errors for bad files, --version, logs."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qmesh.broker.cli import app as broker_app
from qmesh.broker.cli import run as broker_run
from qmesh.client.cli import run as client_run
from qmesh.client.status import run as status_run
from qmesh.common.config import config_option, section_defaults
from qmesh.common.logs import setup_logging
from qmesh.gateway.cli import run as gateway_run
from qmesh.testing import ROOT, free_endpoint
from qmesh.worker.cli import run as worker_run

COMMANDS = {
    "qmesh-broker": ("qmesh.broker.cli", broker_run),
    "qmesh-worker": ("qmesh.worker.cli", worker_run),
    "qmesh-client": ("qmesh.client.cli", client_run),
    "qmesh-gateway": ("qmesh.gateway.cli", gateway_run),
    "qmesh-status": ("qmesh.client.status", status_run),
}

demo = typer.Typer()


@demo.command()
def show(
    broker: str = typer.Option("tcp://default:1", "--broker", envvar="QMESH_BROKER"),
    max_tokens: int = typer.Option(256, "--max-tokens", envvar="QMESH_MAX_TOKENS", min=1),
    jsonl: bool = typer.Option(False, "--jsonl", envvar="QMESH_JSONL"),
    config: Path = config_option("client"),
) -> None:
    typer.echo(json.dumps({"broker": broker, "max_tokens": max_tokens, "jsonl": jsonl}))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty QMESH_HOME, so no user's config file leaks in; its default config file path."""
    monkeypatch.setenv("QMESH_HOME", str(tmp_path))
    for name in ("QMESH_BROKER", "QMESH_MAX_TOKENS", "QMESH_JSONL", "QMESH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config").mkdir()
    return tmp_path / "config" / "qmesh.toml"


def resolved(*args: str, env: dict[str, str] | None = None) -> dict:
    result = CliRunner().invoke(demo, list(args), env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_precedence_is_flag_then_env_then_file_then_default(home):
    assert resolved() == {"broker": "tcp://default:1", "max_tokens": 256, "jsonl": False}
    home.write_text('[client]\nbroker = "tcp://file:1"\nmax-tokens = 32\njsonl = true\n')
    assert resolved() == {"broker": "tcp://file:1", "max_tokens": 32, "jsonl": True}
    env = {"QMESH_BROKER": "tcp://env:1", "QMESH_JSONL": "0"}
    assert resolved(env=env) == {"broker": "tcp://env:1", "max_tokens": 32, "jsonl": False}
    assert resolved("--broker", "tcp://flag:1", env=env) == {"broker": "tcp://flag:1", "max_tokens": 32, "jsonl": False}


def test_config_file_is_found_by_flag_or_env_before_the_default_place(home, tmp_path):
    home.write_text('[client]\nbroker = "tcp://default-file:1"\n')
    other = tmp_path / "other.toml"
    other.write_text('[client]\nbroker = "tcp://other-file:1"\n')
    assert resolved()["broker"] == "tcp://default-file:1"
    assert resolved(env={"QMESH_CONFIG": str(other)})["broker"] == "tcp://other-file:1"
    assert resolved("--config", str(other))["broker"] == "tcp://other-file:1"


def test_a_real_command_takes_its_table_and_env_and_flags_override_it(home):
    def unreachable(*args: str, env: dict[str, str] | None = None) -> str:
        command = [sys.executable, "-m", "qmesh.client.status", *args]
        environment = {"QMESH_HOME": str(home.parent.parent), "PATH": "/usr/bin:/bin", **(env or {})}
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT, env=environment)
        assert done.returncode == 1, done.stderr
        return done.stderr

    endpoints = [free_endpoint() for _ in range(3)]
    home.write_text(f'[status]\nbroker = "{endpoints[0]}"\nconnect_timeout = 0.3\n')
    assert f"{endpoints[0]} within 0.3 s" in unreachable()
    assert f"{endpoints[1]} within 0.3 s" in unreachable(env={"QMESH_BROKER": endpoints[1]})
    assert f"{endpoints[2]} within 0.3 s" in unreachable("--broker", endpoints[2], env={"QMESH_BROKER": endpoints[1]})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[broker]\nmax_queu = 5\n", "[broker] unknown key 'max_queu' (known keys: allow_clients, "),
        ('[broker]\nmax_queue = "lots"\n', "[broker] max_queue: expected an integer, got string 'lots'"),
        ("[broker]\nmax_queue = -1\n", "[broker] max_queue: must be at least 0, got -1"),
        ("[broker]\nqueue_timeout = true\n", "[broker] queue_timeout: expected a number, got boolean True"),
        ('[broker]\nlog_format = "xml"\n', "[broker] log_format: expected one of text, json, got 'xml'"),
        ("[brokers]\nbind = 'x'\n", "unknown table [brokers] (tables: broker, worker, client, gateway, status)"),
        ("broker = 3\n", "'broker' must be a table ([broker]), not a integer"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_file_and_key(tmp_path, text, expected):
    path = tmp_path / "qmesh.toml"
    path.write_text(text)
    result = CliRunner().invoke(broker_app, ["--config", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())  # undo the help box and its wrapping
    assert f"{path}: {expected}" in message


def test_a_missing_explicit_config_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.toml"
    result = CliRunner().invoke(broker_app, ["--config", str(missing)], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and f"{missing}: no such config file" in result.output


def test_every_option_has_an_environment_variable_shown_in_help():
    for name, (_, function) in COMMANDS.items():
        options = inspect.signature(function).parameters
        missing = [o for o, p in options.items() if o != "version" and not getattr(p.default, "envvar", None)]
        assert not missing, f"{name}: options without an env var: {missing}"
        result = CliRunner().invoke(_app(function), ["--help"], env={"COLUMNS": "400"})
        for option in options.values():
            if option.default.envvar:
                assert option.default.envvar in result.output, f"{name} --help lacks {option.default.envvar}"


def _app(function) -> typer.Typer:
    app = typer.Typer()
    app.command()(function)
    return app


def test_the_example_config_in_deploy_is_valid_for_every_command():
    example = ROOT / "deploy" / "qmesh.toml"
    for name, (_, function) in COMMANDS.items():
        assert section_defaults(example, name.removeprefix("qmesh-"), function), f"no [{name}] table"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_version_on_every_command(command):
    module = COMMANDS[command][0]
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"qmesh {version('qmesh')}\n"


# ------------------------------------------------------------------------------------------ logs


def run_broker(*args: str, quiet: bool = False) -> list[str]:
    """Start a broker, let it log that it listens (or run 1 s if ``quiet``), stop it; its stderr lines."""
    command = [sys.executable, "-m", "qmesh.broker.cli", "--bind", free_endpoint(), *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    if quiet:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    else:
        while "listening" not in (line := process.stderr.readline()) and line:
            lines.append(line)
        lines.append(line)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=10)
    assert process.returncode == 0, rest
    return "".join([*lines, rest]).splitlines()


def test_json_logs_are_one_object_per_line():
    lines = run_broker("--log-format", "json")
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("broker listening on tcp://") and r["level"] == "info" for r in records)
    assert records[-1]["message"] == "broker stopped"


def test_log_level_hides_less_severe_records():
    assert run_broker("--log-level", "warning", quiet=True) == []


def test_text_logs_are_short_lines_without_colour_off_a_terminal():
    lines = run_broker()
    assert any(line.endswith(" I qmesh.broker.loop: broker stopped") for line in lines)
    assert not any("\033[" in line for line in lines)


def test_json_formatter_keeps_extras_and_exceptions():
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("qmesh.test").exception("it failed for %s", "worker-1", extra={"request_id": "abc"})
    finally:
        setup_logging("warning", "text")
    record = json.loads(stream.getvalue())
    assert record["message"] == "it failed for worker-1" and record["level"] == "error"
    assert record["request_id"] == "abc" and "ValueError: boom" in record["exception"]
