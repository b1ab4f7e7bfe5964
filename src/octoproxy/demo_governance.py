"""The demo's governance scene (docs/demo.md, docs/governance.md): after the
main run, a small mesh of its own shows service governance at work.

- A provider service `com.demo.gov` with three nodes behind a server-side
  proxy whose provider-side rule gives each caller appkey 100 requests/s
  (burst 20): a greedy caller sending as fast as it can is refused with
  status 6 while a polite one at about 50/s is never refused.
- One node starts failing (status 2) once the greedy caller has stopped
  (its flood of status-6 refusals from every node would reset the
  detector's count of consecutive errors, as any non-error answer does,
  so the two are shown one after the other): the client-side
  proxy's outlier detector ejects it after 3 consecutive errors, and traffic
  moves to the other two; the only failed calls are the detector's
  threshold (and any that were already on their way to that node).
- A cluster-wide quota on Redis when a `redis-server` is installed: a
  second service, `com.demo.quota` (served by the first node's provider),
  allows 200 requests/s for all its proxies together; a batch caller
  asking for more gets about that, and the proxy takes the quota from Redis
  in steps (a few Redis operations for many requests).  Without
  `redis-server` the scene says it is skipped.

Its processes are the demo's (Demo.procs), stopped by the demo's cleanup;
its providers are the demo's (``--fail-flag``: a node whose UDS path +
".fail" exists answers status 2), its callers `octoproxy.rawcall.RawCaller`s
(they name their caller appkey, which the SDK leaves to the proxy).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
import urllib.request
from collections import Counter
from typing import TYPE_CHECKING, Any

from octoproxy.rawcall import RawCaller

if TYPE_CHECKING:
    from octoproxy.demo import Demo

APPKEY = "com.demo.gov"
QUOTA_APPKEY = "com.demo.quota"
BATCH = "com.demo.batch"
NODES = ("gov-ok-1", "gov-ok-2", "gov-flaky")
GREEDY, POLITE = "com.demo.greedy", "com.demo.polite"
PER_CALLER_RATE, PER_CALLER_BURST = 100, 20
EJECT_AFTER = 3
QUOTA_RATE = 200
GREEDY_S = 1.0  # the greedy caller's phase
FAIL_AT_S = 1.0  # the flaky node fails after it (see the module's docstring)
RUN_S = 2.0
GREEDY_INFLIGHT = 8  # well over its limit even on a slow machine


def _json(port: int, path: str) -> Any:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def governance_scene(demo: Demo) -> str:
    """Set up the scene's mesh, run its traffic, return its report section."""
    from octoproxy.demo import DemoError, _free_port
    from octoproxy.ports import can_connect_tcp, can_connect_uds

    t0 = time.monotonic()
    demo.say("governance scene: rate limits per caller, outlier ejection, cluster quota")
    ports = {n: _free_port() for n in NODES}
    aport, sport = _free_port(), _free_port()
    lines = [""]
    quota = bool(shutil.which("redis-server"))
    if quota:
        redis_port = _free_port()
        redis = demo._start("gov-redis", ["-c", "import os,sys; os.execvp(sys.argv[1], sys.argv[1:])",
                                          "redis-server", "--port", str(redis_port),
                                          "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"])
        demo._wait(lambda: can_connect_tcp(redis_port), [redis], "redis-server")
        ports["quota"] = _free_port()
    services: list[dict[str, Any]] = [{"appkey": APPKEY, "rate_limits": [
        {"rate": PER_CALLER_RATE, "burst": PER_CALLER_BURST, "caller": "*",
         "name": "per-caller limit"}]}]
    inbound: list[dict[str, Any]] = [
        {"host": "127.0.0.1", "port": ports[n], "upstream_uds": demo.path(f"{n}.sock"),
         "appkey": APPKEY} for n in NODES]
    client_svcs: list[dict[str, Any]] = [{
        "appkey": APPKEY, "lb_policy": "round_robin",
        "endpoints": [{"address": f"127.0.0.1:{ports[n]}"} for n in NODES],
        "outlier_detection": {"consecutive_errors": EJECT_AFTER, "error_statuses": [2],
                              "base_ejection_s": 30, "max_ejection_percent": 50}}]
    server_cfg: dict[str, Any] = {
        "node": {"id": "gov-server"},
        "listeners": {"inbound": inbound},
        "static": {"services": services},
        "admin": {"port": sport},
        "hot_restart": {"socket": demo.path("gov-server.hr")},
    }
    if quota:
        services.append({"appkey": QUOTA_APPKEY, "cluster_quota": {"rate": QUOTA_RATE}})
        inbound.append({"host": "127.0.0.1", "port": ports["quota"],
                        "upstream_uds": demo.path(f"{NODES[0]}.sock"), "appkey": QUOTA_APPKEY})
        client_svcs.append({"appkey": QUOTA_APPKEY,
                            "endpoints": [{"address": f"127.0.0.1:{ports['quota']}"}]})
        server_cfg["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    client_cfg = {
        "node": {"id": "gov-client"},
        "listeners": {"outbound": [{"path": demo.path("gov.sock")}]},
        "admin": {"port": aport},
        "static": {"services": client_svcs},
        "hot_restart": {"socket": demo.path("gov-client.hr")},
    }
    prov = demo._start("gov-providers", ["-m", "octoproxy.demo", "provider", "--fail-flag",
                                         *(f"{n}={demo.path(n + '.sock')}" for n in NODES)])
    server = demo._start_proxy("gov-server", server_cfg)
    client = demo._start_proxy("gov-client", client_cfg)
    demo._wait(lambda: all(can_connect_uds(demo.path(f"{n}.sock")) for n in NODES), [prov],
               "the scene's providers")
    demo._wait(lambda: all(can_connect_tcp(p) for p in [*ports.values(), sport]), [server],
               "the scene's server-side proxy")
    demo._wait(lambda: can_connect_uds(demo.path("gov.sock")) and can_connect_tcp(aport),
               [client], "the scene's client-side proxy")
    demo.say(f"  3 nodes of {APPKEY} (pids {prov.pid}, {server.pid}, {client.pid}), "
             f"ready in {time.monotonic() - t0:.1f} s")

    import uvloop

    res = uvloop.run(_traffic(demo.path("gov.sock"), demo.path("gov-flaky.sock.fail"), quota))
    gov = _json(aport, "/governance")["services"].get(APPKEY, {})
    ejected = gov.get("ejected", [])

    w = max(len(GREEDY), len(POLITE))
    lines.append(f"Governance ({APPKEY}: 3 nodes; provider-side limit {PER_CALLER_RATE}/s "
                 f"per caller appkey, burst {PER_CALLER_BURST}; outlier ejection after "
                 f"{EJECT_AFTER} consecutive errors)")
    for who in (GREEDY, POLITE):
        st = res["status"][who]
        n = sum(st.values())
        secs = GREEDY_S if who == GREEDY else RUN_S
        lines.append(f"  caller {who:<{w}}  {n:6,} calls in {secs:g} s: {st[0]:6,} answered, "
                     f"{st[6]:6,} refused with status 6" + (f", {st[2]} failed" if st[2] else ""))
        if who in res["limit_msg"]:
            lines.append(f"    refusal: \"{res['limit_msg'][who]}\"")
    flaky_addr = f"127.0.0.1:{ports['gov-flaky']}"
    fails = res["failed"]
    lines.append(f"  node gov-flaky started failing at {FAIL_AT_S:.2f} s: "
                 + (f"ejected after {EJECT_AFTER} consecutive errors ({fails} failed calls in all, "
                    f"{max(0, fails - EJECT_AFTER)} of them already on their way to it)"
                    if flaky_addr in ejected else "NOT ejected"))
    after = res["after"]
    if after:
        lines.append("  answered after the ejection: " + ", ".join(
            f"{k} {v:,}" for k, v in sorted(after.items())))
    if quota:
        q = _json(sport, "/governance")["services"].get(QUOTA_APPKEY, {}).get("quota", {})
        st = res["status"][BATCH]
        lines.append(f"  cluster quota on Redis: {QUOTA_APPKEY} allows {QUOTA_RATE}/s for all its "
                     f"proxies together (one-second windows); caller {BATCH} asking for more: "
                     f"{st[0]:,} answered, {st[6]:,} refused in {RUN_S:g} s (parts of "
                     f"{math.ceil(RUN_S) + 1} windows), taken from Redis in "
                     f"{q.get('steps', 0):,} steps (mode {q.get('mode')})")
    else:
        lines.append("  cluster quota on Redis: skipped (no redis-server on this host; "
                     "install it to see two callers share one quota)")
    ok = (flaky_addr in ejected and res["status"][POLITE][6] == 0
          and res["status"][GREEDY][6] > 0 and "gov-flaky (failed)" not in after and not res["errors"])
    if res["errors"]:
        lines += [f"  error: {e}" for e in res["errors"][:5]]
    if not ok:
        raise DemoError("the governance scene did not show what it should:\n" + "\n".join(lines))
    return "\n".join(lines) + "\n"


async def _traffic(uds: str, fail_flag: str, quota: bool) -> dict[str, Any]:
    status: dict[str, Counter[int]] = {GREEDY: Counter(), POLITE: Counter(), BATCH: Counter()}
    after: Counter[str] = Counter()
    errors: list[str] = []
    limit_msg: dict[str, str] = {}
    failed = 0
    ejected_at: list[float] = []
    callers = [await RawCaller.connect(uds, service="com.demo.GovService", appkey=appkey,
                                       caller=who, timeout_ms=3000)
               for who, appkey in ((GREEDY, APPKEY), (POLITE, APPKEY), (BATCH, QUOTA_APPKEY))]
    t0 = time.monotonic()
    stop = [t0 + RUN_S]  # moved by flip(): the failing phase always lasts RUN_S - FAIL_AT_S

    async def one(c: RawCaller, pause: float, until: float = 0.0) -> None:
        nonlocal failed
        assert c.caller is not None
        while time.monotonic() < (until or stop[0]):
            sent = time.monotonic()
            try:
                f = await asyncio.wait_for(c.call(b"gov"), 10)
            except Exception as e:  # a lost connection
                errors.append(f"{c.caller}: {type(e).__name__}: {e}")
                return
            status[c.caller][f.status] += 1
            # sent after the app saw the detector's threshold: the client-side
            # proxy ejected the node before it passed that answer on
            late = bool(ejected_at) and sent > ejected_at[0] + 0.05
            if f.status == 6:
                limit_msg.setdefault(c.caller, f.message or "")
            elif f.status == 2:
                failed += 1
                if failed >= EJECT_AFTER and not ejected_at:
                    ejected_at.append(time.monotonic())
                elif late:
                    after["gov-flaky (failed)"] += 1
            elif f.status == 0 and c.appkey == APPKEY and late:
                after[(f.body or b"").decode()] += 1
            if pause:
                await asyncio.sleep(pause)

    greedy = asyncio.gather(*(one(callers[0], 0.0, t0 + GREEDY_S) for _ in range(GREEDY_INFLIGHT)))

    async def flip() -> None:
        # only once every greedy call is answered: a status-6 refusal from
        # the node after its first error would reset the detector's count
        # (a loaded machine answers the last ones well after GREEDY_S)
        await asyncio.sleep(FAIL_AT_S)
        await greedy
        with open(fail_flag, "w"):
            pass
        stop[0] = time.monotonic() + RUN_S - FAIL_AT_S

    await asyncio.gather(flip(), greedy, one(callers[1], 0.02),
                         *(one(callers[2], 0.0) for _ in range(4 if quota else 0)))
    for c in callers:
        await c.close()
    return {"status": status, "after": dict(after), "errors": errors, "limit_msg": limit_msg,
            "failed": failed}

