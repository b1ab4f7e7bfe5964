"""What governance costs: CPU per request of the two-proxy chain with every
governance feature enabled (limits never hit) against the same chain with
none, in the same run, rounds alternating; optionally against a build from
before governance existed (--before SRC).

    loadgen --UDS--> A --TCP--> B --UDS--> provider (echo), as bench_proxy.py

- octo:     no governance policy (the data path checks one pointer per request)
- octo-gov: A (caller side): caller rate rules (service, method, per caller),
            circuit breakers, outlier detection, retry policy with the method
            idempotent (so a copy of each request is kept for a retry), the
            adaptive limiter on with a floor it never reaches; B (provider
            side): rate rules by service, method and per caller, and a cluster
            quota on a real redis-server; every limit far above the load
- before:   (--before SRC) octo with the proxies run from another source
            tree, e.g. a worktree of the commit before governance, built in place

The request body is a Thrift call (so method rules parse and match) and the
header carries traceInfo.clientAppkey (so caller rules match), for every system.

    PYTHONPATH=src python bench/e2e/bench_governance.py [--repeat 5] [--duration 5]
        [--scenario '32x8 free'] [--before /tmp/opbefore/src]

Prints per system the median A+B CPU per request (utime+stime, /proc) and
the ratio to octo.  Exit status 1 when a run saw errors or refusals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_proxy as BP  # noqa: E402
from bench_proxy import APPKEY, SERVICE, harness  # noqa: E402

from octoproxy._core import frame  # noqa: E402

BIG = 10_000_000


THRIFT_HEAD = len(frame.thrift_call("echo", 1))  # the body's Thrift message header


def make_templates(outdir: str) -> dict[str, Any]:
    """bench_proxy's templates with a Thrift call body and a caller appkey."""
    head = frame.thrift_call("echo", 1)
    body = head + bytes(BP.BODY_LEN - len(head))
    req = frame.encode_request(1, SERVICE, body, local_context={"octo-remote-appkey": APPKEY},
                               trace_info={"clientAppkey": "com.bench.caller"})
    resp = frame.encode_response(1, body)
    t: dict[str, Any] = {}
    for name, data in (("req", req), ("resp", resp)):
        frames, _ = frame.scan(data)
        f = frames[0]
        path = os.path.join(outdir, f"{name}.bin")
        with open(path, "wb") as fh:
            fh.write(data)
        t[name] = {"path": path, "seq_off": f.seq_off + f.offset,
                   "body_off": f.body_off + f.offset, "len": len(data)}
    return t


def gov_policy(side: str) -> dict[str, Any]:
    if side == "caller":
        return {
            "rate_limits": [
                {"rate": BIG, "side": "caller"},
                {"rate": BIG, "side": "caller", "method": "echo"},
                {"rate": BIG, "side": "caller", "caller": "*"},
            ],
            "circuit_breakers": {"max_requests": BIG, "max_pending": BIG,
                                 "max_requests_per_node": BIG},
            "outlier_detection": {"consecutive_transport_failures": 5, "consecutive_errors": 5,
                                  "failure_rate_threshold": 0.9, "interval_s": 1},
            "retry": {"idempotent_methods": ["echo"], "max_attempts": 2},
            "adaptive_concurrency": {"enabled": True, "initial_limit": BIG, "min_limit": BIG,
                                     "max_limit": BIG},
        }
    return {
        "rate_limits": [
            {"rate": BIG},
            {"rate": BIG, "method": "echo"},
            {"rate": BIG, "caller": "*"},
        ],
        "cluster_quota": {"rate": BIG},
    }


class GovBench(BP.Bench):
    redis_url = ""
    before_src = ""

    def _octo(self, name: str, policy: bool, src: str | None = None) -> BP.System:
        port = harness.free_port()
        tag = f"bench-{os.getpid()}-{name}"
        old_env = harness.env
        if src:
            def env() -> dict[str, str]:
                e = dict(os.environ)
                e["PYTHONPATH"] = src
                return e

            harness.env = env
        try:
            scfg = harness.server_proxy_cfg({port: self.prov_sock}, id=f"{tag}-server")
            scfg["hot_restart"] = {"socket": self.c.path(f"{name}-server.hr")}
            svc: dict[str, Any] = {"appkey": APPKEY, "service_names": [SERVICE],
                                   "endpoints": [{"address": f"127.0.0.1:{port}"}]}
            if policy:
                scfg["listeners"]["inbound"][0]["appkey"] = APPKEY
                scfg["static"] = {"services": [{"appkey": APPKEY, **gov_policy("provider")}]}
                scfg["redis"] = {"url": self.redis_url}
                svc.update(gov_policy("caller"))
            b = self.c.proxy(f"{name}-b", scfg)
            entry = self.c.path(f"{name}.sock")
            ccfg = harness.client_proxy_cfg(entry, [svc], node={"id": f"{tag}-client"},
                                            hot_restart={"socket": self.c.path(f"{name}-c.hr")})
            a = self.c.proxy(f"{name}-a", ccfg)
        finally:
            harness.env = old_env
        return BP.System(name, entry, a, b)

    def start_octo(self) -> BP.System:
        return self._octo("octo", False)

    def start_octogov(self) -> BP.System:
        return self._octo("octogov", True)

    def start_before(self) -> BP.System:
        return self._octo("before", False, self.before_src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scenario", default="32x8 free")
    ap.add_argument("--before", metavar="SRC", help="src dir of a build from before governance")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 s runs, 1 round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.repeat = 1.0, 0.3, 1
    systems = ["octo", "octogov"] + (["before"] if args.before else [])
    scen, conns, inflight, layout, nlg = BP.parse_scenario(args.scenario)
    redis = harness.RedisServer()
    tmp = tempfile.mkdtemp(prefix="opgov", dir="/tmp")
    GovBench.redis_url = redis.url
    GovBench.before_src = os.path.abspath(args.before) if args.before else ""
    pinner = BP.Pinner()
    tpl = make_templates(tmp)
    bench = GovBench(BP.build_tools(tmp), tpl, pinner, sorted(os.sched_getaffinity(0)), systems)
    # The loadgen stamps 16 bytes at the template's body offset. Put the stamp
    # after the Thrift message header, so the method stays "echo" and the method
    # rules and the idempotent-retry check see it (at the body's start the stamp
    # overwrote the method name: those rules never matched). The provider was
    # started with the body's real offset and echoes the body whole.
    bench.tpl["req"] = {**tpl["req"], "body_off": tpl["req"]["body_off"] + THRIFT_HEAD}
    print(f"# {scen}, {args.repeat} round(s) of {args.warmup:g}+{args.duration:g} s, systems "
          f"{', '.join(systems)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    per: dict[str, list[float]] = {s: [] for s in systems}
    rps: dict[str, list[float]] = {s: [] for s in systems}
    bad = False
    try:
        lay = bench.apply_layout(layout)
        for rep in range(args.repeat):
            k = rep % len(systems)
            for system in systems[k:] + systems[:k]:
                r = bench.run(system, conns, inflight, args.duration, args.warmup, lay, nlg)
                print(f"  [{rep + 1}/{args.repeat}] {system:<8} {r.get('rps', 0):>8.0f} rps  "
                      f"A+B {r['proxies_cpu_us_per_req']:.2f} us/req  "
                      f"(A {r['a_cpu_us_per_req']:.2f}, B {r['b_cpu_us_per_req']:.2f})", flush=True)
                if not r["ok"]:
                    bad = True
                    print(f"    PROBLEM: { {k: v for k, v in r.items() if k != 'stderr'} }")
                per[system].append(r["proxies_cpu_us_per_req"])
                rps[system].append(r.get("rps", 0.0))
    finally:
        bench.close()
        redis.stop()
        if not bad:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bench.c.dir, ignore_errors=True)
    base = statistics.median(per["octo"])
    print(f"\nmedian A+B CPU per request over {args.repeat} round(s), {scen}:")
    for s in systems:
        m = statistics.median(per[s])
        print(f"  {s:<8} {m:6.2f} us/req  {statistics.median(rps[s]):8.0f} rps  "
              f"{(m / base - 1) * 100:+6.1f}% vs octo")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
