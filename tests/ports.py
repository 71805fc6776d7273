"""Free loopback ports for the daemons and peers the tests start (the one
place that picks them)."""
from __future__ import annotations

import socket
from collections.abc import Iterable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at *host* right now."""
    return free_ports(["port"], host)["port"]


def free_ports(names: Iterable[str], host: str = "127.0.0.1") -> dict[str, int]:
    """A free port at *host* for each name, all different (every socket is
    held until all are picked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        ports = {}
        for name in names:
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            ports[name] = s.getsockname()[1]
        return ports
    finally:
        for s in socks:
            s.close()
