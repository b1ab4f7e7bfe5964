"""Failures and storms (issue 11): accept-then-close peers, mismatched frame
limits, frames an app must not send, context limits, UDS peer names, the
inbound in-flight gauge, the listen backlog."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from attack import Peer, admin_cfg, chain_cfgs, log_lines, metric, req, scrape, start_proxy

from octoproxy._core import frame as F

from harness import cluster, free_port, wait_for


class AcceptThenClose(threading.Thread):
    """A port that accepts every connection and closes it at once (a dead
    provider behind its proxy, or a peer at its connection limit)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(1024)
        self.port = self.ls.getsockname()[1]
        self.accepts = 0
        self.stop = False

    def run(self) -> None:
        self.ls.settimeout(0.1)
        while not self.stop:
            try:
                s, _ = self.ls.accept()
            except (TimeoutError, OSError):
                continue
            self.accepts += 1
            s.close()
        self.ls.close()


def test_peer_that_accepts_then_closes_is_backed_off() -> None:
    # connections that die young count as failed connects (backoff), and the
    # repeated log lines are rate-limited (was: ~63,000 connects and 125,000
    # log lines in 15 s)
    with cluster() as c:
        peer = AcceptThenClose()
        peer.start()
        ccfg = {
            "node": {"id": "client"},
            "listeners": {"outbound": [{"path": c.path("px.sock")}]},
            "static": {"services": [{"appkey": "a", "endpoints": [
                {"address": f"127.0.0.1:{peer.port}"}]}]},
        }
        client = start_proxy(c, "client", ccfg)
        app = Peer(c.path("px.sock"))
        seq = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0:
            app.send(b"".join(req(seq + i) for i in range(20)))
            seq += 20
            app.wait(lambda s=seq: len(app.answers()) >= s, 10, "answers")
        peer.stop = True
        rate = peer.accepts / 5.0
        lines = len(client.log().splitlines())
        print(f"accept-then-close: {peer.accepts} connects in 5 s ({rate:.0f}/s), {lines} log lines, "
              f"{seq} requests all answered")
        assert all(f[0].status == 4 for f in app.answers().values())
        assert len(app.answers()) == seq
        assert peer.accepts <= 30, peer.accepts
        assert lines <= 60, lines


def test_server_frame_limit_below_client_answers_only_that_request() -> None:
    # a request over the server side's max_frame_bytes (but under the client
    # side's) is answered with status 5; the shared upstream connection and
    # other apps' requests are not touched
    with cluster() as c:
        aport = free_port()
        scfg, ccfg, port = chain_cfgs(
            c, server_extra={"limits": {"max_frame_bytes": 65536, "max_header_bytes": 4096}},
            client_extra={"upstream": {"connections_per_node": 1}, "admin": admin_cfg(aport)})
        server = start_proxy(c, "server", scfg)
        start_proxy(c, "client", ccfg)
        small = Peer(c.path("px.sock"))
        big = Peer(c.path("px.sock"))
        small.send(b"".join(req(i, b"sleep:300:s%d" % i) for i in range(20)))
        wait_for(lambda: metric(scrape(aport), "octo_proxy_in_flight") == 20, 10,
                 "the 20 slow calls in flight on the shared connection")
        big.send(req(99, b"B" * 100_000))
        small.send(b"".join(req(i, b"echo:t%d" % i) for i in range(20, 40)))
        big.wait(lambda: 99 in big.answers(), 10)
        small.wait(lambda: len(small.answers()) == 40, 10)
        a = big.answers()[99][0]
        assert a.status == 5 and "max_frame_bytes" in (a.message or ""), (a.status, a.message)
        bad = {k: (v[0].status, v[0].message) for k, v in small.answers().items() if v[0].status}
        assert bad == {}, bad
        big.send(req(100))
        big.wait(lambda: 100 in big.answers(), 10)
        assert big.answers()[100][0].status == 0
        assert metric(scrape(aport), "octo_proxy_upstream_connections",
                      f'upstream="127.0.0.1:{port}"') == 1
        assert log_lines(server, "closing inbound connection") == 0, server.log()


def test_frames_an_app_must_not_send_are_counted_and_logged_with_its_pid() -> None:
    # decided (docs/protocol.md): a Response or ProxyRestart frame from an app
    # is ignored, counted (octo_proxy_ignored_frames) and logged with the
    # app's pid/uid (SO_PEERCRED); the connection stays
    with cluster() as c:
        aport = free_port()
        scfg, ccfg, _ = chain_cfgs(c, client_extra={"admin": admin_cfg(aport)})
        start_proxy(c, "server", scfg)
        client = start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(F.encode_response(5, b"r") + F.encode_proxy_restart() + req(6))
        p.wait(lambda: 6 in p.answers(), 10)
        assert [f.seq_id for f in p.frames] == [6]
        text = scrape(aport)
        assert metric(text, "octo_proxy_ignored_frames_total", 'kind="response"') == 1
        assert metric(text, "octo_proxy_ignored_frames_total", 'kind="proxy_restart"') == 1
        me = f"pid={os.getpid()} uid={os.getuid()}"
        wait_for(lambda: log_lines(client, me) >= 1, 5, "a log line naming the app")


def test_one_way_request_to_unknown_service_answered_once_under_its_own_id() -> None:
    # decided in docs/protocol.md 6.2 (Dorado clients wait for an answer to a
    # one-way call): a one-way request the proxy cannot route is answered like
    # any request, exactly once, under the sequence id the app used
    with cluster() as c:
        scfg, ccfg, _ = chain_cfgs(c)
        start_proxy(c, "server", scfg)
        start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(req(1, appkey="nope", one_way=True) + req(2))
        p.wait(lambda: 2 in p.answers() and 1 in p.answers(), 10)
        p.poll(0.3)
        assert sorted(f.seq_id for f in p.frames) == [1, 2], p.describe()
        assert p.answers()[1][0].status == 8


def test_context_size_limits() -> None:
    # 512 bytes of global context, 2 KiB of local context (encoded map
    # bytes): past them, status 5 with the reason; one-way: dropped, counted
    with cluster() as c:
        scfg, ccfg, _ = chain_cfgs(c)
        start_proxy(c, "server", scfg)
        start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(req(1, global_context={"k": "v" * 600}) + req(2, local_context={"k": "v" * 3000})
               + req(3, global_context={"k": "v" * 400}, local_context={"k": "v" * 1800}))
        p.wait(lambda: len(p.answers()) == 3, 10)
        a = p.answers()
        assert a[1][0].status == 5 and "globalContext" in (a[1][0].message or ""), a[1][0].message
        assert a[2][0].status == 5 and "localContext" in (a[2][0].message or ""), a[2][0].message
        assert a[3][0].status == 0


def test_malformed_frame_from_uds_app_logs_its_pid_and_uid() -> None:
    with cluster() as c:
        _, ccfg, _ = chain_cfgs(c)
        client = start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(b"\xab\xba" + b"\x00" * 30)
        assert p.wait_closed(5)
        me = f"pid={os.getpid()} uid={os.getuid()}"
        wait_for(lambda: log_lines(client, me) >= 1, 5, f"a log line with {me}")


def test_sigterm_does_not_wait_for_requests_the_caller_gave_up_on() -> None:
    # the inbound in-flight gauge drops once the caller's timeout has passed
    # (was: SIGTERM on the server side waited the full shutdown_s)
    with cluster() as c:
        scfg, ccfg, _ = chain_cfgs(c, server_extra={"hot_restart": {"shutdown_s": 20.0}})
        server = start_proxy(c, "server", scfg)
        start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(b"".join(req(i, b"sleep:60000:x", timeout_ms=500) for i in range(5)))
        p.wait(lambda: len(p.answers()) == 5, 10)
        assert all(f[0].status == 4 for f in p.answers().values())
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        server.p.wait(25)
        took = time.monotonic() - t0
        print(f"SIGTERM with 5 abandoned requests at the provider: exit after {took:.1f} s")
        assert took < 5, took
