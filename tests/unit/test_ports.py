"""free_tcp_port: ports that outgoing connections cannot take in the meantime."""

from __future__ import annotations

import socket

import pytest

from octoproxy.ports import _ephemeral_low, _given, free_tcp_port


def test_free_tcp_port_is_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low = _ephemeral_low()
    ports = [free_tcp_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if low > 10001:
        assert all(10000 <= p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_tcp_port_skips_a_port_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that something else holds (not one free_tcp_port gave: those
    are skipped anyway) is passed over for the next candidate."""
    low = _ephemeral_low()
    if low - 1 <= 10000:
        pytest.skip("no room below the ephemeral range: the kernel picks the port")
    with socket.socket() as held:
        # two ports below the ephemeral range: one held (listening), one free
        held.bind(("127.0.0.1", _port_below(low)))
        held.listen()
        busy = held.getsockname()[1]
        free = _port_below(low, not_=busy)
        candidates = iter([busy, free])

        class Rng:
            def randrange(self, a: int, b: int) -> int:
                return next(candidates)

        monkeypatch.setattr("octoproxy.ports.random.SystemRandom", Rng)
        assert free_tcp_port() == free  # the held port was tried first and skipped


def _port_below(low: int, not_: int = 0) -> int:
    """A port in [10000, low) nothing holds now and free_tcp_port has not given."""
    for p in range(10000, low):
        if p == not_ or p in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        return p
    raise AssertionError("no free port below the ephemeral range")
