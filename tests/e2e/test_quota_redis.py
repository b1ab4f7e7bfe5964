"""Cluster quotas on a real redis-server, in process: two governance
managers (as two proxies would have) share one quota; Redis killed and
restarted mid-run.  The same through proxy processes: test_governance_e2e.py."""

import asyncio
import time

import pytest
import uvloop

from octoproxy import model
from octoproxy._core import frame as F
from octoproxy._core import limits as L
from octoproxy.governance import Manager

from harness import RedisServer

FRAME = F.encode_request(1, "s", F.thrift_call("m", 1))


class _Table:
    """The route table's rebuild hook (not used by quotas)."""

    def rebuild(self, appkey: str) -> None:  # pragma: no cover - no ejection here
        pass



def svc(rate: float, on_failure: str = "local_share", share: float = 0.5) -> model.Service:
    return model.Service("q", governance=model.Governance(
        cluster_quota=model.ClusterQuota(rate, on_failure, share)))


async def drive(govs: list[L.ServiceGov], seconds: float, per_s: float,
                counts: list[list[int]]) -> None:
    """Offer `per_s` requests per second to each gov, in small slices, for
    `seconds`, never past the end of the wall-clock window that ends the
    span (quota windows are whole seconds)."""
    t0 = time.monotonic()
    stop_wall = time.time() + seconds
    if seconds >= 1.0:
        stop_wall = float(round(stop_wall))
    sent = 0
    while (now := time.monotonic()) - t0 < seconds and time.time() < stop_wall:
        due = int((now - t0) * per_s)
        for _ in range(due - sent):
            for i, g in enumerate(govs):
                counts[i][0 if g.check_inbound(FRAME) is None else 1] += 1
        sent = due
        await asyncio.sleep(0.001)


async def start_at_window() -> None:
    # quotas count in wall-clock seconds: measure whole windows
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.002)


def test_two_proxies_share_one_quota(redis: RedisServer) -> None:
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        ms = [Manager(loop, _Table(), redis.url) for _ in range(2)]
        for m in ms:
            m.on_build(svc(400.0), [])
        govs = [m.service_gov("q") for m in ms]
        await start_at_window()
        counts = [[0, 0], [0, 0]]
        await drive(govs, 3.0, 500.0, counts)  # 1000/s offered to a 400/s quota
        ops = sum(m.redis.ops for m in ms)
        for m in ms:
            await m.close()
        return counts, ops

    counts, ops = uvloop.run(main())
    allowed = counts[0][0] + counts[1][0]
    assert abs(allowed - 1200) <= 120, counts  # 3 windows of 400, within 10%
    assert min(counts[0][0], counts[1][0]) > 300, counts  # both got a share
    assert ops < allowed / 3, (ops, allowed)  # steps, not one Redis operation per request


def test_redis_down_local_share_then_back(redis: RedisServer) -> None:
    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        m = Manager(loop, _Table(), redis.url, redis_timeout_s=0.1, redis_retry_s=0.2)
        m.on_build(svc(200.0, "local_share", 0.25), [])
        g = m.service_gov("q")
        counts = [[0, 0]]
        await drive([g], 1.0, 400.0, counts)
        assert g.qmode == L.QM_REDIS
        redis.kill()
        counts = [[0, 0]]
        await drive([g], 0.5, 400.0, counts)  # notices the failure
        assert g.qmode == L.QM_LOCAL and not m.redis.up
        await start_at_window()
        counts = [[0, 0]]
        await drive([g], 2.0, 400.0, counts)
        local_allowed = counts[0][0]
        redis.start()
        deadline = time.monotonic() + 10
        while g.qmode != L.QM_REDIS and time.monotonic() < deadline:
            await drive([g], 0.1, 400.0, [[0, 0]])
        back = g.qmode == L.QM_REDIS
        await start_at_window()
        counts = [[0, 0]]
        await drive([g], 2.0, 400.0, counts)
        st = m.redis_stats()
        await m.close()
        return {"local": local_allowed, "back": back, "after": counts[0][0], "stats": st}

    r = uvloop.run(main())
    # the local share: 25% of 200/s for 2 s (+ its burst of 50)
    assert 100 <= r["local"] <= 100 + 50 + 10, r
    assert r["back"], r
    assert abs(r["after"] - 400) <= 40, r  # Redis again: 200/s for 2 s
    st = r["stats"]
    assert isinstance(st, dict) and st["failures"] == 1 and st["up"]


@pytest.mark.parametrize(("mode", "expect"), [("open", "all"), ("closed", "none")])
def test_fail_open_and_fail_closed(mode: str, expect: str) -> None:
    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        # nothing listens there: Redis is down from the start
        m = Manager(loop, _Table(), "redis://127.0.0.1:1/0", redis_timeout_s=0.05,
                    redis_retry_s=5)
        m.on_build(svc(10.0, mode), [])
        g = m.service_gov("q")
        await drive([g], 0.3, 300.0, [[0, 0]])
        counts = [[0, 0]]
        await drive([g], 0.5, 300.0, counts)
        await m.close()
        return counts

    counts = uvloop.run(main())
    if expect == "all":
        assert counts[0][1] == 0 and counts[0][0] > 100
    else:
        assert counts[0][0] == 0 and counts[0][1] > 100


def test_quota_change_at_run_time_keeps_counting(redis: RedisServer) -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        m = Manager(loop, _Table(), redis.url)
        m.on_build(svc(100.0), [])
        g = m.service_gov("q")
        await start_at_window()
        counts = [[0, 0]]
        await drive([g], 1.0, 400.0, counts)
        first = counts[0][0]
        m.on_build(svc(300.0), [])
        await start_at_window()
        counts = [[0, 0]]
        await drive([g], 1.0, 400.0, counts)
        assert g.n_quota_allowed >= first + counts[0][0]  # counters were not reset
        await m.close()
        return first, counts[0][0]

    first, second = uvloop.run(main())
    assert abs(first - 100) <= 10 and abs(second - 300) <= 30, (first, second)
