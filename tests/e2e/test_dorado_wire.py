"""docs/protocol.md section 12 on the wire: a provider that behaves like a
Dorado provider (it answers one-way calls, it answers ScannerHeartbeat with
its own state) behind a real server-side proxy, apps on a real client-side
proxy's UDS sending Dorado's own frames (tests/data/dorado)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.reference import octo_codec as ref

from octoproxy._core import frame as F

from harness import client_proxy_cfg, cluster, free_port, server_proxy_cfg, wait_for

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "dorado"
SVC = "com.meituan.dorado.test.thrift.api.Echo"
APPKEY = "com.example.dorado.server"


def thrift_call(method: str, seq: int, arg: bytes) -> bytes:
    return F.encode_thrift_message(method, 1, seq, b"\x0b\x00\x01" + len(arg).to_bytes(4, "big")
                                   + arg + b"\x00")[4:]


class DoradoLikeProvider:
    """On a UDS: answers every request, one-way ones too, as Dorado providers
    do (body b"ans:" + the request body), except bodies containing b"hold"
    (kept until release()) and b"noanswer" (never answered); answers a
    ScannerHeartbeat with messageType 2 and heartbeatInfo.status 4 (STOPPED),
    its own state.  Records (seq id, call type, message type) of what came."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(16)
        _to_close.append(self.sock)
        self.seen: list[tuple[int, int, int]] = []
        self.held: list[tuple[socket.socket, bytes]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_and_close, args=(s,), daemon=True).start()

    def _serve_and_close(self, s: socket.socket) -> None:
        with s:
            self._serve(s)

    def _serve(self, s: socket.socket) -> None:
        sc = F.FrameScanner()
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            for f in sc.feed(data):
                if not f.is_request:
                    continue
                with self.lock:
                    self.seen.append((f.seq_id, f.call_type, f.msg_type))
                if f.msg_type == F.MT_SCANNER_HEARTBEAT:
                    s.sendall(F.encode_scanner_heartbeat_response(f.seq_id, status=F.HB_STOPPED,
                                                                  appkey=APPKEY))
                    continue
                if f.msg_type != F.MT_NORMAL or b"noanswer" in f.body:
                    continue
                out = F.encode_response(f.seq_id, b"ans:" + f.body)
                if b"hold" in f.body:
                    with self.lock:
                        self.held.append((s, out))
                else:
                    s.sendall(out)

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for s, out in held:
            s.sendall(out)

    def requests(self) -> list[tuple[int, int, int]]:
        with self.lock:
            return [x for x in self.seen if x[2] == F.MT_NORMAL]


_to_close: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Every socket a test's App or provider opens is closed after it
    (ResourceWarnings are errors)."""
    yield
    while _to_close:
        _to_close.pop().close()


class App:
    """A raw app connection to the outbound UDS."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        _to_close.append(self.s)
        self.s.connect(path)
        self.s.settimeout(20)
        self.sc = F.FrameScanner()
        self.got: list[F.Frame] = []
        self.closed = False

    def send(self, *frames: bytes) -> None:
        self.s.sendall(b"".join(frames))

    def wait(self, n: int, timeout: float = 15.0) -> list[F.Frame]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and not self.closed:
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.s.recv(65536)
            except TimeoutError:
                break
            if not data:
                self.closed = True
                break
            self.got += self.sc.feed(data)
        assert len(self.got) >= n, f"{len(self.got)} answers, wanted {n} (closed={self.closed})"
        return self.got[:n]


def chain(c, **client_extra):
    prov = DoradoLikeProvider(c.path("p.sock"))
    port = free_port()
    c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
    c.proxy("client", client_proxy_cfg(
        c.path("px.sock"),
        [{"appkey": APPKEY, "service_names": [SVC], "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
        upstream={"connections_per_node": 1}, **client_extra))
    return prov, port


def test_one_way_answer_never_reaches_another_request_even_when_ids_collide():
    """Issue 18: a one-way request whose app id equals the proxy id of a
    request in flight on the same upstream connection."""
    with cluster() as c:
        prov, _ = chain(c)
        app = App(c.path("px.sock"))
        app.send(F.encode_request(500, SVC, thrift_call("echo", 500, b"hold"), timeout=10000))
        wait_for(lambda: prov.requests(), 10, "the held request at the provider")
        proxy_id = prov.requests()[0][0]
        fire = thrift_call("echo", proxy_id & 0x7FFFFFFF, b"fire")
        app.send(F.encode_request(proxy_id, SVC, fire, call_type=1, timeout=10000))
        (first,) = app.wait(1)  # the one-way's own answer, while 500 is still held
        assert first.seq_id == proxy_id and first.body == b"ans:" + fire
        ids = [x[0] for x in prov.requests()]
        assert len(ids) == 2 and len(set(ids)) == 2, ids  # forwarded under an id of its own
        prov.release()
        _, second = app.wait(2)
        assert second.seq_id == 500 and second.body.startswith(b"ans:") and b"hold" in second.body


def test_dorado_one_way_call_gets_the_providers_answer_at_once():
    with cluster() as c:
        chain(c)
        app = App(c.path("px.sock"))
        t0 = time.monotonic()
        app.send((GOLDEN / "request_oneway_seq7.bin").read_bytes())
        (a,) = app.wait(1)
        assert (a.seq_id, a.status) == (7, 0) and a.body.startswith(b"ans:")
        assert time.monotonic() - t0 < 0.8  # the request's timeout is 1000 ms


def test_one_way_without_an_answer_expires_silently():
    with cluster() as c:
        prov, _ = chain(c)
        app = App(c.path("px.sock"))
        app.send(F.encode_request(1, SVC, thrift_call("echo", 1, b"noanswer"), call_type=1,
                                  timeout=200),
                 F.encode_request(2, SVC, thrift_call("echo", 2, b"hold"), timeout=10000))
        wait_for(lambda: len(prov.requests()) == 2, 10, "both requests at the provider")
        time.sleep(0.6)  # past the one-way's deadline: the proxy must stay silent about it
        prov.release()
        (a,) = app.wait(1)
        assert a.seq_id == 2 and a.status == 0
        assert len(app.got) == 1


def error_body(f: F.Frame) -> dict:
    exc = F.decode_thrift_exception(f.body)
    assert exc["message"] == f.message
    return exc


def test_proxy_errors_carry_a_thrift_exception_body_for_dorado_requests():
    with cluster() as c:
        chain(c)
        app = App(c.path("px.sock"))
        req = bytearray((GOLDEN / "request_seq0.bin").read_bytes())
        # the same Dorado request naming an appkey the proxy has no route for
        unknown = F.encode_request(0, SVC, F.decode_frame(bytes(req))["body"], timeout=1000,
                                   local_context={"octo-remote-appkey": "com.example.nope"})
        app.send(unknown)
        (a,) = app.wait(1)
        assert (a.seq_id, a.status) == (0, F.STATUS_SERVICE) and "com.example.nope" in a.message
        exc = error_body(a)
        assert (exc["name"], exc["seq_id"], exc["type"]) == ("echo", 0, F.TAPP_UNKNOWN)
        # a timeout, answered long after the request bytes are gone
        app.send(F.encode_request(41, SVC, thrift_call("echo", 41, b"hold"), timeout=150,
                                  checksum=True))
        (_, b) = app.wait(2)
        assert (b.seq_id, b.status) == (41, F.STATUS_TRANSPORT) and "timeout" in b.message
        assert b.checksum  # the request's checksum convention
        assert error_body(b)["seq_id"] == 41 and error_body(b)["name"] == "echo"
        # a body that is no Thrift call: the reason stays in ResponseInfo.message only
        app.send(F.encode_request(42, "com.x.none", b"raw bytes"))
        (_, _, d) = app.wait(3)
        assert d.status == F.STATUS_SERVICE and d.body == b""


def test_compressed_request_is_answered_with_its_own_sequence_id():
    with cluster() as c:
        chain(c)
        app = App(c.path("px.sock"))
        app.send((GOLDEN / "request_gzip_seq3.bin").read_bytes(),
                 (GOLDEN / "request_snappy_seq4.bin").read_bytes())
        a, b = app.wait(2)
        for f, seq, bit in ((a, 3, 0x40), (b, 4, 0x20)):
            assert f.compressed and f.protocol & bit  # compressed the way the request was
            plain = F.decode_frame(ref.uncompress_frame(f.bytes))
            info = plain["header"]["responseInfo"]
            assert (info["sequenceId"], info["status"]) == (seq, F.STATUS_PROTOCOL)
            assert "compressed" in info["message"]
            exc = F.decode_thrift_exception(plain["body"])
            assert (exc["name"], exc["seq_id"], exc["message"]) == ("echo", seq, info["message"])
        # the connection stays usable
        app.send(F.encode_request(5, SVC, thrift_call("echo", 5, b"x")))
        (_, _, ok) = app.wait(3)
        assert ok.seq_id == 5 and ok.status == 0


def test_unreadable_compressed_request_closes_without_an_answer():
    with cluster() as c:
        chain(c)
        app = App(c.path("px.sock"))
        junk = F.encode_frame(b"\x00" * 8, b"not gzip at all", protocol=0x41)
        app.send(junk)
        deadline = time.monotonic() + 10
        while not app.closed and time.monotonic() < deadline:
            data = app.s.recv(65536)
            if not data:
                app.closed = True
            app.got += app.sc.feed(data)
        assert app.closed and app.got == []  # never an answer with an id the app did not use


def test_scanner_heartbeat_reaches_the_provider_through_the_server_side_proxy():
    with cluster() as c:
        prov, port = chain(c)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        scan = F.encode_frame(F.encode_header({"messageType": 2, "requestInfo": {
            "serviceName": "", "sequenceId": 11, "callType": 0, "timeout": 0}}))
        s.sendall(scan)
        sc = F.FrameScanner()
        got: list[F.Frame] = []
        while not got:
            got += sc.feed(s.recv(65536))
        s.close()
        h = F.decode_frame(got[0].bytes)["header"]
        assert h["messageType"] == F.MT_SCANNER_HEARTBEAT
        assert h["heartbeatInfo"]["status"] == F.HB_STOPPED  # the provider's own state
        assert (11, 0, F.MT_SCANNER_HEARTBEAT) in prov.seen


def test_scanner_heartbeat_to_a_dead_provider_gets_no_alive_answer():
    with cluster() as c:
        port = free_port()
        c.proxy("server", server_proxy_cfg({port: c.path("none.sock")}))
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(F.encode_frame(F.encode_header({"messageType": 2, "requestInfo": {
            "serviceName": "", "sequenceId": 1, "callType": 0, "timeout": 0}})))
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        s.close()
        assert data == b""  # closed: the health checker sees the provider down


def test_scanner_heartbeat_on_the_outbound_uds_is_answered_like_dorado():
    with cluster() as c:
        chain(c)
        app = App(c.path("px.sock"))
        app.send(F.encode_frame(F.encode_header({"messageType": 2, "requestInfo": {
            "serviceName": "", "sequenceId": 6, "callType": 0, "timeout": 0}})))
        (a,) = app.wait(1)
        h = F.decode_frame(a.bytes)["header"]
        assert h["messageType"] == 2 and h["responseInfo"]["sequenceId"] == 6
        assert h["heartbeatInfo"]["status"] == F.HB_ALIVE
        assert abs(h["heartbeatInfo"]["sendTime"] - time.time() * 1000) < 60_000


