"""Traffic shunting end to end (issue 16, docs/shunting.md): app -> client
proxy (rules from its config) -> server proxy -> labelled provider apps.
Each answer names the provider node that handled it, so the counts per node
are taken at the providers."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import urllib.request
from typing import Any

import pytest
import uvloop

from octoproxy._core.frame import thrift_call
from octoproxy.process import pid_alive, read_pid_file
from octoproxy.sdk import AsyncClient, Client, Context
from octoproxy.shunting import percent_bucket

from harness import Cluster, client_proxy_cfg, cluster, free_port, stat_value, wait_for

NODES: dict[str, dict[str, str]] = {
    "d1": {},
    "d2": {},
    "g1": {"group": "gray"},
    "g2": {"group": "gray"},
    "sa": {"cell": "set-a"},
    "sb": {"cell": "set-b"},
}


def uid_mod(n: int, *rems: int) -> dict[str, Any]:
    return {"source": "context", "key": "uid", "op": "mod", "modulus": n, "remainders": list(rems)}


SHUNTING = {
    "services": {
        "com.shunt.mod": [{"name": "mod-gray", "match": [uid_mod(100, 1)], "group": "gray"}],
        "com.shunt.pct": [
            {"name": "pct-gray", "group": "gray",
             "match": [{"source": "context", "key": "uid", "op": "percent", "percent": 20}]},
        ],
        "com.shunt.unit": [
            {"name": "loc-unit", "target": "octo-set", "source_key": "loc",
             "unit_table": {"bj": "set-a", "sh": "set-b"}},
        ],
        "com.shunt.lite": [
            {"name": "lite-gray", "target": "octo-liteset", "value": "gray-lite",
             "match": [{"source": "context", "key": "lite", "op": "eq", "value": "1"}]},
        ],
        "com.shunt.nonode": [
            {"name": "to-canary-fb", "group": "canary", "on_no_node": "fallback",
             "match": [{"source": "method", "op": "eq", "value": "fb"}]},
            {"name": "to-canary-rej", "group": "canary", "on_no_node": "reject",
             "match": [{"source": "method", "op": "eq", "value": "rej"}]},
        ],
    },
}


@pytest.fixture(scope="module")
def mesh():
    with cluster() as c:
        ports = c.provider_nodes(NODES)
        eps = {n: {"address": f"127.0.0.1:{ports[n]}", **NODES[n]} for n in NODES}
        both = [eps[n] for n in ("d1", "d2", "g1", "g2")]
        services = [
            {"appkey": "com.shunt.mod", "endpoints": both},
            {"appkey": "com.shunt.pct", "endpoints": both},
            {"appkey": "com.shunt.unit", "set_enabled": True,
             "endpoints": [eps["d1"], eps["sa"], eps["sb"]]},
            {"appkey": "com.shunt.nonode", "endpoints": [eps["d1"], eps["g1"]]},
            {"appkey": "com.shunt.lite", "endpoints": [eps["d1"]]},
        ]
        admin = free_port()
        c.proxy("client", client_proxy_cfg(c.path("px.sock"), services,
                                           shunting=SHUNTING, admin={"port": admin},
                                           logging={"access_log": True},
                                           upstream={"default_timeout_ms": 5000},
                                           # room for a header the label cannot fit in
                                           limits={"max_local_context_bytes": 70000},
                                           hot_restart={"socket": c.path("client.hr"),
                                                        "pid_file": c.path("client.pid"),
                                                        "drain_s": 1.0, "shutdown_s": 5.0}))
        c.admin = admin  # type: ignore[attr-defined]
        yield c


def who(body: bytes) -> str:
    return body.split(b"|", 1)[0].decode()


def per_user(c: Cluster, appkey: str, uids: list[int]) -> dict[int, str]:
    """uid -> the provider node that answered its request (pipelined, in batches)."""

    async def go() -> dict[int, str]:
        out: dict[int, str] = {}
        cl = AsyncClient(c.path("px.sock"), default_timeout_ms=10000)
        try:
            for i in range(0, len(uids), 500):
                batch = uids[i:i + 500]
                rs = await asyncio.gather(*(
                    cl.call("m", b"echo:x", appkey=appkey,
                            context=Context(global_extra={"uid": str(u)}))
                    for u in batch))
                out.update({u: who(r.body) for u, r in zip(batch, rs, strict=True)})
        finally:
            await cl.close()
        return out

    return uvloop.run(go())


def admin_json(c: Cluster, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.admin}{path}", timeout=5) as r:  # type: ignore[attr-defined]
        return json.load(r)


def test_modulo_rule_sends_exactly_the_matching_users_to_the_group(mesh: Cluster) -> None:
    uids = list(range(1000))
    got = per_user(mesh, "com.shunt.mod", uids)
    gray = {u for u, n in got.items() if n in ("g1", "g2")}
    assert gray == {u for u in uids if u % 100 == 1}  # exactly uid % 100 == 1
    counts = collections.Counter(got.values())
    assert counts["g1"] + counts["g2"] == 10 and counts["g1"] > 0 and counts["g2"] > 0
    assert counts["d1"] + counts["d2"] == 990
    # visible in /clusters: the group, and the rule's hits
    cl = admin_json(mesh, "/clusters")
    svc = cl["services"]["com.shunt.mod"]
    assert svc["groups"] == ["gray"]
    assert {n["group"] for n in svc["nodes"]} == {"", "gray"}
    rule = next(r for r in svc["shunting"] if r["name"] == "mod-gray")
    assert rule["hits"] >= 10 and rule["rule"]["group"] == "gray"
    dump = admin_json(mesh, "/config_dump")
    assert any(r["name"] == "mod-gray" for r in dump["shunting"])
    # the config as written (the global rules under `global`)
    assert dump["config"]["shunting"]["services"]["com.shunt.mod"][0]["name"] == "mod-gray"
    assert dump["config"]["shunting"]["global"] == []
    # the access log names the rule
    wait_for(lambda: "rule=com.shunt.mod/mod-gray" in mesh.procs[-1].log(), 10,
             "an access-log line naming the rule")


def test_percentage_rule_share_and_stickiness(mesh: Cluster) -> None:
    uids = list(range(10000))
    got = per_user(mesh, "com.shunt.pct", uids)
    gray = {u for u, n in got.items() if n in ("g1", "g2")}
    share = len(gray) / len(uids)
    assert abs(share - 0.20) <= 0.02, share
    # the documented hash decides, so the same user always lands the same way
    assert gray == {u for u in uids if percent_bucket(str(u).encode()) < 2000}
    again = per_user(mesh, "com.shunt.pct", uids[:2000])
    assert {u for u, n in again.items() if n in ("g1", "g2")} == {u for u in gray if u < 2000}


def test_unit_table_maps_location_to_set_nodes(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        def to(loc: str | None) -> set[str]:
            ctx = Context(local_extra={"loc": loc} if loc is not None else {})
            rs = cl.call_many([("m", b"echo:x")] * 20, appkey="com.shunt.unit", context=ctx)
            return {who(r.body) for r in rs}

        assert to("bj") == {"sa"}
        assert to("sh") == {"sb"}
        assert to("gz") == {"d1"}  # not in the table: no match, the center
        assert to(None) == {"d1"}


def gctx_at_provider(cl: Client, appkey: str, ctx: Context) -> tuple[str, list[list[str]]]:
    """(the provider node, the request's globalContext entries as it received them)."""
    r = cl.call("m", b"gctx", appkey=appkey, context=ctx)
    node, _, entries = r.body.partition(b"|")
    return node.decode(), json.loads(entries)


def test_unit_table_label_reaches_the_provider(mesh: Cluster) -> None:
    # issue 16: the mapping "adds that label to the request", so the provider
    # (and every hop after it) sees the Set the rule chose
    with Client(mesh.path("px.sock")) as cl:
        node, g = gctx_at_provider(cl, "com.shunt.unit",
                                   Context(local_extra={"loc": "bj"}, global_extra={"uid": "9"}))
        assert (node, g) == ("sa", [["uid", "9"], ["octo-set", "set-a"]])
        node, g = gctx_at_provider(cl, "com.shunt.unit", Context(local_extra={"loc": "sh"}))
        assert (node, g) == ("sb", [["octo-set", "set-b"]])
        # a request that carried another Set: rewritten in place, one entry
        node, g = gctx_at_provider(cl, "com.shunt.unit",
                                   Context(set="set-b", global_extra={"uid": "9"},
                                           local_extra={"loc": "bj"}))
        assert (node, g) == ("sa", [["uid", "9"], ["octo-set", "set-a"]])
        # no rule matched: forwarded as it came
        node, g = gctx_at_provider(cl, "com.shunt.unit",
                                   Context(global_extra={"uid": "9"}, local_extra={"loc": "gz"}))
        assert (node, g) == ("d1", [["uid", "9"]])
        node, g = gctx_at_provider(cl, "com.shunt.unit", Context(local_extra={"loc": "gz"}))
        assert (node, g) == ("d1", [])
        # the core's own reader at the provider agrees
        r = cl.call("m", b"ctx", appkey="com.shunt.unit",
                    context=Context(set="set-b", local_extra={"loc": "bj"}))
        assert r.body == b"sa|None/set-a/None/None"


def test_label_that_does_not_fit_is_counted(mesh: Cluster) -> None:
    # a header the label would take past 65,535 bytes: routed by the label
    # all the same, forwarded as it came, and counted (no silent fallback)
    def unwritten() -> float:
        return stat_value(mesh.admin, "octo_proxy_shunt_label_unwritten_total")  # type: ignore[attr-defined]

    before = unwritten()
    with Client(mesh.path("px.sock")) as cl:
        # the largest pad whose header still encodes (within 4 bytes of the limit)
        for pad in range(65440, 65000, -4):
            try:
                node, g = gctx_at_provider(cl, "com.shunt.unit",
                                           Context(local_extra={"loc": "bj", "pad": "x" * pad}))
                break
            except ValueError:  # the SDK refuses a header over 65,535 bytes
                continue
        assert (node, g) == ("sa", [])
        node, g = gctx_at_provider(cl, "com.shunt.unit", Context(local_extra={"loc": "bj"}))
        assert (node, g) == ("sa", [["octo-set", "set-a"]])
    assert unwritten() == before + 1


def test_constant_liteset_label_reaches_the_provider(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        node, g = gctx_at_provider(cl, "com.shunt.lite",
                                   Context(liteset="old", global_extra={"lite": "1"}))
        assert (node, g) == ("d1", [["lite", "1"], ["octo-liteset", "gray-lite"]])
        node, g = gctx_at_provider(cl, "com.shunt.lite", Context(global_extra={"lite": "1"}))
        assert (node, g) == ("d1", [["lite", "1"], ["octo-liteset", "gray-lite"]])
        node, g = gctx_at_provider(cl, "com.shunt.lite", Context(global_extra={"lite": "0"}))
        assert (node, g) == ("d1", [["lite", "0"]])


def test_group_without_node_falls_back_or_answers_8(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        # the rules match the Thrift method name in the body
        r = cl.call("Svc", thrift_call("fb", 1, b"echo:x"), appkey="com.shunt.nonode")
        assert who(r.body) == "d1"  # fallback: the default nodes, never the other group
        r = cl.call("Svc", thrift_call("rej", 1, b"echo:x"), appkey="com.shunt.nonode",
                    raise_on_error=False)
        assert r.status == 8
        assert "'to-canary-rej'" in (r.message or "") and "'canary'" in (r.message or "")
        r = cl.call("Svc", thrift_call("other", 1, b"echo:x"), appkey="com.shunt.nonode")
        assert who(r.body) == "d1"  # no rule matched: default nodes only (g1 is isolated)
    rules = {r["name"]: r for r in admin_json(mesh, "/clusters")["shunting"]}
    assert rules["to-canary-fb"]["fallbacks"] >= 1
    assert rules["to-canary-rej"]["rejects"] >= 1


def test_hot_restart_keeps_rules_and_counts(mesh: Cluster) -> None:
    # last in this module: it replaces the client-side proxy
    def hits() -> int:
        rules = admin_json(mesh, "/clusters")["shunting"]
        return next(r["hits"] for r in rules if r["name"] == "mod-gray")

    per_user(mesh, "com.shunt.mod", [1, 101, 201])
    before = hits()
    assert before >= 3
    pidf = mesh.path("client.pid")
    old = read_pid_file(pidf)
    assert old and pid_alive(old)
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: (p := read_pid_file(pidf)) not in (None, old) and pid_alive(p), 20,
             "a new generation of the client-side proxy")
    wait_for(lambda: not pid_alive(old), 20, "the old generation to exit")

    def admin_up() -> bool:
        try:
            return bool(admin_json(mesh, "/clusters"))
        except OSError:
            return False

    wait_for(admin_up, 20, "the new generation's admin")
    assert hits() >= before  # the counts continue
    got = per_user(mesh, "com.shunt.mod", [1, 2])
    assert got[1] in ("g1", "g2") and got[2] in ("d1", "d2")
    assert hits() >= before + 1
