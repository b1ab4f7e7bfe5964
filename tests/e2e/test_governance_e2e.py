"""Governance end to end with real processes (docs/governance.md): provider
apps, server-side and client-side proxies, a real redis-server, the bundled
control plane.  Calls are counted at the client; executions at the provider."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from typing import Any

import pytest
import uvloop
import yaml

from octoproxy._core import frame as F
from octoproxy.rawcall import RawCaller
from octoproxy.sdk import Client
from octoproxy.sdk.subscribe import subscribe

from harness import (
    Cluster,
    RedisServer,
    can_connect_tcp,
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    wait_for,
)


class Raw(RawCaller):
    """The tests' raw caller (octoproxy.rawcall: traceInfo.clientAppkey, Thrift
    bodies, one-way; pipelined): service com.demo.S of provider appkey "a"."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 **defaults: Any) -> None:
        super().__init__(reader, writer, **{"service": "com.demo.S", "appkey": "a", **defaults})


def call(method: str, args: bytes = b"") -> bytes:
    return F.thrift_call(method, 1, args)


async def paced(raw: Raw, seconds: float, per_s: float, body: bytes, **kw: Any) -> list[int]:
    """Send at `per_s` for `seconds`; the statuses of the answers."""
    futs = []
    t0 = time.monotonic()
    sent = 0
    while (el := time.monotonic() - t0) < seconds:
        due = int(el * per_s)
        while sent < due:
            futs.append(raw.send(body, **kw))
            sent += 1
        await asyncio.sleep(0.002)
    return [f.status for f in await asyncio.gather(*futs)]


async def closed_loop(raw: Raw, seconds: float, inflight: int, body: bytes,
                      **kw: Any) -> list[int]:
    """Keep `inflight` requests outstanding for `seconds` (a caller that always
    has work: a limit is then always being tested); the statuses."""
    out: list[int] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            out.append((await raw.call(body, **kw)).status)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return out


def provider_chain(c: Cluster, services: list[dict[str, Any]], appkey: str = "a",
                   extra: dict[str, Any] | None = None) -> tuple[int, Any]:
    """Provider "p" behind a server-side proxy whose inbound listener serves
    `appkey` with the static `services` (their provider-side rules)."""
    c.providers(p="p.sock")
    port = free_port()
    cfg = server_proxy_cfg({port: c.path("p.sock")})
    cfg["listeners"]["inbound"][0]["appkey"] = appkey
    cfg["static"] = {"services": services}
    cfg.update(extra or {})
    return port, c.proxy("server", cfg)


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


# ------------------------------------------------------------ rate limits


def test_token_bucket_accuracy_over_5_seconds() -> None:
    with cluster() as c:
        # burst 50 (0.5 s of the rate) absorbs the stalls of a loaded machine;
        # it is spent first, then only the rate counts
        port, _ = provider_chain(c, [{"appkey": "a", "rate_limits": [{"rate": 100, "burst": 50}]}])

        async def main() -> list[int]:
            raw = await Raw.connect(port)
            drained = 0
            while (await raw.call(b"drain")).status == 0:
                drained += 1
            assert drained >= 50
            out = await closed_loop(raw, 5.0, 4, call("m"))
            await raw.close()
            return out

        statuses = uvloop.run(main())
    allowed = statuses.count(0)
    assert statuses.count(6) + allowed == len(statuses) and statuses.count(6) > 500
    assert abs(allowed - 500) <= 25, (allowed, len(statuses))  # 100/s over 5 s, within 5%


def test_method_and_greedy_caller_limits_answer_degrade_naming_the_rule() -> None:
    rules = [{"rate": 0.1, "burst": 3, "method": "expensive"},
             {"rate": 0.1, "burst": 5, "caller": "com.greedy", "name": "greedy caller"}]
    with cluster() as c:
        port, _ = provider_chain(c, [{"appkey": "a", "rate_limits": rules}])

        async def main() -> dict[str, list[F.Frame]]:
            raw = await Raw.connect(port)
            out = {
                "expensive": [await raw.call(call("expensive")) for _ in range(6)],
                "cheap": [await raw.call(call("cheap")) for _ in range(10)],
                "greedy": [await raw.call(call("cheap"), caller="com.greedy") for _ in range(10)],
                "nice": [await raw.call(call("cheap"), caller="com.nice") for _ in range(10)],
            }
            await raw.close()
            return out

        out = uvloop.run(main())
    assert [f.status for f in out["expensive"]] == [0, 0, 0, 6, 6, 6]
    assert "method 'expensive'" in out["expensive"][3].message
    assert all(f.status == 0 for f in out["cheap"] + out["nice"])
    assert [f.status for f in out["greedy"]].count(0) == 5
    assert "greedy caller" in out["greedy"][-1].message


def test_one_way_requests_over_the_limit_are_dropped_and_counted() -> None:
    with cluster() as c:
        aport = free_port()
        port, _ = provider_chain(c, [{"appkey": "a", "rate_limits": [{"rate": 0.01, "burst": 2}]}],
                                 extra={"admin": {"port": aport}})

        async def main() -> F.Frame:
            raw = await Raw.connect(port)
            for i in range(5):
                raw.send(b"id:ow%d" % i, one_way=True)
            f = await raw.call(b"after")  # the bucket is empty: refused, not hung
            await raw.close()
            return f

        f = uvloop.run(main())
        assert f.status == 6
        st = admin_json(aport, "/governance")["services"]["a"]["rate_limits"][0]
        assert st["allowed"] == 2 and st["limited"] == 4
        with Client(c.path("p.sock")) as direct:
            seen = [direct.call("x", b"count:ow%d" % i).body for i in range(5)]
    assert seen.count(b"p|1") == 2 and seen.count(b"p|0") == 3


# ------------------------------------------------------------ cluster quota



def test_two_proxies_share_one_cluster_quota(redis: RedisServer) -> None:
    svc = [{"appkey": "a", "cluster_quota": {"rate": 100}}]
    with cluster() as c:
        c.providers(p="p.sock")
        ports = []
        for name in ("s1", "s2"):
            port = free_port()
            cfg = server_proxy_cfg({port: c.path("p.sock")})
            cfg["node"]["id"] = name
            cfg["listeners"]["inbound"][0]["appkey"] = "a"
            cfg["static"] = {"services": svc}
            cfg["redis"] = {"url": redis.url}
            c.proxy(name, cfg)
            ports.append(port)

        async def main() -> list[int]:
            raws = [await Raw.connect(p) for p in ports]
            await asyncio.gather(*(closed_loop(r, 0.5, 2, b"x") for r in raws))  # steps sized
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)  # whole windows
            left = 3.0 - time.time() % 1.0 - 0.03
            res = await asyncio.gather(*(closed_loop(r, left, 2, b"x") for r in raws))
            for r in raws:
                await r.close()
            return [s for st in res for s in st]

        statuses = uvloop.run(main())
    allowed = statuses.count(0)
    # 3 windows of 100: 300, within 10%
    assert 270 <= allowed <= 330, (allowed, len(statuses))


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load(redis: RedisServer) -> None:
    svc = [{"appkey": "a", "cluster_quota": {"rate": 100, "local_share": 0.3}}]
    with cluster() as c:
        aport = free_port()
        port, _ = provider_chain(c, svc, extra={"redis": {"url": redis.url, "retry_s": 0.2},
                                                "admin": {"port": aport}})

        async def windows(raw: Raw, n: int) -> list[int]:
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
            return await closed_loop(raw, n - 0.02, 4, b"x")

        async def main() -> tuple[list[int], list[int], list[int]]:
            raw = await Raw.connect(port)
            await closed_loop(raw, 1.0, 4, b"x")  # Redis connected, steps sized
            before = await windows(raw, 2)
            redis.kill()
            await closed_loop(raw, 0.5, 4, b"x")  # the failure is noticed
            during = await windows(raw, 3)
            redis.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                await closed_loop(raw, 0.5, 4, b"x")
                if admin_json(aport, "/governance")["redis"]["up"]:
                    break
            after = await windows(raw, 2)
            await raw.close()
            return before, during, after

        before, during, after = uvloop.run(main())
        log = c.procs[-1].log()
        g = admin_json(aport, "/governance")
    assert 180 <= before.count(0) <= 220, before.count(0)  # 100/s, 2 windows
    # down: the local share, 30/s for 3 s (its burst was spent noticing)
    assert 80 <= during.count(0) <= 130, during.count(0)
    assert 180 <= after.count(0) <= 220, after.count(0)
    assert log.count("unreachable") == 1 and log.count("reachable again") == 1
    assert g["redis"]["failures"] == 1 and g["services"]["a"]["quota"]["mode"] == "redis"


# ------------------------------------------------------------ caller side


def three_nodes(c: Cluster, n: int = 3, **policy: Any) -> tuple[list[int], str, int]:
    """n providers ("n0".."n{n-1}") each behind its own server-side proxy, and a
    client-side proxy routing appkey "a" to them with `policy`; returns
    (inbound ports, client UDS, client admin port)."""
    ports = []
    for i in range(n):
        c.providers(**{f"n{i}": f"n{i}.sock"})
        port = free_port()
        cfg = server_proxy_cfg({port: c.path(f"n{i}.sock")})
        cfg["node"]["id"] = f"s{i}"
        c.proxy(f"s{i}", cfg)
        ports.append(port)
    aport = free_port()
    svc = {"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{p}"} for p in ports], **policy}
    c.proxy("client", client_proxy_cfg(c.path("px.sock"), [svc], admin={"port": aport}))
    return ports, c.path("px.sock"), aport


def test_circuit_breaker_max_requests() -> None:
    with cluster() as c:
        _, uds, aport = three_nodes(c, 1, circuit_breakers={"max_requests": 4})

        async def main() -> list[F.Frame]:
            raw = await Raw.connect(uds)
            futs = [raw.send(b"sleep:400:x%d" % i) for i in range(10)]
            out = list(await asyncio.gather(*futs))
            out.append(await raw.call(b"after"))  # below the threshold again
            await raw.close()
            return out

        out = uvloop.run(main())
        g = admin_json(aport, "/governance")["services"]["a"]
    statuses = [f.status for f in out]
    assert statuses[:10].count(0) == 4 and statuses[:10].count(6) == 6 and statuses[10] == 0
    assert any("too many requests in flight" in (f.message or "") for f in out)
    assert g["breakers"]["max_requests"] == 6


def test_circuit_breaker_per_node() -> None:
    with cluster() as c:
        _, uds, _ = three_nodes(c, 2, lb_policy="round_robin",
                                circuit_breakers={"max_requests_per_node": 2})

        async def main() -> list[int]:
            raw = await Raw.connect(uds)
            out = [f.status for f in await asyncio.gather(
                *(raw.send(b"sleep:300:y%d" % i) for i in range(8)))]
            await raw.close()
            return out

        statuses = uvloop.run(main())
    assert statuses.count(0) == 4 and statuses.count(6) == 4


def _break(c: Cluster, name: str, how: bytes = b"break") -> None:
    with Client(c.path(f"{name}.sock")) as direct:
        assert direct.call("x", how).ok


def test_failing_node_is_ejected_returns_and_is_ejected_again() -> None:
    od = {"consecutive_errors": 3, "error_statuses": [2], "base_ejection_s": 1.5,
          "max_ejection_percent": 50, "interval_s": 30}
    with cluster() as c:
        _, uds, aport = three_nodes(c, 3, lb_policy="round_robin", outlier_detection=od)
        _break(c, "n1")

        async def main() -> tuple[list[F.Frame], list[F.Frame], list[F.Frame]]:
            raw = await Raw.connect(uds)
            first = [await raw.call(b"q%d" % i) for i in range(60)]
            ej = admin_json(aport, "/clusters")["services"]["a"]["nodes"]
            assert [n["ejected"] for n in ej].count(True) == 1
            await asyncio.sleep(2.0)  # back after 1.5 s, on probation
            second = [await raw.call(b"r%d" % i) for i in range(30)]
            _break(c, "n1", b"mend")
            await asyncio.sleep(3.5)  # the second ejection lasts 3 s
            third = [await raw.call(b"s%d" % i) for i in range(30)]
            await raw.close()
            return first, second, third

        first, second, third = uvloop.run(main())
        g = admin_json(aport, "/governance")["services"]["a"]
    fails1 = [f for f in first if f.status != 0]
    assert len(fails1) == 3 and all(f.status == 2 for f in fails1)  # the threshold, no more
    assert all(f.body.startswith((b"n0|", b"n2|")) for f in first[-30:])
    assert sum(f.status != 0 for f in second) == 1  # probation: one failure ejects again
    assert all(f.status == 0 for f in third)
    assert any(f.body.startswith(b"n1|") for f in third)  # mended and back
    assert g["ejections"] == 2


def test_no_more_than_max_ejection_percent() -> None:
    od = {"consecutive_errors": 2, "base_ejection_s": 30, "max_ejection_percent": 25}
    with cluster() as c:
        _, uds, aport = three_nodes(c, 4, lb_policy="round_robin", outlier_detection=od)
        for name in ("n0", "n1", "n2"):
            _break(c, name)

        async def main() -> list[F.Frame]:
            raw = await Raw.connect(uds)
            out = [await raw.call(b"t%d" % i) for i in range(80)]
            await raw.close()
            return out

        out = uvloop.run(main())
        nodes = admin_json(aport, "/clusters")["services"]["a"]["nodes"]
    assert [n["ejected"] for n in nodes].count(True) == 1  # 25% of 4
    assert sum(f.status == 2 for f in out[-20:]) >= 8  # two broken nodes still serve


def test_ejection_empties_a_locality_and_the_next_one_serves() -> None:
    od = {"consecutive_errors": 1, "base_ejection_s": 30, "max_ejection_percent": 50}
    with cluster() as c:
        ports = []
        for i in range(2):
            c.providers(**{f"n{i}": f"n{i}.sock"})
            port = free_port()
            c.proxy(f"s{i}", server_proxy_cfg({port: c.path(f"n{i}.sock")}))
            ports.append(port)
        eps = [{"address": f"127.0.0.1:{ports[0]}", "idc": "near"},
               {"address": f"127.0.0.1:{ports[1]}", "idc": "far"}]
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "endpoints": eps, "outlier_detection": od}],
            node={"idc": "near"}))
        _break(c, "n0")

        async def main() -> list[F.Frame]:
            raw = await Raw.connect(c.path("px.sock"))
            out = [await raw.call(b"u%d" % i) for i in range(10)]
            await raw.close()
            return out

        out = uvloop.run(main())
    assert out[0].status == 2  # the near node, once
    assert all(f.status == 0 and f.body.startswith(b"n1|") for f in out[1:])


# ------------------------------------------------------------ retries


def test_never_written_requests_go_to_another_node() -> None:
    with cluster() as c:
        ports, uds, aport = three_nodes(c, 2, lb_policy="round_robin",
                                        circuit_breakers={"max_requests": 1000})
        _server_proc(c, 0).stop()  # node 0's server-side proxy is gone: connects fail
        wait_for(lambda: not can_connect_tcp(ports[0]), 10, "node 0 down")

        async def main() -> list[F.Frame]:
            raw = await Raw.connect(uds)
            out = [await raw.call(b"v%d" % i) for i in range(20)]
            await raw.close()
            return out

        out = uvloop.run(main())
        g = admin_json(aport, "/governance")["services"]["a"]
    assert all(f.status == 0 and f.body.startswith(b"n1|") for f in out), \
        [(f.status, f.message) for f in out if f.status]
    assert g["retries_unsent"] >= 1


@pytest.mark.parametrize("idempotent", [False, True])
def test_written_request_is_retried_only_when_idempotent(idempotent: bool) -> None:
    retry = {"idempotent_methods": ["get"] if idempotent else ["other"], "max_attempts": 2}
    with cluster() as c:
        _, uds, aport = three_nodes(c, 2, lb_policy="round_robin", retry=retry)

        def executions() -> int:
            # begun at a provider (its server-side proxy may die before the answer)
            n = 0
            for name in ("n0", "n1"):
                with Client(c.path(f"{name}.sock")) as direct:
                    n += int(direct.call("x", b"started:w1").body.split(b"|")[1])
            return n

        def started(i: int) -> bool:
            with Client(c.path(f"n{i}.sock")) as direct:
                return direct.call("x", b"started:w1").body != b"n%d|0" % i

        async def main() -> F.Frame:
            raw = await Raw.connect(uds)
            fut = raw.send(call("get", b"sleep:1500:id:w1"))
            # the request is executing at one node: its server-side proxy dies
            first = None
            deadline = time.monotonic() + 10
            while first is None and time.monotonic() < deadline:
                first = next((i for i in (0, 1) if started(i)), None)
                await asyncio.sleep(0.02)
            assert first is not None
            _server_proc(c, first).kill()
            f = await fut
            await raw.close()
            return f

        f = uvloop.run(main())
        wait_for(lambda: executions() >= (2 if idempotent else 1), 10, "executions")
        time.sleep(0.5)
        n = executions()
        g = admin_json(aport, "/governance")["services"]["a"]
    if idempotent:
        assert f.status == 0 and n == 2, (f.status, f.message, n)
        assert g["retries"] - g["retries_unsent"] == 1
    else:
        assert f.status == 4 and n == 1, (f.status, f.message, n)  # executed exactly once
        assert g["retries"] - g["retries_unsent"] == 0


def _server_proc(c: Cluster, i: int) -> Any:
    return next(p for p in c.procs if p.name == f"s{i}")


# ------------------------------------------------------------ xDS at run time


def test_limits_changed_over_xds_at_run_time() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        eps_file = c.path("endpoints.yaml")

        def write(rate: float) -> None:
            tmp = eps_file + ".tmp"
            with open(tmp, "w") as f:
                yaml.safe_dump({"services": [{"appkey": "a", "rate_limits": [
                    {"rate": rate, "burst": rate / 5, "name": "xds-limit"}]}]}, f)
            os.replace(tmp, eps_file)

        write(20)
        cp = c.control_plane(eps_file)
        port = free_port()
        sub_port = free_port()
        aport = free_port()
        cfg = server_proxy_cfg({port: c.path("p.sock")})
        cfg["listeners"]["inbound"][0]["appkey"] = "a"
        cfg["xds"] = {"server": cp.target}
        cfg["subscribe"] = {"port": sub_port}
        cfg["admin"] = {"port": aport}
        c.proxy("server", cfg)
        subscribe(f"http://127.0.0.1:{sub_port}", ["a"], timeout=10)

        async def measure() -> int:
            raw = await Raw.connect(port)
            while (await raw.call(b"drain")).status == 0:
                pass
            st = await closed_loop(raw, 2.0, 4, b"x")
            await raw.close()
            return st.count(0)

        slow = uvloop.run(measure())
        write(100)
        wait_for(lambda: admin_json(aport, "/governance")["services"]["a"]["rate_limits"][0]
                 .get("name") == "xds-limit" and _rate_is(aport, 100), 15, "new limit")
        fast = uvloop.run(measure())
        rules = admin_json(aport, "/governance")["services"]["a"]["rate_limits"]
    assert 36 <= slow <= 44, slow  # 20/s for 2 s
    assert 180 <= fast <= 220, fast  # 100/s for 2 s
    assert rules[0]["allowed"] >= slow + fast  # the same rule: counters kept


def _rate_is(aport: int, rate: float) -> bool:
    cfg = admin_json(aport, "/governance")["services"]["a"]["rate_limits"]
    return bool(cfg) and cfg[0].get("rate") == rate

