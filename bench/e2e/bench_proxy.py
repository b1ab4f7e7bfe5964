"""End-to-end load: app -> client proxy -> server proxy -> provider, next to app -> provider.

Builds the C load generator and provider (bench/e2e/loadgen.c, provider.c)
with gcc into a temp dir, starts the provider, a server-side proxy (inbound
TCP -> provider UDS) and a client-side proxy (outbound UDS, a static service
-> the server proxy's port) as real processes (tests/e2e/harness.py), and
runs, alternating direct and chain, --repeat times:

- 1x1:          1 connection x 1 in flight (latency)
- 32x8:         32 connections x 8 in flight (throughput)
- 1x1 one-core: 1x1 with the provider, both proxies and the load generator
                on CPU 0 (taskset -c 0)
- 32x8 2lg:     32x8 split over two load generators (16 connections each):
                if the single load generator were the bottleneck this would
                go faster

Prints the medians over the repeats.  Bodies are 128 bytes.

    PYTHONPATH=src python bench/e2e/bench_proxy.py [--duration 5] [--repeat 3]
    PYTHONPATH=src python bench/e2e/bench_proxy.py --smoke     # CI: 1 s per run, 1 repeat

Exit status 1 when a run saw errors (wrong status, sequence or echo), lost
requests, closed connections or hung; the performance goals are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from octoproxy._core import frame  # noqa: E402

import harness  # noqa: E402

APPKEY = "com.bench.echo"
SERVICE = "com.bench.Echo"
BODY_LEN = 128
DRAIN_S = 3.0  # the load generator's drain limit after the run


# ---------------------------------------------------------------- tools


def build_tools(outdir: str) -> dict[str, str]:
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if not cc:
        sys.exit("bench_proxy: gcc not found (set CC)")
    out = {}
    for name in ("loadgen", "provider"):
        exe = os.path.join(outdir, name)
        subprocess.run([cc, "-O2", "-Wall", "-o", exe, str(HERE / f"{name}.c")], check=True)
        out[name] = exe
    return out


def make_templates(outdir: str) -> dict[str, Any]:
    body = bytes(range(BODY_LEN))
    req = frame.encode_request(1, SERVICE, body, local_context={"octo-remote-appkey": APPKEY})
    resp = frame.encode_response(1, body)
    t: dict[str, Any] = {}
    for name, data in (("req", req), ("resp", resp)):
        frames, used = frame.scan(data)
        assert used == len(data) and len(frames) == 1
        f = frames[0]
        assert f.body_len == BODY_LEN and f.body_off + f.body_len == len(data)
        path = os.path.join(outdir, f"{name}.bin")
        with open(path, "wb") as fh:
            fh.write(data)
        t[name] = {
            "path": path,
            "seq_off": f.seq_off + f.offset,
            "body_off": f.body_off + f.offset,
            "len": len(data),
        }
    return t


# ---------------------------------------------------------------- pinning


class Pinner:
    def __init__(self) -> None:
        self.taskset = shutil.which("taskset")
        self.note = "" if self.taskset else "taskset missing: pinned with sched_setaffinity"

    @staticmethod
    def cpuset(cpus: str) -> set[int]:
        out: set[int] = set()
        for part in cpus.split(","):
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
        return out

    def pin(self, pid: int, cpus: str) -> None:
        """Every thread of a running process."""
        if self.taskset:
            subprocess.run(
                [self.taskset, "-a", "-p", "-c", cpus, str(pid)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            return
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), self.cpuset(cpus))

    def check(self, pid: int, cpus: str) -> None:
        want = self.cpuset(cpus)
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                got = os.sched_getaffinity(int(tid))
                if got != want:
                    raise RuntimeError(f"pid {pid} thread {tid} runs on {sorted(got)}, not {cpus}")

    def prefix(self, cpus: str | None) -> list[str]:
        return [self.taskset, "-c", cpus] if cpus and self.taskset else []

    def preexec(self, cpus: str | None):
        if not cpus or self.taskset:
            return None
        s = self.cpuset(cpus)
        return lambda: os.sched_setaffinity(0, s)


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(
        self, tools: dict[str, str], tpl: dict[str, Any], pinner: Pinner, base_cpus: str
    ) -> None:
        self.tools, self.tpl, self.pinner, self.base_cpus = tools, tpl, pinner, base_cpus
        self.c = harness.Cluster()
        req, resp = tpl["req"], tpl["resp"]
        self.prov_sock = self.c.path("prov.sock")
        self.provider = harness.Proc(
            [
                tools["provider"],
                self.prov_sock,
                req["path"],
                str(req["seq_off"]),
                str(req["body_off"]),
                resp["path"],
                str(resp["seq_off"]),
                str(resp["body_off"]),
            ],
            "provider",
            self.c.dir,
        )
        self.c.procs.append(self.provider)
        harness.wait_for(
            lambda: harness.can_connect_uds(self.prov_sock) or not self.provider.alive(),
            10,
            "provider socket",
        )
        assert self.provider.alive(), self.provider.log()
        port = harness.free_port()
        # own node ids and hot-restart sockets: the defaults (/tmp/octo-proxy-<node id>.restart.sock)
        # are shared with every other proxy on the host that has the same node id
        tag = f"bench-{os.getpid()}"
        scfg = harness.server_proxy_cfg({port: self.prov_sock}, id=f"{tag}-server")
        scfg["hot_restart"] = {"socket": self.c.path("server.hr")}
        self.server = self.c.proxy("server", scfg)
        self.proxy_sock = self.c.path("proxy.sock")
        services = [
            {
                "appkey": APPKEY,
                "service_names": [SERVICE],
                "endpoints": [{"address": f"127.0.0.1:{port}"}],
            }
        ]
        ccfg = harness.client_proxy_cfg(
            self.proxy_sock,
            services,
            node={"id": f"{tag}-client"},
            hot_restart={"socket": self.c.path("client.hr")},
        )
        self.client = self.c.proxy("client", ccfg)
        self.pin_all(base_cpus)

    def close(self) -> None:
        self.c.close()

    def procs(self) -> list[harness.Proc]:
        return [self.provider, self.server, self.client]

    def pin_all(self, cpus: str) -> None:
        for p in self.procs():
            self.pinner.pin(p.pid, cpus)
            self.pinner.check(p.pid, cpus)

    def check_alive(self) -> None:
        for p in self.procs():
            if not p.alive():
                raise RuntimeError(
                    f"{p.name} died (exit {p.p.returncode}); log {p.log_path}:\n" + p.log()[-2000:]
                )

    def run(
        self,
        path: str,
        conns: int,
        inflight: int,
        duration: float,
        warmup: float,
        cpus: str | None,
        nloadgens: int = 1,
    ) -> dict[str, Any]:
        sock = self.prov_sock if path == "direct" else self.proxy_sock
        req = self.tpl["req"]
        self.check_alive()
        cpu0 = {p.name: p.cpu_seconds() for p in self.procs()}
        ss0 = {p.name: schedstat(p.pid) for p in self.procs()}
        t0 = time.monotonic()
        lgs = []
        for i in range(nloadgens):
            n = conns // nloadgens + (1 if i < conns % nloadgens else 0)
            args = [
                *self.pinner.prefix(cpus),
                self.tools["loadgen"],
                sock,
                str(n),
                str(inflight),
                str(duration),
                str(warmup),
                req["path"],
                str(req["seq_off"]),
                str(req["body_off"]),
                str(self.tpl["resp"]["len"]),
            ]
            lgs.append(
                subprocess.Popen(
                    args,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    preexec_fn=self.pinner.preexec(cpus),
                )
            )
        outs = []
        hung = False
        for lg in lgs:
            try:
                out, err = lg.communicate(timeout=warmup + duration + DRAIN_S + 15)
            except subprocess.TimeoutExpired:
                lg.kill()
                out, err = lg.communicate()
                hung = True
            outs.append((lg.returncode, out.decode(), err.decode()))
        wall = time.monotonic() - t0
        cpu1 = {p.name: p.cpu_seconds() for p in self.procs()}
        ss1 = {p.name: schedstat(p.pid) for p in self.procs()}
        results = []
        stderr = ""
        for rc, out, err in outs:
            stderr += err
            line = out.strip().splitlines()[-1] if out.strip() else ""
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                results.append({"errors": 1, "failed": f"exit {rc}: {out!r}"})
        r = merge(results)
        r["hung"] = hung
        r["stderr"] = stderr.strip()
        total = max(r.get("total", 0), 1)
        r["proxies_cpu_us_per_req"] = (
            ((cpu1["server"] - cpu0["server"]) + (cpu1["client"] - cpu0["client"])) * 1e6 / total
            if path == "chain"
            else None
        )
        r["client_cpu_us_per_req"] = (cpu1["client"] - cpu0["client"]) * 1e6 / total
        r["server_cpu_us_per_req"] = (cpu1["server"] - cpu0["server"]) * 1e6 / total
        r["provider_cpu_share"] = (cpu1["provider"] - cpu0["provider"]) / wall
        r["client_cpu_share"] = (cpu1["client"] - cpu0["client"]) / wall
        r["server_cpu_share"] = (cpu1["server"] - cpu0["server"]) / wall
        # share of the wall time each process was runnable but waited for a CPU (/proc schedstat):
        # high values mean it was starved (other processes on the host), not idle
        for n in ("client", "server", "provider"):
            r[f"{n}_runq_wait_share"] = (ss1[n][1] - ss0[n][1]) / wall
        r["ok"] = (
            not hung
            and not r.get("errors")
            and not r.get("lost")
            and not r.get("closed")
            and "failed" not in r
        )
        return r


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) over every thread of pid."""
    run = wait = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    a, b, _ = f.read().split()
                run += int(a)
                wait += int(b)
    return run / 1e9, wait / 1e9


def merge(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several load generators -> one row: sums, and the worst percentile of any."""
    if len(rs) == 1:
        return dict(rs[0])
    out: dict[str, Any] = {"loadgens": len(rs)}
    for k in (
        "requests",
        "rps",
        "total",
        "sent",
        "errors",
        "status_errors",
        "seq_mismatch",
        "echo_mismatch",
        "len_mismatch",
        "unparsable",
        "lost",
        "closed",
        "connections",
        "cpu_s",
    ):
        out[k] = sum(r.get(k, 0) for r in rs)
    for k in ("p50_us", "p99_us", "p999_us", "max_us", "cpu_share", "runq_wait_share"):
        out[k] = max(r.get(k, 0) for r in rs)  # cpu_share: the busiest load generator
    out["inflight"] = rs[0].get("inflight")
    out["duration"] = rs[0].get("duration")
    if any("failed" in r for r in rs):
        out["failed"] = "; ".join(r["failed"] for r in rs if "failed" in r)
    return out


# ---------------------------------------------------------------- report


def med(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for (scen, path), rs in runs.items():
        row = {
            "scenario": scen,
            "path": path,
            "runs": len(rs),
            "rps": med([r.get("rps") for r in rs]),
            "p50_us": med([r.get("p50_us") for r in rs]),
            "p99_us": med([r.get("p99_us") for r in rs]),
            "p999_us": med([r.get("p999_us") for r in rs]),
            "loadgen_cpu_share": med([r.get("cpu_share") for r in rs]),
            "loadgen_runq_wait_share": med([r.get("runq_wait_share") for r in rs]),
            "provider_cpu_share": med([r.get("provider_cpu_share") for r in rs]),
            "proxies_cpu_us_per_req": med([r.get("proxies_cpu_us_per_req") for r in rs]),
            "client_cpu_us_per_req": med([r.get("client_cpu_us_per_req") for r in rs])
            if path == "chain"
            else None,
            "server_cpu_us_per_req": med([r.get("server_cpu_us_per_req") for r in rs])
            if path == "chain"
            else None,
            "client_cpu_share": med([r.get("client_cpu_share") for r in rs])
            if path == "chain"
            else None,
            "server_cpu_share": med([r.get("server_cpu_share") for r in rs])
            if path == "chain"
            else None,
            "client_runq_wait_share": med([r.get("client_runq_wait_share") for r in rs])
            if path == "chain"
            else None,
            "server_runq_wait_share": med([r.get("server_runq_wait_share") for r in rs])
            if path == "chain"
            else None,
            "errors": sum(
                int(r.get("errors", 0))
                + int(r.get("lost", 0))
                + int(r.get("closed", 0))
                + int(bool(r.get("hung")))
                for r in rs
            ),
            "added_p50_us": None,
            "rps_ratio": None,
            "p50_ratio": None,
        }
        if path == "chain" and (scen, "direct") in runs:
            d = runs[(scen, "direct")]
            pairs = [c.get("p50_us", 0) - dd.get("p50_us", 0) for c, dd in zip(rs, d, strict=False)]
            row["added_p50_us"] = med(pairs)  # median of per-repeat (adjacent) differences
            drow_rps, drow_p50 = med([x.get("rps") for x in d]), med([x.get("p50_us") for x in d])
            if drow_rps and row["rps"] is not None:
                row["rps_ratio"] = row["rps"] / drow_rps
            if drow_p50 and row["p50_us"] is not None:
                row["p50_ratio"] = row["p50_us"] / drow_p50
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (
        f"{'scenario':<13} {'path':<6} {'rps':>9} {'p50us':>7} {'p99us':>8} {'p999us':>8} "
        f"{'lg_cpu':>6} {'prov_cpu':>8} {'proxy_us/req':>12} {'(cli+srv)':>11} {'added_p50':>9} "
        f"{'rps_x':>6} {'p50_x':>6} {'err':>4}  {'cli/srv cpu(wait)':<17}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        split = (
            f"{fmt(r['client_cpu_us_per_req'])}+{fmt(r['server_cpu_us_per_req'])}"
            if r["path"] == "chain"
            else ""
        )
        print(
            f"{r['scenario']:<13} {r['path']:<6} {fmt(r['rps'], '.0f'):>9} {fmt(r['p50_us']):>7} "
            f"{fmt(r['p99_us']):>8} {fmt(r['p999_us']):>8} {fmt(r['loadgen_cpu_share'], '.0%'):>6} "
            f"{fmt(r['provider_cpu_share'], '.0%'):>8} {fmt(r['proxies_cpu_us_per_req'], '.2f'):>12} "
            f"{split:>11} {fmt(r['added_p50_us']):>9} {fmt(r['rps_ratio'], '.2f'):>6} "
            f"{fmt(r['p50_ratio'], '.2f'):>6} {r['errors']:>4}  {busy(r):<17}"
        )


def busy(r: dict[str, Any]) -> str:
    if r["path"] != "chain" or r["client_cpu_share"] is None:
        return ""
    pc = lambda x: f"{100 * x:.0f}"  # noqa: E731
    return (
        f"{pc(r['client_cpu_share'])}({pc(r['client_runq_wait_share'])})/"
        f"{pc(r['server_cpu_share'])}({pc(r['server_runq_wait_share'])})%"
    )


def print_goals(rows: list[dict[str, Any]]) -> None:
    by = {(r["scenario"], r["path"]): r for r in rows}
    c = by.get(("32x8", "chain"))
    if c and c["proxies_cpu_us_per_req"] is not None:
        v = c["proxies_cpu_us_per_req"]
        print(
            f"goal: proxies' CPU per request at 32x8 <= 4 us: measured {v:.2f} us "
            f"({'met' if v <= 4 else 'NOT met'})"
        )
    c = by.get(("1x1 one-core", "chain"))
    if c and c["added_p50_us"] is not None:
        v = c["added_p50_us"]
        print(
            f"goal: chain adds <= 65 us to p50 at 1x1 on one core: measured {v:.1f} us "
            f"({'met' if v <= 65 else 'NOT met'})"
        )
    d, c = by.get(("32x8", "direct")), by.get(("32x8", "chain"))
    if d and c and d["rps"] and c["rps"]:
        print(
            f"load generator headroom: the same single loadgen drives {d['rps']:.0f} rps direct, "
            f"{d['rps'] / c['rps']:.1f}x the chain's {c['rps']:.0f} rps"
        )
    one, two = by.get(("32x8", "chain")), by.get(("32x8 2lg", "chain"))
    if one and two and one["rps"] and two["rps"]:
        print(
            f"load generator check (chain 32x8): 1 loadgen {one['rps']:.0f} rps at "
            f"{fmt(one['loadgen_cpu_share'], '.0%')} CPU ({fmt(one['loadgen_runq_wait_share'], '.0%')} "
            f"waiting for a CPU); 2 loadgens {two['rps']:.0f} rps "
            f"({two['rps'] / one['rps']:.2f}x)"
        )
    one, two = by.get(("32x8", "direct")), by.get(("32x8 2lg", "direct"))
    if one and two and one["rps"] and two["rps"]:
        print(
            f"load generator check (direct 32x8): 1 loadgen {one['rps']:.0f} rps at "
            f"{fmt(one['loadgen_cpu_share'], '.0%')} CPU; 2 loadgens {two['rps']:.0f} rps "
            f"({two['rps'] / one['rps']:.2f}x)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each run (1)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario and path; medians (3)")
    ap.add_argument(
        "--taskset",
        metavar="CPUS",
        default=None,
        help="pin every process (provider, proxies, load generators) to CPUS, e.g. 0-1",
    )
    ap.add_argument(
        "--no-one-core",
        dest="one_core",
        action="store_false",
        help="skip the 1x1 run with everything on CPU 0",
    )
    ap.add_argument(
        "--one-core",
        dest="one_core",
        action="store_true",
        default=True,
        help="run 1x1 with everything on CPU 0 too (default)",
    )
    ap.add_argument(
        "--no-two-loadgens",
        dest="two_loadgens",
        action="store_false",
        default=True,
        help="skip the 32x8 run split over two load generators",
    )
    ap.add_argument(
        "--scenario",
        action="append",
        default=None,
        help="only these scenarios (1x1, 32x8, '1x1 one-core', '32x8 2lg'); repeatable",
    )
    ap.add_argument("--smoke", action="store_true", help="CI: 1 s per run, 0.3 s warm-up, 1 repeat")
    ap.add_argument("--json", metavar="PATH", help="also write every run and the medians as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.repeat = 1.0, 0.3, 1

    pinner = Pinner()
    all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    base = args.taskset or all_cpus
    scenarios: list[tuple[str, int, int, str | None, int]] = [
        ("1x1", 1, 1, args.taskset, 1),
        ("32x8", 32, 8, args.taskset, 1),
    ]
    if args.one_core:
        scenarios.append(("1x1 one-core", 1, 1, "0", 1))
    if args.two_loadgens:
        scenarios.append(("32x8 2lg", 32, 8, args.taskset, 2))
    if args.scenario:
        scenarios = [s for s in scenarios if s[0] in args.scenario]

    print(
        f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; runs of {args.warmup:g} s "
        f"warm-up + {args.duration:g} s, {args.repeat} repeat(s), body {BODY_LEN} B; "
        f"pinned to {base}{'; ' + pinner.note if pinner.note else ''}",
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix="opbench", dir="/tmp")
    tools = build_tools(tmp)
    tpl = make_templates(tmp)
    bench = Bench(tools, tpl, pinner, base)
    print(
        f"# temp dirs: {tmp} (tools, templates), {bench.c.dir} (proxy configs and logs)", flush=True
    )
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    raw: list[dict[str, Any]] = []
    bad = False
    try:
        for rep in range(args.repeat):
            for scen, conns, inflight, cpus, nlg in scenarios:
                if cpus != args.taskset:
                    bench.pin_all(cpus or base)
                paths = ("direct", "chain") if rep % 2 == 0 else ("chain", "direct")
                for path in paths:
                    r = bench.run(
                        path, conns, inflight, args.duration, args.warmup, cpus or args.taskset, nlg
                    )
                    runs.setdefault((scen, path), []).append(r)
                    raw.append({"repeat": rep, "scenario": scen, "path": path, **r})
                    print(
                        f"  [{rep + 1}/{args.repeat}] {scen:<13} {path:<6} {r.get('rps', 0):>9.0f} rps "
                        f"p50 {r.get('p50_us', 0):7.1f} p99 {r.get('p99_us', 0):8.1f} "
                        f"p999 {r.get('p999_us', 0):8.1f} us  lg cpu {r.get('cpu_share', 0):.0%} "
                        f"({r.get('runq_wait_share', 0):.0%})"
                        + (
                            f"  proxies {r['proxies_cpu_us_per_req']:.2f} us/req; CPU (run queue wait) "
                            f"client {r['client_cpu_share']:.0%} ({r['client_runq_wait_share']:.0%}) "
                            f"server {r['server_cpu_share']:.0%} ({r['server_runq_wait_share']:.0%})"
                            if r.get("proxies_cpu_us_per_req") is not None
                            else ""
                        ),
                        flush=True,
                    )
                    if not r["ok"]:
                        bad = True
                        print(
                            f"    PROBLEM: {json.dumps({k: v for k, v in r.items() if k != 'stderr'})}"
                        )
                        if r["stderr"]:
                            print(
                                "    loadgen stderr:\n      "
                                + r["stderr"].replace("\n", "\n      ")
                            )
                if cpus != args.taskset:
                    bench.pin_all(base)
    except RuntimeError as e:  # a process of the bench died
        bad = True
        print(f"PROBLEM at {time.strftime('%H:%M:%S')}: {e}", flush=True)
    finally:
        if bad:
            for p in bench.procs():
                print(f"--- tail of {p.log_path}:\n{p.log()[-3000:]}")
        bench.close()
        print("# provider: " + (bench.provider.log().strip().splitlines() or ["?"])[-1])
        if not args.keep and not bad:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bench.c.dir, ignore_errors=True)
    rows = summarize(runs)
    print(
        f"\nmedians over {args.repeat} repeat(s); latencies in us; lg_cpu = load generator CPU s / "
        f"wall s; proxy_us/req = both proxies' CPU (/proc utime+stime) per request; "
        f"cli/srv cpu(wait) = each proxy's CPU share (and share of time runnable but waiting for a CPU)"
    )
    print_table(rows)
    print_goals(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": rows, "runs": raw}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
