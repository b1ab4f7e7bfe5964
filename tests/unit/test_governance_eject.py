"""Outlier ejection decided by governance.Manager on a real route table:
candidates, the ejection share, return and probation, localities."""

import asyncio

import uvloop

from octoproxy import model
from octoproxy._core.route import RouteTable
from octoproxy.governance import Manager


def svc(n: int, **od: object) -> model.Service:
    eps = tuple(model.Endpoint(f"10.0.0.{i + 1}", 9000, idc="a" if i < 2 else "b")
                for i in range(n))
    pol = model.OutlierDetection(**{"consecutive_transport_failures": 2,
                                    "base_ejection_s": 0.3, "max_ejection_percent": 50,
                                    **od})  # type: ignore[arg-type]
    return model.Service("s", eps, governance=model.Governance(outlier_detection=pol))


def addrs(table: RouteTable) -> list[str]:
    return sorted(n.address for n in table.candidates("s"))


def fail(table: RouteTable, address: str, times: int, status: int = 4) -> None:
    node = next(n for n in table.nodes("s") if n.address == address)
    for _ in range(times):
        node.gov.on_answer(status)


async def until(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a state the Manager's timers bring about (generous: a loaded host)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def run(coro_fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        table = RouteTable(model.Labels(idc="a"))
        m = Manager(asyncio.get_running_loop(), table)
        table.gov_hook = m.on_build
        try:
            return await coro_fn(table, m)
        finally:
            await m.close()

    return uvloop.run(main())


def test_ejection_leaves_the_locality_then_returns_on_probation() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4))
        assert addrs(table) == ["10.0.0.1:9000", "10.0.0.2:9000"]  # own idc "a"
        fail(table, "10.0.0.1:9000", 1)
        assert len(addrs(table)) == 2  # below the threshold
        fail(table, "10.0.0.1:9000", 1)
        assert addrs(table) == ["10.0.0.2:9000"]
        st = m.node_state("s", "10.0.0.1:9000")
        assert st is not None and st["ejected"] and st["ejections"] == 1
        t0 = asyncio.get_running_loop().time()
        await until(lambda: "10.0.0.1:9000" in addrs(table), "the return (0.3 s ejection)")
        assert asyncio.get_running_loop().time() - t0 >= 0.25
        assert addrs(table) == ["10.0.0.1:9000", "10.0.0.2:9000"]
        fail(table, "10.0.0.1:9000", 1)  # probation: one failure is enough
        assert addrs(table) == ["10.0.0.2:9000"]
        t0 = asyncio.get_running_loop().time()
        await asyncio.sleep(0.4)  # a window, not a state: still out after 0.4 s
        assert "10.0.0.1:9000" not in addrs(table)  # the second ejection lasts 0.6 s
        await until(lambda: "10.0.0.1:9000" in addrs(table), "the second return")
        assert asyncio.get_running_loop().time() - t0 >= 0.55

    run(body)


def test_locality_emptied_by_ejection_the_next_one_serves() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, max_ejection_percent=50))
        fail(table, "10.0.0.1:9000", 2)
        fail(table, "10.0.0.2:9000", 2)
        assert addrs(table) == ["10.0.0.3:9000", "10.0.0.4:9000"]  # idc "b"

    run(body)


def test_never_more_than_the_share() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, max_ejection_percent=25))
        for i in (1, 2, 3):
            fail(table, f"10.0.0.{i}:9000", 5)
        ejected = [a for a in ("10.0.0.1:9000", "10.0.0.2:9000", "10.0.0.3:9000")
                   if m.node_state("s", a)["ejected"]]  # type: ignore[index]
        assert len(ejected) == 1
        assert m.stats()["s"]["ejected"] == ejected

    run(body)


def test_all_ejected_still_serves_and_the_last_node_is_never_ejected() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(1, max_ejection_percent=100))
        fail(table, "10.0.0.1:9000", 5)
        assert addrs(table) == ["10.0.0.1:9000"]
        assert not m.node_state("s", "10.0.0.1:9000")["ejected"]  # type: ignore[index]

    run(body)


def test_failure_rate_over_an_interval() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, consecutive_transport_failures=0, consecutive_errors=0,
                                 failure_rate_threshold=0.5, failure_rate_min_requests=10,
                                 interval_s=0.2))
        node = next(n for n in table.nodes("s") if n.address == "10.0.0.2:9000")
        for i in range(20):
            node.gov.on_answer(2 if i % 2 else 0)  # 50% runtime exceptions
        await until(lambda: addrs(table) == ["10.0.0.1:9000"], "the ejection at the interval")

    run(body)


def test_policy_removed_returns_everyone() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4))
        fail(table, "10.0.0.1:9000", 2)
        assert addrs(table) == ["10.0.0.2:9000"]
        base = svc(4)
        table.update_service(model.Service("s", base.endpoints))
        assert addrs(table) == ["10.0.0.1:9000", "10.0.0.2:9000"]
        assert all(n.gov is None for n in table.nodes("s"))

    run(body)


def test_ejection_time_grows_and_is_capped_by_max_ejection_s() -> None:
    import time

    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, base_ejection_s=0.2, max_ejection_s=0.3,
                                 max_ejection_percent=50))
        lengths = []
        for _ in range(3):
            fail(table, "10.0.0.1:9000", 2)
            st = m.node_state("s", "10.0.0.1:9000")
            assert st is not None and st["ejected"]
            lengths.append(st["ejected_until"] - time.time())
            await until(lambda: "10.0.0.1:9000" in addrs(table), "the return")
        # 0.2 s, then 0.4 s capped to 0.3 s, then 0.3 s again
        assert 0.1 < lengths[0] <= 0.2 and 0.2 < lengths[1] <= 0.3 and 0.2 < lengths[2] <= 0.3

    run(body)


def test_failure_rate_needs_enough_nodes_with_enough_answers() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, consecutive_transport_failures=0, consecutive_errors=0,
                                 failure_rate_threshold=0.5, failure_rate_min_requests=10,
                                 failure_rate_min_nodes=2, interval_s=0.2))
        nodes = {n.address: n for n in table.nodes("s")}
        for i in range(20):
            nodes["10.0.0.2:9000"].gov.on_answer(2 if i % 2 else 0)
        await asyncio.sleep(0.5)  # a window: two intervals with one node rated, no ejection
        assert addrs(table) == ["10.0.0.1:9000", "10.0.0.2:9000"]
        for i in range(20):
            nodes["10.0.0.2:9000"].gov.on_answer(2 if i % 2 else 0)
            nodes["10.0.0.1:9000"].gov.on_answer(0)
        await until(lambda: addrs(table) == ["10.0.0.1:9000"], "the ejection, two nodes rated")

    run(body)


def test_success_rate_below_mean_minus_stdevs() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        # success rates 1, 1, 1, 1, 0.7 -> mean 0.94, stdev 0.12 (population),
        # limit 0.94 - 1.9 * 0.12 = 0.712: the 0.7 node is out, no other
        table.update_service(svc(5, consecutive_transport_failures=0, consecutive_errors=0,
                                 success_rate_stdev_factor=1.9, success_rate_min_requests=10,
                                 success_rate_min_nodes=5, interval_s=0.2,
                                 max_ejection_percent=50))
        nodes = {n.address: n for n in table.nodes("s")}

        def feed(bad: float) -> None:
            for a, n in nodes.items():
                for i in range(20):
                    fails = a == "10.0.0.5:9000" and i < 20 * bad
                    n.gov.on_answer(2 if fails else 0)

        feed(0.3)
        await until(lambda: m.node_state("s", "10.0.0.5:9000")["ejected"],  # type: ignore[index]
                    "the success-rate ejection")
        assert [a for a in nodes if m.node_state("s", a)["ejected"]] == [  # type: ignore[index]
            "10.0.0.5:9000"]

    run(body)


def test_success_rate_needs_its_minimum_of_rated_nodes() -> None:
    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, consecutive_transport_failures=0, consecutive_errors=0,
                                 success_rate_stdev_factor=1.0, success_rate_min_requests=10,
                                 success_rate_min_nodes=5, interval_s=0.2))
        for n in table.nodes("s"):
            for _ in range(20):
                n.gov.on_answer(2 if n.address == "10.0.0.1:9000" else 0)
        await asyncio.sleep(0.5)  # a window: two sweeps, 4 rated nodes < 5
        assert not any(m.node_state("s", n.address)["ejected"]  # type: ignore[index]
                       for n in table.nodes("s"))

    run(body)


def test_ejection_time_jitter_is_added_after_the_cap() -> None:
    import time

    async def body(table: RouteTable, m: Manager) -> None:
        table.update_service(svc(4, base_ejection_s=5, max_ejection_s=5, ejection_jitter_s=2))
        lengths = []
        for a in ("10.0.0.1:9000", "10.0.0.3:9000"):
            fail(table, a, 2)
            st = m.node_state("s", a)
            assert st is not None and st["ejected"]
            lengths.append(st["ejected_until"] - time.time())
        assert all(4.9 < x <= 7.0 for x in lengths), lengths
        assert lengths[0] != lengths[1]  # random

    run(body)
