"""A misbehaving ADS server (hand-written here) sends malformed resources: the
client NACKs with an error_detail that names each bad resource and says what
is wrong, applies the valid resources of that response, and keeps serving the
last good version of the bad ones."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from octoproxy import model
from octoproxy.xds import CLUSTER_TYPE, ENDPOINT_TYPE, XdsClient, service_to_cla, service_to_cluster
from octoproxy.xds.shunting import THRIFT_ROUTE_TYPE

from xds_helpers import Sink, until
from xds_helpers import run as _run

pytestmark = pytest.mark.timeout(30)
CDS, EDS = CLUSTER_TYPE, ENDPOINT_TYPE


def run(coro: Any, timeout: float = 20) -> None:
    _run(coro, timeout)


def service(appkey: str, weight: int = 100) -> model.Service:
    return model.Service(appkey, (model.Endpoint("10.1.0.1", 9000, weight=weight),))


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Answers the first request of each type with good resources for a and b,
    then sends whatever the test pushes; records every request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.delta = False
        self.nonce = 0
        good = {"a": service("a"), "b": service("b")}
        self.good: dict[str, list[Any]] = {
            CDS: [service_to_cluster(s) for s in good.values()],
            EDS: [service_to_cla(s) for s in good.values()],
            THRIFT_ROUTE_TYPE: [],  # no shunting rules (tests/unit/test_xds_shunting.py)
        }

    def response(self, t: str, msgs: list[Any], version: str) -> Any:
        self.nonce += 1
        anys = [any_pb2.Any(type_url=t, value=m.SerializeToString()) for m in msgs]
        if not self.delta:
            return discovery_pb2.DiscoveryResponse(
                version_info=version, resources=anys, type_url=t, nonce=f"n{self.nonce}"
            )
        r = discovery_pb2.DeltaDiscoveryResponse(type_url=t, nonce=f"n{self.nonce}")
        for m, a in zip(msgs, anys, strict=True):
            res = r.resources.add(name=m.name if t == CDS else m.cluster_name, version=version)
            res.resource.CopyFrom(a)
        return r

    async def _serve(self, it: AsyncIterator[Any]) -> AsyncIterator[Any]:
        seen: set[str] = set()

        async def reader() -> None:
            async for req in it:
                self.requests.append(req)
                if req.type_url not in seen:
                    seen.add(req.type_url)
                    self.queue.put_nowait(
                        self.response(req.type_url, self.good[req.type_url], "v1")
                    )

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                yield await self.queue.get()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def StreamAggregatedResources(
        self, it: AsyncIterator[Any], ctx: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(it):
            yield r

    async def DeltaAggregatedResources(
        self, it: AsyncIterator[Any], ctx: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(it):
            yield r


def cla_with(appkey: str, mutate: Callable[[Any], None]) -> Any:
    cla = service_to_cla(service(appkey))
    mutate(cla.endpoints[0].lb_endpoints[0])
    return cla


def _no_address(e: Any) -> None:
    e.endpoint.ClearField("address")


def _port0(e: Any) -> None:
    e.endpoint.address.socket_address.port_value = 0


def _role_str(e: Any) -> None:
    e.metadata.filter_metadata["envoy.lb"]["role"] = "backup"


def _neg_warmup(e: Any) -> None:
    e.metadata.filter_metadata["envoy.lb"]["warmup_s"] = -5


def _cluster(mutate: Callable[[Any], None]) -> Any:
    c = service_to_cluster(service("b", 1))
    mutate(c)
    return c


def _set_enabled_str(c: Any) -> None:
    c.metadata.filter_metadata["octo"]["set_enabled"] = "yes"


def _a_random() -> Any:
    return service_to_cluster(model.Service("a", lb_policy=model.LbPolicy.RANDOM))


def _lb_cluster_provided(c: Any) -> None:
    c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED


# (type, resources of the bad response, what the NACK message must say).  Each bad
# response but "wrong-type" also carries a valid change to "a" (weight 7), which
# is applied: only the bad resource is rejected.
CASES: dict[str, tuple[str, Callable[[], list[Any]], str]] = {
    "missing-address": (
        EDS,
        lambda: [service_to_cla(service("a", 7)), cla_with("b", _no_address)],
        "endpoint.address.socket_address is missing",
    ),
    "bad-port": (
        EDS,
        lambda: [service_to_cla(service("a", 7)), cla_with("b", _port0)],
        "port_value must be 1..65535",
    ),
    "metadata-type": (
        EDS,
        lambda: [service_to_cla(service("a", 7)), cla_with("b", _role_str)],
        '["envoy.lb"].role must be a number',
    ),
    "negative-warmup": (
        EDS,
        lambda: [service_to_cla(service("a", 7)), cla_with("b", _neg_warmup)],
        "warmup_s must be a finite number >= 0",
    ),
    "duplicate": (
        EDS,
        lambda: [
            service_to_cla(service("a", 7)),
            service_to_cla(service("b", 3)),
            service_to_cla(service("b", 4)),
        ],
        "ClusterLoadAssignment 'b': appears twice in the response",
    ),
    "cluster-metadata-type": (
        CDS,
        lambda: [_a_random(), _cluster(_set_enabled_str)],
        "set_enabled must be a bool, got string_value",
    ),
    "lb-policy": (
        CDS,
        lambda: [_a_random(), _cluster(_lb_cluster_provided)],
        "lb_policy CLUSTER_PROVIDED is not supported",
    ),
    "service-name-conflict": (
        CDS,
        lambda: [
            service_to_cluster(model.Service("a", service_names=("x.S",))),
            service_to_cluster(model.Service("b", service_names=("x.S",))),
        ],
        "service name 'x.S' is claimed by both Cluster 'a' and Cluster 'b'",
    ),
    "wrong-type": (
        EDS,
        lambda: [service_to_cluster(service("a", 7))],
        "resource type type.googleapis.com/envoy.config.cluster.v3.Cluster in a",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_malformed_resource_is_nacked_and_the_valid_ones_applied(case: str, delta: bool) -> None:
    t, make, expect = CASES[case]

    async def body() -> None:
        ads = ScriptedAds()
        ads.delta = delta
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sink = Sink()
        c = XdsClient(f"127.0.0.1:{port}", sink, node_id="p", delta=delta, resource_timeout_s=5)
        c.start()
        try:
            c.subscribe(["a", "b", "c"])
            await until(lambda: {"a", "b"} <= set(sink.services), what="good config")
            await until(lambda: c.stats.acks >= 2, what="acks")
            before, calls = dict(sink.services), sink.calls
            n_req = len(ads.requests)
            if case == "wrong-type":
                bad = ads.response(EDS, [], "v2")
                if delta:
                    res = bad.resources.add(name="a", version="v2")
                    res.resource.CopyFrom(
                        any_pb2.Any(type_url=CDS, value=make()[0].SerializeToString())
                    )
                else:
                    bad.resources.add(type_url=CDS, value=make()[0].SerializeToString())
            else:
                bad = ads.response(t, make(), "v2")
            ads.queue.put_nowait(bad)
            await until(lambda: c.stats.nacks == 1, what="NACK")
            await until(
                lambda: any(r.response_nonce == bad.nonce for r in ads.requests[n_req:]),
                what="NACK on the wire",
            )
            nack = next(r for r in ads.requests[n_req:] if r.response_nonce == bad.nonce)
            assert nack.type_url == t
            assert nack.error_detail.code == 3  # INVALID_ARGUMENT
            assert expect in nack.error_detail.message, nack.error_detail.message
            if not delta:
                assert nack.version_info == "v1"  # the last good version
            # the bad resource was not applied, the valid one was
            assert sink.services["b"] == before["b"]
            if case == "wrong-type":
                assert sink.services == before and sink.calls == calls
            elif t == CDS and case != "service-name-conflict":
                await until(lambda: sink.services["a"].lb_policy == "random", what="a applied")
                assert sink.calls == calls + 1
            elif case == "service-name-conflict":
                await until(lambda: sink.services["a"].service_names == ("x.S",), what="a applied")
                assert sink.calls == calls + 1
            else:
                await until(lambda: sink.services["a"].endpoints[0].weight == 7, what="a applied")
                assert sink.calls == calls + 1
            assert (
                c.state("b").value == "ready" and expect in c.error("b")
            ) or case == "wrong-type"
            # the stream goes on: a good update is ACKed and applied
            good = ads.response(EDS, [service_to_cla(service("a", 9))], "v3")
            ads.queue.put_nowait(good)
            await until(lambda: sink.services["a"].endpoints[0].weight == 9, what="good update")
            # the update is applied before its ACK is sent: wait for the ACK itself
            # (the last request seen may still be the NACK on a loaded host)
            await until(
                lambda: any(r.response_nonce == good.nonce for r in ads.requests[n_req:]),
                what="ACK on the wire",
            )
            ack = next(r for r in ads.requests[n_req:] if r.response_nonce == good.nonce)
            assert ack.type_url == EDS
            assert not ack.HasField("error_detail")
            if not delta:
                assert ack.version_info == "v3"
            assert c.stats.nacks == 1
        finally:
            await c.stop()
            await server.stop(None)

    run(body())


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_resource_timeout(delta: bool) -> None:
    """Names the server never answers for are declared missing after
    resource_timeout_s; a cluster whose assignment never comes is served empty."""

    async def body() -> None:
        ads = ScriptedAds()
        ads.delta = delta
        ads.good[CDS].append(service_to_cluster(service("d")))  # no assignment for d
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sink = Sink()
        c = XdsClient(f"127.0.0.1:{port}", sink, node_id="p", delta=delta, resource_timeout_s=0.3)
        c.start()
        try:
            t0 = time.monotonic()
            c.subscribe(["a", "d", "zzz"])
            states = await c.wait_for(["a", "d", "zzz"], 5)
            assert {k: s.value for k, s in states.items()} == {
                "a": "ready",
                "d": "ready",
                "zzz": "missing",
            }
            assert time.monotonic() - t0 >= 0.3  # d waited for its timeout
            assert sink.services["d"].endpoints == ()
            assert "zzz" not in sink.services
            assert c.stats.resource_timeouts == 2
        finally:
            await c.stop()
            await server.stop(None)

    run(body())


def test_sotw_stale_cds_push_does_not_make_a_new_name_missing() -> None:
    """SotW race: a CDS response built before the server saw the request that
    added a name lacks it; the answer to the request follows and wins."""

    class Racy(ScriptedAds):
        async def _serve(self, it: AsyncIterator[Any]) -> AsyncIterator[Any]:
            names: set[str] = set()
            eds_names: set[str] = set()

            async def reader() -> None:
                async for req in it:
                    self.requests.append(req)
                    new = set(req.resource_names)
                    if req.type_url == CDS and new != names:
                        # first a push built for the old subscription, then the answer
                        old = [m for m in self.good[CDS] if m.name in names]
                        self.queue.put_nowait(self.response(CDS, old, "v1"))
                        await asyncio.sleep(0.1)
                        now = [m for m in self.good[CDS] if m.name in new]
                        self.queue.put_nowait(self.response(CDS, now, "v2"))
                        names.clear()
                        names.update(new)
                    elif req.type_url == EDS and set(req.resource_names) != eds_names:
                        eds_names.clear()
                        eds_names.update(req.resource_names)
                        clas = [m for m in self.good[EDS] if m.cluster_name in eds_names]
                        self.queue.put_nowait(self.response(EDS, clas, "v1"))

            task = asyncio.get_running_loop().create_task(reader())
            try:
                while True:
                    yield await self.queue.get()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def body() -> None:
        ads = Racy()
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sink = Sink()
        # SotW: "nope" is settled by the resource timeout only
        c = XdsClient(f"127.0.0.1:{port}", sink, node_id="p", resource_timeout_s=1.5)
        c.start()
        try:
            c.subscribe(["a"])
            assert (await c.wait_for(["a"], 5))["a"].value == "ready"
            c.subscribe(["b", "nope"])
            states = await c.wait_for(["b", "nope"], 10)
            assert {k: s.value for k, s in states.items()} == {"b": "ready", "nope": "missing"}
            assert len(sink.services["b"].endpoints) == 1 and c.stats.nacks == 0
        finally:
            await c.stop()
            await server.stop(None)

    run(body())
