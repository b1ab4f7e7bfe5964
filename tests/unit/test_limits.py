"""The core's governance objects (_core.limits) on their own: token buckets,
rule matching by method and caller, breakers, outlier counts, retry checks."""

import time

from octoproxy._core import frame as F
from octoproxy._core import limits as L


def req(method: str | None = "get", caller: str | None = None, seq: int = 1) -> bytes:
    body = F.thrift_call(method, seq) if method is not None else b"plain"
    trace = {"clientAppkey": caller} if caller is not None else None
    return F.encode_request(seq, "com.x.S", body, trace_info=trace)


def test_bucket_starts_full_at_its_burst() -> None:
    # a rate slow enough that no scheduler pause refills a token meanwhile;
    # the refill itself is checked against the clock by the next-but-one test
    r = L.RateRule("r", 1.0, 10.0)
    assert sum(r.try_take() for _ in range(50)) == 10


def test_burst_defaults_to_the_rate_and_at_least_one() -> None:
    assert L.RateRule("a", 20.0).burst == 20.0
    assert L.RateRule("b", 0.5).burst == 1.0


def test_refill_follows_the_clock_exactly() -> None:
    # robust on a busy machine: the tokens after a pause are bounded by the
    # clock readings around it, whatever the scheduler did in between
    r = L.RateRule("r", 2000.0, 10_000.0)
    while r.try_take():
        pass
    t_drained = time.monotonic()
    time.sleep(0.5)
    t_count = time.monotonic()
    n = 0
    while r.try_take():
        n += 1
    t_end = time.monotonic()
    assert 2000 * (t_count - t_drained) - 1 <= n <= 2000 * (t_end - t_drained) + 1, n


def test_rules_by_method_and_caller() -> None:
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("get", 1, 2, method="get"),
                 L.RateRule("greedy", 1, 1, caller="com.greedy")], [])
    assert [g.check_inbound(req("get")) is None for _ in range(3)] == [True, True, False]
    assert g.check_inbound(req("put")) is None  # another method: no limit
    assert g.check_inbound(req("put", "com.greedy")) is None
    msg = g.check_inbound(req("put", "com.greedy"))
    assert msg is not None and "greedy" in msg and "1/s" in msg
    assert g.check_inbound(req("put", "com.nice")) is None


def test_a_body_without_a_method_name_is_not_limited_by_method_rules() -> None:
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("get", 1, 1, method="get")], [])
    for _ in range(5):
        assert g.check_inbound(req(None)) is None


def test_per_caller_buckets_are_independent() -> None:
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("each", 1, 2, per_caller=True)], [])
    a = [g.check_inbound(req("m", "a")) is None for _ in range(3)]
    b = [g.check_inbound(req("m", "b")) is None for _ in range(3)]
    none = [g.check_inbound(req("m", None)) is None for _ in range(3)]
    assert a == b == none == [True, True, False]


def test_per_caller_table_grows_and_keeps_every_callers_tokens() -> None:
    # the buckets live in a C hash table that doubles as callers arrive: a
    # caller's spent tokens survive every growth (no caller starts full twice)
    r = L.RateRule("each", 0.001, 2, per_caller=True)
    names = [f"com.caller.{i}" for i in range(3000)]
    for n in names:
        assert r.try_take(n) and r.try_take(n)
    assert r.n_callers == 3000
    assert not any(r.try_take(n) for n in names)
    assert r.try_take("") and r.try_take(None) and not r.try_take("")  # no caller: one bucket


def test_per_caller_table_is_emptied_past_its_bound() -> None:
    r = L.RateRule("each", 0.001, 1, per_caller=True)
    for i in range(10_000):
        assert r.try_take(f"c{i}")
    assert r.n_callers == 10_000 and not r.try_take("c0")
    assert r.try_take("one too many")  # the table is emptied: every caller starts full
    assert r.n_callers == 1 and r.try_take("c0")


def test_a_refusal_gives_back_per_caller_tokens_too() -> None:
    g = L.ServiceGov("svc")
    each = L.RateRule("each", 0.001, 3, per_caller=True)
    meth = L.RateRule("method", 0.001, 1, method="get")
    g.set_rules([each, meth], [])
    assert g.check_inbound(req("get", "a")) is None
    for _ in range(4):
        assert g.check_inbound(req("get", "a")) is not None
    assert each.n_allowed == 1
    assert [g.check_inbound(req("put", "a")) is None for _ in range(3)] == [True, True, False]


def test_a_refusal_gives_back_the_tokens_of_earlier_rules() -> None:
    g = L.ServiceGov("svc")
    svc_rule = L.RateRule("service", 1, 5)
    meth = L.RateRule("method", 1, 1, method="get")
    g.set_rules([svc_rule, meth], [])
    assert g.check_inbound(req("get")) is None
    for _ in range(3):
        assert g.check_inbound(req("get")) is not None
    assert svc_rule.n_allowed == 1 and meth.n_limited == 3
    assert svc_rule.tokens() >= 3.99  # the refused requests did not spend service tokens


def test_changing_limits_keeps_granted_tokens_and_counters() -> None:
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("r", 1, 10, method="get")], [])
    for _ in range(4):
        assert g.check_inbound(req("get")) is None
    before = g.inbound_rules[0]
    g.set_rules([L.RateRule("r2", 1, 8, method="get")], [])
    after = g.inbound_rules[0]
    assert after is before and after.n_allowed == 4 and after.name == "r2"
    assert 5.9 <= after.tokens() <= 6.5  # 6 left, not refilled to 8
    g.set_rules([L.RateRule("r3", 1, 3, method="get")], [])
    assert after.tokens() <= 3.0  # capped by the smaller burst


def test_breakers_and_adaptive_limit_on_the_caller_side() -> None:
    g = L.ServiceGov("svc")
    f = req("m")
    assert g.check_outbound(f) is None
    g.max_requests = 2
    g.inflight = 2
    assert "too many requests in flight" in g.check_outbound(f)
    g.inflight = 1
    g.node_max_requests = 3
    assert "picked node" in g.check_outbound(f, active=3)
    assert g.check_outbound(f, active=2) is None
    g.adaptive_limit = 1
    assert "adaptive concurrency" in g.check_outbound(f)
    assert g.breaker_counts() == {"max_requests": 1, "max_pending": 0,
                                  "node_max_requests": 1, "adaptive": 1, "max_connections": 0}


def test_caller_side_rules_are_reported_after_the_provider_rules() -> None:
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("p", 1, 100)], [L.RateRule("c", 1, 1, caller="app")])
    assert g.check_outbound(req("m", "app")) is None
    assert "c (1/s" in g.check_outbound(req("m", "app"))


def test_outlier_counts_and_trip_once() -> None:
    g = L.ServiceGov("svc")
    trips: list[tuple[str, str]] = []
    g.on_trip = lambda ng, why: trips.append((ng.address, why))
    g.consec_transport = 3
    g.consec_status = 2
    g.status_mask = 1 << 2
    ng = L.NodeGov(g, "h:1")
    ng.on_answer(4)
    ng.on_answer(4)
    ng.on_answer(0)  # a success resets the run
    ng.on_answer(4)
    ng.on_answer(4)
    assert trips == []
    ng.on_answer(4)
    assert trips == [("h:1", "3 consecutive transport failures/timeouts")]
    ng.on_answer(4)
    assert len(trips) == 1  # tripped: Python decides, no second call
    ng.tripped = False
    ng.consec_tr = 0
    ng.on_answer(1)  # an application exception is not a node fault by default
    ng.on_answer(2)
    ng.on_answer(2)
    assert trips[-1] == ("h:1", "2 consecutive error statuses")
    assert ng.take_window() == (10, 8)
    assert ng.take_window() == (0, 0)


def test_retry_only_for_idempotent_methods() -> None:
    g = L.ServiceGov("svc")
    assert not g.may_retry(req("get"))  # no retry policy
    g.max_attempts = 2
    g.set_idempotent(["get"])
    assert g.may_retry(req("get"))
    assert not g.may_retry(req("put"))
    assert not g.may_retry(req(None))
    g.idempotent_all = True
    assert g.may_retry(req("put"))


def test_retry_budget() -> None:
    g = L.ServiceGov("svc")
    g.budget_ratio = 0.2
    g.min_retries = 2
    g.inflight = 100
    g.retries_active = 19
    assert L.retry_budget_allows(g)
    g.retries_active = 20
    assert not L.retry_budget_allows(g)
    g.inflight = 1
    g.retries_active = 1
    assert L.retry_budget_allows(g)  # the minimum
    g.retries_active = 2
    assert not L.retry_budget_allows(g)


def test_quota_modes() -> None:
    g = L.ServiceGov("svc")
    f = req("m")
    asks: list[int] = []

    def want() -> None:
        asks.append(1)

    g.qwant = want
    g.qmode = L.QM_REDIS
    g.qtokens = 3.0
    g.qlow = 1.0
    results = [g.check_inbound(f) is None for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert len(asks) == 1 and g.qasked  # asked once, when it ran low
    g.qdebt = 2.0
    assert g.check_inbound(f) is None  # credit while the step is on its way
    g.qmode = L.QM_CLOSED
    assert "cluster quota" in g.check_inbound(f)
    g.qmode = L.QM_OPEN
    assert g.check_inbound(f) is None
    g.qmode = L.QM_LOCAL
    g.set_local_share(4.0, 2.0)
    time.sleep(0.6)  # a changed bucket keeps its tokens: let it fill (a 0.25 s pause refills one)
    assert [g.check_inbound(f) is None for _ in range(3)] == [True, True, False]


def test_names_that_differ_in_any_byte_are_other_names() -> None:
    # methods and callers compared by length and bytes: lengths around 8 and
    # 16, a difference in the first, a middle and the last byte
    for n in (1, 7, 8, 9, 15, 16, 17, 23):
        name = "".join(chr(97 + i % 26) for i in range(n))
        others = {name[:k] + "#" + name[k + 1 :] for k in (0, n // 2, n - 1)}
        g = L.ServiceGov("svc")
        g.set_rules([L.RateRule("m", 1, 1, method=name), L.RateRule("c", 1, 1, caller=name)], [])
        assert g.check_inbound(req(name, "x")) is None
        assert g.check_inbound(req(name, "x")) is not None  # its method's bucket is spent
        assert g.check_inbound(req("get", name)) is None
        assert g.check_inbound(req("get", name)) is not None  # its caller's bucket is spent
        for o in others:
            assert g.check_inbound(req(o, o)) is None, (name, o)
        g.set_idempotent([name])
        g.max_attempts = 2
        assert g.may_retry(req(name)) and not any(g.may_retry(req(o)) for o in others)


def test_a_per_caller_rule_serves_each_caller_its_own_bucket_in_any_order() -> None:
    # the last caller's slot is tried first: alternating callers of one length
    # that differ in their last byte must still get a bucket each
    g = L.ServiceGov("svc")
    g.set_rules([L.RateRule("each", 1, 2, per_caller=True)], [])
    got = [g.check_inbound(req("get", c)) is None for c in ["com.a1", "com.a2"] * 3]
    assert got == [True, True, True, True, False, False]
    assert g.check_inbound(req("get", "com.a3")) is None
