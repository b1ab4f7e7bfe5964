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
        [--scenario '32x8 free'] [--before /tmp/opbefore/src] [--instructions]

Prints per system the median A+B CPU per request (utime+stime, /proc) and
the ratio to octo.  Exit status 1 when a run saw errors or refusals.

--instructions: instead, A and B run under valgrind's callgrind with
instrumentation off until the load starts; one run per system (after a
warm-up run) counts the user-space instructions A and B execute per
request.  Unlike CPU time these do not depend on the host's load (the
kernel's work is not counted; the proxies run ~50x slower, so each read
carries more requests than at full speed).  Needs valgrind.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
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
    vg_python = ""  # --instructions: a python that runs under callgrind (instrumentation off)

    def _proxy(self, name: str, cfg: dict[str, Any]) -> Any:
        if not self.vg_python:
            return self.c.proxy(name, cfg)
        exe = sys.executable
        sys.executable = self.vg_python  # the harness starts proxies with sys.executable
        try:
            p = self.c.proxy(name, cfg, wait=False)
        finally:
            sys.executable = exe
        self.c.wait_ready(p, cfg, timeout=300.0)  # Python starts slowly under valgrind
        return p

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
            b = self._proxy(f"{name}-b", scfg)
            entry = self.c.path(f"{name}.sock")
            ccfg = harness.client_proxy_cfg(entry, [svc], node={"id": f"{tag}-client"},
                                            hot_restart={"socket": self.c.path(f"{name}-c.hr")})
            a = self._proxy(f"{name}-a", ccfg)
        finally:
            harness.env = old_env
        return BP.System(name, entry, a, b)

    def start_octo(self) -> BP.System:
        return self._octo("octo", False)

    def start_octogov(self) -> BP.System:
        return self._octo("octogov", True)

    def start_before(self) -> BP.System:
        return self._octo("before", False, self.before_src)


def vg_wrapper(outdir: str) -> str:
    """A python command that runs under callgrind, instrumentation off."""
    path = os.path.join(outdir, "vg-python")
    real = sys.executable  # the binary (a venv's symlink to it), not a shell shim
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec valgrind -q --tool=callgrind --instr-atstart=no "
                f"--callgrind-out-file={outdir}/cg.%p {real} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, stdout=subprocess.DEVNULL,
                   timeout=120)


def instructions(bench: GovBench, system: str, outdir: str, conns: int, inflight: int,
                 duration: float, lay: dict[str, str], nlg: int) -> dict[str, Any]:
    """One run of `system` with A and B instrumented: user-space instructions
    per request (the callgrind dump's total over the requests answered)."""
    sysm = bench.systems[system]
    assert sysm.a is not None and sysm.b is not None
    procs = {"a": sysm.a, "b": sysm.b}
    for p in procs.values():
        callgrind(p.pid, "-z")  # nothing before this run counts
        callgrind(p.pid, "-i", "on")
    r = bench.run(system, conns, inflight, duration, 0.0, lay, nlg)
    out: dict[str, Any] = {"ok": r["ok"], "total": r.get("total", 0), "rps": r.get("rps", 0.0)}
    for k, p in procs.items():
        callgrind(p.pid, "-i", "off")
        callgrind(p.pid, "-d")
        dump = max(glob.glob(f"{outdir}/cg.{p.pid}.*"), key=os.path.getmtime)
        with open(dump) as f:
            ir = next(int(line.split()[1]) for line in f if line.startswith(("totals:", "summary:"))
                      and int(line.split()[1]) > 0)
        out[k] = ir / max(out["total"], 1)
        out[k + "_dp"] = read_callbacks(dump) / max(out["total"], 1)
    return out


def read_callbacks(dump: str) -> int:
    """Instructions spent inside the data path's read callbacks (the
    protocols' buffer_updated, everything they call included): the work per
    request, without what the process does per unit of time (timers, the
    cluster quota's Redis steps, the adaptive limiter), which weighs more
    per request the slower the process runs."""
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", dump],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    total = 0
    for line in ann.splitlines():
        # the function table's rows: "  77,474,981 (57.97%)  .../datapath.c:__pyx_pw_..."
        m = re.match(r"\s*([\d,]+) \([\d.]+%\)\s+\S*datapath\.c:__pyx_pw_\w*buffer_updated ", line)
        if m:
            total += int(m.group(1).replace(",", ""))
    return total


def main_instructions(bench: GovBench, systems: list[str], outdir: str, args: Any, scen: str,
                      conns: int, inflight: int, layout: str, nlg: int) -> int:
    lay = bench.apply_layout(layout)
    res = {}
    bad = False
    for system in systems:
        bench.run(system, conns, inflight, 2.0, 0.0, lay, nlg)  # connections made, caches warm
        res[system] = instructions(bench, system, outdir, conns, inflight, args.duration, lay, nlg)
        r = res[system]
        bad |= not r["ok"]
        print(f"  {system:<8} {r['total']:>8} requests  A {r['a']:7.0f}  B {r['b']:7.0f}  "
              f"A+B {r['a'] + r['b']:7.0f} instructions/request; in the read callbacks "
              f"A {r['a_dp']:6.0f}  B {r['b_dp']:6.0f}" + ("" if r["ok"] else "  PROBLEM"),
              flush=True)
    print(f"\nuser-space instructions per request (callgrind), {scen}:")
    for suffix, what in (("", "the whole process"), ("_dp", "the read callbacks")):
        a0, b0 = res["octo"]["a" + suffix], res["octo"]["b" + suffix]
        print(f" {what}:")
        for s in systems:
            a, b = res[s]["a" + suffix], res[s]["b" + suffix]
            print(f"  {s:<8} A+B {a + b:7.0f}  {((a + b) / (a0 + b0) - 1) * 100:+6.1f}% vs octo "
                  f"(A {a:6.0f} {(a / a0 - 1) * 100:+.1f}%, B {b:6.0f} {(b / b0 - 1) * 100:+.1f}%)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", metavar="SRC", help="src dir of a build from before governance")
    ap.add_argument("--instructions", action="store_true",
                    help="user-space instructions per request of A and B under callgrind")
    args = BP.cost_args(ap, argv)
    systems = ["octo", "octogov"] + (["before"] if args.before else [])
    scen, conns, inflight, layout, nlg = BP.parse_scenario(args.scenario)
    redis = harness.RedisServer()
    tmp = tempfile.mkdtemp(prefix="opgov", dir="/tmp")
    GovBench.redis_url = redis.url
    GovBench.before_src = os.path.abspath(args.before) if args.before else ""
    if args.instructions:
        GovBench.vg_python = vg_wrapper(tmp)
    pinner = BP.Pinner()
    tpl = make_templates(tmp)
    bench = GovBench(BP.build_tools(tmp), tpl, pinner, sorted(os.sched_getaffinity(0)), systems)
    # The loadgen stamps 16 bytes at the template's body offset. Put the stamp
    # after the Thrift message header, so the method stays "echo" and the method
    # rules and the idempotent-retry check see it (at the body's start the stamp
    # overwrote the method name: those rules never matched). The provider was
    # started with the body's real offset and echoes the body whole.
    bench.tpl["req"] = {**tpl["req"], "body_off": tpl["req"]["body_off"] + THRIFT_HEAD}
    if args.instructions:
        print(f"# {scen}, one {args.duration:g} s run per system under callgrind, systems "
              f"{', '.join(systems)}", flush=True)
        try:
            return main_instructions(bench, systems, tmp, args, scen, conns, inflight, layout, nlg)
        finally:
            bench.close()
            redis.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bench.c.dir, ignore_errors=True)
    bad = False
    try:
        runs, bad = BP.cost_rounds(bench, systems, args)
    finally:
        bench.close()
        redis.stop()
        if not bad:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bench.c.dir, ignore_errors=True)
    BP.print_cost(runs, args)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
