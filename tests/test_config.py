"""Configuration: flag > environment > config file > default, clear errors for bad files, --version, logs."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import signal
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import requests
import typer
from typer.testing import CliRunner

from meshkit import BrokerThread
from qmesh.broker.cli import app as broker_app
from qmesh.broker.cli import run as broker_run
from qmesh.client.cli import run as client_run
from qmesh.client.status import run as status_run
from qmesh.common.config import config_option, section_defaults
from qmesh.common.errors import ConfigError
from qmesh.common.logs import setup_logging
from qmesh.gateway.cli import run as gateway_run
from qmesh.testing import ROOT, Child, free_endpoint, qmesh_command, wait_for
from qmesh.worker.cli import run as worker_run
from qmesh.worker.shard_cli import run as shard_run

COMMANDS = {
    "qmesh-broker": broker_run,
    "qmesh-worker": worker_run,
    "qmesh-client": client_run,
    "qmesh-gateway": gateway_run,
    "qmesh-status": status_run,
    "qmesh-shard": shard_run,
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
        command = qmesh_command("qmesh-status", *args)
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
        (
            "[brokers]\nbind = 'x'\n",
            "unknown table [brokers] (tables: broker, worker, client, gateway, status, models, shard)",
        ),
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
    for name, function in COMMANDS.items():
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


def test_help_names_the_default_config_file_the_code_reads(tmp_path):
    """Every command's --help names the same default places, and each is the file read in its situation."""
    places = ("$QMESH_HOME/config/qmesh.toml", "$XDG_CONFIG_HOME/qmesh/qmesh.toml", "~/.config/qmesh/qmesh.toml")
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{place}`" in readme for place in places), "the README tells the same story"
    for name, function in COMMANDS.items():
        text = " ".join(CliRunner().invoke(_app(function), ["--help"], env={"COLUMNS": "400"}).output.split())
        for place in places:
            assert place in text, f"{name} --help does not name {place}"
    qmesh_home, xdg, home = tmp_path / "qmesh-home", tmp_path / "xdg", tmp_path / "home"
    for path, broker in [
        (qmesh_home / "config", "tcp://qmesh-home:1"),
        (xdg / "qmesh", "tcp://xdg:1"),
        (home / ".config" / "qmesh", "tcp://home:1"),
    ]:
        path.mkdir(parents=True)
        (path / "qmesh.toml").write_text(f'[client]\nbroker = "{broker}"\n')
    env = {"QMESH_HOME": str(qmesh_home), "XDG_CONFIG_HOME": str(xdg), "HOME": str(home), "QMESH_CONFIG": None}
    assert resolved(env=env)["broker"] == "tcp://qmesh-home:1", "QMESH_HOME wins over XDG_CONFIG_HOME"
    assert resolved(env={**env, "QMESH_HOME": None})["broker"] == "tcp://xdg:1"
    assert resolved(env={**env, "QMESH_HOME": None, "XDG_CONFIG_HOME": None})["broker"] == "tcp://home:1"
    (qmesh_home / "config" / "qmesh.toml").unlink()
    assert resolved(env=env)["broker"] == "tcp://default:1", "with QMESH_HOME set, only its file is read"


@pytest.mark.parametrize(
    ("line", "keys"),
    [
        ('api_key = "sk-one"', ["sk-one"]),
        ('api-key = ["sk-one", "sk-two"]', ["sk-one", "sk-two"]),
        ('api_keys = ["sk-old"]', ["sk-old"]),  # its old name, in deploy/qmesh.toml before: still read
    ],
)
def test_the_gateway_api_key_is_a_list_or_one_string_under_the_option_name(tmp_path, line, keys):
    path = tmp_path / "qmesh.toml"
    path.write_text(f"[gateway]\n{line}\n")
    assert section_defaults(path, "gateway", gateway_run) == {"api_key": keys}


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("api_key = 3", "[gateway] api_key: expected a string, got integer 3"),
        ('api_key = "a"\napi_keys = ["b"]', "[gateway] api_keys is the old name of api_key: give only api_key"),
    ],
)
def test_a_bad_gateway_api_key_is_named(tmp_path, lines, expected):
    path = tmp_path / "qmesh.toml"
    path.write_text(f"[gateway]\n{lines}\n")
    with pytest.raises(ConfigError) as caught:
        section_defaults(path, "gateway", gateway_run)
    assert str(caught.value) == f"{path}: {expected}"


def test_the_gateway_command_takes_its_api_key_from_the_config_file(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with BrokerThread() as broker:
        config = tmp_path / "qmesh.toml"
        config.write_text(f'[gateway]\nbroker = "{broker.endpoint}"\nport = {port}\napi_key = "sk-file"\n')
        command = qmesh_command("qmesh-gateway", "--config", str(config))
        gateway = Child("qmesh-gateway", command, tmp_path / "gateway.log", {"QMESH_HOME": str(tmp_path)})
        try:
            wait_for(lambda: _answers(f"{url}/health"), 20, "the gateway to serve")
            assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
            wrong = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-other"}, timeout=10)
            assert wrong.status_code == 401
            right = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-file"}, timeout=10)
            assert right.status_code == 200 and right.json()["data"] == []  # no worker yet: no model
        finally:
            gateway.stop()
    assert "Application shutdown complete" in gateway.log(), gateway.log_tail()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.ConnectionError:
        return False


def test_gateway_help_names_the_config_key_of_api_key():
    text = " ".join(CliRunner().invoke(_app(gateway_run), ["--help"], env={"COLUMNS": "400"}).output.split())
    assert "api_key" in text and "a list or one string" in text


def test_the_example_config_in_deploy_is_valid_for_every_command():
    example = ROOT / "deploy" / "qmesh.toml"
    for name, function in COMMANDS.items():
        assert section_defaults(example, name.removeprefix("qmesh-"), function), f"no [{name}] table"


@pytest.mark.parametrize("command", sorted([*COMMANDS, "qmesh-keys"]))
def test_version_on_every_command(command):
    done = subprocess.run(qmesh_command(command, "--version"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"qmesh {version('qmesh')}\n"


# ------------------------------------------------------------------------------------------ logs


def run_broker(*args: str, quiet: bool = False) -> list[str]:
    """Start a broker, let it log that it listens (or run 1 s if ``quiet``), stop it; its stderr lines."""
    command = qmesh_command("qmesh-broker", "--bind", free_endpoint(), *args)
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
