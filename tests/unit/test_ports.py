"""free_tcp_port: ports that outgoing connections cannot take in the meantime."""

from __future__ import annotations

import socket

from octoproxy.ports import _ephemeral_low, free_tcp_port


def test_free_tcp_port_is_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low = _ephemeral_low()
    ports = [free_tcp_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if low > 10001:
        assert all(10000 <= p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_tcp_port_skips_a_port_in_use() -> None:
    held = []
    try:
        for _ in range(20):
            p = free_tcp_port()
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert free_tcp_port() not in taken
    finally:
        for s in held:
            s.close()
