"""docs/protocol.md section 7, each behaviour named: the proxy announcement,
ProxyRestart handling on the client side, and who receives ProxyRestart."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from octoproxy._core import frame
from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import AsyncClient, Client

from harness import (
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    wait_for,
)


class FakeServerProxy:
    """A scripted server-side proxy on a TCP port: records what arrives on
    each connection, answers requests (or holds them), sends ProxyRestart."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[dict] = []
        self.hold = True
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            rec = {"sock": s, "frames": [], "held": [], "closed": False}
            with self.lock:
                self.conns.append(rec)
            threading.Thread(target=self._serve, args=(rec,), daemon=True).start()

    def _serve(self, rec: dict) -> None:
        sc = frame.FrameScanner()
        s = rec["sock"]
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                rec["closed"] = True
                return
            for f in sc.feed(data):
                rec["frames"].append(f)
                if f.msg_type == 1:
                    s.sendall(frame.encode_heartbeat(f.seq_id, response=True))
                elif f.is_request and f.call_type == 0:
                    out = frame.encode_response(f.seq_id, b"fake|" + f.body)
                    if self.hold and f.body.startswith(b"hold"):
                        rec["held"].append(out)
                    else:
                        s.sendall(out)

    def send_proxy_restart(self, i: int) -> None:
        self.conns[i]["sock"].sendall(frame.encode_proxy_restart())

    def release_held(self, i: int) -> None:
        rec = self.conns[i]
        for out in rec["held"]:
            rec["sock"].sendall(out)
        rec["held"].clear()

    def requests(self, i: int) -> list:
        return [f for f in self.conns[i]["frames"] if f.is_request and f.msg_type == 0]

    def close(self) -> None:
        self.sock.close()
        for rec in self.conns:
            rec["sock"].close()


def test_first_frame_on_an_upstream_connection_announces_the_proxy() -> None:
    fake = FakeServerProxy()
    with cluster() as c:
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{fake.port}"}]}],
            upstream={"connections_per_node": 1}))
        with Client(c.path("px.sock")) as cl:
            assert cl.call("m", b"x", appkey="a").body == b"fake|x"
        first = fake.conns[0]["frames"][0]
        assert first.msg_type == 1 and first.is_request and first.proxy_announce
    fake.close()


def test_proxy_restart_moves_new_requests_keeps_reading_owed_then_closes() -> None:
    import asyncio

    import uvloop

    fake = FakeServerProxy()
    with cluster() as c:
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{fake.port}"}]}],
            upstream={"connections_per_node": 1, "default_timeout_ms": 10000}))

        async def main() -> None:
            cl = await AsyncClient.connect(c.path("px.sock"))
            held = [asyncio.ensure_future(cl.call("m", b"hold%d" % i, appkey="a"))
                    for i in range(5)]
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: len(fake.conns) == 1
                                       and len(fake.conns[0]["held"]) == 5, 5, "held requests"))
            fake.send_proxy_restart(0)
            fake.hold = False
            # frames on one connection are handled in order: once the heartbeat
            # sent after ProxyRestart is answered, ProxyRestart has been handled
            fake.conns[0]["sock"].sendall(frame.encode_heartbeat(4243))
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
                lambda: any(f.msg_type == 1 and f.is_response and f.seq_id == 4243
                            for f in fake.conns[0]["frames"]), 5, "the heartbeat answer"))
            # new requests after ProxyRestart go on a fresh connection
            r = await cl.call("m", b"new", appkey="a")
            assert r.body == b"fake|new"
            assert len(fake.conns) == 2
            assert [f.body for f in fake.requests(1)] == [b"new"]
            assert len(fake.requests(0)) == 5  # nothing new on the old one
            # what was owed on the old connection is still delivered
            fake.release_held(0)
            rs = await asyncio.wait_for(asyncio.gather(*held), 5)
            assert [x.body for x in rs] == [b"fake|hold%d" % i for i in range(5)]
            await cl.close()

        uvloop.run(main())
        # and the old connection is closed once nothing is owed on it
        wait_for(lambda: fake.conns[0]["closed"], 5, "the retired connection to be closed")
        assert not fake.conns[1]["closed"]
    fake.close()


def test_legacy_clients_never_receive_proxy_restart() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        scfg = server_proxy_cfg({port: c.path("p.sock")})
        scfg["hot_restart"] = {"socket": c.path("s.hr"), "pid_file": c.path("s.pid"),
                               "drain_s": 1.5, "shutdown_s": 5, "proxy_restart_spread_s": 0}
        c.proxy("server", scfg)
        legacy = socket.create_connection(("127.0.0.1", port))
        legacy.sendall(frame.encode_request(1, "m", b"echo:1"))
        sc = frame.FrameScanner()
        got: list = []
        legacy.settimeout(5)
        wait_for(lambda: got.extend(sc.feed(legacy.recv(4096))) or got, 5, "legacy answer")
        old = read_pid(c.path("s.pid"))
        assert old
        os.kill(old, signal.SIGUSR2)
        # read everything the old generation sends this legacy connection until it closes
        legacy.settimeout(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            data = legacy.recv(4096)
            if not data:
                break
            got.extend(sc.feed(data))
        legacy.close()
        assert all(f.msg_type != 3 for f in got), "a legacy client received ProxyRestart"
        wait_for(lambda: not pid_alive(old), 15, "the old generation to exit")


def test_idle_upstream_connection_closed_and_reopened_on_next_use() -> None:
    fake = FakeServerProxy()
    fake.hold = False
    with cluster() as c:
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{fake.port}"}]}],
            upstream={"connections_per_node": 1, "idle_timeout_s": 0.4}))
        with Client(c.path("px.sock")) as cl:
            assert cl.call("m", b"1", appkey="a").ok
            wait_for(lambda: fake.conns[0]["closed"], 5, "the idle connection to be closed")
            assert cl.call("m", b"2", appkey="a").body == b"fake|2"
        assert len(fake.conns) == 2 and fake.requests(1)[0].body == b"2"
    fake.close()


def test_connect_timeout_answers_with_reason() -> None:
    # a listener whose accept queue is full: the kernel drops the SYN and the
    # connect hangs, as towards a host that does not answer
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    with cluster() as c:
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
            upstream={"connect_timeout_ms": 300}))
        with Client(c.path("px.sock")) as cl:
            t0 = time.monotonic()
            r = cl.call("m", b"x", appkey="a", raise_on_error=False)
            took = time.monotonic() - t0
        assert r.status == 4 and "timed out after 300 ms" in r.message, r.message
        assert took >= 0.25  # answered when the connect timed out, not before
    for f in fillers:
        f.close()
    full.close()


def test_heartbeat_from_the_upstream_peer_is_answered() -> None:
    fake = FakeServerProxy()
    fake.hold = False
    with cluster() as c:
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{fake.port}"}]}],
            upstream={"connections_per_node": 1}))
        with Client(c.path("px.sock")) as cl:
            assert cl.call("m", b"1", appkey="a").ok
            fake.conns[0]["sock"].sendall(frame.encode_heartbeat(4242))
            wait_for(lambda: any(f.msg_type == 1 and f.is_response and f.seq_id == 4242
                                 for f in fake.conns[0]["frames"]), 5, "the heartbeat answer")
    fake.close()
