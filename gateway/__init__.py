"""An OpenAI-compatible HTTP gateway in front of the QMesh broker (``qmesh-gateway``)."""
