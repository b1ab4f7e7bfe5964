"""xDS end to end: the bundled control plane (in process or as a real process),
the xDS client over real gRPC on loopback, a fake route sink; SotW and delta."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import octoproxy
from octoproxy import model
from octoproxy.controlplane import ControlPlane
from octoproxy.ports import free_tcp_port as free_port
from octoproxy.xds import ResourceState, XdsClient

from xds_helpers import Sink, until
from xds_helpers import run as _run

pytestmark = pytest.mark.timeout(60)
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
SRC = str(Path(octoproxy.__file__).resolve().parents[1])


def run(coro: Any, timeout: float = 30) -> None:
    _run(coro, timeout)


def svc(appkey: str, *eps: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"appkey": appkey, "endpoints": list(eps), **kw}


def ep(n: int, **kw: Any) -> dict[str, Any]:
    return {"address": f"10.0.0.{n}:9000", **kw}


def write(path: Path, services: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"services": services}))
    os.replace(tmp, path)


def base_services() -> list[dict[str, Any]]:
    return [
        svc(
            "app.a",
            ep(1, idc="bj-a", region="bj", weight=50),
            ep(2, idc="bj-b", region="bj", role="backup", cell="gray", swimlane="lane-1"),
            ep(3, warmup_s=60, start_time=1700000000),
            lb_policy="least_request",
            set_enabled=True,
            service_names=["a.Svc"],
        ),
        svc("app.b", ep(11), ep(12, status="starting")),
        svc("app.c", ep(21)),
    ]


def client(port: int, sink: Sink, delta: bool, **kw: Any) -> XdsClient:
    kw.setdefault("resource_timeout_s", 3.0)
    kw.setdefault("backoff_base_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    return XdsClient(
        f"127.0.0.1:{port}",
        sink,
        node_id=kw.pop("node_id", "proxy-1"),
        labels=model.Labels("ls", "set-1", "lane-1", "bj-a", "bj"),
        delta=delta,
        **kw,
    )


async def with_cp(path: Path, fn: Callable[[ControlPlane], Awaitable[None]]) -> None:
    cp = ControlPlane(str(path), port=0, poll_s=0.05)
    await cp.start()
    try:
        await fn(cp)
    finally:
        await cp.stop()


@MODES
def test_subscribe_endpoints_arrive(tmp_path: Path, delta: bool) -> None:
    f = tmp_path / "endpoints.yaml"
    write(f, base_services())

    async def body(cp: ControlPlane) -> None:
        sink = Sink()
        c = client(cp.port, sink, delta)
        c.start()
        try:
            c.subscribe(["app.a", "app.b"])
            states = await c.wait_for(["app.a", "app.b"], 5)
            assert states == {"app.a": ResourceState.READY, "app.b": ResourceState.READY}
            assert set(sink.services) == {"app.a", "app.b"}  # only what was asked for
            a = sink.services["app.a"]
            assert a.lb_policy is model.LbPolicy.LEAST_REQUEST
            assert a.set_enabled and a.service_names == ("a.Svc",)
            assert sink.ep("app.a", "10.0.0.1:9000") == model.Endpoint(
                "10.0.0.1", 9000, weight=50, idc="bj-a", region="bj"
            )
            e2 = sink.ep("app.a", "10.0.0.2:9000")
            assert (e2.role, e2.cell, e2.swimlane, e2.idc) == (1, "gray", "lane-1", "bj-b")
            e3 = sink.ep("app.a", "10.0.0.3:9000")
            assert (e3.warmup_s, e3.start_time) == (60.0, 1700000000.0)
            assert sink.ep("app.b", "10.0.0.12:9000").status == model.STATUS_STARTING
            # the node identity went out on the first request
            (stream,) = cp.ads.streams.values()
            n = stream.node
            assert (n.id, n.cluster, n.locality.region, n.locality.zone) == (
                "proxy-1",
                "octo-mesh",
                "bj",
                "bj-a",
            )
            assert dict(n.metadata) == {"liteset": "ls", "set": "set-1", "swimlane": "lane-1"}
            assert c.stats.nacks == 0 and not cp.ads.nacks
            # what the admin endpoint shows
            d = json.loads(json.dumps(c.dump()))
            assert d["connected"] and d["mode"] == ("delta" if delta else "sotw")
            assert d["subscriptions"]["app.a"]["state"] == "ready"
            assert d["subscriptions"]["app.a"]["endpoints"] == 3
            # TRDS (shunting rules) does not hold readiness back: its answer may come later
            await until(lambda: all(c.versions().values()), what="every type's version")
        finally:
            await c.stop()

    run(with_cp(f, body))


@MODES
def test_file_change_reaches_sink_within_1s_and_unhealthy_is_not_alive(
    tmp_path: Path, delta: bool
) -> None:
    f = tmp_path / "endpoints.yaml"
    services = base_services()
    write(f, services)

    async def body(cp: ControlPlane) -> None:
        sink = Sink()
        c = client(cp.port, sink, delta)
        c.start()
        try:
            c.subscribe(["app.a", "app.c"])
            await c.wait_for(["app.a", "app.c"], 5)
            # a new node and a weight change
            services[0]["endpoints"].append(ep(4, idc="bj-a", region="bj"))
            services[0]["endpoints"][0]["weight"] = 77
            write(f, services)
            took = await until(
                lambda: (
                    len(sink.services["app.a"].endpoints) == 4
                    and sink.ep("app.a", "10.0.0.1:9000").weight == 77
                ),
                what="the new node",
            )
            assert took < 1.0
            assert sink.updates.count("app.c") == 1  # untouched service: not pushed again
            # a node marked unhealthy arrives as not alive
            services[0]["endpoints"][3]["health"] = "unhealthy"
            write(f, services)
            took = await until(
                lambda: sink.ep("app.a", "10.0.0.4:9000").status != model.STATUS_ALIVE,
                what="unhealthy node",
            )
            assert took < 1.0
            assert sink.ep("app.a", "10.0.0.4:9000").status == model.STATUS_DEAD
            # a bad file is ignored: the old content stays
            errors = cp.store.errors
            f.write_text("services:\n  - appkey: app.a\n    endpoints: [{address: nope}]\n")
            await until(lambda: cp.store.errors > errors, what="bad file rejected")
            assert "address must be host:port" in cp.store.last_error
            assert len(sink.services["app.a"].endpoints) == 4
            # a service deleted from the file is removed from the sink
            write(f, [s for s in services if s["appkey"] != "app.c"])
            await until(lambda: "app.c" not in sink.services, what="app.c removed")
            assert c.state("app.c") is ResourceState.MISSING
            assert c.stats.nacks == 0
        finally:
            await c.stop()

    run(with_cp(f, body))


@MODES
def test_two_clients_get_only_their_own_and_unsubscribe_stops_updates(
    tmp_path: Path, delta: bool
) -> None:
    f = tmp_path / "endpoints.yaml"
    services = base_services()
    write(f, services)

    async def body(cp: ControlPlane) -> None:
        s1, s2 = Sink(), Sink()
        c1 = client(cp.port, s1, delta, node_id="p1")
        c2 = client(cp.port, s2, delta, node_id="p2")
        c1.start()
        c2.start()
        try:
            c1.subscribe(["app.a"])
            c2.subscribe(["app.b", "app.c"])
            await c1.wait_for(["app.a"], 5)
            await c2.wait_for(["app.b", "app.c"], 5)
            assert set(s1.services) == {"app.a"}
            assert set(s2.services) == {"app.b", "app.c"}
            # a change to app.a reaches only p1; a change to app.b only p2
            services[0]["endpoints"][0]["weight"] = 1
            services[1]["endpoints"][0]["weight"] = 2
            write(f, services)
            await until(lambda: s1.ep("app.a", "10.0.0.1:9000").weight == 1)
            await until(lambda: s2.ep("app.b", "10.0.0.11:9000").weight == 2)
            assert set(s1.services) == {"app.a"} and set(s2.services) == {"app.b", "app.c"}
            # unsubscribe: removed from the sink, no more updates
            c2.unsubscribe(["app.b"])
            assert s2.removes == ["app.b"] and "app.b" not in s2.services
            n_b = s2.updates.count("app.b")
            services[1]["endpoints"][0]["weight"] = 3  # app.b changes ...
            services[2]["endpoints"][0]["weight"] = 4  # ... and app.c too
            write(f, services)
            await until(lambda: s2.ep("app.c", "10.0.0.21:9000").weight == 4)
            assert s2.updates.count("app.b") == n_b and "app.b" not in s2.services
            # the server no longer sends app.b to p2
            st = next(s for s in cp.ads.streams.values() if s.node.id == "p2")
            assert all("app.b" not in ts.names for ts in st.types.values())
        finally:
            await c1.stop()
            await c2.stop()

    run(with_cp(f, body))


@MODES
def test_unknown_service_is_missing(tmp_path: Path, delta: bool) -> None:
    f = tmp_path / "endpoints.yaml"
    write(f, base_services())

    async def body(cp: ControlPlane) -> None:
        sink = Sink()
        c = client(cp.port, sink, delta, resource_timeout_s=1.5)
        c.start()
        try:
            t0 = time.monotonic()
            c.subscribe(["app.a", "no.such"])
            states = await c.wait_for(["app.a", "no.such"], 5)
            took = time.monotonic() - t0
            assert states == {"app.a": ResourceState.READY, "no.such": ResourceState.MISSING}
            if delta:  # removed_resources says so at once
                assert took < 1.4 and c.stats.resource_timeouts == 0
            else:  # SotW has no way to say it: the resource timeout does
                assert took >= 1.5 and c.stats.resource_timeouts == 1
            # it shows up later: it arrives (still subscribed)
            write(f, [*base_services(), svc("no.such", ep(99))])
            await until(lambda: "no.such" in sink.services, what="late service")
        finally:
            await c.stop()

    run(with_cp(f, body))


async def start_cp_process(path: Path, port: int) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "octoproxy.controlplane",
        "--endpoints",
        str(path),
        "--listen",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    assert b"listening on" in line, line
    return proc


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


@MODES
def test_control_plane_killed_and_restarted(tmp_path: Path, delta: bool) -> None:
    f = tmp_path / "endpoints.yaml"
    services = base_services()
    write(f, services)
    port = free_port()

    async def body() -> None:
        proc = await start_cp_process(f, port)
        sink = Sink()
        c = client(port, sink, delta)
        c.start()
        try:
            c.subscribe(["app.a", "app.b"])
            assert set((await c.wait_for(["app.a", "app.b"], 5)).values()) == {ResourceState.READY}
            before = dict(sink.services)
            await kill(proc)
            await until(lambda: not c.connected, what="stream down")
            # last good config kept, nothing removed
            assert sink.services == before and not sink.removes
            # while it is down: a change to app.a, and a new subscription
            services[0]["endpoints"][0]["weight"] = 5
            write(f, services)
            c.subscribe(["app.c"])
            await asyncio.sleep(0.3)  # several reconnect attempts fail meanwhile
            assert sink.services == before
            proc = await start_cp_process(f, port)
            await until(lambda: c.connected, what="reconnect")
            await until(lambda: "app.c" in sink.services, what="app.c after reconnect")
            await until(lambda: sink.ep("app.a", "10.0.0.1:9000").weight == 5)
            assert c.stats.streams >= 2
            # everything was re-subscribed: a change to app.b reaches us too
            services[1]["endpoints"][0]["weight"] = 6
            write(f, services)
            await until(lambda: sink.ep("app.b", "10.0.0.11:9000").weight == 6)
            assert not sink.removes and c.stats.nacks == 0
        finally:
            await c.stop()
            await kill(proc)

    run(body(), timeout=45)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    c = XdsClient("127.0.0.1:1", Sink(), node_id="x", backoff_base_s=0.5, backoff_max_s=30)
    for attempt in range(12):
        cap = min(30.0, 0.5 * 2**attempt)
        ds = [c._backoff(attempt) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in ds)
        assert len(set(ds)) > 1


def test_state_file_json_roundtrip(tmp_path: Path) -> None:
    from octoproxy.subscribe import read_state, write_state

    p = tmp_path / "d" / "subs.json"
    assert read_state(p) == []
    write_state(p, ["b", "a"])
    assert json.loads(p.read_text()) == {"version": 1, "appkeys": ["a", "b"]}
    assert read_state(p) == ["a", "b"]
    assert [x.name for x in p.parent.iterdir()] == ["subs.json"]  # no temp file left
    p.write_text("{not json")
    assert read_state(p) == []


@MODES
def test_empty_or_truncated_endpoints_file_is_ignored(tmp_path: Path, delta: bool) -> None:
    """`: > endpoints.yaml` or a half-written file keeps the last good snapshot
    (logged); only an explicit `services: []` removes every service."""
    f = tmp_path / "endpoints.yaml"
    write(f, base_services())

    async def body(cp: ControlPlane) -> None:
        sink = Sink()
        c = client(cp.port, sink, delta)
        c.start()
        try:
            c.subscribe(["app.a", "app.b"])
            await c.wait_for(["app.a", "app.b"], 5)
            before = dict(sink.services)
            good = f.read_text()
            for bad in ("", "   \n", good[: len(good) // 2] + "\n  - {addr", "services:\n"):
                errors = cp.store.errors
                f.write_text(bad)
                await until(lambda e=errors: cp.store.errors > e, what="file rejected")
                assert sink.services == before and c.stats.services_removed == 0
            assert "services" in cp.store.last_error
            f.write_text("services: []\n")
            await until(lambda: not sink.services, what="explicitly no services")
        finally:
            await c.stop()

    run(with_cp(f, body))


@MODES
def test_control_plane_answers_lds_rds_and_unserved_types_at_once(
    tmp_path: Path, delta: bool
) -> None:
    """Per appkey a Listener (API listener, HCM over RDS, router filter) and a
    RouteConfiguration; a type it does not serve is answered at once (empty
    SotW response / every name in removed_resources), not left to time out."""
    import grpc
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    f = tmp_path / "endpoints.yaml"
    write(f, base_services())
    lds = "type.googleapis.com/envoy.config.listener.v3.Listener"
    rds = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    sds = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

    async def body(cp: ControlPlane) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.port}") as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
            got: dict[str, Any] = {}
            for t in (lds, rds, sds):
                if delta:
                    req: Any = discovery_pb2.DeltaDiscoveryRequest(
                        type_url=t, resource_names_subscribe=["app.a"]
                    )
                else:
                    req = discovery_pb2.DiscoveryRequest(type_url=t, resource_names=["app.a"])
                await call.write(req)
                got[t] = await asyncio.wait_for(call.read(), 5)
            call.cancel()

        def body_of(r: Any) -> bytes:
            return bytes(r.resources[0].resource.value if delta else r.resources[0].value)

        listener = listener_pb2.Listener.FromString(body_of(got[lds]))
        assert listener.name == "app.a"
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.api_listener.api_listener.Unpack(hcm)
        assert hcm.rds.route_config_name == "app.a" and hcm.rds.config_source.HasField("ads")
        assert [h.name for h in hcm.http_filters] == ["envoy.filters.http.router"]
        rc = route_pb2.RouteConfiguration.FromString(body_of(got[rds]))
        assert rc.virtual_hosts[0].routes[0].route.cluster == "app.a"
        if delta:
            assert list(got[sds].removed_resources) == ["app.a"] and not got[sds].resources
        else:
            assert got[sds].type_url == sds and not got[sds].resources

    run(with_cp(f, body))
