"""Route table micro benchmarks (pytest-benchmark).

lookup + pick is measured inside the core, the way the data path calls
rt_route: `bench_route` loops it N times in C, so each round's time / N is
the cost of one lookup + pick (ns figures are in `extra_info`).

Goals: <= 100 ns round robin, <= 150 ns least request; full build of
1,000 services x 100 nodes <= 200 ms; one-service update rebuilds one service.
"""

import pytest

from octoproxy._core import route as R
from octoproxy.model import Endpoint, Labels, LbPolicy, Service

N_ITER = 200_000
APPKEY = "com.example.bench.service"


def make_service(appkey, n, policy, varied=True, host_prefix="10.1"):
    return Service(
        appkey,
        tuple(
            Endpoint(
                f"{host_prefix}.{i // 250}.{i % 250}",
                9000,
                weight=(50 + (i * 37) % 100) if varied else 100,
            )
            for i in range(n)
        ),
        lb_policy=policy,
        service_names=(appkey + ".Iface",),
    )


def many_services(n_services=1000, n_nodes=100):
    return [
        make_service(
            f"com.example.app{s:04d}",
            n_nodes,
            LbPolicy.ROUND_ROBIN,
            varied=False,
            host_prefix=f"10.{s % 250}",
        )
        for s in range(n_services)
    ]


@pytest.mark.parametrize("nodes", [10, 100, 1000])
@pytest.mark.parametrize("policy", list(LbPolicy))
def test_lookup_and_pick(benchmark, policy, nodes):
    t = R.RouteTable(Labels(idc="", region=""), seed=1)
    # a table with other services around, so the index is not trivially small
    t.replace_all(
        [make_service(f"com.example.other{i}", 3, policy) for i in range(200)]
        + [make_service(APPKEY, nodes, policy)]
    )
    key = APPKEY.encode()
    hk = b"user-42" if policy == LbPolicy.CONSISTENT_HASH else None
    R.bench_route(t, key, 1000, hk)  # warm (CH: the ring is built on first use)
    ok = benchmark(R.bench_route, t, key, N_ITER, hk)
    assert ok == N_ITER
    ns = benchmark.stats.stats.min / N_ITER * 1e9  # best round: least disturbed by neighbours
    benchmark.extra_info["ns_per_lookup_pick"] = round(ns, 1)
    benchmark.extra_info["ns_per_lookup_pick_mean"] = round(
        benchmark.stats.stats.mean / N_ITER * 1e9, 1
    )
    # goals (RR <= 100 ns, LR <= 150 ns) are read off the report, never asserted:
    # a benchmark on a shared host measures, it does not pass or fail
    benchmark.extra_info["goal_ns"] = {LbPolicy.ROUND_ROBIN: 100, LbPolicy.LEAST_REQUEST: 150}.get(
        policy
    )


@pytest.mark.parametrize("ctx", ["own_labels", "context_labels"])
def test_lookup_and_pick_with_cells_and_lanes(benchmark, ctx):
    # own labels: the precomputed default; context labels present: two more
    # hashes and probes (cell, lane)
    svc = Service(
        APPKEY,
        tuple(
            Endpoint(
                f"10.2.0.{i}",
                9000,
                cell="gray" if i % 2 else "",
                swimlane="lane-7" if i % 3 == 0 else "",
            )
            for i in range(100)
        ),
    )
    t = R.RouteTable(Labels(liteset="gray", swimlane="lane-7"), seed=1)
    t.replace_all([svc])
    kw = {}
    if ctx == "context_labels":
        kw = {"liteset": b"gray", "set_": b"", "swimlane": b"lane-7"}
    ok = benchmark(R.bench_route, t, APPKEY.encode(), N_ITER, **kw)
    assert ok == N_ITER
    benchmark.extra_info["ns_per_lookup_pick"] = round(benchmark.stats.stats.min / N_ITER * 1e9, 1)


def test_full_build_1000x100(benchmark):
    services = many_services()
    t = R.RouteTable(Labels(idc="i1", region="r1"), seed=1)

    def build():
        # a fresh table each round: no Node reuse, the worst case
        fresh = R.RouteTable(Labels(idc="i1", region="r1"), seed=1)
        fresh.replace_all(services)
        return fresh

    benchmark.pedantic(build, rounds=5, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.min * 1e3, 1)
    benchmark.extra_info["goal_ms"] = 200  # reported, not asserted (see above)
    t.replace_all(services)
    assert len(t.appkeys()) == 1000


def test_full_rebuild_1000x100_reusing_nodes(benchmark):
    services = many_services()
    t = R.RouteTable(Labels(), seed=1)
    t.replace_all(services)
    benchmark.pedantic(t.replace_all, args=(services,), rounds=5, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.min * 1e3, 1)


def test_one_service_update_in_1000x100(benchmark):
    services = many_services()
    t = R.RouteTable(Labels(), seed=1)
    t.replace_all(services)
    one = make_service("com.example.app0500", 100, LbPolicy.ROUND_ROBIN, host_prefix="10.77")
    benchmark(t.update_service, one)
    builds = t.builds
    t.update_service(one)
    assert t.builds == builds + 1  # only that service was rebuilt
    benchmark.extra_info["us"] = round(benchmark.stats.stats.min * 1e6, 1)


# ------------------------------------------------------- traffic shunting


def _ten_rules(last_matches):
    """10 rules of the kinds users write (docs/shunting.md); the request
    below matches none of the first nine (so all ten are evaluated)."""
    from octoproxy.model import ShuntMatch as M
    from octoproxy.model import ShuntRule as Rule

    rules = [
        Rule("r0", (M("context", "eq", key="region", values=("sh",)),), group="gray"),
        Rule("r1", (M("context", "mod", key="uid", modulus=100, remainders=(1, 2)),), group="gray"),
        Rule("r2", (M("caller", "in", values=("com.a", "com.b", "com.c")),), group="gray"),
        Rule("r3", (M("method", "eq", values=("checkout",)),), group="gray"),
        Rule("r4", (M("context", "prefix", key="device", values=("ios-",)),), group="gray"),
        Rule("r5", (M("context", "range", key="uid", lo=0, hi=1000),), group="gray"),
        Rule("r6", (M("service", "eq", values=("com.other.Iface",)),), group="gray"),
        Rule("r7", (M("context", "percent", key="uid", percent=5),), group="gray"),
        Rule(
            "r8",
            (M("caller", "eq", values=("com.x",)), M("method", "in", values=("a", "b"))),
            group="gray",
        ),
    ]
    last = M("context", "mod", key="uid", modulus=10, remainders=(7,) if last_matches else (8,))
    rules.append(Rule("r9", (last,), group="gray"))
    return tuple(rules)


@pytest.mark.parametrize("rules", ["none", "10_no_match", "10_last_matches"])
@pytest.mark.parametrize("path", ["route", "scan+route"])
def test_lookup_rules_and_pick(benchmark, rules, path):
    """lookup + 10 shunting rules + pick (goal <= 150 ns), against no rules.
    route: rt_route_req over a request scanned once (the rules walk the
    context maps themselves); scan+route: each request scanned with the
    table's context keys, then routed, as an outbound connection does (the
    scan's own cost is in both rows of this path)."""
    from octoproxy._core.frame import encode_request, thrift_call

    nodes = [Endpoint(f"10.2.0.{i}", 9000) for i in range(10)]
    nodes += [Endpoint(f"10.3.0.{i}", 9000, group="gray") for i in range(2)]
    t = R.RouteTable(Labels(), seed=1)
    t.replace_all(
        [make_service(f"com.example.other{i}", 3, LbPolicy.ROUND_ROBIN) for i in range(200)]
        + [Service(APPKEY, tuple(nodes))]
    )
    if rules != "none":
        t.update_shunting(APPKEY, _ten_rules(rules == "10_last_matches"))
    frame = encode_request(
        1,
        APPKEY + ".Iface",
        thrift_call("getUser", 1, b""),
        global_context={"uid": "123457", "region": "bj", "device": "android-14"},
        local_context={"octo-remote-appkey": APPKEY},
        trace_info={"clientAppkey": "com.caller"},
    )
    fn = R.bench_route_req if path == "route" else R.bench_scan_route
    fn(t, frame, 1000)
    ok = benchmark(fn, t, frame, N_ITER)
    assert ok == N_ITER
    ns = benchmark.stats.stats.min / N_ITER * 1e9
    benchmark.extra_info["ns_per_rules_lookup_pick"] = round(ns, 1)
    benchmark.extra_info["ns_mean"] = round(benchmark.stats.stats.mean / N_ITER * 1e9, 1)
    benchmark.extra_info["goal_ns"] = 150 if rules != "none" else None
