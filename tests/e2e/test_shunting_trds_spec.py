"""Traffic shunting driven the way an outside control plane would drive it
(issue 16): Envoy's Thrift RouteConfiguration written by hand in its JSON
form (``method_name``, ``service_name``, header matchers exact / prefix /
range / present / a set of literals, ``metadata_match`` on the ``envoy.lb``
group, ``weighted_clusters``), node groups as ``envoy.lb`` endpoint
metadata, served over ADS by a scripted control plane (not the bundled one,
and not built with octo-proxy's own reverse mapping).

Real processes: the client-side proxy (xDS + subscribe API), the server-side
proxy, provider nodes d1 d2 (default), g1 (group gray), c1 (group canary).
Every answer names the node that handled it.  Checked only through
documented interfaces: the wire (docs/protocol.md), the ADS stream
(ACK/NACK, docs/xds.md section 1 and 2), the admin pages and the access
log (docs/shunting.md)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.filters.network.thrift_proxy.v3 import route_pb2

from octoproxy._core.frame import thrift_call
from octoproxy.sdk.subscribe import subscribe

from harness import Cluster, cluster, free_port, wait_for, xds_client_cfg
from outsider import DoubleThread, Wire, admin_json, pb
from xds_double import CDS, EDS, TRDS

pytestmark = pytest.mark.timeout(180)

A = "com.spec.user"
B = "com.spec.unit"  # nodes in LiteSet cells, a unit table in the octo extension
NODES = {"d1": "", "d2": "", "g1": "gray", "c1": "canary"}
DEFAULT = {"d1", "d2"}


def to_group(group: str, name: str, **octo: Any) -> dict[str, Any]:
    return {"cluster": A, "metadata_match": {"filter_metadata": {
        "envoy.lb": {"group": group}, "octo": {"name": name, **octo}}}}


ROUTES: list[dict[str, Any]] = [
    {"match": {"method_name": "getGray"}, "route": to_group("gray", "by-method")},
    {"match": {"service_name": "com.spec.AdminService"}, "route": to_group("canary", "by-service")},
    {"match": {"method_name": "", "headers": [
        {"name": "userId", "range_match": {"start": "100", "end": "200"}}]},
     "route": to_group("gray", "by-range")},
    {"match": {"headers": [{"name": "region", "string_match": {"prefix": "bj-"}},
                           {"name": "vip", "present_match": True}]},
     "route": to_group("canary", "by-prefix-and-present")},
    {"match": {"headers": [{"name": ":client-id", "exact_match": "com.spec.tester"}]},
     "route": to_group("gray", "by-caller")},
    {"match": {"headers": [{"name": "tier", "safe_regex_match": {"regex": "^(?:gold|silver)$"}}]},
     "route": to_group("canary", "by-set")},
    {"match": {"method_name": "toGhost"},
     "route": to_group("ghost", "ghost-reject", on_no_node="reject")},
    {"match": {"method_name": "toGhostFb"}, "route": to_group("ghost", "ghost-fallback")},
    {"match": {"method_name": "ab"}, "route": {
        "metadata_match": {"filter_metadata": {"octo": {"name": "ab"}}},
        "weighted_clusters": {"clusters": [
            {"name": A, "weight": 30,
             "metadata_match": {"filter_metadata": {"envoy.lb": {"group": "gray"}}}},
            {"name": A, "weight": 70}]}}},
]


def route_config(routes: list[dict[str, Any]]) -> route_pb2.RouteConfiguration:
    return pb({"name": A, "routes": routes}, route_pb2.RouteConfiguration)


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Cluster, DoubleThread]]:
    with cluster() as c:
        ports = c.provider_nodes(NODES)
        cp = DoubleThread()
        try:
            cla = {"cluster_name": A, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": ports[n]}}},
                 **({"metadata": {"filter_metadata": {"envoy.lb": {"group": g}}}} if g else {})}
                for n, g in NODES.items()]}]}
            cp.do(cp.double.put_raw, CDS, pb(
                {"name": A, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}},
                cluster_pb2.Cluster))
            cp.do(cp.double.put_raw, EDS, pb(cla, endpoint_pb2.ClusterLoadAssignment))
            cp.do(cp.double.put_raw, TRDS, route_config(ROUTES))
            cells = {"d1": "", "g1": "ls-a", "c1": "ls-b"}
            cla_b = {"cluster_name": B, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": ports[n]}}},
                 "metadata": {"filter_metadata": {"envoy.lb": {"cell": cell}}}}
                for n, cell in cells.items()]}]}
            cp.do(cp.double.put_raw, CDS, pb(
                {"name": B, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}},
                cluster_pb2.Cluster))
            cp.do(cp.double.put_raw, EDS, pb(cla_b, endpoint_pb2.ClusterLoadAssignment))
            cp.do(cp.double.put_raw, TRDS, pb({"name": B, "routes": [{"route": {
                "cluster": B, "metadata_match": {"filter_metadata": {"octo": {
                    "name": "loc-to-liteset", "target": "octo-liteset", "source_key": "locId",
                    "unit_table": {"1001": "ls-a", "2001": "ls-b", "3001": "ls-none"}}}}}}]},
                route_pb2.RouteConfiguration))
            sub, admin = free_port(), free_port()
            c.proxy("client", xds_client_cfg(c.path("px.sock"), cp.target, sub,
                                             subscribe={"timeout_s": 10}, admin={"port": admin},
                                             logging={"access_log": True}))
            subscribe(f"http://127.0.0.1:{sub}", [A, B])
            c.admin = admin  # type: ignore[attr-defined]
            # the weighted route is two rules: its gray share and the rest (to the cluster)
            wait_for(lambda: len(rules_of(c)) == len(ROUTES) + 1, 15, "the rules over TRDS")
            yield c, cp
        finally:
            cp.close()


def rules_of(c: Cluster) -> dict[str, Any]:
    svc = admin_json(c.admin, "/clusters")["services"].get(A, {})  # type: ignore[attr-defined]
    return {r["name"]: r for r in svc.get("shunting", [])}


def nodes(c: Cluster, n: int = 12, method: str = "m", **kw: Any) -> set[str]:
    """The set of nodes that answered n requests (all must succeed)."""
    w = Wire(c.path("px.sock"))
    try:
        out = set()
        for i in range(n):
            r = w.call(thrift_call(method, i, b"echo:x"), appkey=A, **kw)
            assert r["status"] == 0, r
            out.add(r["body"].split(b"|")[0].decode())
        return out
    finally:
        w.close()


def test_standard_route_fields_select_the_group(mesh: tuple[Cluster, DoubleThread]) -> None:
    c, cp = mesh
    assert cp.nacks(TRDS) == []
    # no route matches: the request is routed as it was, to the default nodes only
    assert nodes(c, 20) == DEFAULT
    assert nodes(c, method="getGray") == {"g1"}
    assert nodes(c, service="com.spec.AdminService") == {"c1"}
    # range_match [100, 200): integer values only, half open
    for uid, want in [("99", DEFAULT), ("100", {"g1"}), ("150", {"g1"}), ("199", {"g1"}), ("+150", {"g1"}),
                      ("200", DEFAULT), ("-1", DEFAULT), ("150x", DEFAULT), ("1.5e2", DEFAULT),
                      ("", DEFAULT)]:
        assert nodes(c, glob={"userId": uid}) == want, uid
    # headers are ANDed; a header is a context key, localContext before globalContext
    assert nodes(c, glob={"region": "bj-3", "vip": "1"}) == {"c1"}
    assert nodes(c, local={"region": "bj-3"}, glob={"vip": "1"}) == {"c1"}
    assert nodes(c, local={"region": "sh-1"}, glob={"region": "bj-3", "vip": "1"}) == DEFAULT
    assert nodes(c, glob={"region": "bj-3"}) == DEFAULT
    assert nodes(c, glob={"region": "sh-1", "vip": "1"}) == DEFAULT
    # :client-id is the caller appkey (traceInfo.clientAppkey)
    assert nodes(c, caller="com.spec.tester") == {"g1"}
    assert nodes(c, caller="com.spec.other") == DEFAULT
    # a set of literals as a safe_regex: exact, case-sensitive
    assert nodes(c, glob={"tier": "silver"}) == {"c1"}
    for tier in ("gold2", "GOLD", "xgold"):
        assert nodes(c, glob={"tier": tier}) == DEFAULT, tier


def test_unit_table_sets_the_liteset_before_cell_routing(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    wait_for(lambda: admin_json(c.admin, "/clusters")["services"].get(B, {}).get("shunting"),  # type: ignore[attr-defined]
             15, "the unit rule")

    def to(**kw: Any) -> set[str]:
        w = Wire(c.path("px.sock"))
        try:
            got = set()
            for i in range(12):
                r = w.call(thrift_call("m", i, b"echo:x"), appkey=B, **kw)
                assert r["status"] == 0, r
                got.add(r["body"].split(b"|")[0].decode())
            return got
        finally:
            w.close()

    assert to(glob={"locId": "1001"}) == {"g1"}
    assert to(local={"locId": "2001"}) == {"c1"}
    # a LiteSet with no node of its own falls back to the center, as a request carrying it would
    assert to(glob={"locId": "3001"}) == {"d1"}
    assert to(glob={"octo-liteset": "ls-none"}) == {"d1"}
    # not in the table, or absent: the rule does not match, the request routes as it was
    assert to(glob={"locId": "9999"}) == {"d1"}
    assert to() == {"d1"}
    assert to(glob={"octo-liteset": "ls-b"}) == {"c1"}


def test_routes_asked_for_on_demand_by_name(mesh: tuple[Cluster, DoubleThread]) -> None:
    """TRDS names: the subscribed appkeys and octo/global, never a wildcard
    (an empty first request); every response ACKed or NACKed by its nonce."""
    _, cp = mesh

    def read() -> list[Any]:
        return [r.msg for r in cp.double.requests if r.msg.type_url == TRDS]

    reqs = cp.do(read)
    assert reqs and list(reqs[0].resource_names), "a TRDS request without names is a wildcard"
    assert set(reqs[-1].resource_names) == {A, B, "octo/global"}
    sent = {r.nonce for _, r in cp.do(lambda: list(cp.double.responses)) if r.type_url == TRDS}
    answered = {r.response_nonce for r in reqs if r.response_nonce}
    assert answered <= sent and len(answered) >= 1


def test_first_matching_route_wins(mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    # by-method (0) before by-caller (4) and by-set (5)
    assert nodes(c, method="getGray", caller="com.spec.tester",
                 glob={"tier": "gold"}) == {"g1"}
    # by-service (1) before by-range (2)
    assert nodes(c, service="com.spec.AdminService", glob={"userId": "150"}) == {"c1"}
    # by-prefix-and-present (3, canary) before by-caller (4, gray)
    assert nodes(c, caller="com.spec.tester", glob={"region": "bj-1", "vip": "y"}) == {"c1"}


def test_group_without_nodes_rejects_with_8_or_falls_back(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    w = Wire(c.path("px.sock"))
    try:
        r = w.call(thrift_call("toGhost", 1, b"echo:x"), appkey=A)
        assert r["status"] == 8, r
        assert "'ghost-reject'" in r["message"] and "'ghost'" in r["message"], r
    finally:
        w.close()
    assert nodes(c, method="toGhostFb") == DEFAULT


def test_weighted_clusters_share(mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    w = Wire(c.path("px.sock"))
    got: collections.Counter[str] = collections.Counter()
    try:
        for i in range(2000):
            r = w.call(thrift_call("ab", i, b"echo:x"), appkey=A)
            assert r["status"] == 0, r
            got[r["body"].split(b"|")[0].decode()] += 1
    finally:
        w.close()
    assert set(got) <= {"g1", "d1", "d2"}, got
    share = got["g1"] / 2000
    assert abs(share - 0.30) <= 0.04, got  # random: 1 sigma is 1 point here


def test_admin_pages_and_access_log_show_groups_and_rule_hits(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    nodes(c, 5, method="getGray")
    svc = admin_json(c.admin, "/clusters")["services"][A]  # type: ignore[attr-defined]
    assert sorted(svc["groups"]) == ["canary", "gray"]
    assert {n["group"] for n in svc["nodes"]} == {"", "gray", "canary"}
    hits = {r["name"]: r["hits"] for r in svc["shunting"]}
    assert hits["by-method"] >= 5
    dump = admin_json(c.admin, "/config_dump")  # type: ignore[attr-defined]
    assert any(r["name"] == "by-method" and r["hits"] >= 5 for r in dump["shunting"])
    client = next(p for p in c.procs if p.name == "client")
    wait_for(lambda: f"rule={A}/by-method" in client.log(), 10, "an access-log line naming the rule")


BAD: list[tuple[dict[str, Any], str]] = [
    ({"match": {"method_name": "m", "invert": True}, "route": to_group("gray", "inverted")},
     "rule 'inverted'"),
    ({"match": {"headers": [{"name": "uid", "invert_match": True, "exact_match": "1"}]},
      "route": to_group("gray", "negated")}, "rule 'negated'"),
    ({"match": {"headers": [{"name": "uid", "safe_regex_match": {"regex": "^1.*$"}}]},
      "route": to_group("gray", "regex")}, "rule 'regex'"),
    ({"match": {"headers": [{"name": "uid", "present_match": False}]},
      "route": to_group("gray", "absent")}, "rule 'absent'"),
    ({"match": {"method_name": "m"}, "route": {**to_group("gray", "elsewhere"),
                                               "cluster": "com.spec.other"}},
     "rule 'elsewhere'"),
    ({"match": {"method_name": "m"}, "route": {"cluster": A, "metadata_match": {
        "filter_metadata": {"envoy.lb": {"group": "gray", "version": "v2"}}}}}, "route-9"),
]


@pytest.mark.parametrize(("bad", "why"), BAD, ids=[w for _, w in BAD])
def test_bad_route_set_is_nacked_whole_naming_the_rule_and_old_rules_stay(
        mesh: tuple[Cluster, DoubleThread], bad: dict[str, Any], why: str) -> None:
    c, cp = mesh
    before = len(cp.nacks(TRDS))
    # a good route first, so that applying part of the set would show
    cp.do(cp.double.put_raw, TRDS, route_config(
        [{"match": {"method_name": "m"}, "route": to_group("canary", "partial")}, *ROUTES[:8], bad]))
    wait_for(lambda: len(cp.nacks(TRDS)) > before, 15, "a NACK")
    msg = cp.nacks(TRDS)[-1]
    assert f"RouteConfiguration '{A}'" in msg and why in msg, msg
    assert nodes(c, 20) == DEFAULT  # 'partial' was not applied
    assert nodes(c, method="getGray") == {"g1"}  # the old set is in force
    assert "partial" not in rules_of(c)


def test_a_route_with_a_field_this_proxy_does_not_know_is_nacked(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    """A newer control plane may set a RouteMatch field these protos do not
    know: the rule would match more than it says if it were ignored."""
    c, cp = mesh
    before = len(cp.nacks(TRDS))
    rc = route_config([*ROUTES, {"match": {"method_name": "m"},
                                 "route": to_group("canary", "newer")}])
    rc.routes[-1].match.MergeFromString(b"\x98\x06\x01")  # field 99, varint 1
    cp.do(cp.double.put_raw, TRDS, rc)
    wait_for(lambda: len(cp.nacks(TRDS)) > before, 15, "a NACK")
    msg = cp.nacks(TRDS)[-1]
    assert f"routes[{len(ROUTES)}].match has a field this proxy does not know" in msg, msg
    assert nodes(c, 20) == DEFAULT and "newer" not in rules_of(c)


def test_a_route_to_the_cluster_itself_stops_there(mesh: tuple[Cluster, DoubleThread]) -> None:
    """As in Envoy, a matching route that names the cluster with no subset
    (and the ungrouped share of weighted_clusters) is where the request
    goes: the default nodes; a later catch-all route never sees it."""
    c, cp = mesh
    cp.do(cp.double.put_raw, TRDS, route_config([
        {"match": {"method_name": "healthCheck"}, "route": {"cluster": A}},
        ROUTES[-1],  # ab: 30% gray, 70% the cluster itself
        {"match": {"method_name": ""}, "route": to_group("canary", "catch-all")},
    ]))
    wait_for(lambda: "catch-all" in rules_of(c), 15, "the new rule set")
    assert nodes(c, 20, method="healthCheck") == DEFAULT
    assert nodes(c, 20, method="other") == {"c1"}
    got: collections.Counter[str] = collections.Counter()
    w = Wire(c.path("px.sock"))
    try:
        for i in range(600):
            r = w.call(thrift_call("ab", i, b"echo:x"), appkey=A)
            got[r["body"].split(b"|")[0].decode()] += 1
    finally:
        w.close()
    assert "c1" not in got and got["g1"] > 0 and got["d1"] + got["d2"] > 0, got
    hits = {r["name"]: (r["hits"], r["fallbacks"]) for r in rules_of(c).values()}
    assert hits["route-0"][0] >= 20 and hits["route-0"][1] == 0  # routed, not a fallback


def test_a_new_route_set_replaces_the_old_one_whole(mesh: tuple[Cluster, DoubleThread]) -> None:
    # last in this module: it changes the rules
    c, cp = mesh
    cp.do(cp.double.put_raw, TRDS, route_config(
        [{"match": {"method_name": "m"}, "route": to_group("canary", "all-m")}]))
    wait_for(lambda: set(rules_of(c)) == {"all-m"}, 15, "the new rule set")
    assert nodes(c, 20) == {"c1"}
    assert nodes(c, method="getGray") == DEFAULT  # the old rules are gone
    # an empty RouteConfiguration: no rules
    cp.do(cp.double.put_raw, TRDS, route_config([]))
    wait_for(lambda: rules_of(c) == {}, 15, "no rules")
    assert nodes(c, 20) == DEFAULT
