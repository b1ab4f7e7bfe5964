"""SIGTERM while the proxy starts (issue 11): before its handlers are in
place it exited 143 (killed by the signal's default action), dropping
listeners it had just opened.  `octo-proxy run` now holds SIGTERM, SIGINT
and SIGUSR2 blocked from its first step until the handlers are installed: a
SIGTERM that arrives after the listeners opened becomes an orderly stop
(every request read is answered), and one that arrives before anything is
served a clean exit 0.

The start is held at a known point by this test playing the previous
generation of a hot restart (same uid): the new process waits for its
answers, so the signal lands exactly where it must."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

from attack import Peer, req

from octoproxy.sdk import Client

from harness import Cluster, cluster, free_port, server_proxy_cfg, wait_for


class FakePredecessor:
    """The old generation's side of the hot-restart handshake, step by step."""

    def __init__(self, path: str) -> None:
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.lsock.settimeout(30)
        self.conn: socket.socket | None = None
        self.buf = b""

    def accept_hello(self) -> dict[str, Any]:
        self.conn, _ = self.lsock.accept()
        self.conn.settimeout(30)
        return self.recv()

    def recv(self) -> dict[str, Any]:
        assert self.conn is not None
        while b"\n" not in self.buf:
            data = self.conn.recv(65536)
            assert data, "the new generation closed the hot-restart connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def offer(self, listeners: dict[str, socket.socket]) -> None:
        assert self.conn is not None
        msg = {"ok": True, "listeners": list(listeners), "state": {}, "generation": 1,
               "pid": os.getpid()}
        socket.send_fds(self.conn, [json.dumps(msg).encode() + b"\n"],
                        [s.fileno() for s in listeners.values()])

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.lsock.close()


def _setup(c: Cluster) -> tuple[dict[str, Any], int, socket.socket]:
    c.providers(p="p.sock")
    port = free_port()
    cfg = server_proxy_cfg({port: c.path("p.sock")})
    cfg["hot_restart"] = {"socket": c.path("s.hr"), "pid_file": c.path("s.pid"),
                          "start_timeout_s": 30.0, "shutdown_s": 10.0}
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", port))
    lst.listen(64)
    return cfg, port, lst


def test_sigterm_after_the_listeners_opened_is_an_orderly_stop() -> None:
    with cluster() as c:
        cfg, port, lst = _setup(c)
        old = FakePredecessor(c.path("old.hr"))
        try:
            p = c.proxy("server", cfg, wait=False,
                        extra_args=["--hot-restart-from", c.path("old.hr")])
            assert old.accept_hello()["magic"] == "octo-proxy-hot-restart"
            old.offer({f"tcp:127.0.0.1:{port}": lst})
            assert old.recv() == {"ready": True}  # it serves our listener, no handlers yet
            peer = Peer(port)
            peer.send(req(1, b"sleep:1000:id:early", timeout_ms=10000))
            with Client(c.path("p.sock")) as cl:
                wait_for(lambda: cl.call("m", b"started:early").body == b"p|1", 10,
                         "the request at the provider")
            p.signal(signal.SIGTERM)  # before the handlers: it was exit 143
            t0 = time.monotonic()
            old.send({"released": True})
            rc = p.p.wait(20)
            took = time.monotonic() - t0
            assert peer.wait_closed(5)
            a = peer.answers()
            print(f"early SIGTERM: exit {rc} after {took:.2f} s, answers {sorted(a)}")
            assert rc == 0, p.log()
            assert 1 in a and a[1][0].status == 0 and a[1][0].body == b"p|id:early", peer.describe()
            assert "stopping" in p.log()
        finally:
            old.close()
            lst.close()


def test_sigterm_before_anything_is_served_exits_0() -> None:
    with cluster() as c:
        cfg, port, lst = _setup(c)
        old = FakePredecessor(c.path("old.hr"))
        try:
            p = c.proxy("server", cfg, wait=False,
                        extra_args=["--hot-restart-from", c.path("old.hr")])
            old.accept_hello()
            p.signal(signal.SIGTERM)  # it waits for our offer: nothing is served yet
            old.offer({f"tcp:127.0.0.1:{port}": lst})
            rc = p.p.wait(20)
            assert rc == 0, p.log()
            assert "before serving" in p.log()
            assert not os.path.exists(c.path("s.pid"))
            # the listener stayed with its owner (this test): still accepting here
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = lst.accept()
                conn.close()
        finally:
            old.close()
            lst.close()
