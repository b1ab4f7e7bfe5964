"""Data path micro benchmarks (pytest-benchmark): one proxy process in-process.

The client-side proxy's data path (datapath.Engine, Downstream, UpstreamConn)
runs against fake transports and a fake event loop: no sockets, no event
loop, so what is measured is the core's own work per request, the part of
the end-to-end CPU figure that the proxy controls (the rest is syscalls).

- forwarded: an app connection's read carrying BATCH requests is scanned,
  routed, remapped and staged for the upstream connection; the upstream's
  read carrying their BATCH answers is matched, remapped back and staged for
  the app; the loop's end-of-iteration callbacks flush both.  Cost per
  request = the whole round trip.
- forwarded+gov: the same with every caller-side governance feature of
  docs/governance.md on and no limit hit (rate rules by service, method and
  per caller, breakers, outlier counts, adaptive limit, a retry policy that
  keeps a retry copy of each request); requests carry a caller appkey.
  Goal (issue 14): <= +10% of forwarded.
- forwarded+label: the same with a shunting rule that labels every request
  (docs/shunting.md: octo-swimlane written into its globalContext, straight
  into the upstream's staged output); the rule's evaluation included.
- inbound / inbound+gov: the server-side proxy's data path (requests from
  the caller's proxy to the provider, its answers back), without and with
  every provider-side feature on and no limit hit (rate rules by service,
  method and per caller, a cluster quota spending a step from Redis).
- locally answered: the proxy answers the request itself: unknown service,
  overload (the per-connection in-flight limit reached), draining (hot restart), and timeout (the
  request went upstream and its deadline passed: the cost of the sweep
  answering it).  Cost per request = the request in + the answer out.

Goal (issue 13): a locally answered request costs <= 2x a forwarded one.

    PYTHONPATH=src python -m pytest bench/micro/test_bench_datapath.py
    PYTHONPATH=src python bench/micro/test_bench_datapath.py [FRAMES_PER_READ]   # table, ratios
"""

from __future__ import annotations

import logging
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from octoproxy._core import datapath as D
from octoproxy._core import frame as F
from octoproxy._core import limits as L
from octoproxy._core import route as R
from octoproxy.config import Limits, Upstream
from octoproxy.model import Endpoint, Labels, Service, ShuntRule

APPKEY = "com.bench.echo"
SERVICE = "com.bench.Echo"
BODY = bytes(range(128))
# a strict TBinaryProtocol call (what Dorado apps send): a local answer to it
# carries a Thrift EXCEPTION body with its method name and seqid
THRIFT_BODY = F.encode_thrift_message("echo", 1, 7, b"\x0b\x00\x01\x00\x00\x00\x04ping\x00")[4:]
BATCH = 8  # frames per read (the end-to-end 32x8 point batches ~6.6 per read)


class FakeHandle:
    def __init__(self, cb: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.cb, self.args, self.cancelled = cb, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_soon / call_later only queue: run_ready() is the end of a loop iteration."""

    def __init__(self) -> None:
        self.ready: list[FakeHandle] = []
        self.later: list[FakeHandle] = []

    def call_soon(self, cb: Callable[..., Any], *args: Any, context: Any = None) -> FakeHandle:
        h = FakeHandle(cb, args)
        self.ready.append(h)
        return h

    def call_later(
        self, delay: float, cb: Callable[..., Any], *args: Any, context: Any = None
    ) -> FakeHandle:
        h = FakeHandle(cb, args)
        self.later.append(h)
        return h

    def time(self) -> float:
        return time.monotonic()

    def run_ready(self) -> None:
        while self.ready:
            ready, self.ready = self.ready, []
            for h in ready:
                if not h.cancelled:
                    h.cb(*h.args)


class FakeTransport:
    """Takes every write; counts bytes and calls."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.writes += 1
        self.last = data

    def writelines(self, items: list[bytes]) -> None:
        for b in items:
            self.write(b)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def feed(conn: Any, data: bytes) -> None:
    """One read event: the bytes land in the connection's buffer, then buffer_updated."""
    view = conn.get_buffer(len(data))
    view[: len(data)] = data
    conn.buffer_updated(len(data))


def seq_off_of(data: bytes) -> int:
    frames, _ = F.scan(data)
    return frames[0].offset + frames[0].seq_off


# an older build's Engine keyword (before it took the config's sections),
# and the factor from the config's unit
OLD_ENGINE_NAMES = {
    "connections_per_node": ("conns_per_node", 1),
    "max_inflight_per_connection": ("max_in_flight", 1),
    "max_timeout_ms": ("max_timeout", 0.001),
}


def make_engine(table: Any, loop: Any, connect: Any, log: Any, **config: Any) -> Any:
    lim = {k: v for k, v in config.items() if k in Limits.model_fields}
    up = {k: v for k, v in config.items() if k not in lim}
    try:
        return D.Engine(table, loop, connect, log, Limits().model_copy(update=lim),
                        Upstream().model_copy(update=up))
    except TypeError:  # a build from before the engine took the config's sections
        old: dict[str, Any] = {}
        for k, v in config.items():
            name, factor = OLD_ENGINE_NAMES[k]
            if name == "max_in_flight" and not hasattr(D.Engine, name):
                name = "max_inflight"  # before the core's split
            old[name] = v * factor
        return D.Engine(table, loop, connect, log, **old)


class Rig:
    """A client-side proxy's Engine with one app connection and one upstream node."""

    def __init__(self, gov: Any = None, **config: Any) -> None:
        """`config`: fields of config.Limits / config.Upstream, set unchecked;
        `gov`: a ServiceGov every node of the service gets (governance)."""
        self.loop = FakeLoop()
        self.table = R.RouteTable(Labels(idc="", region=""), seed=1)
        if gov is not None:

            def hook(svc: Any, nodes: list[Any]) -> None:
                for n in nodes:
                    n.gov = L.NodeGov(gov, n.address)

            self.table.gov_hook = hook
        self.table.replace_all(
            [Service(APPKEY, (Endpoint("127.0.0.1", 9),), service_names=(SERVICE,))]
        )
        self.ups: list[Any] = []
        log = logging.getLogger("bench.datapath")
        log.disabled = True
        # one upstream connection, so the ids of a round are known in advance
        self.eng = make_engine(self.table, self.loop, self.connect, log,
                               connections_per_node=1, **config)
        # the app side's protocol factory (named outbound() since the core's split)
        factory = getattr(self.eng, "outbound", None) or self.eng.downstream
        self.down = factory()
        self.app = FakeTransport()
        self.down.connection_made(self.app)

    def connect(self, conn: Any, host: str | None, port: Any) -> None:
        t = FakeTransport()
        self.ups.append((conn, t))
        conn.connection_made(t)

    def close(self) -> None:
        self.eng.close_all()


def request_batch(
    appkey: str = APPKEY,
    timeout_ms: int = 0,
    protocol: int = 1,
    body: bytes = BODY,
    caller: str | None = None,
) -> bytes:
    return b"".join(
        F.encode_request(
            1000 + i,
            SERVICE,
            body,
            timeout=timeout_ms,
            protocol=protocol,
            local_context={"octo-remote-appkey": appkey},
            trace_info={"clientAppkey": caller} if caller else None,
        )
        for i in range(BATCH)
    )


def caller_gov() -> Any:
    """Every caller-side governance feature on, limits far above the load
    (bench/e2e/bench_governance.py's caller-side policy)."""
    big = 10_000_000
    g = L.ServiceGov(APPKEY)
    g.set_rules(
        [],
        [
            L.RateRule("service", big),
            L.RateRule("method", big, method="echo"),
            L.RateRule("each caller", big, per_caller=True),
        ],
    )
    g.max_requests = g.max_pending = g.node_max_requests = big
    g.adaptive_limit = big
    g.consec_transport = g.consec_status = 5
    g.status_mask = 1 << 2
    g.max_attempts = 2
    g.set_idempotent(["echo"])
    return g


class Forwarding:
    """Round trips through one Rig: requests in, their answers back."""

    def __init__(self, body: bytes = BODY, gov: bool = False, label: bool = False) -> None:
        self.rig = Rig(gov=caller_gov() if gov else None)
        if label:
            self.rig.table.update_shunting(APPKEY, (ShuntRule(
                "lane", action="context", target="octo-swimlane", value="lane-1"),))
        self.reqs = request_batch(body=body, caller="com.bench.caller")
        self.resp = F.encode_response(1, BODY)
        self.resp_seq = seq_off_of(self.resp)
        # first round: opens the upstream connection, learns its first id
        feed(self.rig.down, self.reqs)
        self.rig.loop.run_ready()
        self.conn, self.up = self.rig.ups[0]
        if label:  # what is measured: every request leaves with the label
            assert {f.swimlane for f in F.scan(self.up.last)[0]} == {"lane-1"}
        self.next_id = self.ids_sent()[0]
        self.answers = self.make_answers()
        before = self.rig.app.nbytes
        feed(self.conn, self.answers)
        self.rig.loop.run_ready()
        check_answers(self.rig.app, before, BATCH, 0)
        assert self.rig.app.nbytes - before == BATCH * len(self.resp)

    def ids_sent(self) -> list[int]:
        frames, _ = F.scan(self.up.last)    # a labelled request is longer than the app's
        return [f.seq_id for f in frames[-BATCH:]]

    def make_answers(self) -> bytes:
        out = bytearray()
        for i in range(BATCH):
            r = bytearray(self.resp)
            struct.pack_into(">q", r, self.resp_seq, self.next_id + i)
            out += r
        self.next_id += BATCH
        return bytes(out)

    def timed(self) -> None:
        feed(self.rig.down, self.reqs)
        self.rig.loop.run_ready()
        feed(self.conn, self.answers)
        self.rig.loop.run_ready()

    def prepare(self) -> None:
        self.answers = self.make_answers()


def check_answers(t: FakeTransport, before: int, n: int, status: int) -> None:
    frames, _ = F.scan(t.last)
    assert len(frames) >= 1 and t.nbytes > before
    for f in frames:
        assert f.status == status, (f.status, status)


class LocalAnswer:
    """Requests the proxy answers itself, one read of BATCH at a time."""

    def __init__(self, why: str, body: bytes = BODY) -> None:
        self.why = why
        limits: dict[str, Any] = {}
        appkey = APPKEY
        if why == "overload":
            limits["max_inflight_per_connection"] = 0  # the per-connection limit
        elif why == "unknown service":
            appkey = "com.bench.nowhere"
        self.rig = Rig(**limits)
        if why == "draining":
            self.rig.eng.start_drain()
        self.reqs = request_batch(appkey, body=body)
        self.status = {"unknown service": 8, "overload": 6, "draining": 3}[why]
        before = self.rig.app.nbytes
        self.timed()
        check_answers(self.rig.app, before, BATCH, self.status)

    def timed(self) -> None:
        feed(self.rig.down, self.reqs)
        self.rig.loop.run_ready()


class Timeouts:
    """Requests that went upstream and timed out: the sweep answers them."""

    def __init__(self, body: bytes = BODY) -> None:
        # a timeout cap of 0: every request is past its deadline when the
        # sweep runs (no sleep between, which would leave the caches cold)
        self.rig = Rig(max_timeout_ms=0)
        self.reqs = request_batch(body=body)
        self.prepare()
        before = self.rig.app.nbytes
        self.timed()
        check_answers(self.rig.app, before, BATCH, 4)

    def prepare(self) -> None:
        feed(self.rig.down, self.reqs)
        self.rig.loop.run_ready()

    def timed(self) -> None:
        self.rig.eng._on_tick()
        self.rig.loop.run_ready()


def provider_gov() -> Any:
    """Every provider-side governance feature on, limits far above the load
    (bench/e2e/bench_governance.py's provider-side policy): rate rules by
    service, method and per caller, and a cluster quota spending a step
    taken from Redis (the step is never used up here, so Redis is not asked)."""
    big = 10_000_000
    g = L.ServiceGov(APPKEY)
    g.set_rules(
        [
            L.RateRule("service", big),
            L.RateRule("method", big, method="echo"),
            L.RateRule("each caller", big, per_caller=True),
        ],
        [],
    )
    g.qmode = L.QM_REDIS
    g.qtokens = 1e18
    return g


class Inbound:
    """The server-side proxy: requests in from the caller's proxy, on to the
    provider, its answers back (B of the end-to-end chain)."""

    def __init__(self, body: bytes = BODY, gov: bool = False) -> None:
        self.rig = Rig()
        self.ic = self.rig.eng.inbound("/bench-provider", provider_gov() if gov else None)
        self.peer = FakeTransport()
        self.ic.connection_made(self.peer)  # connects to the provider (Rig.connect)
        self.pv, self.prov = self.rig.ups[0]
        self.reqs = request_batch(body=body, caller="com.bench.caller")
        resp = F.encode_response(1, BODY)
        off = seq_off_of(resp)
        out = bytearray()
        for i in range(BATCH):
            r = bytearray(resp)
            struct.pack_into(">q", r, off, 1000 + i)  # the provider answers under the caller's ids
            out += r
        self.answers = bytes(out)
        before = self.prov.nbytes
        self.timed()
        assert self.prov.nbytes - before == len(self.reqs)  # every request reached the provider
        check_answers(self.peer, 0, BATCH, 0)

    def timed(self) -> None:
        feed(self.ic, self.reqs)
        self.rig.loop.run_ready()
        feed(self.pv, self.answers)
        self.rig.loop.run_ready()


def make(kind: str, body: bytes = BODY) -> Any:
    if kind == "forwarded":
        return Forwarding(body)
    if kind == "forwarded+gov":
        return Forwarding(body, gov=True)
    if kind == "forwarded+label":
        return Forwarding(body, label=True)
    if kind == "inbound":
        return Inbound(body)
    if kind == "inbound+gov":
        return Inbound(body, gov=True)
    if kind == "timeout":
        return Timeouts(body)
    return LocalAnswer(kind, body)


KINDS = ("forwarded", "forwarded+gov", "forwarded+label", "inbound", "inbound+gov", "unknown service", "overload",
         "draining", "timeout")


@pytest.mark.parametrize("body", ["plain", "thrift"])
@pytest.mark.parametrize("kind", KINDS)
def test_datapath(benchmark: Any, kind: str, body: str) -> None:
    case = make(kind, THRIFT_BODY if body == "thrift" else BODY)
    setup = getattr(case, "prepare", None)
    benchmark.pedantic(case.timed, setup=setup, rounds=2000, iterations=1, warmup_rounds=50)
    ns = benchmark.stats.stats.median / BATCH * 1e9
    benchmark.extra_info["ns_per_request_median"] = round(ns, 1)
    benchmark.extra_info["ns_per_request_min"] = round(benchmark.stats.stats.min / BATCH * 1e9, 1)
    case.rig.close()


def measure(kind: str, rounds: int = 3000, body: bytes = BODY) -> float:
    """Median ns per request over `rounds` timed rounds."""
    case = make(kind, body)
    setup = getattr(case, "prepare", None)
    ts = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        case.timed()
        ts.append(time.perf_counter_ns() - t0)
    case.rig.close()
    ts.sort()
    return ts[len(ts) // 2] / BATCH


def main() -> int:
    global BATCH
    if len(sys.argv) > 1:
        BATCH = int(sys.argv[1])  # frames per read
    print(f"data path, in-process, fake transports; {BATCH} frames per read; median ns per request")
    for label, body in (("body not Thrift", BODY), ("body a Thrift call", THRIFT_BODY)):
        res = {k: measure(k, body=body) for k in KINDS}
        print(f" {label}:")
        for k, v in res.items():
            # governance against its own path; local answers against a forwarded request
            ref = k.removesuffix("+gov") if k.endswith("+gov") else "forwarded"
            ref = k if k == "inbound" else ref  # the other proxy's path: no ratio
            print(
                f"  {k:<16} {v:8.0f} ns"
                + ("" if k == ref else f"  {v / res[ref]:5.2f}x {ref}")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
