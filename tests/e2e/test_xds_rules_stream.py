"""Traffic-shunting rules over a real ADS gRPC stream (TRDS: Envoy's Thrift
RouteConfiguration), SotW and delta: from the bundled control plane's file
(changed at run time), and from a go-control-plane-like double (routes before
clusters, the same version resent, delta removals, a NACKed rule set keeping
the old rules).  docs/xds.md."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from octoproxy import model as M
from octoproxy.controlplane import ControlPlane
from octoproxy.xds import XdsClient
from octoproxy.xds.shunting import GLOBAL_RESOURCE, rules_to_route_config

from xds_double import TRDS, AdsDouble, Behaviour
from xds_helpers import Sink, run, until

pytestmark = pytest.mark.timeout(60)
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


def mod_rule(name: str, group: str, rem: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "match": [
            {"source": "context", "key": "userId", "op": "mod", "modulus": 100, "remainders": [rem]}
        ],
        "group": group,
    }


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)


def world(a_rules: list[dict[str, Any]], g_rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "services": [
            {
                "appkey": "app.a",
                "endpoints": [
                    {"address": "10.0.0.1:9000"},
                    {"address": "10.0.0.2:9000", "group": "gray"},
                ],
                "shunting": a_rules,
            },
            {"appkey": "app.b", "endpoints": [{"address": "10.0.0.3:9000"}]},
        ],
        "shunting": g_rules,
    }


@MODES
def test_bundled_control_plane_file_changes(tmp_path: Path, delta: bool) -> None:
    path = tmp_path / "endpoints.yaml"
    write(path, world([mod_rule("gray-users", "gray")], [mod_rule("global-1", "canary", 2)]))

    async def main() -> None:
        cp = ControlPlane(str(path), port=0, poll_s=0.02)
        await cp.start()
        sink = Sink()
        c = XdsClient(f"127.0.0.1:{cp.port}", sink, node_id="p", delta=delta,
                      backoff_base_s=0.05)  # fmt: skip
        c.start()
        try:
            c.subscribe(["app.a"])
            await until(lambda: sink.names("app.a") == ["gray-users"], what="app.a rules")
            await until(lambda: sink.names(M.SHUNT_GLOBAL) == ["global-1"], what="global rules")
            assert [e.group for e in sink.services["app.a"].endpoints] == ["", "gray"]
            r = sink.rules["app.a"][0]
            assert (r.group, r.matches[0].modulus, r.matches[0].remainders) == ("gray", 100, (1,))
            # app.b has no rules: nothing pushed for it
            c.subscribe(["app.b"])
            await until(lambda: "app.b" in sink.services, what="app.b")
            assert "app.b" not in sink.rules
            # a rule changed in the file reaches the sink
            write(
                path,
                world([mod_rule("gray-users-2", "gray", 3)], [mod_rule("global-1", "canary", 2)]),
            )
            await until(lambda: sink.names("app.a") == ["gray-users-2"], what="changed rule")
            # a bad rule: the file is rejected, the proxy keeps the last rules
            nacks = c.stats.nacks
            bad = world([{"name": "x", "group": "g", "colour": "red"}], [])
            write(path, bad)
            await until(lambda: cp.store.errors > 0, what="file rejected")
            assert sink.names("app.a") == ["gray-users-2"] and c.stats.nacks == nacks
            # rules removed from the file: an empty RouteConfiguration, SotW too
            write(path, world([], [mod_rule("global-1", "canary", 2)]))
            await until(lambda: "app.a" not in sink.rules, what="rules removed")
            assert sink.names(M.SHUNT_GLOBAL) == ["global-1"]
            assert c.versions()["TRDS"]
            d = c.dump()["shunting"]
            assert set(d) == {"app.a", "app.b", GLOBAL_RESOURCE}
            assert d[GLOBAL_RESOURCE]["rules"] == ["global-1"]
            # unsubscribing drops the scope's rules; the last one drops the global ones
            c.unsubscribe(["app.a", "app.b"])
            assert sink.rules == {}
            assert c.stats.nacks == 0 and not cp.ads.nacks
        finally:
            await c.stop()
            await cp.stop()

    run(main())


async def with_double(
    b: Behaviour, delta: bool, fn: Callable[[AdsDouble, XdsClient, Sink], Awaitable[None]]
) -> None:
    d = AdsDouble(b)
    await d.start()
    sink = Sink()
    c = XdsClient(d.target, sink, node_id="p", delta=delta, backoff_base_s=0.05)
    c.start()
    try:
        await fn(d, c, sink)
        assert d.violations == []
    finally:
        await c.stop()
        await d.stop()


def svc(appkey: str) -> M.Service:
    return M.Service(appkey, (M.Endpoint("10.9.0.1", 1), M.Endpoint("10.9.0.2", 2, group="g")))


R1 = (M.ShuntRule("r1", (M.ShuntMatch(M.SRC_METHOD, M.OP_EQ, values=("m",)),), group="g"),)
R2 = (M.ShuntRule("r2", (), group="g", on_no_node=M.NO_NODE_REJECT),)


@MODES
def test_double_routes_before_clusters_and_same_version_resent(delta: bool) -> None:
    """Rules that come before their cluster are applied at once (they are
    their own resource); a SotW server resending the whole type under the
    same version costs nothing and is ACKed."""

    async def body(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put_routes("a", R1)
        d.put_routes(M.SHUNT_GLOBAL, R2)
        d.put(svc("a"))
        c.subscribe(["a"])
        await until(lambda: "a" in sink.rules and M.SHUNT_GLOBAL in sink.rules, what="rules")
        assert "a" not in sink.services  # the cluster is held back by the double
        await until(lambda: "a" in sink.services, what="cluster")
        assert sink.rules == {"a": R1, M.SHUNT_GLOBAL: R2}
        calls = len(sink.rule_calls)
        acks = c.stats.acks
        for _ in range(3):
            d.put(svc("a"))  # SotW: pushes every type, TRDS resent unchanged
        if not delta:
            await until(lambda: c.stats.acks >= acks + 3, what="ACKs of the resends")
        assert len(sink.rule_calls) == calls  # nothing pushed again
        assert c.stats.nacks == 0
        # a rule change after all that
        d.put_routes("a", R2)
        await until(lambda: sink.rules.get("a") == R2, what="changed rules")
        if not delta:
            trds = [r for _, r in d.responses if r.type_url == TRDS]
            assert len({r.version_info for r in trds}) < len(trds)  # same version resent

    b = Behaviour(routes_first=True, resend_same_routes=not delta, cds_hold_s=1.0)
    run(with_double(b, delta, body))


@MODES
def test_double_bad_rule_set_is_nacked_whole_and_old_rules_stay(delta: bool) -> None:
    async def body(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a"), svc("b"))
        d.put_routes("a", R1)
        d.put_routes("b", R1)
        c.subscribe(["a", "b"])
        await until(lambda: sink.rules.get("a") == R1 and sink.rules.get("b") == R1, what="rules")
        bad = rules_to_route_config("a", R1 + R2)
        bad.routes[1].match.headers.add(name="k", suffix_match="x")  # not supported
        good_b = rules_to_route_config("b", R2)
        d.put_raw(TRDS, bad, good_b)
        await until(lambda: d.nacks, what="NACK")
        t, msg = d.nacks[-1]
        assert t == TRDS
        assert "RouteConfiguration 'a': routes[1] (rule 'r2'): match.headers[0]" in msg, msg
        assert "suffix_match is not supported" in msg
        await until(lambda: sink.rules.get("b") == R2, what="the good one applied")
        assert sink.rules["a"] == R1  # the old rules stay
        assert "rule 'r2'" in c.dump()["shunting"]["a"]["error"]
        # fixed: applied and ACKed
        d.put_routes("a", R2)
        await until(lambda: sink.rules.get("a") == R2, what="fixed rules")
        assert c.dump()["shunting"]["a"]["error"] == ""

    run(with_double(Behaviour(), delta, body))


def test_double_delta_removal_means_no_rules() -> None:
    async def body(d: AdsDouble, c: XdsClient, sink: Sink) -> None:
        d.put(svc("a"))
        d.put_routes("a", R1)
        d.put_routes(M.SHUNT_GLOBAL, R2)
        c.subscribe(["a"])
        await until(lambda: len(sink.rules) == 2, what="rules")
        d.remove_routes("a")
        await until(lambda: "a" not in sink.rules, what="removal")
        assert sink.rules == {M.SHUNT_GLOBAL: R2} and "a" in sink.services
        removed = [n for _, r in d.responses if r.type_url == TRDS for n in r.removed_resources]
        assert "a" in removed
        # back again
        d.put_routes("a", R1)
        await until(lambda: sink.rules.get("a") == R1, what="rules back")
        assert c.stats.nacks == 0

    run(with_double(Behaviour(), True, body))
