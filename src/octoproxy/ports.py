"""Free TCP ports for the demo, the tests and the benches, and whether
something listens on a port or a UDS path yet.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral
range, the same range every outgoing connection takes its local port from.
Between the moment it is chosen and the moment the child process binds it, a
connection made by anyone on the host may take it, and the child fails with
EADDRINUSE (seen in the demo on a loaded host). Ports below the ephemeral
range are never given to outgoing connections, so a port chosen there stays
free unless something binds it on purpose.
"""

from __future__ import annotations

import random
import socket

_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, below the ephemeral range when there is
    room (else the kernel's choice), never the same twice in one process."""
    low = _ephemeral_low()
    if low - 1 > 10000:
        rng = random.SystemRandom()
        for _ in range(500):
            p = rng.randrange(10000, low)
            if p in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError:
                    continue
            _given.add(p)
            return p
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            p = int(s.getsockname()[1])
        if p not in _given:
            _given.add(p)
            return p


def can_connect_tcp(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def can_connect_uds(path: str) -> bool:
    """Something accepts connections on the UDS path now."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
