"""The data path end to end: app -> client proxy (UDS) -> server proxy (TCP) -> provider (UDS).

Real processes, real sockets; every wait is on a condition with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import time

import pytest
import uvloop

from octoproxy._core import frame
from octoproxy._core.constants import CallType, Status
from octoproxy.sdk import AsyncClient, Client, Context, RpcError

from harness import (
    Cluster,
    can_connect_uds,
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    simple_chain,
    wait_for,
)

NODES = {
    # name: labels of the endpoint the client proxy knows it by
    "gh": {"idc": "gh", "region": "bj"},
    "yf": {"idc": "yf", "region": "bj"},
    "sh": {"idc": "sh", "region": "sh"},
    "lite1": {"cell": "l1", "idc": "gh", "region": "bj"},
    "set1": {"cell": "s1", "idc": "yf", "region": "bj"},
    "lane1": {"swimlane": "w1", "idc": "sh", "region": "sh"},
}


@pytest.fixture(scope="module")
def mesh():
    with cluster() as c:
        c.providers(**{n: f"{n}.sock" for n in NODES})
        ports = {n: free_port() for n in NODES}
        c.proxy("server", server_proxy_cfg({ports[n]: c.path(f"{n}.sock") for n in NODES}))
        eps = {n: {"address": f"127.0.0.1:{ports[n]}", **NODES[n]} for n in NODES}
        services = [
            {"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
             "endpoints": [eps[n] for n in ("gh", "yf", "sh", "lite1", "lane1")]},
            {"appkey": "com.demo.set", "set_enabled": True,
             "endpoints": [eps["set1"], eps["gh"]]},
            {"appkey": "com.demo.sick",
             "endpoints": [{**eps["gh"], "status": 0}, {**eps["yf"], "weight": 0}]},
        ]
        c.proxy("client", client_proxy_cfg(c.path("proxy.sock"), services,
                                           node={"idc": "gh", "region": "bj"},
                                           upstream={"default_timeout_ms": 2000}))
        c.ports = ports  # type: ignore[attr-defined]
        yield c


def who(resp) -> str:
    return resp.body.split(b"|", 1)[0].decode()


def run(coro):
    return uvloop.run(coro)


# ---------------------------------------------------------------- routing


def test_request_by_service_name_reaches_same_idc_node(mesh: Cluster) -> None:
    with Client(mesh.path("proxy.sock")) as c:
        rs = c.call_many([("com.demo.Echo", b"echo:%d" % i) for i in range(50)])
    assert {who(r) for r in rs} == {"gh"}  # same IDC beats same region
    assert [r.body for r in rs] == [b"gh|%d" % i for i in range(50)]


def test_routing_by_liteset_swimlane_and_set(mesh: Cluster) -> None:
    with Client(mesh.path("proxy.sock")) as c:
        def to(ctx: Context, appkey: str = "com.demo.echo") -> set[str]:
            return {who(r) for r in c.call_many([("m", b"x")] * 20, appkey=appkey, context=ctx)}

        assert to(Context(liteset="l1")) == {"lite1"}
        assert to(Context(liteset="nope")) == {"gh"}  # LiteSet falls back to the center
        assert to(Context(swimlane="w1")) == {"lane1"}
        assert to(Context(swimlane="w9")) == {"gh"}  # swimlane falls back to the trunk
        assert to(Context(), "com.demo.set") == {"gh"}
        assert to(Context(set="s1"), "com.demo.set") == {"set1"}
        assert to(Context(set="s1")) == {"gh"}  # not Set-enabled: center
        with pytest.raises(RpcError) as e:
            c.call("m", b"x", appkey="com.demo.set", context=Context(set="s9"))
        assert e.value.status == 4 and "Set cell 's9'" in e.value.message


def test_context_reaches_provider(mesh: Cluster) -> None:
    with Client(mesh.path("proxy.sock")) as c:
        r = c.call("m", b"ctx", appkey="com.demo.echo", context=Context(swimlane="w1", hash_key="k"))
    assert r.body == b"lane1|w1/None/None/k"


def test_proxy_answers_routing_errors_with_status_and_reason(mesh: Cluster) -> None:
    with Client(mesh.path("proxy.sock")) as c:
        r = c.call("com.nobody.Svc", b"", raise_on_error=False)
        assert r.status == 8 and "unknown service 'com.nobody.Svc'" in r.message
        r = c.call("m", b"", appkey="com.demo.sick", raise_on_error=False)
        assert r.status == 4 and "no healthy node" in r.message
        # the connection is still usable after errors
        assert c.call("com.demo.Echo", b"echo:ok").body == b"gh|ok"


def test_heartbeat_answered_by_proxy(mesh: Cluster) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(mesh.path("proxy.sock"))
    s.sendall(frame.encode_heartbeat(77))
    sc = frame.FrameScanner()
    frames = wait_for(lambda: sc.feed(s.recv(4096)), 5, "heartbeat answer")
    assert frames[0].msg_type == 1 and frames[0].seq_id == 77 and frames[0].is_response
    s.close()


def raw_frames_until(s: socket.socket, seq_id: int, timeout: float = 10.0) -> list[frame.Frame]:
    """Every frame the proxy writes on raw socket `s` up to and including the
    answer with `seq_id` (what the SDK would hide: unknown ids, repeats)."""
    sc = frame.FrameScanner()
    got: list[frame.Frame] = []
    s.settimeout(timeout)
    while not any(f.seq_id == seq_id for f in got):
        data = s.recv(65536)
        assert data, f"proxy closed the connection before answering {seq_id}"
        got += sc.feed(data)
    return got


def test_one_way_call_the_provider_does_not_answer_gets_no_answer(mesh: Cluster) -> None:
    # Raw socket: an answer the proxy made up for a one-way request (a timeout
    # answer when its entry expires: 50 ms here, docs/protocol.md 6.2) would
    # arrive before the answer to the two-way call sent after them (300 ms).
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(mesh.path("proxy.sock"))
        s.sendall(b"".join(
            frame.encode_request(i, "com.demo.Echo", b"echo:fire", call_type=CallType.CALL_ONEWAY,
                                 timeout=50)
            for i in range(1, 21)
        ) + frame.encode_request(100, "com.demo.Echo", b"sleep:300:after", timeout=5000))
        got = raw_frames_until(s, 100)
    assert [(f.seq_id, f.status, f.body) for f in got] == [(100, 0, b"gh|after")]


# ---------------------------------------------------------------- pipelining


def test_pipelined_out_of_order_responses_reach_the_right_caller(mesh: Cluster) -> None:
    async def one_conn(k: int) -> None:
        c = await AsyncClient.connect(mesh.path("proxy.sock"))
        rnd = random.Random(k)
        calls = [c.call("com.demo.Echo", b"sleep:%d:%d-%d" % (rnd.randrange(0, 30), k, i))
                 for i in range(300)]
        rs = await asyncio.gather(*calls)
        assert [r.body for r in rs] == [b"gh|%d-%d" % (k, i) for i in range(300)]
        await c.close()

    async def main() -> None:
        await asyncio.gather(*(one_conn(k) for k in range(4)))

    run(main())


# ---------------------------------------------------------------- timeouts


def test_timeout_answers_transport_exception_and_drops_late_response(mesh: Cluster) -> None:
    # Raw socket: the SDK would drop a second answer for the same id unseen.
    # Request 5 times out after 100 ms, its real answer reaches the proxy at
    # ~600 ms; request 6 is answered at ~1000 ms, so every frame the proxy
    # writes for 5 is on the wire before 6's answer.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(mesh.path("proxy.sock"))
        s.sendall(frame.encode_request(5, "com.demo.Echo", b"sleep:600:late", timeout=100))
        (err,) = raw_frames_until(s, 5)
        assert err.status == Status.STATUS_TRANSPORT and "timeout" in (err.message or "")
        assert "100 ms" in (err.message or "")
        s.sendall(frame.encode_request(6, "com.demo.Echo", b"sleep:1000:sentinel", timeout=5000))
        got = raw_frames_until(s, 6)
    assert [(f.seq_id, f.status, f.body) for f in got] == [(6, 0, b"gh|sentinel")]
    with Client(mesh.path("proxy.sock")) as c:  # and the proxy is still fine
        assert c.call("com.demo.Echo", b"echo:still-fine").body == b"gh|still-fine"


def test_timeout_bounded_by_configured_maximum() -> None:
    with cluster() as c:
        simple_chain(c, upstream={"default_timeout_ms": 100, "max_timeout_ms": 200})
        with Client(c.path("px.sock")) as cl:
            r = cl.call("m", b"sleep:1500:x", appkey="a", timeout_ms=60000, raise_on_error=False)
            assert r.status == 4 and "200 ms" in r.message  # not the 1.5 s answer
            r = cl.call("m", b"sleep:1500:x", appkey="a", timeout_ms=0, raise_on_error=False)
            assert r.status == 4 and "100 ms" in r.message


# ---------------------------------------------------------------- failures


def test_upstream_killed_mid_flight_answers_every_request_at_once() -> None:
    with cluster() as c:
        server, _ = simple_chain(
            c, upstream={"default_timeout_ms": 30000, "reconnect_backoff_base_ms": 50})

        async def main() -> None:
            cl = await AsyncClient.connect(c.path("px.sock"))
            assert (await cl.call("m", b"echo:up", appkey="a")).body == b"p|up"
            calls = [asyncio.ensure_future(cl.call("m", b"sleep:20000:x", appkey="a",
                                                   raise_on_error=False)) for _ in range(200)]
            # until the provider has all 200: then they are in flight everywhere
            for _ in range(1000):
                started = await cl.call("m", b"started", appkey="a")
                if int(started.body.split(b"|")[1]) >= 200:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"only {started.body!r} requests reached the provider")
            server.kill()
            # answered at once, not after their 20 s (or the 30 s timeout)
            rs = await asyncio.wait_for(asyncio.gather(*calls), 5)
            assert all(r.status == 4 for r in rs), {r.message for r in rs}
            assert all("closed" in r.message or "unavailable" in r.message for r in rs)
            # with the upstream gone, new requests fail fast with a reason
            r = await cl.call("m", b"echo:x", appkey="a", raise_on_error=False)
            assert r.status == 4 and "127.0.0.1" in r.message
            await cl.close()

        run(main())


def test_upstream_connect_failure_answered_with_reason() -> None:
    with cluster() as c:
        port = free_port()  # nobody listens here
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}]}]))
        with Client(c.path("px.sock")) as cl:
            r = cl.call("m", b"x", appkey="a", raise_on_error=False)
            assert r.status == 4 and "connect failed" in r.message and str(port) in r.message


def test_upstream_recovers_after_provider_side_restart() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        scfg = server_proxy_cfg({port: c.path("p.sock")})
        server = c.proxy("server", scfg)
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
            upstream={"reconnect_backoff_base_ms": 20, "reconnect_backoff_max_ms": 100}))
        with Client(c.path("px.sock")) as cl:
            assert cl.call("m", b"echo:1", appkey="a").ok
            server.kill()
            c.proxy("server2", scfg)
            # after the backoff a new connection is made and traffic flows again
            wait_for(lambda: cl.call("m", b"echo:2", appkey="a", raise_on_error=False).ok, 10,
                     "traffic through the restarted server proxy")


# ---------------------------------------------------------------- bounded


def test_stalled_consumer_keeps_proxy_memory_bounded() -> None:
    with cluster() as c:
        _, client = simple_chain(
            c, upstream={"default_timeout_ms": 30000},
            limits={"write_high_water": 1 << 20, "write_low_water": 1 << 18,
                    "max_unread_bytes": 8 << 20})
        base = client.rss_bytes()
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(c.path("px.sock"))
        # asks for ~200 MB of answers and never reads one
        s.sendall(b"".join(frame.encode_request(i, "m", b"big:65536",
                                                local_context={"octo-remote-appkey": "a"})
                           for i in range(1, 3001)))
        peak = 0

        def cut_off() -> bool:
            nonlocal peak
            peak = max(peak, client.rss_bytes())
            return "leaves" in client.log() and "unread" in client.log()

        wait_for(cut_off, 20, "the proxy to cut off the consumer that does not read")
        assert peak - base < 64 * 1024 * 1024, f"client proxy grew by {(peak - base) >> 20} MiB"
        s.close()
        # the proxy is still healthy for others
        with Client(c.path("px.sock")) as cl:
            assert cl.call("m", b"echo:ok", appkey="a").body == b"p|ok"


def test_inflight_limit_per_connection_answers_overload() -> None:
    with cluster() as c:
        simple_chain(c, limits={"max_inflight_per_connection": 10})
        with Client(c.path("px.sock")) as cl:
            rs = cl.call_many([("m", b"sleep:200:x")] * 25, appkey="a", raise_on_error=False)
        ok = [r for r in rs if r.ok]
        over = [r for r in rs if not r.ok]
        assert len(ok) == 10 and len(over) == 15
        assert all(r.status == 6 and "limit 10" in r.message for r in over)


def test_connection_limit_closes_the_extra_connection() -> None:
    # limits.max_connections bounds open app connections: one more is closed
    # at once (docs/protocol.md 6.4), the held ones keep working
    with cluster() as c:
        simple_chain(c, limits={"max_connections": 2})
        held = [Client(c.path("px.sock")) for _ in range(2)]
        for h in held:
            assert h.call("m", b"echo:x", appkey="a").ok
        with socket.socket(socket.AF_UNIX) as extra:
            extra.connect(c.path("px.sock"))
            extra.settimeout(5)
            assert extra.recv(100) == b""  # closed by the proxy
        held[0].close()

        def new_connection_served() -> bool:
            with Client(c.path("px.sock")) as cl:
                return cl.call("m", b"echo:x", appkey="a", raise_on_error=False).ok

        wait_for(new_connection_served, 5, "a slot freed by a closed connection")
        assert held[1].call("m", b"echo:y", appkey="a").ok
        held[1].close()


# ---------------------------------------------------------------- bad input


def test_malformed_frame_closes_only_its_connection(mesh: Cluster) -> None:
    good = Client(mesh.path("proxy.sock"))
    assert good.call("com.demo.Echo", b"echo:1").ok
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(mesh.path("proxy.sock"))
    bad.sendall(b"\xab\xba\x01\x01\x00\x00\x00\x10\x00\x08" + b"\x0c\x00\x02\xff\xff\xff\xff\xff" + b"zz" * 3)
    bad.settimeout(5)
    assert bad.recv(100) == b""  # closed by the proxy
    bad.close()
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(mesh.path("proxy.sock"))
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
    garbage.settimeout(5)
    assert garbage.recv(100) == b""
    garbage.close()
    assert good.call("com.demo.Echo", b"echo:2").body == b"gh|2"
    good.close()


def test_oversized_frame_answered_and_skipped_connection_kept() -> None:
    # docs/protocol.md 6.4: answered with status 5 once its header is in,
    # its bytes discarded as they come; the same connection goes on
    with cluster() as c:
        simple_chain(c, limits={"max_frame_bytes": 4096, "max_header_bytes": 1024})
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(c.path("px.sock"))
            big = frame.encode_request(5, "m", b"y" * 10000,
                                       local_context={"octo-remote-appkey": "a"})
            s.sendall(big[:2000])
            s.settimeout(5)
            sc = frame.FrameScanner()
            (f,) = wait_for(lambda: sc.feed(s.recv(4096)), 5, "the answer to the oversized request")
            assert f.seq_id == 5 and f.status == 5 and "exceeds the limit of 4096" in f.message
            s.sendall(big[2000:] + frame.encode_request(6, "m", b"echo:after",
                                                        local_context={"octo-remote-appkey": "a"}))
            (g,) = wait_for(lambda: sc.feed(s.recv(4096)), 5, "the next request's answer")
            assert g.seq_id == 6 and g.status == 0 and g.body.endswith(b"after")


def test_checksummed_frames_forwarded_intact(mesh: Cluster) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(mesh.path("proxy.sock"))
    s.sendall(frame.encode_request(9, "com.demo.Echo", b"echo:sum", checksum=True))
    sc = frame.FrameScanner()  # verifies the Adler-32 of what comes back
    frames = wait_for(lambda: sc.feed(s.recv(4096)), 5, "checksummed answer")
    f = frames[0]
    assert f.checksum and f.seq_id == 9 and f.status == 0 and f.body == b"gh|sum"
    s.close()


def test_legacy_client_calls_inbound_port_directly(mesh: Cluster) -> None:
    port = mesh.ports["yf"]  # type: ignore[attr-defined]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"".join(frame.encode_request(i, "com.demo.Echo", b"echo:%d" % i)
                       for i in range(1, 6)))
    sc = frame.FrameScanner()
    got: list = []
    s.settimeout(5)
    wait_for(lambda: got.extend(sc.feed(s.recv(4096))) or len(got) >= 5, 5, "legacy answers")
    assert sorted((f.seq_id, f.body) for f in got) == [(i, b"yf|%d" % i) for i in range(1, 6)]
    s.close()


# ---------------------------------------------------------------- the UDS listener


def test_uds_mode_default_and_live_socket_not_stolen(mesh: Cluster) -> None:
    path = mesh.path("proxy.sock")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    p = mesh.proxy("thief", client_proxy_cfg(path, []), wait=False)
    wait_for(lambda: not p.alive(), 10, "the second proxy to give up")
    assert p.p.returncode != 0
    assert "in use by a live process" in p.log()
    assert can_connect_uds(path)


def test_stale_socket_file_replaced_and_mode_configurable() -> None:
    with cluster() as c:
        path = c.path("stale.sock")
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()  # a socket file nobody listens on any more
        cfg = client_proxy_cfg(path, [])
        cfg["listeners"]["outbound"][0]["mode"] = 0o600
        c.proxy("client", cfg)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert can_connect_uds(path)


def test_large_frames_pass_and_buffers_shrink_back() -> None:
    with cluster() as c:
        server, client = simple_chain(c)
        with Client(c.path("px.sock")) as cl:
            big = b"echo:" + b"z" * (4 << 20)
            for _ in range(3):
                r = cl.call("m", big, appkey="a")
                assert r.body == b"p|" + big[5:]
            r = cl.call("m", b"big:6000000", appkey="a")
            assert len(r.body) == 6000002
            base = client.rss_bytes() + server.rss_bytes()
            for _ in range(5):
                cl.call("m", big, appkey="a")
            # the per-connection buffers do not keep 4 MiB each after the frames are gone
            assert client.rss_bytes() + server.rss_bytes() - base < 32 << 20


def test_sync_client_back_to_back_calls_do_not_wait(mesh: Cluster) -> None:
    # a regression: checking an idle connection must not block for the socket timeout
    with Client(mesh.path("proxy.sock")) as c:
        t0 = time.monotonic()
        for i in range(20):
            assert c.call("com.demo.Echo", b"echo:%d" % i).ok
        # the bug waited the socket timeout (3 s + 5 s) per call: 160 s for
        # these 20; all of them take less than one such wait
        assert time.monotonic() - t0 < 8.0


def test_unreadable_compressed_frame_from_app_closes_without_an_answer(mesh: Cluster) -> None:
    # docs/protocol.md 9: a compressed request is answered under its own
    # sequence id (tests/e2e/test_dorado_wire.py); when its bytes cannot be
    # decompressed there is no id to answer with, and never an id 0 answer
    req = bytearray(frame.encode_request(3, "com.demo.Echo", b"echo:x"))
    req[3] |= 0x40  # gzip flag on bytes that are not gzip
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(mesh.path("proxy.sock"))
        s.sendall(bytes(req))
        s.settimeout(5)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b""
    with Client(mesh.path("proxy.sock")) as c:
        assert c.call("com.demo.Echo", b"echo:ok").ok


def test_native_thrift_passes_through_inbound(mesh: Cluster) -> None:
    # a legacy native-Thrift client on the provider's port: its bytes reach the
    # provider unchanged and the provider's answer comes back (the test
    # provider answers the Thrift call, seq id 7, echoing the whole message)
    port = mesh.ports["gh"]  # type: ignore[attr-defined]
    msg = frame.encode_thrift_message("ping", 1, 7, b"\x00")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(msg)
    sc = frame.FrameScanner()
    s.settimeout(5)
    got = wait_for(lambda: sc.feed(s.recv(4096)), 5, "the provider's answer")
    assert got[0].seq_id == 7 and got[0].body == b"gh|" + msg[4:]
    s.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_client_on_both_event_loops(mesh: Cluster, loop_kind: str) -> None:
    async def main() -> None:
        c = await AsyncClient.connect(mesh.path("proxy.sock"))
        rs = await asyncio.gather(*(c.call("com.demo.Echo", b"echo:%d" % i) for i in range(50)))
        assert [r.body for r in rs] == [b"gh|%d" % i for i in range(50)]
        await c.send_one_way("com.demo.Echo", b"echo:fire")
        await c.close()

    (asyncio.run if loop_kind == "asyncio" else uvloop.run)(main())
