"""Where every part that connects to the broker (SDK, CLIs, workers, gateway) looks for it unless told otherwise."""

from __future__ import annotations

import ipaddress

DEFAULT_BROKER = "tcp://127.0.0.1:5555"


def broker_endpoints(brokers: str) -> tuple[str, ...]:
    """The endpoints of ``--broker``: one broker, or a pair, ``tcp://A:5555,tcp://B:5556`` (the active one serves;
    clients and workers find it, and follow it when the other takes over)."""
    endpoints = tuple(part.strip() for part in brokers.split(",") if part.strip())
    if not endpoints:
        raise ValueError(f"no broker endpoint in {brokers!r}")
    return endpoints


def is_loopback_host(host: str) -> bool:
    """True for a host only this machine reaches: localhost or a loopback address (IPv6 with or without brackets)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: may be reachable from elsewhere
        return False
