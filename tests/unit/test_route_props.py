"""Property tests: the core's lookups equal the literal reference router's."""

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy._core import route as R
from octoproxy.model import Endpoint, Labels, LbPolicy, Service

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import router as ref

# small alphabets so that labels collide often (the interesting cases)
CELLS = st.sampled_from(["", "", "c1", "c2", "gray"])
LANES = st.sampled_from(["", "", "w1", "w2"])
IDCS = st.sampled_from(["", "i1", "i2", "i3"])
REGIONS = st.sampled_from(["", "r1", "r2"])
CTX = st.one_of(st.none(), st.sampled_from(["", "c1", "c2", "gray", "w1", "w2", "zz"]))


@st.composite
def endpoints(draw):
    n = draw(st.integers(0, 12))
    eps = []
    for i in range(n):
        eps.append(
            Endpoint(
                f"10.0.0.{draw(st.integers(0, 14))}",  # duplicates: the first wins
                9000 + i % 2,
                weight=draw(st.sampled_from([0, 1, 10, 100])),
                status=draw(st.sampled_from([2, 2, 2, 0, 1, 3])),
                role=draw(st.sampled_from([0, 0, 1])),
                cell=draw(CELLS),
                swimlane=draw(LANES),
                idc=draw(IDCS),
                region=draw(REGIONS),
            )
        )
    return tuple(eps)


@st.composite
def services(draw):
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        out.append(
            Service(
                f"app{i}",
                draw(endpoints()),
                lb_policy=draw(st.sampled_from(list(LbPolicy))),
                set_enabled=draw(st.booleans()),
                service_names=tuple(
                    draw(st.lists(st.sampled_from(["N1", "N2", "N3"]), max_size=2))
                ),
            )
        )
    return out


LABELS = st.builds(
    Labels,
    liteset=st.sampled_from(["", "c1", "gray", "zz"]),
    set=st.sampled_from(["", "c1", "c2", "zz"]),
    swimlane=st.sampled_from(["", "w1", "zz"]),
    idc=IDCS,
    region=REGIONS,
)


def ref_result(r, **kw):
    try:
        return sorted(e.address for e in r.candidates(**kw)), 0
    except ref.RefError as e:
        return None, e.code


def core_candidates(t, appkey, **ctx):
    try:
        return sorted(n.address for n in t.candidates(appkey, **ctx)), 0
    except R.RouteError as e:
        return None, e.code


def core_route(t, **kw):
    try:
        n = t.route(**kw)
    except R.RouteError as e:
        return None, e.code
    return n.address, 0


@settings(max_examples=400, deadline=None)
@given(services(), LABELS, st.lists(st.tuples(CTX, CTX, CTX), min_size=1, max_size=6))
def test_candidates_equal_reference(svcs, labels, ctxs):
    t = R.RouteTable(labels, seed=1)
    t.replace_all(svcs)
    r = ref.ReferenceRouter(labels, svcs)
    for appkey in [s.appkey for s in svcs] + ["unknown"]:
        for lite, cset, lane in ctxs:
            ctx = {"liteset": lite, "set": cset, "swimlane": lane}
            want = ref_result(r, appkey=appkey, **ctx)
            assert core_candidates(t, appkey, **ctx) == want
            # route() agrees: same error, or a node from the reference set
            got, code = core_route(t, appkey=appkey, hash_key="k", **ctx)
            assert code == want[1]
            if got is not None:
                assert got in want[0]


@settings(max_examples=200, deadline=None)
@given(services(), LABELS, st.sampled_from([None, "", "N1", "N2", "N3", "N9"]))
def test_service_name_lookup_equals_reference(svcs, labels, name):
    t = R.RouteTable(labels, seed=2)
    t.replace_all(svcs)
    r = ref.ReferenceRouter(labels, svcs)
    want = ref_result(r, service_name=name)
    got, code = core_route(t, service_name=name)
    assert code == want[1]
    if got is not None:
        assert got in want[0]


@settings(max_examples=150, deadline=None)
@given(services(), services(), LABELS, st.tuples(CTX, CTX, CTX))
def test_incremental_updates_equal_a_full_build(first, second, labels, ctx):
    # a table updated service by service routes like one built from scratch
    t = R.RouteTable(labels, seed=3)
    t.replace_all(first)
    for s in second:
        t.update_service(s)
    final = {s.appkey: s for s in first} | {s.appkey: s for s in second}
    r = ref.ReferenceRouter(labels, list(final.values()))
    lite, cset, lane = ctx
    for appkey in final:
        want = ref_result(r, appkey=appkey, liteset=lite, set=cset, swimlane=lane)
        assert core_candidates(t, appkey, liteset=lite, set=cset, swimlane=lane) == want
