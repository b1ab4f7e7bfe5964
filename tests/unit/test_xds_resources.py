"""The xDS <-> model mapping (docs/xds.md) and the control plane's file format."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from octoproxy import model
from octoproxy.controlplane.store import FileError, _Cache, build
from octoproxy.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ResourceError,
    appkey_problem,
    cla_to_endpoints,
    cluster_to_settings,
    service_to_cla,
    service_to_cluster,
)

C = cluster_pb2.Cluster
H = health_check_pb2


def full_service() -> model.Service:
    return model.Service(
        "app.x",
        (
            model.Endpoint(
                "10.0.0.1", 1, 120, model.STATUS_ALIVE, 0, "", "", "bj-a", "bj", 180, 1e9
            ),
            model.Endpoint(
                "10.0.0.2", 2, 0, model.STATUS_STARTING, 1, "set-1", "lane", "sh-a", "sh"
            ),
            model.Endpoint("::1", 3, 5, model.STATUS_WARNING, 0, "", "", "bj-a", "bj"),
        ),
        model.LbPolicy.CONSISTENT_HASH,
        True,
        ("x.A", "x.B"),
    )


def test_roundtrip_keeps_every_field() -> None:
    s = full_service()
    settings = cluster_to_settings(service_to_cluster(s))
    eps = cla_to_endpoints(service_to_cla(s))
    assert settings.lb_policy is model.LbPolicy.CONSISTENT_HASH
    assert settings.set_enabled and settings.service_names == ("x.A", "x.B")
    assert sorted(eps, key=lambda e: e.port) == list(s.endpoints)


@pytest.mark.parametrize(
    ("lb", "want"),
    [
        (C.ROUND_ROBIN, model.LbPolicy.ROUND_ROBIN),
        (C.LEAST_REQUEST, model.LbPolicy.LEAST_REQUEST),
        (C.RANDOM, model.LbPolicy.RANDOM),
        (C.RING_HASH, model.LbPolicy.CONSISTENT_HASH),
        (C.MAGLEV, model.LbPolicy.CONSISTENT_HASH),
    ],
)
def test_lb_policy(lb: int, want: model.LbPolicy) -> None:
    assert cluster_to_settings(C(name="a", lb_policy=lb)).lb_policy is want


def test_plain_envoy_resources_use_defaults() -> None:
    """A cluster and assignment from any control plane, without octo metadata."""
    s = cluster_to_settings(C(name="a"))
    assert (s.lb_policy, s.set_enabled, s.service_names) == (model.LbPolicy.ROUND_ROBIN, False, ())
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="a")
    lle = cla.endpoints.add()
    lle.locality.zone = "z1"
    lbe = lle.lb_endpoints.add()
    lbe.endpoint.address.socket_address.address = "10.9.9.9"
    lbe.endpoint.address.socket_address.port_value = 80
    backup = cla.endpoints.add(priority=1).lb_endpoints.add()
    backup.endpoint.address.socket_address.address = "10.9.9.8"
    backup.endpoint.address.socket_address.port_value = 80
    e, b = cla_to_endpoints(cla)
    assert e == model.Endpoint("10.9.9.9", 80, weight=100, idc="z1")
    assert b.role == model.ROLE_BACKUP  # priority > 0 without a role label


@pytest.mark.parametrize(
    ("health", "status"),
    [
        (H.UNKNOWN, model.STATUS_ALIVE),
        (H.HEALTHY, model.STATUS_ALIVE),
        (H.UNHEALTHY, model.STATUS_DEAD),
        (H.DRAINING, model.STATUS_STOPPING),
        (H.TIMEOUT, model.STATUS_DEAD),
        (H.DEGRADED, model.STATUS_WARNING),
    ],
)
def test_health_status(health: int, status: int) -> None:
    cla = service_to_cla(model.Service("a", (model.Endpoint("h", 1),)))
    lbe = cla.endpoints[0].lb_endpoints[0]
    lbe.health_status = health
    del lbe.metadata.filter_metadata["octo"]  # no exact OCTO status: health decides
    assert cla_to_endpoints(cla)[0].status == status


def _cla(mutate) -> endpoint_pb2.ClusterLoadAssignment:  # type: ignore[no-untyped-def]
    cla = service_to_cla(model.Service("a", (model.Endpoint("h", 1), model.Endpoint("g", 2))))
    mutate(cla.endpoints[0].lb_endpoints[0])
    return cla


@pytest.mark.parametrize(
    ("mutate", "msg"),
    [
        (lambda e: e.endpoint.ClearField("address"), "socket_address is missing"),
        (lambda e: e.endpoint.address.socket_address.ClearField("address"), "address is empty"),
        (lambda e: e.endpoint.address.socket_address.ClearField("port_value"), "must be 1..65535"),
        (lambda e: setattr(e.endpoint.address.socket_address, "named_port", "x"), "1..65535"),
        (lambda e: e.endpoint.address.socket_address.__setattr__("protocol", 1), "only TCP"),
        (
            lambda e: (
                setattr(e.endpoint.address.socket_address, "address", "g")
                or setattr(e.endpoint.address.socket_address, "port_value", 2)
            ),
            "duplicate endpoint g:2",
        ),
        (lambda e: e.load_balancing_weight.__setattr__("value", 2**31), "exceeds"),
        (
            lambda e: e.metadata.filter_metadata["envoy.lb"].update({"cell": 3}),
            "cell must be a string",
        ),
        (
            lambda e: e.metadata.filter_metadata["envoy.lb"].update({"role": 2}),
            "role must be 0 (primary) or 1",
        ),
        (
            lambda e: e.metadata.filter_metadata["envoy.lb"].update({"start_time": -1}),
            "start_time must be",
        ),
        (lambda e: e.metadata.filter_metadata["octo"].update({"status": 9}), "status must be 0..5"),
        (lambda e: e.ClearField("endpoint"), "no endpoint"),
    ],
)
def test_malformed_assignment_says_what_is_wrong(mutate, msg: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ResourceError) as ei:
        cla_to_endpoints(_cla(mutate))
    assert msg in str(ei.value)
    assert "ClusterLoadAssignment 'a'" in str(ei.value)


@pytest.mark.parametrize(
    ("mutate", "msg"),
    [
        (lambda c: c.ClearField("name"), "without a name"),
        (lambda c: setattr(c, "type", C.STATIC), "a STATIC cluster with eds_cluster_config"),
        (lambda c: c.ClearField("type"), "STATIC cluster (type unset) with eds_cluster_config"),
        (lambda c: setattr(c, "type", C.STRICT_DNS), "type STRICT_DNS is not supported"),
        (lambda c: c.cluster_type.__setattr__("name", "x.agg"), "custom cluster"),
        (lambda c: setattr(c.eds_cluster_config, "service_name", "other"), "service_name"),
        (
            lambda c: c.metadata.filter_metadata["octo"].update({"service_names": "x"}),
            "must be a list",
        ),
        (
            lambda c: c.metadata.filter_metadata["octo"].update({"service_names": [1]}),
            "service_names[0] must be a string",
        ),
        (lambda c: c.metadata.filter_metadata["octo"].update({"service_names": [""]}), "is empty"),
    ],
)
def test_malformed_cluster_says_what_is_wrong(mutate, msg: str) -> None:  # type: ignore[no-untyped-def]
    c = service_to_cluster(model.Service("a"))
    mutate(c)
    with pytest.raises(ResourceError) as ei:
        cluster_to_settings(c)
    assert msg in str(ei.value)


def test_endpoints_file_format(tmp_path: Path) -> None:
    f = tmp_path / "e.yaml"
    f.write_text(
        """
services:
  - appkey: a
    lb_policy: MAGLEV
    set_enabled: true
    service_names: [a.S]
    endpoints:
      - {address: "10.0.0.1:1", status: stopping, role: backup, cell: c, swimlane: w,
         idc: i, region: r, warmup_s: 3, start_time: 4, weight: 7}
      - {address: "[::1]:2", health: degraded}
      - {address: "10.0.0.3:3", status: 1}
  - appkey: b
"""
    )
    cache, res = build(f, _Cache())
    assert set(res[CLUSTER_TYPE]) == set(res[ENDPOINT_TYPE]) == {"a", "b"}
    eps = cla_to_endpoints(
        endpoint_pb2.ClusterLoadAssignment.FromString(res[ENDPOINT_TYPE]["a"].raw)
    )
    by_port = {e.port: e for e in eps}
    assert by_port[1] == model.Endpoint("10.0.0.1", 1, 7, 3, 1, "c", "w", "i", "r", 3, 4)
    assert by_port[2].host == "::1" and by_port[2].status == model.STATUS_WARNING
    assert by_port[3].status == model.STATUS_STARTING
    s = cluster_to_settings(C.FromString(res[CLUSTER_TYPE]["a"].raw))
    assert s.lb_policy is model.LbPolicy.CONSISTENT_HASH and s.service_names == ("a.S",)
    # unchanged services are reused, with the same content-hash version
    _, res2 = build(f, cache)
    assert res2[ENDPOINT_TYPE]["a"] is res[ENDPOINT_TYPE]["a"]


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("services: [{appkey: a}, {appkey: a}]", "duplicate appkey 'a'"),
        ("services: [{appkey: a, endpoints: [{address: x}]}]", "services[0].endpoints[0].address"),
        ("services: [{appkey: a, endpoints: [{address: 'h:1', weight: -1}]}]", "weight"),
        (
            "services: [{appkey: a, endpoints: [{address: 'h:1', status: zombie}]}]",
            "status must be",
        ),
        (
            "services: [{appkey: a, endpoints: [{address: 'h:1', status: 2, health: healthy}]}]",
            "not both",
        ),
        ("services: [{appkey: a, lb_policy: fastest}]", "lb_policy must be one of"),
        ("services: [{appkey: a, colour: red}]", "services[0].colour"),
        ("clusters: []", "with the key 'services'"),
        ("services: [", "not valid YAML"),
    ],
)
def test_bad_endpoints_file(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "e.yaml"
    f.write_text(text)
    with pytest.raises(FileError) as ei:
        build(f, _Cache())
    assert msg in str(ei.value)


def test_endpoint_cache_reuses_unchanged_endpoints() -> None:
    eps = tuple(model.Endpoint(f"10.0.0.{i}", 9000, idc="z") for i in range(5))
    cache: dict = {}  # type: ignore[type-arg]
    first = cla_to_endpoints(service_to_cla(model.Service("a", eps)), None, cache)
    assert len(cache) == 5
    changed = (*eps[:4], model.Endpoint("10.0.0.4", 9000, weight=1, idc="z"))
    cache2: dict = {}  # type: ignore[type-arg]
    second = cla_to_endpoints(service_to_cla(model.Service("a", changed)), cache, cache2)
    assert second == changed
    assert all(a is b for a, b in zip(first[:4], second[:4], strict=True))
    assert second[4] is not first[4] and len(cache2) == 5
    dup = service_to_cla(model.Service("a", (eps[0], eps[0])))
    with pytest.raises(ResourceError, match=r"duplicate endpoint 10\.0\.0\.0:9000"):
        cla_to_endpoints(dup, cache, {})


def test_static_cluster_serves_its_inline_endpoints() -> None:
    """A Cluster with no type (the proto default, STATIC) or STATIC, with an
    inline load_assignment, is a service with those endpoints (no EDS)."""
    svc = full_service()
    for set_type in (False, True):
        c = cluster_pb2.Cluster(name="app.x", lb_policy=C.RING_HASH)
        if set_type:
            c.type = C.STATIC
        c.load_assignment.CopyFrom(service_to_cla(svc))
        c.load_assignment.cluster_name = "" if set_type else "app.x"
        settings = cluster_to_settings(c)
        assert settings.static_endpoints is not None
        assert set(settings.static_endpoints) == set(svc.endpoints)
    c = cluster_pb2.Cluster(name="app.x")  # STATIC with no hosts at all
    assert cluster_to_settings(c).static_endpoints == ()
    c.load_assignment.CopyFrom(service_to_cla(svc))
    c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 0
    with pytest.raises(ResourceError) as ei:
        cluster_to_settings(c)
    assert "Cluster 'app.x': load_assignment: endpoints[0].lb_endpoints[0]" in str(ei.value)
    c.load_assignment.cluster_name = "other"
    with pytest.raises(ResourceError, match=r"load_assignment\.cluster_name 'other'"):
        cluster_to_settings(c)


def test_localities_carry_a_weight() -> None:
    """gRPC clients drop a locality without a load_balancing_weight: every one
    has the sum of its serving endpoints' weights, at least 1."""
    cla = service_to_cla(full_service())
    weights = {(le.locality.region, le.locality.zone): le.load_balancing_weight.value
               for le in cla.endpoints}  # fmt: skip
    assert weights == {("bj", "bj-a"): 120 + 0, ("sh", "sh-a"): 1}  # WARNING does not serve


@pytest.mark.parametrize(
    ("appkey", "ok"),
    [("com.example.order", True), ("a", True), ("A-b_c.9", True), ("*", False), ("", False),
     (".a", False), ("a b", False), ("a/b", False), ("a" * 255, True), ("a" * 256, False),
     ("xdstp://x/y", False), ("é", False), (7, False)],
)  # fmt: skip
def test_appkey_rules(appkey: object, ok: bool) -> None:
    assert (appkey_problem(appkey) is None) is ok
