"""Hot restart under load: throughput and p99 during a series of restarts vs steady state.

Builds the C load generator and provider (bench/e2e/loadgen.c, provider.c),
starts the provider, a server-side proxy and a client-side proxy (both with a
hot-restart socket and a pid file in the harness temp dir) as real processes,
and runs the load generator with --restart-aware (it behaves like the Mesh
SDK: a status-3 answer flagged octo-proxy-restart is re-sent once on a fresh
connection; a restart notice moves new requests to a new connection).  Each
repeat is one load generator run:

    warm-up | steady state | N hot restarts, --interval s apart | steady state

alternating client-side and server-side proxy (SIGUSR2 to the pid in the pid
file, as an operator or systemd would).  The restart window runs from the
first SIGUSR2 to N x --interval later.  Reported per repeat and as medians:
steady-state rps and p99 (both steady phases together), rps and p99 in the
restart window, their ratio (goal: >= 90% of steady state), errors (goal: 0),
retried requests, restart notices, reconnects, and a per-second timeline.

    PYTHONPATH=src python bench/e2e/bench_restart.py                # 3 repeats, ~1 min
    PYTHONPATH=src python bench/e2e/bench_restart.py --smoke        # 1 repeat, 2 restarts, ~10 s

Exit status 1 when a run saw errors (wrong status, a second restart answer
for one request, requests owed on a connection the proxy closed, lost
requests) or a restart did not complete; the throughput goal is reported,
never asserted.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_proxy as bp  # noqa: E402  (tools, templates, harness on sys.path)

from octoproxy.process import pid_alive, read_pid_file  # noqa: E402

import harness  # noqa: E402

NS = 1_000_000_000


class Chain:
    """provider (C) <- server-side proxy <- client-side proxy, hot-restartable."""

    def __init__(self, tools: dict[str, str], tpl: dict[str, Any], drain_s: float,
                 spread_s: float) -> None:
        self.c = harness.Cluster()
        req, resp = tpl["req"], tpl["resp"]
        self.prov_sock = self.c.path("prov.sock")
        self.provider = harness.Proc(
            [tools["provider"], self.prov_sock, req["path"], str(req["seq_off"]),
             str(req["body_off"]), resp["path"], str(resp["seq_off"]), str(resp["body_off"])],
            "provider", self.c.dir)
        self.c.procs.append(self.provider)
        harness.wait_for(lambda: harness.can_connect_uds(self.prov_sock)
                         or not self.provider.alive(), 10, "provider socket")
        assert self.provider.alive(), self.provider.log()
        port = harness.free_port()
        tag = f"benchhr-{os.getpid()}"

        def hr(name: str) -> dict[str, Any]:
            return {"socket": self.c.path(f"{name}.hr"), "pid_file": self.c.path(f"{name}.pid"),
                    "drain_s": drain_s, "shutdown_s": max(15.0, drain_s + 5),
                    "proxy_restart_spread_s": spread_s}

        scfg = harness.server_proxy_cfg({port: self.prov_sock}, id=f"{tag}-server")
        scfg["hot_restart"] = hr("server")
        self.server = self.c.proxy("server", scfg)
        self.proxy_sock = self.c.path("proxy.sock")
        services = [{"appkey": bp.APPKEY, "service_names": [bp.SERVICE],
                     "endpoints": [{"address": f"127.0.0.1:{port}"}]}]
        ccfg = harness.client_proxy_cfg(self.proxy_sock, services, node={"id": f"{tag}-client"},
                                        hot_restart=hr("client"))
        self.client = self.c.proxy("client", ccfg)

    def pid(self, name: str) -> int | None:
        return read_pid_file(self.c.path(f"{name}.pid"))

    def logs(self) -> dict[str, str]:
        # generations started by SIGUSR2 inherit the first one's stdout: one log per proxy
        return {p.name: p.log() for p in (self.provider, self.server, self.client)}

    def close(self) -> None:
        self.c.close()


class Restart:
    def __init__(self, name: str, old: int, t_signal: int) -> None:
        self.name, self.old, self.t_signal = name, old, t_signal
        self.new: int | None = None
        self.t_new: int | None = None  # the new generation wrote the pid file (serving)
        self.t_old_gone: int | None = None
        self.startup_cpu_s: float | None = None  # the new generation's CPU when it serves

    def poll(self, chain: Chain, now: int) -> None:
        if self.new is None:
            p = chain.pid(self.name)
            if p and p != self.old and pid_alive(p):
                self.new, self.t_new = p, now
                self.startup_cpu_s = proc_cpu(p)
        if self.t_old_gone is None and not pid_alive(self.old):
            self.t_old_gone = now

    @property
    def done(self) -> bool:
        return self.new is not None and self.t_old_gone is not None


def one_run(chain: Chain, tools: dict[str, str], tpl: dict[str, Any], args: argparse.Namespace,
            tmp: str, rep: int) -> dict[str, Any]:
    req = tpl["req"]
    window = args.restarts * args.interval
    duration = args.steady + window + args.steady
    dump = os.path.join(tmp, f"lat{rep}.bin")
    cmd = [tools["loadgen"], "--restart-aware", "--interval-ms", "100", "--dump", dump,
           chain.proxy_sock, str(args.connections), str(args.inflight), str(duration),
           str(args.warmup), req["path"], str(req["seq_off"]), str(req["body_off"]),
           str(tpl["resp"]["len"])]
    t_start = time.monotonic_ns()
    lg = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # +50 ms: the loadgen's clock starts a little after t_start (exec, connect)
    first = t_start + int((args.warmup + args.steady + 0.05) * NS)
    schedule = [first + int(i * args.interval * NS) for i in range(args.restarts)]
    order = ["client", "server"] if rep % 2 == 0 else ["server", "client"]
    restarts: list[Restart] = []
    problems: list[str] = []
    host: list[tuple[int, int, int]] = []  # (t, busy jiffies, all jiffies) of the host, every 100 ms
    while lg.poll() is None:
        now = time.monotonic_ns()
        if not host or now - host[-1][0] >= NS // 10:
            host.append((now, *host_jiffies()))
        if schedule and now >= schedule[0]:
            schedule.pop(0)
            name = order[len(restarts) % 2]
            old = chain.pid(name)
            if not old or not pid_alive(old):
                problems.append(f"restart {len(restarts) + 1}: no live {name} generation")
            else:
                os.kill(old, signal.SIGUSR2)
                restarts.append(Restart(name, old, now))
        for r in restarts:
            if not r.done:
                r.poll(chain, now)
        time.sleep(0.005)
    out, err = lg.communicate()
    deadline = time.monotonic() + 20
    while not all(r.done for r in restarts) and time.monotonic() < deadline:
        for r in restarts:
            r.poll(chain, time.monotonic_ns())
        time.sleep(0.01)
    for i, r in enumerate(restarts):
        if not r.done:
            problems.append(f"restart {i + 1} ({r.name}, pid {r.old}): "
                            f"new={r.new} old_gone={r.t_old_gone is not None} after 20 s")
    line = out.decode().strip().splitlines()[-1] if out.strip() else ""
    try:
        res = json.loads(line)
    except json.JSONDecodeError:
        return {"ok": False, "problems": [f"loadgen exit {lg.returncode}: {out!r} {err!r}"]}
    t0 = res["t0_ns"]
    recs = array.array("I")
    with open(dump, "rb") as f:
        recs.frombytes(f.read())
    os.unlink(dump)
    t_us, lat_ns = recs[0::2], recs[1::2]

    def rel_us(t_ns: int) -> float:
        return (t_ns - t0) / 1000

    first_sig = restarts[0].t_signal if restarts else first
    w0 = rel_us(first_sig)
    w1 = w0 + window * 1e6
    s0 = args.warmup * 1e6
    end = (args.warmup + duration) * 1e6

    def host_busy(spans: list[tuple[float, float]]) -> float | None:
        busy = tot = 0
        for a, b in spans:
            pts = [h for h in host if a <= rel_us(h[0]) <= b]
            if len(pts) >= 2:
                busy += pts[-1][1] - pts[0][1]
                tot += pts[-1][2] - pts[0][2]
        return busy / tot if tot else None

    def phase(spans: list[tuple[float, float]]) -> dict[str, Any]:
        lats = sorted(lat_ns[i] for i in range(len(t_us)) if any(a <= t_us[i] < b for a, b in spans))
        secs = sum(b - a for a, b in spans) / 1e6
        n = len(lats)
        return {"requests": n, "seconds": secs, "rps": n / secs if secs > 0 else 0.0,
                "host_cpu_busy": host_busy(spans),
                "p50_us": pctl(lats, 0.50), "p99_us": pctl(lats, 0.99),
                "p999_us": pctl(lats, 0.999), "max_us": lats[-1] / 1000 if lats else 0.0}

    steady = phase([(s0, w0), (w1, end)])
    before, after = phase([(s0, w0)]), phase([(w1, end)])
    during = phase([(w0, w1)])
    # per-second timeline from the 100 ms samples (whole run)
    rows = res.get("intervals", {}).get("rows", [])
    per_s: dict[int, list[Any]] = {}
    for t_ms, n, _p50, _p99, _mx, retried, notices, reconnects, errors in rows:
        sec = int((t_ms - 1) // 1000)
        a = per_s.setdefault(sec, [0, 0, 0, 0, 0])
        a[0] += n
        a[1] += retried
        a[2] += notices
        a[3] += reconnects
        a[4] += errors
    sec_lat: dict[int, list[int]] = {}
    for i in range(len(t_us)):
        sec_lat.setdefault(int(t_us[i] // 1_000_000), []).append(lat_ns[i])
    timeline = []
    for sec in sorted(per_s):
        lats = sorted(sec_lat.get(sec, []))
        ev = [f"{r.name[0]}" for r in restarts if int(rel_us(r.t_signal) // 1e6) == sec]
        timeline.append({"s": sec, "rps": per_s[sec][0], "p99_us": pctl(lats, 0.99),
                         "retried": per_s[sec][1], "notices": per_s[sec][2],
                         "reconnects": per_s[sec][3], "errors": per_s[sec][4],
                         "restarts": "".join(ev),
                         "phase": "warm-up" if sec < args.warmup else
                         "drain" if sec >= end / 1e6 else
                         ("restarts" if w0 / 1e6 - 1 < sec < w1 / 1e6 else "steady")
                         + ("*" if sec + 1 > end / 1e6 or sec < args.warmup < sec + 1 else "")})
    errors = int(res.get("errors", 0)) + int(res.get("lost", 0))
    logs = chain.logs()
    drain_left = {n: re.findall(r"drain: (\d+) request\(s\) still in flight", t)
                  for n, t in logs.items()}
    r = {
        "repeat": rep,
        "steady": steady, "steady_before": before, "steady_after": after, "restart_window": during,
        "ratio": during["rps"] / steady["rps"] if steady["rps"] else 0.0,
        "errors": errors, "loadgen": {k: v for k, v in res.items() if k != "intervals"},
        "retried": res.get("retried", 0), "notices": res.get("notices", 0),
        "reconnects": res.get("reconnects", 0),
        "restarts": [{"proxy": x.name, "old_pid": x.old, "new_pid": x.new,
                      "at_s": rel_us(x.t_signal) / 1e6,
                      "new_serving_after_s": (x.t_new - x.t_signal) / NS if x.t_new else None,
                      "old_gone_after_s": (x.t_old_gone - x.t_signal) / NS if x.t_old_gone else None,
                      "new_cpu_s_when_serving": x.startup_cpu_s}
                     for x in restarts],
        "timeline": timeline, "problems": problems,
        "drain_left_total": {n: sum(map(int, v)) for n, v in drain_left.items()},
        "stderr": err.decode().strip(),
    }
    r["ok"] = not errors and not problems and len(restarts) == args.restarts
    return r


def proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU of the host (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


def pctl(sorted_ns: list[int], p: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns), max(1, int(p * len(sorted_ns) + 0.999999)))
    return sorted_ns[k - 1] / 1000


def pc(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def print_run(r: dict[str, Any], args: argparse.Namespace) -> None:
    st, dw = r["steady"], r["restart_window"]
    print(f"  [{r['repeat'] + 1}/{args.repeat}] steady {st['rps']:>8.0f} rps p99 {st['p99_us']:>8.0f} us"
          f" (before {r['steady_before']['rps']:.0f}, after {r['steady_after']['rps']:.0f} rps) | "
          f"restarts {dw['rps']:>8.0f} rps p99 {dw['p99_us']:>8.0f} us | ratio {r['ratio']:.1%} | "
          f"errors {r['errors']} retried {r['retried']} notices {r['notices']} "
          f"reconnects {r['reconnects']}; host CPU busy {pc(st['host_cpu_busy'])} steady, "
          f"{pc(dw['host_cpu_busy'])} restarts", flush=True)
    for x in r["restarts"]:
        ns = x["new_serving_after_s"]
        og = x["old_gone_after_s"]
        print(f"      t={x['at_s']:5.2f}s {x['proxy']:<6} pid {x['old_pid']} -> {x['new_pid']}: "
              f"new serving after {ns if ns is None else round(ns, 2)} s, "
              f"old exited after {og if og is None else round(og, 2)} s; new one's CPU when "
              f"serving {x['new_cpu_s_when_serving']} s")
    if args.timeline:
        print("      sec  phase     answers     p99us  retried notices reconn errors restarts"
              "  (c/s: SIGUSR2 to the client/server proxy; *: second only partly in the phase)")
        for t in r["timeline"]:
            print(f"      {t['s']:>3}  {t['phase']:<9} {t['rps']:>8} {t['p99_us']:>9.0f} "
                  f"{t['retried']:>8} {t['notices']:>7} {t['reconnects']:>6} {t['errors']:>6}  "
                  f"{t['restarts']}")
    if not r["ok"]:
        print(f"    PROBLEM: errors {r['errors']}, {r['problems']}; loadgen "
              f"{json.dumps(r.get('loadgen'))}")
        if r.get("stderr"):
            print("    loadgen stderr:\n      " + r["stderr"].replace("\n", "\n      "))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", "--steady", dest="steady", type=float, default=4.0,
                    help="seconds of steady state before and again after the restarts (4)")
    ap.add_argument("--restarts", type=int, default=6,
                    help="hot restarts per run, alternating client and server proxy (6)")
    ap.add_argument("--interval", type=float, default=1.5, help="seconds between restarts (1.5)")
    ap.add_argument("--connections", type=int, default=32, help="load generator connections (32)")
    ap.add_argument("--inflight", type=int, default=8, help="requests in flight per connection (8)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are quoted (3)")
    ap.add_argument("--drain", type=float, default=5.0, help="hot_restart.drain_s of both proxies (5)")
    ap.add_argument("--spread", type=float, default=0.5,
                    help="hot_restart.proxy_restart_spread_s of both proxies (0.5)")
    ap.add_argument("--no-timeline", dest="timeline", action="store_false",
                    help="do not print the per-second timeline of every run")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 repeat, 1 s steady, 2 restarts")
    ap.add_argument("--json", metavar="PATH", help="also write every run and the medians as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steady, args.restarts, args.repeat, args.warmup = 1.0, 2, 1, 0.5

    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.connections}x"
          f"{args.inflight} restart-aware; {args.warmup:g} s warm-up + {args.steady:g} s steady + "
          f"{args.restarts} restarts {args.interval:g} s apart + {args.steady:g} s steady; "
          f"drain_s {args.drain:g}, proxy_restart_spread_s {args.spread:g}; {args.repeat} repeat(s)",
          flush=True)
    tmp = tempfile.mkdtemp(prefix="opbenchhr", dir="/tmp")
    tools = bp.build_tools(tmp)
    tpl = bp.make_templates(tmp)
    chain = Chain(tools, tpl, args.drain, args.spread)
    print(f"# temp dirs: {tmp} (tools), {chain.c.dir} (proxy configs and logs)", flush=True)
    runs: list[dict[str, Any]] = []
    bad = False
    try:
        for rep in range(args.repeat):
            # every generation from the previous repeat has exited
            harness.wait_for(lambda: all(len(harness.children_of(p)) == 0 for p in
                                         (chain.pid("client"), chain.pid("server")) if p), 20,
                             "the proxies to be idle")
            r = one_run(chain, tools, tpl, args, tmp, rep)
            runs.append(r)
            print_run(r, args)
            bad |= not r["ok"]
    finally:
        if bad:
            for name, text in chain.logs().items():
                print(f"--- tail of {name}.log:\n{text[-3000:]}")
        chain.close()
        if not args.keep and not bad:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(chain.c.dir, ignore_errors=True)
    good = [r for r in runs if "steady" in r]

    def m(f: Any) -> float:
        return statistics.median(f(r) for r in good) if good else 0.0

    med = {
        "steady_rps": m(lambda r: r["steady"]["rps"]),
        "steady_p99_us": m(lambda r: r["steady"]["p99_us"]),
        "restart_rps": m(lambda r: r["restart_window"]["rps"]),
        "restart_p99_us": m(lambda r: r["restart_window"]["p99_us"]),
        "ratio": m(lambda r: r["ratio"]),
        # throughput given up per restart, in seconds of steady-state throughput
        "cost_per_restart_s": m(lambda r: (1 - r["ratio"]) * args.restarts * args.interval
                                / max(1, args.restarts)),
        "new_generation_cpu_s": statistics.median(
            [x["new_cpu_s_when_serving"] for r in good for x in r["restarts"]
             if x["new_cpu_s_when_serving"] is not None] or [0.0]),
        "new_serving_after_s": statistics.median(
            [x["new_serving_after_s"] for r in good for x in r["restarts"]
             if x["new_serving_after_s"] is not None] or [0.0]),
        "host_cpu_busy_steady": m(lambda r: r["steady"]["host_cpu_busy"] or 0.0),
        "host_cpu_busy_restarts": m(lambda r: r["restart_window"]["host_cpu_busy"] or 0.0),
        "errors": sum(r.get("errors", 0) for r in runs),
        "retried": m(lambda r: r["retried"]),
        "notices": m(lambda r: r["notices"]),
        "reconnects": m(lambda r: r["reconnects"]),
    }
    print(f"\nmedians over {len(good)} run(s) ({args.connections}x{args.inflight}, "
          f"{args.restarts} restarts {args.interval:g} s apart per run):")
    print(f"  steady state:   {med['steady_rps']:>9.0f} rps  p99 {med['steady_p99_us']:>8.0f} us")
    print(f"  restart window: {med['restart_rps']:>9.0f} rps  p99 {med['restart_p99_us']:>8.0f} us")
    print(f"  ratio {med['ratio']:.1%} (goal >= 90%: {'met' if med['ratio'] >= 0.9 else 'NOT met'}); "
          f"errors {med['errors']} in all runs (goal 0: {'met' if not med['errors'] else 'NOT met'}); "
          f"retried {med['retried']:.0f}, notices {med['notices']:.0f}, "
          f"reconnects {med['reconnects']:.0f} per run")
    print(f"  per restart: {med['cost_per_restart_s']:.2f} s of steady-state throughput given up; "
          f"the new generation serves {med['new_serving_after_s']:.2f} s after SIGUSR2, having used "
          f"{med['new_generation_cpu_s']:.2f} s of CPU to start; host CPU busy "
          f"{med['host_cpu_busy_steady']:.0%} steady, {med['host_cpu_busy_restarts']:.0%} during restarts")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "runs": runs, "args": vars(args)}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
