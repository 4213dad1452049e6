"""``python -m qmesh.gateway``: the same as ``qmesh-gateway``."""

from qmesh.gateway.cli import main

main()
