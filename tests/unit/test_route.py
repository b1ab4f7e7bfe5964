"""The route table, one docs/protocol.md section 8 rule per test (docs/routing.md)."""

import sys
from pathlib import Path

import pytest
import xxhash

from octoproxy._core import route as R
from octoproxy.model import (
    ROLE_BACKUP,
    STATUS_ALIVE,
    STATUS_DEAD,
    STATUS_STARTING,
    Endpoint,
    Labels,
    LbPolicy,
    Service,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import router as ref

APP = "com.example.order"


def ep(n, **kw):
    return Endpoint(f"10.0.0.{n}", 9000, **kw)


def table(*services, labels=None, **kw):
    t = R.RouteTable(labels or Labels(), seed=7, **kw)
    t.replace_all(services)
    return t


def hosts(nodes):
    return sorted(n.host for n in nodes)


def code(fn, *a, **kw):
    with pytest.raises(R.RouteError) as ei:
        fn(*a, **kw)
    return ei.value.code


# ------------------------------------------------------------------ hashing


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 100, 1000])
def test_xxh64_matches_xxhash_package(n):
    data = bytes((i * 37 + 11) & 0xFF for i in range(n))
    assert R.xxh64(data) == xxhash.xxh64_intdigest(data)
    assert R.xxh64(data, 12345) == xxhash.xxh64_intdigest(data, seed=12345)


# -------------------------------------------------------------- step 1: cell


def test_liteset_falls_back_to_center():
    svc = Service(APP, (ep(1), ep(2, cell="gray-1"), ep(3, cell="set-a")))
    t = table(svc, labels=Labels(liteset="gray-1"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    # a LiteSet with no node of its own falls back to the center
    assert hosts(t.candidates(APP, liteset="gray-9")) == ["10.0.0.1"]


def test_liteset_wins_over_set():
    svc = Service(APP, (ep(1), ep(2, cell="gray-1"), ep(3, cell="set-a")), set_enabled=True)
    t = table(svc, labels=Labels(liteset="gray-1", set="set-a"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    # LiteSet without nodes -> center, never the Set cell
    assert hosts(t.candidates(APP, liteset="gray-9")) == ["10.0.0.1"]


def test_set_with_empty_cell_is_error():
    svc = Service(APP, (ep(1), ep(2, cell="set-a")), set_enabled=True)
    t = table(svc, labels=Labels(set="set-a"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    with pytest.raises(R.RouteError) as ei:
        t.route(APP, set="set-b")
    assert ei.value.code == R.RT_SET_NO_NODE
    assert "set-b" in str(ei.value) and APP in str(ei.value)
    assert code(t.candidates, APP, set="set-b") == R.RT_SET_NO_NODE


def test_service_not_set_enabled_serves_set_callers_from_center():
    svc = Service(APP, (ep(1), ep(2, cell="set-a")), set_enabled=False)
    t = table(svc, labels=Labels(set="set-a"))
    assert hosts(t.candidates(APP)) == ["10.0.0.1"]
    assert hosts(t.candidates(APP, set="set-b")) == ["10.0.0.1"]


def test_caller_without_cell_gets_center_only():
    svc = Service(APP, (ep(1), ep(2, cell="set-a"), ep(3, cell="gray")), set_enabled=True)
    t = table(svc)
    assert hosts(t.candidates(APP)) == ["10.0.0.1"]


# ---------------------------------------------------------- step 2: swimlane


def test_swimlane_falls_back_to_trunk():
    svc = Service(APP, (ep(1), ep(2, swimlane="lane-a")))
    t = table(svc, labels=Labels(swimlane="lane-a"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    assert hosts(t.candidates(APP, swimlane="lane-zz")) == ["10.0.0.1"]


def test_trunk_traffic_never_reaches_lane_nodes():
    svc = Service(APP, (ep(1), ep(2, swimlane="lane-a"), ep(3, swimlane="lane-b")))
    t = table(svc)
    assert hosts(t.candidates(APP)) == ["10.0.0.1"]
    assert {t.route(APP).host for _ in range(100)} == {"10.0.0.1"}
    # only lane nodes: trunk callers have nowhere to go (no lane fallback)
    t.update_service(Service(APP, (ep(2, swimlane="lane-a"),)))
    assert code(t.route, APP) == R.RT_NO_HEALTHY


def test_swimlane_within_the_chosen_cell():
    svc = Service(APP, (ep(1), ep(2, swimlane="w"), ep(3, cell="g"), ep(4, cell="g", swimlane="w")))
    t = table(svc)
    assert hosts(t.candidates(APP, liteset="g", swimlane="w")) == ["10.0.0.4"]
    assert hosts(t.candidates(APP, liteset="g")) == ["10.0.0.3"]
    assert hosts(t.candidates(APP, swimlane="w")) == ["10.0.0.2"]


# ------------------------------------------------------------ step 3: health


def test_weight_zero_and_non_alive_dropped():
    svc = Service(
        APP,
        (
            ep(1),
            ep(2, weight=0),
            ep(3, status=STATUS_DEAD),
            ep(4, status=STATUS_STARTING),
            ep(5, status=STATUS_ALIVE, weight=1),
        ),
    )
    t = table(svc)
    assert hosts(t.candidates(APP)) == ["10.0.0.1", "10.0.0.5"]
    assert {t.route(APP).host for _ in range(200)} == {"10.0.0.1", "10.0.0.5"}
    t.update_service(Service(APP, (ep(2, weight=0), ep(3, status=STATUS_DEAD))))
    with pytest.raises(R.RouteError) as ei:
        t.route(APP)
    assert ei.value.code == R.RT_NO_HEALTHY
    assert APP in str(ei.value) and "2 endpoint(s)" in str(ei.value)


def test_backups_only_when_no_primary_left():
    svc = Service(APP, (ep(1), ep(2, role=ROLE_BACKUP)))
    t = table(svc)
    assert hosts(t.candidates(APP)) == ["10.0.0.1"]
    t.update_service(Service(APP, (ep(1, status=STATUS_DEAD), ep(2, role=ROLE_BACKUP))))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    t.update_service(Service(APP, (ep(1, weight=0), ep(2, role=ROLE_BACKUP, weight=0))))
    assert code(t.candidates, APP) == R.RT_NO_HEALTHY


# ---------------------------------------------------------- step 4: locality


def test_locality_same_idc_then_region_then_any():
    a = ep(1, idc="bj-a", region="bj")
    b = ep(2, idc="bj-b", region="bj")
    c = ep(3, idc="sh-a", region="sh")
    me = Labels(idc="bj-a", region="bj")
    assert hosts(table(Service(APP, (a, b, c)), labels=me).candidates(APP)) == ["10.0.0.1"]
    assert hosts(table(Service(APP, (b, c)), labels=me).candidates(APP)) == ["10.0.0.2"]
    far = Labels(idc="gz-a", region="gz")
    assert hosts(table(Service(APP, (a, b, c)), labels=far).candidates(APP)) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]


def test_locality_applies_after_health():
    a = ep(1, idc="bj-a", region="bj", status=STATUS_DEAD)
    b = ep(2, idc="bj-b", region="bj")
    t = table(Service(APP, (a, b)), labels=Labels(idc="bj-a", region="bj"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]


# ------------------------------------------------- per-request context keys


def test_request_context_overrides_proxy_labels():
    svc = Service(
        APP,
        (ep(1), ep(2, cell="gray"), ep(3, cell="set-a"), ep(4, swimlane="w")),
        set_enabled=True,
    )
    t = table(svc, labels=Labels(liteset="gray", set="set-a", swimlane="w"))
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]
    # present-but-empty overrides: "" liteset -> the Set rule applies
    assert hosts(t.candidates(APP, liteset="")) == ["10.0.0.3"]
    # "" liteset and "" set -> center; "" swimlane -> trunk
    assert hosts(t.candidates(APP, liteset="", set="", swimlane="")) == ["10.0.0.1"]
    assert hosts(t.candidates(APP, liteset="", set="")) == ["10.0.0.4"]
    assert t.route(APP, liteset="", set="", swimlane="").host == "10.0.0.1"
    assert t.route(APP, liteset=b"", set=b"set-a", swimlane=b"").host == "10.0.0.3"


# ------------------------------------------------------ service resolution


def test_unknown_service():
    t = table(Service(APP, (ep(1),)))
    with pytest.raises(R.RouteError) as ei:
        t.route("com.nope")
    assert ei.value.code == R.RT_UNKNOWN_SERVICE and "com.nope" in str(ei.value)
    assert isinstance(ei.value, LookupError)
    assert code(t.route, service_name="NoSuch") == R.RT_UNKNOWN_SERVICE
    assert code(t.candidates, "com.nope") == R.RT_UNKNOWN_SERVICE


def test_no_service_key():
    t = table(Service(APP, (ep(1),)))
    assert code(t.route) == R.RT_NO_SERVICE_KEY
    assert code(t.route, appkey="", service_name="") == R.RT_NO_SERVICE_KEY


def test_service_name_index():
    t = table(
        Service(APP, (ep(1),), service_names=("OrderService", "Shared")),
        Service("com.example.pay", (ep(2),), service_names=("PayService", "Shared")),
    )
    assert t.route(service_name="OrderService").host == "10.0.0.1"
    assert t.route(service_name="PayService").host == "10.0.0.2"
    # octo-remote-appkey wins over serviceName
    assert t.route(appkey="com.example.pay", service_name="OrderService").host == "10.0.0.2"
    # a name claimed twice: the smallest appkey
    assert t.route(service_name="Shared").appkey == "com.example.order"
    assert t.service_names()["Shared"] == "com.example.order"


# ------------------------------------------------------------------ warm-up


def test_warmup_weights_at_0_60_120_180s():
    t0 = 1_000_000.0
    svc = Service(APP, (ep(1, weight=120, warmup_s=180, start_time=t0), ep(2, weight=120)))
    now = [t0]
    t = table(svc, clock=lambda: now[0])
    n = t.nodes(APP)[0]
    got = []
    for dt in (0, 60, 120, 180, 1000):
        now[0] = t0 + dt
        got.append(n.effective_weight)
    assert got == [1, 40, 80, 120, 120]  # floor of 1 at 0 s
    assert n.weight == 120 and n.weight_at(t0 + 90) == 60
    t.set_time(t0 + 60)
    assert n.effective_weight == 40


def test_warmup_changes_picks_without_rebuild():
    t0 = 5_000.0
    svc = Service(APP, (ep(1, weight=120, warmup_s=180, start_time=t0), ep(2, weight=120)))
    t = R.RouteTable(Labels(), seed=3)
    t.set_time(t0 + 60)
    t.replace_all([svc])
    version = t.version
    picks = [t.route(APP).host for _ in range(16_000)]
    assert abs(picks.count("10.0.0.1") / len(picks) - 40 / 160) < 0.01
    t.set_time(t0 + 60.5)  # under the 1 s tick: structures are not recomputed
    t.route(APP)
    assert t._candset(APP).prepared_at == t0 + 60
    t.set_time(t0 + 120)
    picks = [t.route(APP).host for _ in range(16_000)]
    assert abs(picks.count("10.0.0.1") / len(picks) - 80 / 200) < 0.01
    t.set_time(t0 + 200)
    picks = [t.route(APP).host for _ in range(16_000)]
    assert abs(picks.count("10.0.0.1") / len(picks) - 0.5) < 0.01
    assert t.version == version


def test_sets_without_warming_nodes_never_read_the_clock():
    calls = []

    def clock():
        calls.append(1)
        return 1_000.0

    t = table(Service(APP, (ep(1), ep(2))), clock=clock)
    before = len(calls)
    for _ in range(100):
        t.route(APP)
    assert len(calls) == before


# ------------------------------------------------------------ API and swaps


def test_python_api_and_node_fields():
    svc = Service(
        APP,
        (Endpoint("10.1.1.1", 8080, weight=50, cell="g", swimlane="w", idc="i", region="r"),),
    )
    t = table(svc)
    assert t.has_service(APP) and not t.has_service("x")
    assert t.appkeys() == [APP]
    assert t.labels == Labels()
    (n,) = t.nodes(APP)
    assert (n.appkey, n.host, n.port, n.address) == (APP, "10.1.1.1", 8080, "10.1.1.1:8080")
    assert (n.weight, n.effective_weight, n.status, n.role) == (50, 50, STATUS_ALIVE, 0)
    assert (n.cell, n.swimlane, n.idc, n.region) == ("g", "w", "i", "r")
    assert n.in_flight == 0 and n.picks == 0 and n.upstream is None
    n.upstream = "pool"
    n.in_flight = 3
    assert n.upstream == "pool" and n.in_flight == 3
    with pytest.raises(AttributeError):
        n.weight = 1
    assert t.route(APP, liteset="g", swimlane="w") is n and n.picks == 1


def test_version_bumps_on_each_swap_and_remove():
    t = R.RouteTable(Labels(), seed=1)
    assert t.version == 0
    t.update_service(Service(APP, (ep(1),)))
    t.update_service(Service("b", (ep(2),)))
    assert t.version == 2
    t.remove_service(APP)
    assert t.version == 3 and t.appkeys() == ["b"]
    t.remove_service("absent")
    assert t.version == 3
    t.replace_all([Service("c", (ep(3),))])
    assert t.version == 4 and t.appkeys() == ["c"]


def test_update_of_one_service_does_not_rebuild_others():
    t = table(*[Service(f"s{i}", (ep(1), ep(2))) for i in range(10)])
    builds = t.builds
    entries = {a: t._entry(a) for a in t.appkeys()}
    sets = {a: t._candset(a) for a in t.appkeys()}
    t.update_service(Service("s3", (ep(1), ep(3))))
    assert t.builds == builds + 1
    for a in t.appkeys():
        if a != "s3":
            assert t._entry(a) is entries[a]
            assert t._candset(a) is sets[a]
    assert t._entry("s3") is not entries["s3"]


def test_nodes_are_reused_across_updates():
    t = table(Service(APP, (ep(1), ep(2))))
    n1 = t.nodes(APP)[0]
    n1.in_flight = 5
    t.update_service(Service(APP, (ep(1, weight=50), ep(3))))
    m1 = t.nodes(APP)[0]
    assert m1 is n1 and m1.in_flight == 5 and m1.weight == 50
    t.replace_all([Service(APP, (ep(1),))])
    assert t.nodes(APP)[0] is n1


def test_round_robin_position_survives_an_unrelated_update():
    svc = Service(APP, tuple(ep(i) for i in range(1, 6)))
    t = table(svc)
    seq = [t.route(APP).host for _ in range(7)]
    # an update that leaves the trunk candidates alone (a node in another cell)
    t.update_service(Service(APP, (*svc.endpoints, ep(9, cell="gray"))))
    nxt = [t.route(APP).host for _ in range(3)]
    ref_t = table(svc)
    expected = [ref_t.route(APP).host for _ in range(10)]
    assert seq + nxt == expected


def test_old_snapshot_unchanged_by_a_build():
    t = table(Service(APP, (ep(1),)))
    cs = t._candset(APP)
    t.update_service(Service(APP, (ep(2),)))
    assert hosts(cs.candidates) == ["10.0.0.1"]
    assert hosts(t.candidates(APP)) == ["10.0.0.2"]


def test_unknown_policy_rejected():
    with pytest.raises(ValueError):
        table(Service(APP, (ep(1),), lb_policy="fastest"))


def test_reference_agrees_on_examples():
    svc = Service(APP, (ep(1), ep(2, cell="g"), ep(3, swimlane="w")), set_enabled=True)
    labels = Labels(idc="x")
    t = table(svc, labels=labels)
    r = ref.ReferenceRouter(labels, [svc])
    for ctx in ({}, {"liteset": "g"}, {"swimlane": "w"}, {"liteset": "zz", "swimlane": "w"}):
        assert hosts(t.candidates(APP, **ctx)) == sorted(e.host for e in r.candidates(APP, **ctx))


def test_policies_all_route():
    for pol in LbPolicy:
        t = table(Service(APP, (ep(1), ep(2, weight=30)), lb_policy=pol))
        assert t.route(APP, hash_key="user-1").host in ("10.0.0.1", "10.0.0.2")
        assert t.route(APP).host in ("10.0.0.1", "10.0.0.2")


def test_error_messages_name_the_service_and_cell():
    svc = Service(
        APP, (ep(1), ep(2, cell="gray", status=STATUS_DEAD), ep(3, cell="gray", weight=0))
    )
    t = table(svc, labels=Labels(liteset="gray"))
    with pytest.raises(R.RouteError) as ei:
        t.route(APP)
    msg = str(ei.value)
    assert ei.value.code == R.RT_NO_HEALTHY
    assert APP in msg and "'gray'" in msg and "2 endpoint(s)" in msg
    # the data path can build the same text from a code
    assert t.error_message(R.RT_NO_HEALTHY, APP) == msg
    assert "neither" in t.error_message(R.RT_NO_SERVICE_KEY)
    assert "NoSuch" in t.error_message(R.RT_UNKNOWN_SERVICE, service_name="NoSuch")


def test_bench_helper_with_send_done_leaves_active_at_zero():
    t = table(Service(APP, (ep(1), ep(2)), lb_policy=LbPolicy.LEAST_REQUEST))
    assert R.bench_route(t, APP.encode(), 500, send_done=True) == 500
    assert [n.in_flight for n in t.nodes(APP)] == [0, 0]
    assert sum(n.picks for n in t.nodes(APP)) == 500
    assert R.bench_route(t, APP.encode(), 10, liteset=b"zz", set_=b"", swimlane=b"w") == 10
