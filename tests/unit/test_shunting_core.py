"""Traffic shunting in the core (route.pyx, rt_route_req) against the
pure-Python reference router (tests/reference/router.py): examples, then a
property test on random rule sets and requests.  docs/shunting.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octoproxy import model
from octoproxy._core import route as R
from octoproxy._core.frame import encode_frame, encode_header, thrift_call
from octoproxy.model import Endpoint, Labels, Service
from octoproxy.model import ShuntMatch as M
from octoproxy.model import ShuntRule as Rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import router as ref


def frame_of(rq: ref.Request) -> bytes:
    """The request a caller's app would send for a reference Request."""
    lctx = dict(rq.lctx)
    if rq.appkey is not None:
        lctx["octo-remote-appkey"] = rq.appkey
    body = thrift_call(rq.method, 1) if rq.method is not None else b""
    trace = {"clientAppkey": rq.caller} if rq.caller is not None else None
    ri: dict = {"sequenceId": 7, "callType": 0, "timeout": 0}
    if rq.service_name is not None:
        ri["serviceName"] = rq.service_name
    h = {
        "messageType": 0,
        "requestInfo": ri,
        "traceInfo": trace,
        "globalContext": dict(rq.gctx) or None,
        "localContext": lctx or None,
    }
    return encode_frame(encode_header(h), body)


def table_of(labels: Labels, services: list[Service], rules: dict) -> R.RouteTable:
    t = R.RouteTable(labels, seed=1)
    t.replace_all(services)
    for scope, rs in rules.items():
        t.update_shunting(scope, rs)
    return t


def core_outcome(t: R.RouteTable, rq: ref.Request, n: int, scan_keys: bool = True) -> tuple:
    """(sorted addresses over n picks, rule name, error code); scan_keys:
    the context values as the outbound scan picks them out, or (False) as
    the rules' own walk over the maps finds them."""
    f = frame_of(rq)
    seen, rule = set(), None
    try:
        for _ in range(max(n, 1)):
            nd, rule = t.route_frame(f, scan_keys)
            seen.add(nd.address)
    except R.RouteError as e:
        return None, e.rule, e.code
    return sorted(seen), rule, 0


def ref_outcome(r: ref.ReferenceRouter, rq: ref.Request) -> tuple:
    try:
        o = r.route_request(rq)
    except ref.RefError as e:
        return None, e.rule, e.code, 0
    return sorted(e.address for e in o.candidates), o.rule, 0, len(o.candidates)


def check(labels, services, rules, rq) -> tuple:
    r = ref.ReferenceRouter(labels, services, rules)
    t = table_of(labels, services, rules)
    want, rule, code, n = ref_outcome(r, rq)
    got = core_outcome(t, rq, n)
    assert got == (want, rule, code), (got, (want, rule, code))
    # the same through the rules' own walk over the maps (a request scanned
    # without the table's keys, or keys beyond FR_WANT)
    t2 = table_of(labels, services, rules)
    walked = core_outcome(t2, rq, n, scan_keys=False)
    assert walked == (want, rule, code), (walked, (want, rule, code))
    return got


EPS = (
    Endpoint("10.0.0.1", 1),
    Endpoint("10.0.0.2", 1),
    Endpoint("10.0.1.1", 1, group="g"),
    Endpoint("10.0.1.2", 1, group="g"),
    Endpoint("10.0.2.1", 1, cell="set-a"),
    Endpoint("10.0.2.2", 1, cell="set-b"),
    Endpoint("10.0.3.1", 1, group="g", cell="set-a"),
)
SVC = Service("svc", EPS, set_enabled=True, service_names=("Svc",))
L = Labels()


def test_default_routing_never_reaches_grouped_nodes() -> None:
    got, rule, code = check(L, [SVC], {}, ref.Request(appkey="svc"))
    assert got == ["10.0.0.1:1", "10.0.0.2:1"] and rule is None and code == 0
    t = table_of(L, [SVC], {})
    assert t.groups("svc") == ["g"]
    assert {n.group for n in t.nodes("svc")} == {"", "g"}


def test_modulo_rule_sends_matching_users_to_the_group() -> None:
    rules = {
        "svc": (
            Rule(
                "gray", (M("context", "mod", key="uid", modulus=100, remainders=(1,)),), group="g"
            ),
        )
    }
    for uid, want in (("1", "g"), ("101", "g"), ("-99", "g"), ("2", ""), ("x1", ""), ("", "")):
        got, rule, _ = check(L, [SVC], rules, ref.Request(appkey="svc", gctx={"uid": uid}))
        if want == "g":
            assert got == ["10.0.1.1:1", "10.0.1.2:1"] and rule == "gray"
        else:
            assert got == ["10.0.0.1:1", "10.0.0.2:1"] and rule is None
    # localContext wins over globalContext for the same key
    got, rule, _ = check(
        L, [SVC], rules, ref.Request(appkey="svc", gctx={"uid": "1"}, lctx={"uid": "2"})
    )
    assert rule is None


def test_match_on_service_method_caller_and_order() -> None:
    rules = {
        "svc": (
            Rule(
                "m",
                (M("method", "eq", values=("echo",)), M("caller", "prefix", values=("c.",))),
                group="g",
            ),
        ),
        model.SHUNT_GLOBAL: (
            Rule("all", (M("service", "in", values=("Svc", "Other")),), group="nope"),
        ),
    }
    got, rule, _ = check(
        L, [SVC], rules, ref.Request(appkey="svc", service_name="Svc", method="echo", caller="c.x")
    )
    assert rule == "m"
    # provider rules first; the global one matches next (group without nodes: fallback)
    got, rule, _ = check(
        L, [SVC], rules, ref.Request(appkey="svc", service_name="Svc", method="other", caller="c.x")
    )
    assert rule == "all" and got == ["10.0.0.1:1", "10.0.0.2:1"]
    t = table_of(L, [SVC], rules)
    t.route_frame(frame_of(ref.Request(appkey="svc", service_name="Svc", method="x")))
    st_ = {s["name"]: s for s in t.shunting_stats()}
    assert st_["all"]["hits"] == 1 and st_["all"]["fallbacks"] == 1 and st_["m"]["hits"] == 0


def test_group_without_node_rejects_naming_the_rule() -> None:
    rules = {"svc": (Rule("r", (M("caller", "present"),), group="g", on_no_node="reject"),)}
    # a Set caller: group g has a node in set-a, none in set-b
    got, rule, code = check(
        L, [SVC], rules, ref.Request(appkey="svc", caller="c", gctx={"octo-set": "set-a"})
    )
    assert got == ["10.0.3.1:1"]
    got, rule, code = check(
        L, [SVC], rules, ref.Request(appkey="svc", caller="c", gctx={"octo-set": "set-b"})
    )
    assert code == R.RT_SHUNT_NO_NODE and rule == "r"
    t = table_of(L, [SVC], rules)
    with pytest.raises(R.RouteError, match="rule 'r' sends this request to node group 'g'"):
        t.route_frame(frame_of(ref.Request(appkey="svc", caller="c", gctx={"octo-set": "set-b"})))
    assert t.shunting_stats()[0]["rejects"] == 1


def test_unit_table_maps_location_to_set() -> None:
    rules = {
        model.SHUNT_GLOBAL: (
            Rule(
                "unit",
                action="context",
                target="octo-set",
                source_key="loc",
                unit_table=(("bj", "set-a"), ("sh", "set-b")),
            ),
        )
    }
    for loc, want in (
        ("bj", ["10.0.2.1:1"]),
        ("sh", ["10.0.2.2:1"]),
        ("gz", ["10.0.0.1:1", "10.0.0.2:1"]),
    ):
        got, rule, _ = check(L, [SVC], rules, ref.Request(appkey="svc", lctx={"loc": loc}))
        assert got == want
        assert rule == ("unit" if loc != "gz" else None)


def test_percent_is_sticky_and_close_to_target() -> None:
    rules = {"svc": (Rule("p", (M("context", "percent", key="uid", percent=30),), group="g"),)}
    t = table_of(L, [SVC], rules)
    hits = 0
    for uid in range(4000):
        f = frame_of(ref.Request(appkey="svc", gctx={"uid": str(uid)}))
        a = t.route_frame(f)[1]
        assert t.route_frame(f)[1] == a  # the same user always lands the same way
        hits += a == "p"
    assert abs(hits / 4000 - 0.30) < 0.03


def test_rule_update_swaps_atomically_and_keeps_counts() -> None:
    rules = (Rule("a", (M("caller", "eq", values=("c",)),), group="g"),)
    t = table_of(L, [SVC], {"svc": rules})
    f = frame_of(ref.Request(appkey="svc", caller="c"))
    t.route_frame(f)
    v = t.version
    t.update_shunting("svc", rules)  # unchanged: no rebuild
    assert t.version == v
    t.update_shunting("svc", (*rules, Rule("b", group="g")))
    assert t.version == v + 1 and t.shunting_stats()[0]["hits"] == 1
    t.update_shunting("svc", ())
    assert t.route_frame(f)[1] is None
    # rules for a service that arrives later apply when it does
    t2 = R.RouteTable(L)
    t2.update_shunting("svc", rules)
    t2.update_service(SVC)
    assert t2.route_frame(f)[1] == "a"


# ----------------------------------------------------------- property test

KEYS = ["uid", "loc", "octo-set"]
VALS = ["", "0", "1", "7", "-3", "+7", "42", "100", "bj", "sh", "x1", "set-a", "set-b", "é"]


@st.composite
def matches(draw):
    if draw(st.integers(0, 9)) == 0:
        # random: only 0% and 100% are deterministic (the core folds both at
        # compile time: 0% never matches, 100% always does, no draw)
        return M("random", "percent", percent=draw(st.sampled_from([0, 100])))
    src = draw(st.sampled_from(["service", "method", "caller", "context"]))
    op = draw(st.sampled_from(["eq", "in", "prefix", "present", "range", "mod", "percent"]))
    key = draw(st.sampled_from(KEYS)) if src == "context" else ""
    kw: dict = {}
    if op in ("eq", "prefix"):
        kw["values"] = (draw(st.sampled_from([*VALS, "s", "m", "Sv"])),)
    elif op == "in":
        kw["values"] = tuple(draw(st.lists(st.sampled_from(VALS), min_size=1, max_size=3)))
    elif op == "range":
        lo = draw(st.integers(-10, 100))
        kw.update(lo=lo, hi=lo + draw(st.integers(1, 50)))
    elif op == "mod":
        mod = draw(st.integers(1, 10))
        kw.update(modulus=mod, remainders=tuple(draw(st.sets(st.integers(0, mod - 1), min_size=1))))
    elif op == "percent":
        kw["percent"] = draw(st.sampled_from([0, 0.01, 12.5, 50, 99.99, 100]))
    return M(src, op, key=key, **kw)


@st.composite
def rule_sets(draw, prefix):
    out = []
    for i in range(draw(st.integers(0, 4))):
        ms = tuple(draw(st.lists(matches(), max_size=3)))
        if draw(st.integers(0, 3)) == 0:
            if draw(st.booleans()):
                out.append(
                    Rule(
                        f"{prefix}{i}",
                        ms,
                        action="context",
                        target=draw(st.sampled_from(["octo-set", "octo-liteset", "octo-swimlane"])),
                        value=draw(st.sampled_from(["set-a", "set-b", "", "w1"])),
                    )
                )
            else:
                out.append(
                    Rule(
                        f"{prefix}{i}",
                        ms,
                        action="context",
                        target="octo-set",
                        source_key=draw(st.sampled_from(KEYS)),
                        unit_table=(("bj", "set-a"), ("sh", "set-b"), ("1", "zz")),
                    )
                )
        elif draw(st.integers(0, 4)) == 0:
            out.append(Rule(f"{prefix}{i}", ms, action="default"))
        else:
            out.append(
                Rule(
                    f"{prefix}{i}",
                    ms,
                    group=draw(st.sampled_from(["g", "h", "none"])),
                    on_no_node=draw(st.sampled_from(["fallback", "reject"])),
                )
            )
    return tuple(out)


@st.composite
def grouped_services(draw):
    eps = []
    for i in range(draw(st.integers(0, 10))):
        eps.append(
            Endpoint(
                f"10.1.0.{i}",
                1,
                status=draw(st.sampled_from([2, 2, 2, 0])),
                cell=draw(st.sampled_from(["", "", "set-a", "set-b"])),
                swimlane=draw(st.sampled_from(["", "", "w1"])),
                group=draw(st.sampled_from(["", "", "g", "h"])),
            )
        )
    return [Service("svc", tuple(eps), set_enabled=draw(st.booleans()), service_names=("Svc",))]


OPT = st.one_of(st.none(), st.sampled_from([*VALS, "Svc", "m", "Sv"]))
CTXD = st.dictionaries(
    st.sampled_from([*KEYS, "octo-swimlane", "octo-liteset"]),
    st.sampled_from([*VALS, "w1"]),
    max_size=3,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    services=grouped_services(),
    own=rule_sets("p"),
    glob=rule_sets("g"),
    service_name=OPT,
    method=OPT,
    caller=OPT,
    gctx=CTXD,
    lctx=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALS), max_size=2),
    by_name=st.booleans(),
)
def test_core_equals_reference(
    services, own, glob, service_name, method, caller, gctx, lctx, by_name
) -> None:
    rules = {k: v for k, v in (("svc", own), (model.SHUNT_GLOBAL, glob)) if v}
    if by_name:
        rq = ref.Request(service_name="Svc", method=method, caller=caller, gctx=gctx, lctx=lctx)
    else:
        rq = ref.Request(
            appkey="svc",
            service_name=service_name,
            method=method,
            caller=caller,
            gctx=gctx,
            lctx=lctx,
        )
    if rq.method == "":
        rq.method = None  # an empty Thrift name reads as no method (docs/shunting.md)
    check(L, services, rules, rq)


def test_more_context_keys_than_the_one_pass_table() -> None:
    # 28 keys are looked up in one pass; a 29th and later alone: same answers
    keys = [f"k{i}" for i in range(40)]
    rules = {
        "svc": tuple(
            Rule(f"r{i}", (M("context", "mod", key=k, modulus=10, remainders=(3,)),), group="g")
            for i, k in enumerate(keys)
        )
    }
    for hit in (0, 27, 28, 39):
        rq = ref.Request(appkey="svc", gctx={keys[hit]: "13", "k1": "x"}, lctx={keys[-1]: "5"})
        if hit == 39:
            rq = ref.Request(appkey="svc", lctx={keys[39]: "23"})
        _, rule, _ = check(L, [SVC], rules, rq)
        assert rule == f"r{hit}"
    # every op on a key looked up alone, and a unit table reading one
    alone = keys[35]
    ops = [
        M("context", "eq", key=alone, values=("42",)),
        M("context", "in", key=alone, values=("x", "42")),
        M("context", "prefix", key=alone, values=("4",)),
        M("context", "present", key=alone),
        M("context", "range", key=alone, lo=40, hi=43),
        M("context", "percent", key=alone, percent=100),
        M("context", "percent", key=alone, percent=0),
    ]
    for m in ops:
        rs = {"svc": (*rules["svc"][:35], Rule("t", (m,), group="g"))}
        for v in ("42", "", "x"):
            check(L, [SVC], rs, ref.Request(appkey="svc", gctx={alone: v}))
        check(L, [SVC], rs, ref.Request(appkey="svc"))
    unit = Rule(
        "u", action="context", target="octo-set", source_key=alone, unit_table=(("42", "set-a"),)
    )
    rs = {"svc": (*rules["svc"][:35], unit)}
    for g in ({alone: "42"}, {alone: "7"}, {}):
        check(L, [SVC], rs, ref.Request(appkey="svc", gctx=g))


def test_more_conditions_than_the_grouped_mask() -> None:
    # up to 64 conditions are evaluated by op into one mask before the rules;
    # past that each rule tests its own in order: the same answers
    for n in (64, 65, 90):
        rules = {
            "svc": tuple(
                Rule(
                    f"r{i}",
                    (
                        M("context", "present", key="uid"),
                        M("context", "mod", key="uid", modulus=100, remainders=(i,)),
                    )[: 1 + (i < n - 45)],
                    group="g",
                )
                for i in range(45)
            )
        }
        assert sum(len(r.matches) for r in rules["svc"]) == n
        for uid in ("0", "7", "44", "45", "x", ""):
            check(L, [SVC], rules, ref.Request(appkey="svc", gctx={"uid": uid}))
        check(L, [SVC], rules, ref.Request(appkey="svc"))
