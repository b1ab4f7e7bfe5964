"""The repeat limiter and the peer names in log lines."""

from __future__ import annotations

import io
import logging
import os
import socket

from octoproxy.logs import RepeatLimiter, peer_name


def _logger(limiter: RepeatLimiter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.addFilter(limiter)
    lg = logging.getLogger(f"octoproxy.test{id(limiter)}")
    lg.handlers[:] = [h]
    lg.propagate = False
    return lg, out


def test_repeats_of_one_template_are_limited_per_window_and_counted() -> None:
    now = [100.0]
    lim = RepeatLimiter(burst=3, window_s=0.2, clock=lambda: now[0])
    lg, out = _logger(lim)
    for i in range(100):
        lg.warning("connect to %s failed", f"10.0.0.{i}")
    lg.warning("another message")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lim.suppressed == 97
    now[0] += 0.19  # still the same window
    lg.warning("connect to %s failed", "y")
    assert len(out.getvalue().splitlines()) == 4 and lim.suppressed == 98
    now[0] += 0.05  # the next window
    lg.warning("connect to %s failed", "x")
    last = out.getvalue().splitlines()[-1]
    assert last == "connect to x failed [98 similar line(s) suppressed in the last 0.2 s]"


def test_access_log_is_never_limited() -> None:
    lim = RepeatLimiter(burst=1, window_s=60)
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.addFilter(lim)
    lg = logging.getLogger("octoproxy.access")
    old = lg.handlers[:]
    lg.handlers[:] = [h]
    try:
        for _ in range(10):
            lg.warning("service=a status=0")
    finally:
        lg.handlers[:] = old
    assert len(out.getvalue().splitlines()) == 10 and lim.suppressed == 0


class _T:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else self.sock.getpeername()


def test_peer_name_uds_is_pid_and_uid_tcp_is_address() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer_name(_T(a)) == f"pid={os.getpid()} uid={os.getuid()}"
    finally:
        a.close()
        b.close()
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    s, addr = ls.accept()
    try:
        assert peer_name(_T(s)) == f"127.0.0.1:{addr[1]}"
    finally:
        for x in (c, s, ls):
            x.close()
    assert peer_name(None) == "?"
