"""Where every part that connects to the broker (SDK, CLIs, workers, gateway) looks for it unless told otherwise."""

from __future__ import annotations

DEFAULT_BROKER = "tcp://127.0.0.1:5555"


def broker_endpoints(brokers: str) -> tuple[str, ...]:
    """The endpoints of ``--broker``: one broker, or a pair, ``tcp://A:5555,tcp://B:5556`` (the active one serves;
    clients and workers find it, and follow it when the other takes over)."""
    endpoints = tuple(part.strip() for part in brokers.split(",") if part.strip())
    if not endpoints:
        raise ValueError(f"no broker endpoint in {brokers!r}")
    return endpoints
