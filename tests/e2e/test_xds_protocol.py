"""The xDS client against the control-plane double (tests/e2e/xds_double.py)
behaving like the servers met in production: the protocol document's rules
that the bundled control plane alone would never exercise."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2

from octoproxy import model
from octoproxy.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ResourceState,
    TooManySubscriptions,
    XdsClient,
    service_to_cla,
)

from xds_double import AdsDouble, Behaviour, names, services
from xds_helpers import Sink, until
from xds_helpers import run as _run

pytestmark = pytest.mark.timeout(60)
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
CDS, EDS = CLUSTER_TYPE, ENDPOINT_TYPE


def run(coro: Any, timeout: float = 50) -> None:
    _run(coro, timeout)


async def with_double(
    b: Behaviour,
    delta: bool,
    fn: Callable[[AdsDouble, XdsClient, Sink], Awaitable[None]],
    **kw: Any,
) -> None:
    d = AdsDouble(b)
    await d.start()
    sink = Sink()
    kw.setdefault("resource_timeout_s", 15)
    c = XdsClient(d.target, sink, node_id="p", delta=delta, backoff_base_s=0.05, **kw)
    c.start()
    try:
        await fn(d, c, sink)
        assert d.violations == []
    finally:
        await c.stop()
        await d.stop()


def svc(appkey: str, *ports: int) -> model.Service:
    return model.Service(appkey, tuple(model.Endpoint("10.9.0.1", p) for p in ports))


@MODES
def test_assignment_before_its_cluster_is_kept_not_nacked(delta: bool) -> None:
    async def body(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a", 1, 2))
        states = await c.wait_for(["a"], 10)
        assert states["a"] is ResourceState.READY
        assert len(sink.services["a"].endpoints) == 2 and c.stats.nacks == 0
        # the EDS answer really went first
        first = [r.type_url for _, r in d.responses]
        assert first.index(EDS) < first.index(CDS)

    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        c.subscribe(["a"])
        await body(d, c, sink)

    run(with_double(Behaviour(eds_first=True, cds_hold_s=0.3), delta, go))


@MODES
def test_readded_cluster_gets_its_endpoints_from_a_server_sending_only_changes(
    delta: bool,
) -> None:
    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a", 1), svc("b", 5))
        c.subscribe(["a", "b"])
        assert set((await c.wait_for(["a", "b"], 10)).values()) == {ResourceState.READY}
        d.remove("a")
        await until(lambda: "a" not in sink.services, what="a removed")
        assert c.state("a") is ResourceState.MISSING
        n_eds = len(d.requests_of(EDS))
        d.put(svc("a", 1))  # back, with the same assignment
        await until(lambda: "a" in sink.services, what="a back")
        assert sink.services["a"].endpoints == (model.Endpoint("10.9.0.1", 1),)
        # and the assignment was asked for again, so a server would send it
        await until(lambda: len(d.requests_of(EDS)) > n_eds, what="EDS asked again")
        assert c.stats.nacks == 0
        # a later change of a's assignment still arrives
        d.put(svc("a", 1, 2))
        await until(lambda: len(sink.services["a"].endpoints) == 2, what="a changed")

    run(with_double(Behaviour(only_changed=True), delta, go))


def test_sotw_crossing_push_does_not_make_new_names_missing() -> None:
    """A CDS push built before the server saw the request adding names lacks
    them: they are not declared missing (SotW cannot say "does not exist")."""

    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(*services("s", 20))
        c.subscribe(["s000"])
        await c.wait_for(["s000"], 10)
        keys = names(services("s", 20))[1:]
        c.subscribe(keys)
        states = await c.wait_for(keys, 10)
        assert set(states.values()) == {ResourceState.READY}, states
        assert c.stats.nacks == 0 and c.stats.resource_timeouts == 0
        assert len(sink.services) == 20

    run(with_double(Behaviour(stale_cds_first=True, stale_gap_s=0.3), False, go))


@MODES
def test_cds_with_unrelated_clusters_of_any_type_is_not_nacked(delta: bool) -> None:
    extra = [
        cluster_pb2.Cluster(name="dns", type=cluster_pb2.Cluster.STRICT_DNS),
        cluster_pb2.Cluster(name="orig", type=cluster_pb2.Cluster.ORIGINAL_DST,
                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED),
    ]  # fmt: skip

    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a", 1))
        c.subscribe(["a"])
        assert (await c.wait_for(["a"], 10))["a"] is ResourceState.READY
        assert c.stats.nacks == 0 and set(sink.services) == {"a"}

    run(with_double(Behaviour(extra_clusters=extra), delta, go))


@MODES
def test_static_cluster_with_inline_endpoints(delta: bool) -> None:
    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        c.subscribe(["st"])
        cl = cluster_pb2.Cluster(name="st")  # no type: STATIC
        cl.load_assignment.CopyFrom(service_to_cla(svc("st", 7, 8)))
        d.put_raw(CDS, cl)
        assert (await c.wait_for(["st"], 10))["st"] is ResourceState.READY
        assert {e.port for e in sink.services["st"].endpoints} == {7, 8}
        # a STATIC cluster mistaken for EDS is NACKed with a message that says so
        bad = cluster_pb2.Cluster(name="st")
        bad.eds_cluster_config.eds_config.ads.SetInParent()
        d.put_raw(CDS, bad)
        await until(lambda: d.nacks, what="NACK")
        assert "set type: EDS" in d.nacks[0][1]
        assert {e.port for e in sink.services["st"].endpoints} == {7, 8}  # last good kept

    run(with_double(Behaviour(), delta, go))


@MODES
def test_invalid_only_resource_settles_as_invalid_and_recovers(delta: bool) -> None:
    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a", 1), cluster_only=True)
        bad = service_to_cla(svc("a", 1))
        bad.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 0
        d.put_raw(EDS, bad)
        c.subscribe(["a"])
        assert (await c.wait_for(["a"], 10))["a"] is ResourceState.INVALID
        assert "port_value must be 1..65535" in c.error("a")
        d.put(svc("a", 3))
        await until(lambda: c.state("a") is ResourceState.READY, what="ready")
        assert c.error("a") == "" and sink.services["a"].endpoints[0].port == 3

    run(with_double(Behaviour(), delta, go))


@MODES
def test_subscribing_while_big_responses_are_handled_keeps_ack_order(delta: bool) -> None:
    """Subscriptions made while a response is being validated (which yields
    to the loop) go out after its ACK, CDS before EDS (the double checks)."""
    svcs = services("big", 300, nodes=40)

    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(*svcs)
        for i in range(0, 300, 10):
            c.subscribe(names(svcs[i : i + 10]))
            await asyncio.sleep(0.002)
        states = await c.wait_for(names(svcs), 30)
        assert set(states.values()) == {ResourceState.READY}
        assert c.stats.nacks == 0

    run(with_double(Behaviour(ignore_stale_nonce=True), delta, go))


@MODES
def test_requests_never_exceed_max_request_bytes(delta: bool) -> None:
    limit = 64 * 1024
    keys = [f"com.example.service-with-a-long-name.{i:06d}" for i in range(3000)]

    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(*[svc(k, 1) for k in keys[:50]])
        if delta:  # delta requests are split
            c.subscribe(keys)
            await until(lambda: len(sink.services) == 50, what="services")
        else:  # SotW requests carry every name: refused beyond the limit
            with pytest.raises(TooManySubscriptions, match="max_request_bytes"):
                c.subscribe(keys)
            assert c.subscriptions == frozenset()
            c.subscribe(keys[:1000])
            await until(lambda: len(sink.services) == 50, what="services")
        sizes = [r.msg.ByteSize() for r in d.requests]
        assert max(sizes) <= limit, max(sizes)

    run(with_double(Behaviour(), delta, go, max_request_bytes=limit))


def test_max_subscriptions() -> None:
    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        c.subscribe(["a", "b"])
        with pytest.raises(TooManySubscriptions, match="at most 3"):
            c.subscribe(["c", "d"])
        assert c.subscriptions == {"a", "b"}
        c.subscribe(["a", "c"])  # a is already there
        assert c.subscriptions == {"a", "b", "c"}

    run(with_double(Behaviour(), False, go, max_subscriptions=3))


def test_unsupported_type_in_a_response_is_nacked_and_the_stream_goes_on() -> None:
    async def go(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a", 1))
        c.subscribe(["a"])
        await c.wait_for(["a"], 10)
        from envoy.service.discovery.v3 import discovery_pb2

        t = "type.googleapis.com/envoy.config.listener.v3.Listener"
        d.send_raw(discovery_pb2.DiscoveryResponse(type_url=t, version_info="1",
                                                   resources=[any_pb2.Any(type_url=t)]))  # fmt: skip
        await until(lambda: d.nacks, what="NACK")
        assert "unsupported type" in d.nacks[0][1]
        d.put(svc("a", 2))
        await until(lambda: sink.services["a"].endpoints[0].port == 2, what="update")

    run(with_double(Behaviour(), False, go))
