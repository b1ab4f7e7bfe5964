"""The data path's state machine in one process, without sockets.

The protocol objects of `octoproxy._core.datapath` are driven the way the
event loop drives them (`connection_made`, `get_buffer` + `buffer_updated`,
`pause_writing`, `connection_lost`) with transports that record what is
written; every test asserts on the bytes on those fake wires.  The e2e tests
in tests/e2e/test_datapath.py check the same behaviour over real sockets.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from octoproxy._core import frame as F
from octoproxy._core.constants import CallType, Status
from octoproxy._core.datapath import COUNTERS, Engine
from octoproxy._core.route import RouteTable
from octoproxy.config import Limits, Upstream
from octoproxy.model import Endpoint, Labels, Service

APP = "com.example.order"


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    info = debug = error = warning


class FakeHandle:
    def __init__(self, loop: FakeLoop, cb: Any) -> None:
        self.loop, self.cb, self.cancelled = loop, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """What the engine asks of a loop: call_later (the timeout sweep) and
    call_soon (the end-of-iteration flush).  Both only queue; run_ready() is
    the end of a loop iteration, fire() runs the timers."""

    current: FakeLoop | None = None

    def __init__(self) -> None:
        self.timers: list[FakeHandle] = []
        self.ready: list[FakeHandle] = []
        FakeLoop.current = self

    def call_later(self, delay: float, cb: Any, *args: Any) -> FakeHandle:
        h = FakeHandle(self, lambda: cb(*args))
        self.timers.append(h)
        return h

    def call_soon(self, cb: Any, *args: Any, context: Any = None) -> FakeHandle:
        h = FakeHandle(self, lambda: cb(*args))
        self.ready.append(h)
        return h

    def run_ready(self) -> None:
        while self.ready:
            h = self.ready.pop(0)
            if not h.cancelled:
                h.cb()

    def fire(self) -> None:
        """Run every timer due (the sweep re-arms itself while work is left)."""
        due, self.timers = self.timers, []
        for h in due:
            if not h.cancelled:
                h.cb()
        self.run_ready()


class FakeTransport:
    """Records writes; close/abort only mark it (connection_lost is the test's
    call, as it comes later from a real loop too)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.unread = 0  # what get_write_buffer_size reports
        self.eof = False  # write_eof() was called (our FIN)

    def write(self, b: bytes) -> None:
        assert not self.closed, "write after close"
        assert not self.eof, "write after write_eof"
        self.data += b

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        assert not self.eof, "write_eof twice"
        self.eof = True

    def writelines(self, seq: list[bytes]) -> None:
        for b in seq:
            self.write(b)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.unread

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def frames(self) -> list[F.Frame]:
        """Every whole frame written so far (and forget them)."""
        if FakeLoop.current is not None:
            FakeLoop.current.run_ready()  # what the iteration staged is sent at its end
        frames, used = F.scan(bytes(self.data))
        assert used == len(self.data), "a partial frame on the wire"
        self.data.clear()
        return frames


class Connector:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, str | None, Any]] = []

    def __call__(self, conn: Any, host: str | None, target: Any) -> None:
        self.calls.append((conn, host, target))


def feed(proto: Any, data: bytes, chunk: int | None = None) -> None:
    """What the loop does on reads: fill get_buffer(), then buffer_updated(n)."""
    while data:
        buf = proto.get_buffer(len(data))
        n = min(len(buf), len(data), chunk or len(data))
        buf[:n] = data[:n]
        proto.buffer_updated(n)
        data = data[n:]
        assert FakeLoop.current is not None
        FakeLoop.current.run_ready()  # each read is one loop iteration


class Rig:
    """An engine with one service of `nodes` endpoints and fake everything."""

    def __init__(self, nodes: int = 1, **config: Any) -> None:
        """`config`: fields of config.Limits / config.Upstream, set unchecked
        (a 0 ms timeout is due at once)."""
        self.table = RouteTable(Labels(), seed=7)
        self.table.replace_all(
            [Service(APP, [Endpoint(f"10.0.0.{i + 1}", 9000) for i in range(nodes)])]
        )
        self.loop = FakeLoop()
        self.connector = Connector()
        self.log = FakeLog()
        config.setdefault("connections_per_node", 1)  # one upstream connection: easy to watch
        lim = {k: v for k, v in config.items() if k in Limits.model_fields}
        up = {k: v for k, v in config.items() if k not in lim}
        assert set(up) <= set(Upstream.model_fields), up
        self.engine = Engine(self.table, self.loop, self.connector, self.log,
                             Limits().model_copy(update=lim), Upstream().model_copy(update=up))

    def app(self) -> tuple[Any, FakeTransport]:
        conn = self.engine.outbound()
        t = FakeTransport()
        conn.connection_made(t)
        return conn, t

    def connect_upstream(self, i: int = -1) -> tuple[Any, FakeTransport]:
        """Complete the i-th connect the core asked for; returns (conn, transport)
        with the ProxyAnnounce heartbeat already taken off the wire."""
        conn, _host, _port = self.connector.calls[i]
        t = FakeTransport()
        conn.connection_made(t)
        first = F.scan(bytes(t.data))[0][0]
        assert first.msg_type == F.MT_HEARTBEAT and first.proxy_announce
        del t.data[: first.length]
        return conn, t


def request(seq: int, **kw: Any) -> bytes:
    kw.setdefault("local_context", {"octo-remote-appkey": APP})
    return F.encode_request(seq, "Echo.echo", b"body-%d" % seq, **kw)


# -------------------------------------------------------------- forwarding


def test_requests_go_upstream_with_fresh_ids_and_answers_come_back_with_theirs() -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, request(7) + request(7000))  # both in one read
    assert len(rig.connector.calls) == 1  # one connection opened on first use
    up, up_t = rig.connect_upstream()
    sent = up_t.frames()  # what waited for the connect went out right after the announce
    assert [f.body for f in sent] == [b"body-7", b"body-7000"]
    ids = [f.seq_id for f in sent]
    assert len(set(ids)) == 2 and 7 not in ids and 7000 not in ids
    assert rig.engine.in_flight() == 2 and app_t.data == b""
    # answers in the other order, in one read: each gets its app id back
    feed(up, F.encode_response(ids[1], b"r2") + F.encode_response(ids[0], b"r1"))
    got = app_t.frames()
    assert [(f.seq_id, f.body, f.status) for f in got] == [(7000, b"r2", 0), (7, b"r1", 0)]
    assert rig.engine.in_flight() == 0
    c = rig.engine.counters()
    assert c["outbound_requests"] == 2 and c["outbound_answers"] == 2


def test_a_frame_split_over_many_reads_is_forwarded_once_whole() -> None:
    rig = Rig()
    app, _ = rig.app()
    feed(app, request(1))
    _up, up_t = rig.connect_upstream()
    up_t.frames()
    data = request(2) + request(3)
    feed(app, data, chunk=5)
    assert [f.body for f in up_t.frames()] == [b"body-2", b"body-3"]


def test_an_answer_for_an_unknown_or_repeated_id_is_dropped() -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, request(5))
    up, up_t = rig.connect_upstream()
    (sent,) = up_t.frames()
    answer = F.encode_response(sent.seq_id, b"once")
    feed(up, answer + answer + F.encode_response(sent.seq_id + 999, b"stray"))
    assert [(f.seq_id, f.body) for f in app_t.frames()] == [(5, b"once")]


def test_one_way_requests_get_an_id_of_their_own_and_expire_silently() -> None:
    # docs/protocol.md 6.2: tracked so that an answer, if one comes, reaches
    # this caller and no other; nothing is owed, so none is made up
    rig = Rig(default_timeout_ms=0)
    app, app_t = rig.app()
    feed(app, request(42, call_type=CallType.CALL_ONEWAY))
    up, up_t = rig.connect_upstream()
    (sent,) = up_t.frames()
    assert sent.body == b"body-42" and sent.call_type == CallType.CALL_ONEWAY
    assert app.in_flight == 0  # the app is owed nothing
    c = rig.engine.counters()
    assert c["oneway_requests"] == 1 and c["outbound_requests"] == 0
    up._check_pending()
    rig.loop.fire()  # its deadline passes: no answer is made up
    assert app_t.frames() == [] and rig.engine.counters()["oneway_unanswered"] == 1
    feed(up, F.encode_response(sent.seq_id, b"late"))  # and a late one finds no slot
    assert app_t.data == b""
    up._check_pending()


def test_a_provider_answer_to_a_one_way_request_reaches_its_caller_only() -> None:
    rig = Rig()
    app, app_t = rig.app()
    other, other_t = rig.app()
    feed(app, request(42, call_type=CallType.CALL_ONEWAY))
    feed(other, request(42))
    up, up_t = rig.connect_upstream()
    one_way, two_way = up_t.frames()
    assert one_way.seq_id != two_way.seq_id  # the same app id, two upstream ids
    feed(up, F.encode_response(one_way.seq_id, b"ow"))
    assert [(f.seq_id, f.body) for f in app_t.frames()] == [(42, b"ow")]
    assert other_t.data == b""


# ------------------------------------------------------ errors the proxy answers


def test_timeout_answers_transport_error_and_drops_the_late_answer() -> None:
    rig = Rig(default_timeout_ms=0)  # due at once: the next sweep answers it
    app, app_t = rig.app()
    feed(app, request(9))
    up, up_t = rig.connect_upstream()
    (sent,) = up_t.frames()
    assert rig.loop.timers, "a request in flight arms the sweep"
    up._check_pending()
    rig.loop.fire()
    up._check_pending()
    (err,) = app_t.frames()
    assert err.seq_id == 9 and err.status == Status.STATUS_TRANSPORT
    assert "timeout" in (err.message or "")
    assert rig.engine.counters()["timeouts"] == 1 and rig.engine.in_flight() == 0
    feed(up, F.encode_response(sent.seq_id, b"late"))
    assert app_t.data == b""


def test_upstream_close_answers_every_request_in_flight_at_once() -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, request(1) + request(2) + request(3, call_type=CallType.CALL_ONEWAY))
    up, up_t = rig.connect_upstream()
    assert len(up_t.frames()) == 3
    up.connection_lost(ConnectionResetError("reset by peer"))
    got = app_t.frames()
    # the one-way request too: it could not be delivered (docs/protocol.md 6.2)
    assert sorted(f.seq_id for f in got) == [1, 2, 3]
    assert {f.status for f in got} == {Status.STATUS_TRANSPORT}
    assert all("closed" in (f.message or "") for f in got)
    assert rig.engine.in_flight() == 0


def test_connect_failure_answers_what_waited_and_backs_off() -> None:
    rig = Rig(reconnect_backoff_base_ms=60_000, reconnect_backoff_max_ms=60_000)
    app, app_t = rig.app()
    feed(app, request(1))
    conn, _, _ = rig.connector.calls[0]
    conn.connect_failed("connection refused")
    (err,) = app_t.frames()
    assert err.seq_id == 1 and err.status == Status.STATUS_TRANSPORT
    assert "connection refused" in (err.message or "")
    # within the backoff no new connect is tried: answered at once
    feed(app, request(2))
    (err2,) = app_t.frames()
    assert err2.seq_id == 2 and err2.status == Status.STATUS_TRANSPORT
    assert len(rig.connector.calls) == 1


def test_unknown_service_is_answered_with_service_status() -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, request(4, local_context={"octo-remote-appkey": "com.example.nope"}))
    (err,) = app_t.frames()
    assert err.seq_id == 4 and err.status == Status.STATUS_SERVICE
    assert rig.connector.calls == []


def test_in_flight_limit_answers_degrade_per_connection() -> None:
    rig = Rig(max_inflight_per_connection=2)
    app, app_t = rig.app()
    feed(app, request(1) + request(2) + request(3))
    (err,) = app_t.frames()
    assert err.seq_id == 3 and err.status == Status.STATUS_DEGRADE
    assert rig.engine.in_flight() == 2


def test_heartbeats_are_answered_by_the_proxy_with_the_same_id() -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, F.encode_heartbeat(77))
    (hb,) = app_t.frames()
    assert hb.msg_type == F.MT_HEARTBEAT and hb.is_response and hb.seq_id == 77
    assert rig.connector.calls == []


def test_malformed_bytes_close_only_that_connection() -> None:
    rig = Rig()
    bad, bad_t = rig.app()
    good, good_t = rig.app()
    feed(bad, b"\x00\x00\x00\x05hello, not a frame")
    assert bad_t.aborted and rig.engine.counters()["malformed_frames"] == 1
    feed(good, request(1))
    _up, up_t = rig.connect_upstream()
    assert [f.body for f in up_t.frames()] == [b"body-1"]
    assert not good_t.closed


# ------------------------------------------------------------ backpressure


def test_a_full_upstream_pauses_its_apps_until_it_drains() -> None:
    rig = Rig()
    a, a_t = rig.app()
    b, b_t = rig.app()
    feed(a, request(1))
    up, _up_t = rig.connect_upstream()
    up.pause_writing()  # the upstream's transport is over its high mark
    feed(a, request(2))
    feed(b, request(3))
    assert not a_t.reading and not b_t.reading  # both feed it: both stop reading
    up.resume_writing()
    assert a_t.reading and b_t.reading


def test_an_app_that_does_not_read_stops_its_upstream_reads_nothing_else() -> None:
    rig = Rig()
    app, app_t = rig.app()
    app.pause_writing()  # the app does not read its answers
    feed(app, request(1))
    assert not app_t.reading  # no new requests from it while its answers pile up
    app.resume_writing()
    assert app_t.reading


def test_an_app_leaving_too_much_unread_is_cut_off() -> None:
    rig = Rig(max_unread_bytes=1000)
    app, app_t = rig.app()
    feed(app, request(1))
    up, up_t = rig.connect_upstream()
    (sent,) = up_t.frames()
    app.pause_writing()
    app_t.unread = 5000  # what the kernel and the transport hold for it
    feed(up, F.encode_response(sent.seq_id, b"x" * 100))
    assert app_t.aborted and rig.engine.counters()["slow_consumers"] == 1


# ------------------------------------------------------------ inbound side


def test_inbound_forwards_to_the_provider_unchanged_and_back() -> None:
    rig = Rig()
    ib = rig.engine.inbound("/run/provider.sock")
    ib_t = FakeTransport()
    ib.connection_made(ib_t)
    (pv, host, target) = rig.connector.calls[0]
    assert host is None and target == "/run/provider.sock"
    req = request(123456)
    feed(ib, req)  # the provider is still connecting: held, and reading paused
    assert not ib_t.reading
    pv_t = FakeTransport()
    pv.connection_made(pv_t)
    assert bytes(pv_t.data) == req and ib_t.reading
    assert rig.engine.in_flight() == 1
    feed(pv, F.encode_response(123456, b"ok"))
    (ans,) = ib_t.frames()
    assert ans.seq_id == 123456 and ans.body == b"ok"
    assert rig.engine.in_flight() == 0


def test_inbound_answers_a_proxy_announce_and_sends_it_proxy_restart() -> None:
    rig = Rig()
    ib = rig.engine.inbound("/run/provider.sock")
    ib_t = FakeTransport()
    ib.connection_made(ib_t)
    feed(ib, F.encode_proxy_announce(5))
    (hb,) = ib_t.frames()
    assert hb.is_response and hb.seq_id == 5
    assert rig.engine.send_proxy_restarts() == 1
    assert rig.engine.send_proxy_restarts() == 0  # once per connection
    (pr,) = ib_t.frames()
    assert pr.msg_type == F.MT_PROXY_RESTART


def test_drain_answers_new_requests_with_the_restart_flag() -> None:
    rig = Rig()
    app, app_t = rig.app()
    rig.engine.start_drain()
    assert app_t.frames() == []  # a restart notice only for apps that ask for one
    feed(app, request(8))
    (ans,) = app_t.frames()
    assert ans.seq_id == 8 and ans.proxy_restart and ans.status == Status.STATUS_RPC
    assert rig.connector.calls == []


def _inbound_pair(rig: Rig) -> tuple[Any, FakeTransport, Any, FakeTransport]:
    """An inbound connection and its provider connection, both connected."""
    ib = rig.engine.inbound("/run/provider.sock")
    ib_t = FakeTransport()
    ib.connection_made(ib_t)
    pv = rig.connector.calls[-1][0]
    pv_t = FakeTransport()
    pv.connection_made(pv_t)
    return ib, ib_t, pv, pv_t


def test_drain_reads_a_legacy_client_no_more_and_ends_it_after_its_last_answer() -> None:
    # a legacy client gets no restart notice: the drain reads nothing more
    # from it (a request read then would run on the old generation) and ends
    # its connection (FIN) the moment its last owed answer is out, whatever
    # the other connections still owe.  It was: served until nothing was in
    # flight in the whole process, or ended at drain_s with answers owed
    rig = Rig()
    ib, ib_t, pv, pv_t = _inbound_pair(rig)
    other, other_t, other_pv, _ = _inbound_pair(rig)
    feed(ib, request(1) + request(2))
    feed(other, request(9))
    assert rig.engine.in_flight() == 3
    rig.engine.start_drain()
    assert not ib_t.reading and not ib_t.eof and not other_t.reading
    feed(pv, F.encode_response(1, b"one"))
    assert [f.seq_id for f in ib_t.frames()] == [1] and not ib_t.eof
    feed(pv, F.encode_response(2, b"two"))
    assert [f.seq_id for f in ib_t.frames()] == [2] and ib_t.eof
    assert ib.ending and not other_t.eof and rig.engine.in_flight() == 1
    # after the FIN what the client sends is read (so its close is seen, and
    # ours sends no reset) and discarded: never forwarded, never executed
    pv_t.data.clear()
    assert ib_t.reading
    feed(ib, request(3))
    assert pv_t.data == b"" and ib_t.frames() == [] and rig.engine.in_flight() == 1
    feed(other_pv, F.encode_response(9, b"nine"))
    assert [f.seq_id for f in other_t.frames()] == [9] and other_t.eof
    assert rig.engine.close_clients() == 2  # already ended: no second FIN
    assert rig.engine.in_flight() == 0


def test_drain_serves_a_new_legacy_connection_one_read_and_leaves_proxies_alone() -> None:
    rig = Rig()
    fresh, fresh_t, fresh_pv, fresh_pv_t = _inbound_pair(rig)
    proxy, proxy_t, proxy_pv, _ = _inbound_pair(rig)
    feed(proxy, F.encode_proxy_announce(3) + request(4))
    proxy_t.frames()
    rig.engine.start_drain()
    assert fresh_t.reading and proxy_t.reading  # nothing read yet / a proxy (ProxyRestart)
    feed(fresh, request(5) + request(6))  # accepted just before the handover
    assert not fresh_t.reading and fresh_pv_t.frames() and not fresh_t.eof
    feed(fresh_pv, F.encode_response(5) + F.encode_response(6))
    assert [f.seq_id for f in fresh_t.frames()] == [5, 6] and fresh_t.eof
    feed(proxy_pv, F.encode_response(4))
    feed(proxy, request(7))
    assert [f.seq_id for f in proxy_t.frames()] == [4] and proxy_t.reading and not proxy_t.eof
    assert not proxy.ending and rig.engine.in_flight() == 1


@pytest.mark.parametrize("n", [1, 63, 64, 200])
def test_the_pending_table_grows_and_keeps_every_request(n: int) -> None:
    rig = Rig()
    app, app_t = rig.app()
    feed(app, b"".join(request(i + 1) for i in range(n)))
    up, up_t = rig.connect_upstream()
    sent = up_t.frames()
    assert len(sent) == n and len({f.seq_id for f in sent}) == n
    up._check_pending()
    for f in reversed(sent):  # answers in the other order: the list unlinks from everywhere
        feed(up, F.encode_response(f.seq_id, f.body))
        up._check_pending()
    got = app_t.frames()
    assert sorted((f.seq_id, f.body) for f in got) == [
        (i + 1, b"body-%d" % (i + 1)) for i in range(n)
    ]
    assert rig.engine.in_flight() == 0


# ------------------------------------------------------------ counters table


def test_the_counters_table_is_one_list_for_counting_handing_over_and_export() -> None:
    rig = Rig()
    names = [k for k in rig.engine.counters() if k != "errors"]
    assert names == [row[0] for row in COUNTERS]  # a field without its row fails here
    families: dict[str, str] = {}
    for _name, metric, doc in COUNTERS:  # a family's members share its help
        assert families.setdefault(metric.partition("{")[0], doc) == doc, metric
    old = {name: i + 1 for i, name in enumerate(names)}
    rig.engine.restore_counters({**old, "errors": {"4": 2}, "not_a_counter": 9})
    rig.engine.restore_counters(old)
    c = rig.engine.counters()
    assert {k: c[k] for k in names} == {k: 2 * v for k, v in old.items()}
    assert c["errors"] == {"4": 2} and "not_a_counter" not in c


def test_the_core_uses_only_engine_attributes_it_declares() -> None:
    """An attribute of the typed engine that datapath.pxd does not declare
    (e.g. a counter renamed away) still compiles: Cython makes it a Python
    attribute lookup, an AttributeError when that line first runs."""
    core = Path(__file__).resolve().parents[2] / "src/octoproxy/_core"
    declared: set[str] = set()
    cls = None
    for line in (core / "datapath.pxd").read_text().splitlines():
        if m := re.match(r"cdef class (\w+)", line):
            cls = m.group(1)
        elif cls in ("Stats", "Engine") and line.startswith("    cdef "):
            code = line.split("#")[0].rstrip()
            m = re.search(r"(\w+)\(self", code) or re.search(r"(\w+)\s*(\[[^\]]*\])?$", code)
            assert m is not None, line
            declared.add(m.group(1))
    python_level = {n for n in (*vars(Engine), *vars(Engine.__mro__[1])) if not n.startswith("__")}
    used: dict[str, set[str]] = {}
    for f in core.glob("*.pxi"):
        text = f.read_text()
        names = set(re.findall(r"\b(?:eng|self\.engine)\.(\w+)", text))
        if f.name in ("engine.pxi", "stats.pxi"):  # there `self` is the engine
            names |= set(re.findall(r"\bself\.(\w+)", text))
        for n in names - declared - python_level:
            used.setdefault(n, set()).add(f.name)
    assert not used, f"not declared in datapath.pxd (Stats/Engine): {used}"


def test_pending_table_invariants_hold_under_mixed_timeouts() -> None:
    """Requests with different deadlines, answered, timed out and failed in
    turn; the table's invariants are checked after every step (and inside
    every change in an OCTOPROXY_DEBUG=1 build, see DEBUG)."""
    rig = Rig(default_timeout_ms=30_000)
    app, app_t = rig.app()
    feed(app, request(1))
    up, up_t = rig.connect_upstream()
    up_t.frames()
    for i in range(2, 150):
        # 0 = the default (30 s); 1 ms: due at the next sweep
        feed(app, request(i, timeout=(1 if i % 3 == 0 else 0) if i % 5 else 60000 - i))
        up._check_pending()
    sent = {f.seq_id: f for f in up_t.frames()}
    for sid in list(sent)[::4]:
        feed(up, F.encode_response(sid, b"a"))
        up._check_pending()
    deadline = time.monotonic() + 10
    while rig.engine.counters()["timeouts"] == 0:  # 1 ms deadlines pass
        assert time.monotonic() < deadline
        rig.loop.fire() if rig.loop.timers else rig.engine._on_tick()
        up._check_pending()
    left = rig.engine.in_flight()
    assert 0 < left < 149
    up.connection_lost(None)
    assert rig.engine.in_flight() == 0
    got = app_t.frames()
    assert len(got) == 149 and len({f.seq_id for f in got}) == 149


# -------------------------------------------------------------- retry copies


def _gov_rig() -> Rig:
    """Two nodes whose service retries the Thrift method 'echo' once."""
    from octoproxy._core import limits as L

    g = L.ServiceGov(APP)
    g.max_attempts = 2
    g.set_idempotent(["echo"])
    rig = Rig(nodes=2)

    def hook(svc: Any, nodes: list[Any]) -> None:
        for n in nodes:
            n.gov = L.NodeGov(g, n.address)

    rig.table.gov_hook = hook
    rig.table.replace_all([Service(APP, [Endpoint(f"10.0.0.{i + 1}", 9000) for i in range(2)])])
    return rig


@pytest.mark.parametrize("size", [40, 5000])  # in a pooled buffer / in a buffer of its own
@pytest.mark.parametrize("how", ["status 4", "connection lost"])
def test_a_written_idempotent_request_goes_again_byte_for_byte_from_its_copy(
    how: str, size: int
) -> None:
    rig = _gov_rig()
    app, app_t = rig.app()
    body = F.encode_thrift_message("echo", 1, 7, bytes(range(256)) * (size // 256) + b"x")[4:]
    req = F.encode_request(5, "Echo.echo", body, timeout=60_000,
                           local_context={"octo-remote-appkey": APP})
    feed(app, req)
    up1, t1 = rig.connect_upstream(0)
    (first,) = t1.frames()
    assert first.body == body
    if how == "status 4":
        feed(up1, F.encode_response(first.seq_id, b"", status=Status.STATUS_TRANSPORT))
    else:
        up1.connection_lost(ConnectionResetError("reset by peer"))
    assert app_t.frames() == []  # not answered: sent again to the other node
    up2, t2 = rig.connect_upstream(1)
    (again,) = t2.frames()
    # the copy kept since it was sent: the same bytes under a new upstream id
    assert (again.body, again.length) == (body, first.length) and again.seq_id != first.seq_id
    feed(up2, F.encode_response(again.seq_id, b"ok"))
    (ans,) = app_t.frames()
    assert (ans.seq_id, ans.status, ans.body) == (5, 0, b"ok")
    assert rig.engine.in_flight() == 0
