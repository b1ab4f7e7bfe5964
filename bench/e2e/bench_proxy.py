"""End-to-end load: octo-proxy, HAProxy and nginx as the same two-proxy chain, and direct.

    loadgen --UDS--> A --TCP (loopback)--> B --UDS--> provider (echo)

Builds the C load generator and provider (bench/e2e/loadgen.c, provider.c)
with gcc into a temp dir and starts, as real processes, one provider and,
for each system, its two proxies:

- octo:    A = client-side octo-proxy (outbound UDS, static service -> B's
           port), B = server-side octo-proxy (inbound TCP -> provider UDS);
           every frame is parsed, routed and its sequence id remapped
- haproxy: two `haproxy` processes, `mode tcp`, `nbthread 1` (an L4 relay)
- nginx:   two `nginx` processes, `stream` module, one worker, no master
- direct:  loadgen -> provider, no proxy

HAProxy and nginx come from the distribution (`--install` runs
`apt-get install -y haproxy nginx libnginx-mod-stream` when they are missing
and this is Debian as root; without them the columns are left out).  Then,
--repeat rounds of every scenario (point x CPU layout), the systems in a
rotating order within each scenario:

- points:  1x1 (1 connection x 1 in flight: latency), 32x8 (32 x 8:
           pipelined throughput), 256x1 (256 connections x 1: many idle-ish
           app connections, where multiplexing pays)
- layouts: split (load generator + A on the first CPU, B + provider on
           the second: each side of the TCP hop on its own core),
           one-core (everything on the first CPU), free (not pinned)

Prints the medians per scenario and system, then the comparison table of
docs/performance.md (A+B CPU per request, requests/s, p99 at 32x8; p50 at
1x1; CPU at 256x1) with ratios to HAProxy.  Bodies are 128 bytes.
`--syscalls` adds one 32x8 run per proxy system under `perf stat` (or
`strace -c -f` where perf cannot count syscalls) for syscalls per request of
A and B.

    PYTHONPATH=src python bench/e2e/bench_proxy.py --install      # ~7 min
    PYTHONPATH=src python bench/e2e/bench_proxy.py --smoke        # CI: 1 s per run, 1 round

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

SYSTEMS = ("direct", "octo", "shunt", "haproxy", "nginx")
LABEL = {
    "direct": "direct",
    "octo": "octo-proxy",
    "shunt": "octo-proxy + 10 shunting rules",
    "base": "octo-proxy (baseline)",
    "haproxy": "HAProxy",
    "nginx": "nginx",
}
POINTS = {"1x1": (1, 1), "32x8": (32, 8), "256x1": (256, 1)}
LAYOUTS = ("split", "one-core", "free")
DEFAULT_SCENARIOS = ("1x1 one-core", "32x8 split", "32x8 one-core", "256x1 split", "256x1 one-core")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


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


# With the shunt system in a run, every system of that run is sent a request
# that carries what its rules read (context keys, the caller, a Thrift call
# body), so that all ten are evaluated (none matches) and octo and shunt see
# the same request; the loadgen's stamp goes after the Thrift message header
# (SHUNT_HEAD), so the method stays readable.
SHUNT_GCTX = {"uid": "123457", "region": "bj", "device": "android-14"}
SHUNT_CALLER = "com.bench.caller"
SHUNT_HEAD = len(frame.thrift_call("getUser", 1))


def shunt_rules(kind: str) -> list[dict[str, Any]]:
    """The shunt system's ten rules.  mixed: five kinds of condition, each in
    two rules (conditions shared by rules are evaluated once); distinct: ten
    different conditions on six values, the kinds of
    bench/micro/test_bench_route.py (one rule has two conditions)."""
    if kind == "mixed":
        kinds = [
            {"source": "context", "key": "uid", "op": "mod", "modulus": 100, "remainders": [1]},
            {"source": "caller", "op": "in", "values": ["com.a", "com.b"]},
            {"source": "method", "op": "eq", "value": "checkout"},
            {"source": "context", "key": "region", "op": "eq", "value": "sh"},
            {"source": "context", "key": "uid", "op": "percent", "percent": 5},
        ]
        return [{"name": f"r{i}", "match": [kinds[i % 5]], "group": "gray"} for i in range(10)]
    conds: list[list[dict[str, Any]]] = [
        [{"source": "context", "key": "region", "op": "eq", "value": "sh"}],
        [{"source": "context", "key": "uid", "op": "mod", "modulus": 100, "remainders": [1, 2]}],
        [{"source": "caller", "op": "in", "values": ["com.a", "com.b", "com.c"]}],
        [{"source": "method", "op": "eq", "value": "checkout"}],
        [{"source": "context", "key": "device", "op": "prefix", "value": "ios-"}],
        [{"source": "context", "key": "uid", "op": "range", "lo": 0, "hi": 1000}],
        [{"source": "service", "op": "eq", "value": "com.other.Iface"}],
        [{"source": "context", "key": "uid", "op": "percent", "percent": 5}],
        [{"source": "caller", "op": "eq", "value": "com.x"},
         {"source": "method", "op": "in", "values": ["a", "b"]}],
        [{"source": "context", "key": "uid", "op": "mod", "modulus": 10, "remainders": [8]}],
    ]
    return [{"name": f"r{i}", "match": c, "group": "gray"} for i, c in enumerate(conds)]


def make_templates(outdir: str, shunt: bool = False) -> dict[str, Any]:
    body = bytes(range(BODY_LEN))
    kw: dict[str, Any] = {}
    if shunt:
        body = frame.thrift_call("getUser", 1) + body[SHUNT_HEAD:]
        kw = {"global_context": SHUNT_GCTX, "trace_info": {"clientAppkey": SHUNT_CALLER}}
    req = frame.encode_request(1, SERVICE, body, local_context={"octo-remote-appkey": APPKEY}, **kw)
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


def have(system: str) -> bool:
    if system == "haproxy":
        return shutil.which("haproxy") is not None
    if system == "nginx":
        return shutil.which("nginx") is not None and os.path.exists(NGINX_STREAM_MODULE)
    return True


def install_comparators() -> None:
    """HAProxy and nginx (stream) from the distribution, when missing (Debian, root)."""
    want = []
    if not have("haproxy"):
        want.append("haproxy")
    if not have("nginx"):
        want += ["nginx", "libnginx-mod-stream"]
    if not want:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"# cannot install {' '.join(want)} (needs apt-get as root): left out", flush=True)
        return
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", *want]
    e = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"# installing {' '.join(want)} (apt-get)", flush=True)
    if subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=e, stdout=subprocess.DEVNULL)
        subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL)


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


# ---------------------------------------------------------------- the systems


@dataclass
class System:
    """One chain under test: the socket the load generator connects to, and
    the two proxies (A next to the app, B next to the provider), if any."""

    name: str
    entry: str
    a: harness.Proc | None = None
    b: harness.Proc | None = None
    notes: list[str] = field(default_factory=list)

    def procs(self) -> list[harness.Proc]:
        return [p for p in (self.a, self.b) if p is not None]


def haproxy_cfg(bind: str, server: str) -> str:
    return (
        "global\n"
        "    nbthread 1\n"
        "    maxconn 4096\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        "listen relay\n"
        f"    bind {bind}\n"
        f"    server next {server}\n"
    )


def nginx_cfg(d: str, name: str, listen: str, upstream: str) -> str:
    return (
        f"load_module {NGINX_STREAM_MODULE};\n"
        "daemon off;\n"
        "master_process off;\n"
        "worker_processes 1;\n"
        f"pid {d}/{name}.pid;\n"
        f"error_log {d}/{name}.err warn;\n"
        "events { worker_connections 4096; }\n"
        "stream {\n"
        "    server {\n"
        f"        listen {listen};\n"
        f"        proxy_pass {upstream};\n"
        "    }\n"
        "}\n"
    )


class Bench:
    def __init__(
        self,
        tools: dict[str, str],
        tpl: dict[str, Any],
        pinner: Pinner,
        cpus: list[int],
        systems: list[str],
        baseline: str | None = None,
    ) -> None:
        self.tools, self.tpl, self.pinner = tools, tpl, pinner
        self.baseline = baseline
        self.rule_set = "mixed"  # the shunt system's rules (shunt_rules)
        self.cpus = cpus
        self.c = harness.Cluster()
        try:
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
            self.systems: dict[str, System] = {}
            for name in systems:
                self.systems[name] = getattr(self, f"start_{name}")()
        except BaseException:
            self.c.close()
            raise

    def start_direct(self) -> System:
        return System("direct", self.prov_sock)

    def start_base(self) -> System:
        return self.start_octo("base", self.baseline)

    def start_shunt(self) -> System:
        # issue 16's cost: 10 rules on the service, none matching this request
        # (make_templates(shunt=True): all ten evaluated: context lookups, the
        # method parse, integer parses, a percent hash), docs/shunting.md
        return self.start_octo("shunt", shunting={"services": {APPKEY: shunt_rules(self.rule_set)}})

    def start_octo(
        self, name: str = "octo", src: str | None = None, shunting: dict[str, Any] | None = None
    ) -> System:
        port = harness.free_port()
        # own node ids and hot-restart sockets: the defaults (/tmp/octo-proxy-<node id>.restart.sock)
        # are shared with every other proxy on the host that has the same node id
        tag = f"bench-{os.getpid()}"
        scfg = harness.server_proxy_cfg({port: self.prov_sock}, id=f"{tag}-server")
        scfg["hot_restart"] = {"socket": self.c.path(f"{name}-server.hr")}
        scfg["node"]["id"] += f"-{name}"
        entry = self.c.path(f"{name}.sock")
        services = [
            {
                "appkey": APPKEY,
                "service_names": [SERVICE],
                "endpoints": [{"address": f"127.0.0.1:{port}"}],
            }
        ]
        ccfg = harness.client_proxy_cfg(
            entry,
            services,
            node={"id": f"{tag}-client-{name}"},
            hot_restart={"socket": self.c.path(f"{name}-client.hr")},
        )
        if shunting:
            ccfg["shunting"] = shunting
        if src is None:
            b = self.c.proxy(f"{name}-b", scfg)
            a = self.c.proxy(f"{name}-a", ccfg)
        else:
            # another checkout's octo-proxy (built in place): its src first on sys.path
            b = self.proxy_from(src, f"{name}-b", scfg)
            a = self.proxy_from(src, f"{name}-a", ccfg)
        return System(name, entry, a, b)

    def proxy_from(self, src: str, name: str, cfg: dict[str, Any]) -> harness.Proc:
        path = self.c.write_config(name, cfg)
        boot = (
            f"import sys, runpy; sys.path.insert(0, {src!r}); "
            "runpy.run_module('octoproxy', run_name='__main__', alter_sys=True)"
        )
        p = harness.Proc([sys.executable, "-c", boot, "run", "-c", path], name, self.c.dir)
        self.c.procs.append(p)
        self.c.wait_ready(p, cfg)
        return p

    def _relay(
        self, name: str, cmd_a: list[str], cmd_b: list[str], entry: str, port: int
    ) -> System:
        b = harness.Proc(cmd_b, f"{name}-b", self.c.dir)
        self.c.procs.append(b)
        harness.wait_for(
            lambda: harness.can_connect_tcp(port) or not b.alive(), 15, f"{name} B :{port}"
        )
        a = harness.Proc(cmd_a, f"{name}-a", self.c.dir)
        self.c.procs.append(a)
        harness.wait_for(
            lambda: harness.can_connect_uds(entry) or not a.alive(), 15, f"{name} A {entry}"
        )
        for p in (a, b):
            assert p.alive(), f"{p.name} died:\n{p.log()}"
        return System(name, entry, a, b)

    def start_haproxy(self) -> System:
        exe = shutil.which("haproxy") or "haproxy"
        port = harness.free_port()
        entry = self.c.path("haproxy.sock")
        cfgs = {
            "a": haproxy_cfg(f"unix@{entry}", f"127.0.0.1:{port}"),
            "b": haproxy_cfg(f"127.0.0.1:{port}", f"unix@{self.prov_sock}"),
        }
        cmds = {}
        for k, text in cfgs.items():
            path = self.c.path(f"haproxy-{k}.cfg")
            with open(path, "w") as f:
                f.write(text)
            cmds[k] = [exe, "-db", "-f", path]  # foreground, one process
        return self._relay("haproxy", cmds["a"], cmds["b"], entry, port)

    def start_nginx(self) -> System:
        exe = shutil.which("nginx") or "nginx"
        port = harness.free_port()
        entry = self.c.path("nginx.sock")
        cfgs = {
            "a": nginx_cfg(self.c.dir, "nginx-a", f"unix:{entry}", f"127.0.0.1:{port}"),
            "b": nginx_cfg(self.c.dir, "nginx-b", f"127.0.0.1:{port}", f"unix:{self.prov_sock}"),
        }
        cmds = {}
        for k, text in cfgs.items():
            path = self.c.path(f"nginx-{k}.conf")
            with open(path, "w") as f:
                f.write(text)
            # -e: the error log before the config is read; -p: nothing under /var
            cmds[k] = [exe, "-c", path, "-p", self.c.dir, "-e", self.c.path(f"nginx-{k}.err")]
        return self._relay("nginx", cmds["a"], cmds["b"], entry, port)

    def close(self) -> None:
        self.c.close()

    def procs(self) -> list[harness.Proc]:
        out = [self.provider]
        for s in self.systems.values():
            out += s.procs()
        return out

    def layout(self, name: str) -> dict[str, str]:
        """CPUs of the load generator, A, B and the provider in a layout."""
        first = str(self.cpus[0])
        second = str(self.cpus[1] if len(self.cpus) > 1 else self.cpus[0])
        every = ",".join(str(c) for c in self.cpus)
        if name == "split":
            return {"lg": first, "a": first, "b": second, "prov": second}
        if name == "one-core":
            return {"lg": first, "a": first, "b": first, "prov": first}
        return {"lg": every, "a": every, "b": every, "prov": every}

    def apply_layout(self, name: str) -> dict[str, str]:
        lay = self.layout(name)
        placed = [(self.provider, lay["prov"])]
        for s in self.systems.values():
            if s.a is not None:
                placed.append((s.a, lay["a"]))
            if s.b is not None:
                placed.append((s.b, lay["b"]))
        for p, cpus in placed:
            self.pinner.pin(p.pid, cpus)
            self.pinner.check(p.pid, cpus)
        return lay

    def check_alive(self) -> None:
        for p in self.procs():
            if not p.alive():
                raise RuntimeError(
                    f"{p.name} died (exit {p.p.returncode}); log {p.log_path}:\n" + p.log()[-2000:]
                )

    def run(
        self,
        system: str,
        conns: int,
        inflight: int,
        duration: float,
        warmup: float,
        lay: dict[str, str],
        nloadgens: int = 1,
        count_syscalls: bool = False,
    ) -> dict[str, Any]:
        sysm = self.systems[system]
        req = self.tpl["req"]
        self.check_alive()
        procs = {"a": sysm.a, "b": sysm.b, "provider": self.provider}
        live = {k: p for k, p in procs.items() if p is not None}
        cpu0 = {k: p.cpu_seconds() for k, p in live.items()}
        ss0 = {k: schedstat(p.pid) for k, p in live.items()}
        counters = (
            {
                k: SyscallCounter(p.pid, self.c.path(f"sc-{system}-{k}"))
                for k, p in live.items()
                if k != "provider"
            }
            if count_syscalls
            else {}
        )
        t0 = time.monotonic()
        lgs = []
        for i in range(nloadgens):
            n = conns // nloadgens + (1 if i < conns % nloadgens else 0)
            args = [
                *self.pinner.prefix(lay["lg"]),
                self.tools["loadgen"],
                sysm.entry,
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
                    preexec_fn=self.pinner.preexec(lay["lg"]),
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
        cpu1 = {k: p.cpu_seconds() for k, p in live.items()}
        ss1 = {k: schedstat(p.pid) for k, p in live.items()}
        syscalls = {k: c.stop() for k, c in counters.items()}
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
        for k in ("a", "b"):
            if k in live:
                r[f"{k}_cpu_us_per_req"] = (cpu1[k] - cpu0[k]) * 1e6 / total
                r[f"{k}_cpu_share"] = (cpu1[k] - cpu0[k]) / wall
                # share of the wall time it was runnable but waited for a CPU (/proc schedstat):
                # high values mean it was starved (other processes on the host), not idle
                r[f"{k}_runq_wait_share"] = (ss1[k][1] - ss0[k][1]) / wall
        r["proxies_cpu_us_per_req"] = (
            r["a_cpu_us_per_req"] + r["b_cpu_us_per_req"] if "a" in live else None
        )
        r["provider_cpu_share"] = (cpu1["provider"] - cpu0["provider"]) / wall
        if syscalls:
            r["syscalls"] = {k: v for k, v in syscalls.items()}
            r["syscalls_total"] = total
        r["ok"] = (
            not hung
            and not r.get("errors")
            and not r.get("lost")
            and not r.get("closed")
            and "failed" not in r
        )
        return r


class SyscallCounter:
    """Syscalls made by one process (all threads) while it runs: `perf stat`
    on the syscalls:sys_enter_* tracepoints, or `strace -c -f` without them."""

    def __init__(self, pid: int, out: str) -> None:
        self.out = out
        self.tool = "perf" if perf_syscalls_ok() else "strace"
        if self.tool == "perf":
            cmd = [
                "perf",
                "stat",
                "-x",
                ",",
                "-e",
                "syscalls:sys_enter_*",
                "-p",
                str(pid),
                "-o",
                out,
            ]
        else:
            cmd = ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", out]
        self.p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile
        )
        time.sleep(1.0 if self.tool == "perf" else 0.5)  # attached before the load starts

    def stop(self) -> dict[str, int]:
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError), open(self.out) as f:
            for line in f:
                if self.tool == "perf":
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
                        with contextlib.suppress(ValueError):
                            n = int(parts[0])
                            if n:
                                counts[parts[2].removeprefix("syscalls:sys_enter_")] = n
                else:
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        with contextlib.suppress(ValueError):
                            counts[parts[-1]] = int(parts[3])
        return counts


_PERF_OK: bool | None = None


def perf_syscalls_ok() -> bool:
    global _PERF_OK
    if _PERF_OK is None:
        _PERF_OK = bool(shutil.which("perf")) and (
            subprocess.run(
                ["perf", "stat", "-e", "syscalls:sys_enter_write", "--", "true"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ).returncode
            == 0
        )
    return _PERF_OK


def raise_nofile() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    for (scen, system), rs in runs.items():
        row: dict[str, Any] = {"scenario": scen, "system": system, "runs": len(rs)}
        for k in (
            "rps",
            "p50_us",
            "p99_us",
            "p999_us",
            "cpu_share",
            "runq_wait_share",
            "provider_cpu_share",
            "proxies_cpu_us_per_req",
            "a_cpu_us_per_req",
            "b_cpu_us_per_req",
            "a_cpu_share",
            "b_cpu_share",
            "a_runq_wait_share",
            "b_runq_wait_share",
        ):
            row[k] = med([r.get(k) for r in rs])
        row["errors"] = sum(
            int(r.get("errors", 0))
            + int(r.get("lost", 0))
            + int(r.get("closed", 0))
            + int(bool(r.get("hung")))
            for r in rs
        )
        row["added_p50_us"] = None
        d = runs.get((scen, "direct"))
        if system != "direct" and d and scen.startswith("1x1"):
            # median of the per-round differences (runs of one round are adjacent in time)
            row["added_p50_us"] = med(
                [c.get("p50_us", 0) - dd.get("p50_us", 0) for c, dd in zip(rs, d, strict=False)]
            )
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (
        f"{'scenario':<15} {'system':<8} {'rps':>9} {'p50us':>7} {'p99us':>8} {'p999us':>8} "
        f"{'lg_cpu':>6} {'prov_cpu':>8} {'A+B_us/req':>10} {'(A+B)':>11} {'added_p50':>9} "
        f"{'err':>4}  {'A/B cpu(wait)':<17}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        split = (
            f"{fmt(r['a_cpu_us_per_req'], '.2f')}+{fmt(r['b_cpu_us_per_req'], '.2f')}"
            if r["a_cpu_us_per_req"] is not None
            else ""
        )
        print(
            f"{r['scenario']:<15} {r['system']:<8} {fmt(r['rps'], '.0f'):>9} {fmt(r['p50_us']):>7} "
            f"{fmt(r['p99_us']):>8} {fmt(r['p999_us']):>8} {fmt(r['cpu_share'], '.0%'):>6} "
            f"{fmt(r['provider_cpu_share'], '.0%'):>8} {fmt(r['proxies_cpu_us_per_req'], '.2f'):>10} "
            f"{split:>11} {fmt(r['added_p50_us']):>9} {r['errors']:>4}  {busy(r):<17}"
        )


def busy(r: dict[str, Any]) -> str:
    if r["a_cpu_share"] is None:
        return ""
    pc = lambda x: f"{100 * x:.0f}"  # noqa: E731
    return (
        f"{pc(r['a_cpu_share'])}({pc(r['a_runq_wait_share'])})/"
        f"{pc(r['b_cpu_share'])}({pc(r['b_runq_wait_share'])})%"
    )


# the comparison table: (label, point, layouts, field, scale, format, ratio label)
COMPARE = (
    (
        "32x8, A+B CPU us per request",
        "32x8",
        ("split", "one-core"),
        "proxies_cpu_us_per_req",
        1,
        ".2f",
    ),
    ("32x8 requests/s", "32x8", ("split", "one-core"), "rps", 1e-3, ".0fk"),
    ("32x8 p99 (ms)", "32x8", ("split", "one-core"), "p99_us", 1e-3, ".2f"),
    ("1x1 p50 (us)", "1x1", ("one-core", "split", "free"), "p50_us", 1, ".1f"),
    (
        "256x1, A+B CPU us per request",
        "256x1",
        ("split", "one-core"),
        "proxies_cpu_us_per_req",
        1,
        ".2f",
    ),
    ("256x1 p99 (ms)", "256x1", ("split", "one-core"), "p99_us", 1e-3, ".2f"),
)


def compare_table(rows: list[dict[str, Any]], systems: list[str]) -> list[str]:
    """The issue's table: one line per point, 'split / one-core' per system, x HAProxy."""
    by = {(r["scenario"], r["system"]): r for r in rows}
    shown = [s for s in systems if s != "direct"] + (["direct"] if "direct" in systems else [])
    lines = [
        "| point | " + " | ".join(LABEL[s] for s in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for label, point, layouts, key, scale, spec in COMPARE:
        lays = [lay for lay in layouts if any((f"{point} {lay}", s) in by for s in shown)]
        if point == "1x1":
            lays = lays[:1]
        if not lays:
            continue
        cells = []
        for s in shown:
            vals, ratios = [], []
            for lay in lays:
                r = by.get((f"{point} {lay}", s))
                v = r.get(key) if r else None
                h = by.get((f"{point} {lay}", "haproxy"), {}).get(key)
                unit = spec.endswith("k")
                vals.append(
                    fmt(v * scale if v is not None else None, spec.rstrip("k"))
                    + ("k" if unit and v is not None else "")
                )
                if s != "haproxy" and v is not None and h:
                    ratios.append(f"{v / h:.2f}x")
            if key.startswith("proxies") and s == "direct":
                cells.append("")
                continue
            cell = " / ".join(vals)
            if ratios:
                cell += " (" + " / ".join(ratios) + " HAProxy)"
            cells.append(cell)
        lines.append(f"| {label} ({' / '.join(lays)}) | " + " | ".join(cells) + " |")
    return lines


def print_goals(rows: list[dict[str, Any]]) -> None:
    by = {(r["scenario"], r["system"]): r for r in rows}

    def val(scen: str, system: str, key: str) -> float | None:
        r = by.get((scen, system))
        return r.get(key) if r else None

    def say(what: str, ok: bool | None, got: str) -> None:
        state = "-" if ok is None else ("met" if ok else "NOT met")
        print(f"goal: {what}: {got} ({state})")

    for lay in ("split", "one-core"):
        s = f"32x8 {lay}"
        o, h = val(s, "octo", "proxies_cpu_us_per_req"), val(s, "haproxy", "proxies_cpu_us_per_req")
        if o is not None and h:
            say(
                f"{s}: A+B CPU per request <= HAProxy's",
                o <= h,
                f"{o:.2f} vs {h:.2f} us ({o / h:.2f}x)",
            )
        o, h = val(s, "octo", "rps"), val(s, "haproxy", "rps")
        if o is not None and h:
            say(f"{s}: requests/s >= HAProxy's", o >= h, f"{o:.0f} vs {h:.0f} ({o / h:.2f}x)")
        o, h = val(s, "octo", "p99_us"), val(s, "haproxy", "p99_us")
        if o is not None and h:
            say(
                f"{s}: p99 <= 1.2x HAProxy's", o <= 1.2 * h, f"{o:.0f} vs {h:.0f} us ({o / h:.2f}x)"
            )
        s = f"256x1 {lay}"
        o, h = val(s, "octo", "proxies_cpu_us_per_req"), val(s, "haproxy", "proxies_cpu_us_per_req")
        if o is not None and h:
            say(
                f"{s}: A+B CPU per request <= 0.6x HAProxy's",
                o <= 0.6 * h,
                f"{o:.2f} vs {h:.2f} us ({o / h:.2f}x)",
            )
    o, h = val("1x1 one-core", "octo", "p50_us"), val("1x1 one-core", "haproxy", "p50_us")
    if o is not None and h:
        say("1x1 one-core: p50 <= HAProxy's", o <= h, f"{o:.1f} vs {h:.1f} us ({o / h:.2f}x)")
    o = val("32x8 split", "octo", "proxies_cpu_us_per_req")
    if o is not None:
        say("32x8 split: octo-proxy's A+B CPU per request <= 4 us", o <= 4, f"{o:.2f} us")
    o = val("1x1 one-core", "octo", "added_p50_us")
    if o is not None:
        say("1x1 one-core: octo-proxy adds <= 65 us to the direct p50", o <= 65, f"{o:.1f} us")
    d, o = val("32x8 split", "direct", "rps"), val("32x8 split", "octo", "rps")
    if d and o:
        print(
            f"load generator headroom: the same single loadgen drives {d:.0f} rps direct, "
            f"{d / o:.1f}x octo-proxy's {o:.0f} rps"
        )
    one, two = by.get(("32x8 split", "octo")), by.get(("32x8-2lg split", "octo"))
    if one and two and one["rps"] and two["rps"]:
        print(
            f"load generator check (octo-proxy 32x8 split): 1 loadgen {one['rps']:.0f} rps at "
            f"{fmt(one['cpu_share'], '.0%')} CPU; 2 loadgens {two['rps']:.0f} rps "
            f"({two['rps'] / one['rps']:.2f}x)"
        )


def print_syscalls(sc_runs: list[dict[str, Any]]) -> None:
    tool = "perf stat -e 'syscalls:sys_enter_*'" if perf_syscalls_ok() else "strace -c -f"
    print(f"\nsyscalls per request ({tool}, one 32x8 split run each, warm-up and drain included)")
    for r in sc_runs:
        total = r["syscalls_total"]
        for k in ("a", "b"):
            counts = r["syscalls"].get(k, {})
            top = sorted(counts.items(), key=lambda kv: -kv[1])
            s = sum(counts.values())
            print(
                f"  {LABEL[r['system']]:<10} {k.upper()}: {s / total:.3f} total; "
                + ", ".join(f"{n} {v / total:.3f}" for n, v in top[:6])
            )


def parse_scenario(name: str) -> tuple[str, int, int, str, int]:
    """'32x8 split' -> (name, conns, inflight, layout, load generators); '32x8-2lg ...' uses two."""
    point, _, layout = name.partition(" ")
    base, _, lg = point.partition("-")
    if base not in POINTS or layout not in LAYOUTS or lg not in ("", "2lg"):
        raise SystemExit(
            f"bad scenario {name!r}: POINT[-2lg] LAYOUT with POINT in {', '.join(POINTS)} "
            f"and LAYOUT in {', '.join(LAYOUTS)}"
        )
    conns, inflight = POINTS[base]
    return name, conns, inflight, layout, 2 if lg else 1


def rotation(systems: list[str], rnd: int) -> list[str]:
    """The systems in round rnd's order: who goes first rotates from round
    to round, so no system is always measured first or after the same one."""
    k = rnd % len(systems)
    return systems[k:] + systems[:k]


# ---------------------------------------------------------------- cost benches
# bench_auth.py and bench_governance.py: one feature on against the same chain
# without it, in the same run; these are their shared options and main loop.


def cost_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a cost bench's command line: its own options (already on ap)
    and the shared ones (--smoke: 1 s runs, 0.3 s warm-up, 1 round)."""
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="unmeasured seconds before each run (1)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; medians over them (5)")
    ap.add_argument("--scenario", default="32x8 free",
                    help="POINT LAYOUT as bench_proxy.py's ('32x8 free')")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 s runs, 1 round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.repeat = 1.0, 0.3, 1
    return args


def cost_rounds(
    bench: Bench,
    systems: list[str],
    args: argparse.Namespace,
    note: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """A cost bench's measurement: args.repeat rounds, each one run of every
    system (in `rotation` order) in args.scenario, each run printed (with
    note(run) under it, if given).  Returns every system's runs and whether
    one saw errors or refusals (a refused request is a cheap one: the
    figure would lie)."""
    _, conns, inflight, layout, nlg = parse_scenario(args.scenario)
    print(f"# {args.scenario}, {args.repeat} round(s) of {args.warmup:g}+{args.duration:g} s, "
          f"systems {', '.join(systems)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    bad = False
    lay = bench.apply_layout(layout)
    for rnd in range(args.repeat):
        for system in rotation(systems, rnd):
            r = bench.run(system, conns, inflight, args.duration, args.warmup, lay, nlg)
            print(f"  [{rnd + 1}/{args.repeat}] {system:<8} {r.get('rps', 0):>8.0f} rps  "
                  f"A+B {r['proxies_cpu_us_per_req']:.2f} us/req  "
                  f"(A {r['a_cpu_us_per_req']:.2f}, B {r['b_cpu_us_per_req']:.2f})", flush=True)
            if not r["ok"]:
                bad = True
                print(f"    PROBLEM: { {k: v for k, v in r.items() if k != 'stderr'} }")
            if note is not None:
                print(f"           {note(r)}", flush=True)
            runs[system].append(r)
    return runs, bad


def print_cost(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
               base: str = "octo") -> None:
    """Per system the median A+B CPU per request and requests/s, the CPU's
    ratio to base, the median of the per-round ratios and the best round."""
    cpu = {s: [r["proxies_cpu_us_per_req"] for r in rs] for s, rs in runs.items()}
    b = statistics.median(cpu[base])
    print(f"\nmedian A+B CPU per request over {args.repeat} round(s), {args.scenario}:")
    for s, rs in runs.items():
        m = statistics.median(cpu[s])
        # the same round's runs are seconds apart, so their ratio drifts less with
        # the host's load than the ratio of the medians: its median over rounds
        paired = statistics.median(x / o for x, o in zip(cpu[s], cpu[base], strict=True))
        print(f"  {s:<8} {m:6.2f} us/req  {statistics.median(r.get('rps', 0.0) for r in rs):8.0f} "
              f"rps  {(m / b - 1) * 100:+6.1f}% vs {base}  (per round: median "
              f"{(paired - 1) * 100:+.1f}%, min {min(cpu[s]):.2f} us/req)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each run (1)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians over them (3)")
    ap.add_argument(
        "--scenario",
        action="append",
        default=None,
        help="'POINT LAYOUT' (repeatable): POINT 1x1, 32x8, 256x1 (add -2lg for two load "
        "generators), LAYOUT split, one-core, free; default: " + ", ".join(DEFAULT_SCENARIOS),
    )
    ap.add_argument(
        "--systems",
        default="direct,octo,haproxy,nginx",
        help="comma-separated, from direct,octo,shunt,haproxy,nginx (default: all but shunt, "
        "octo-proxy with 10 shunting rules on the service; the ones not installed are left out)",
    )
    ap.add_argument(
        "--shunt-rules",
        choices=("mixed", "distinct"),
        default="mixed",
        help="the shunt system's ten rules: mixed (five kinds of condition, each in two rules; "
        "the default) or distinct (ten different conditions, as bench/micro/test_bench_route.py)",
    )
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the octo-proxy of another checkout (its core built in place), e.g. "
        "a worktree of the commit before a change: system 'base', in the same run",
    )
    ap.add_argument(
        "--install",
        action="store_true",
        help="apt-get install haproxy / nginx + libnginx-mod-stream when missing (root, Debian)",
    )
    ap.add_argument(
        "--syscalls",
        action="store_true",
        help="then one 32x8 split run per proxy system under perf stat: syscalls per request",
    )
    ap.add_argument("--smoke", action="store_true", help="CI: 1 s per run, 0.3 s warm-up, 1 round")
    ap.add_argument("--json", metavar="PATH", help="also write every run and the medians as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.repeat = 1.0, 0.3, 1
    if args.install:
        install_comparators()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS or s == "base":
            raise SystemExit(f"unknown system {s!r}")
    missing = [s for s in systems if not have(s)]
    systems = [s for s in systems if have(s)]
    baseline = None
    if args.baseline:
        baseline = str(Path(args.baseline).resolve() / "src")
        if not (Path(baseline) / "octoproxy").is_dir():
            raise SystemExit(f"--baseline: no src/octoproxy under {args.baseline}")
        systems.insert(systems.index("octo") + 1 if "octo" in systems else 0, "base")
    scenarios = [parse_scenario(s) for s in (args.scenario or DEFAULT_SCENARIOS)]

    pinner = Pinner()
    cpus = sorted(os.sched_getaffinity(0))
    print(
        f"# {os.cpu_count()} CPUs (using {','.join(map(str, cpus))}), load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; runs of {args.warmup:g} s warm-up + "
        f"{args.duration:g} s, {args.repeat} round(s), body {BODY_LEN} B; systems "
        f"{', '.join(systems)}"
        + (f" (not installed: {', '.join(missing)}; --install)" if missing else "")
        + (f"; {pinner.note}" if pinner.note else ""),
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix="opbench", dir="/tmp")
    tools = build_tools(tmp)
    tpl = make_templates(tmp, shunt="shunt" in systems)
    bench = Bench(tools, tpl, pinner, cpus, systems, baseline)
    bench.rule_set = args.shunt_rules
    if "shunt" in systems:
        # the provider was started with the body's real offset (it echoes it whole)
        bench.tpl["req"] = {**tpl["req"], "body_off": tpl["req"]["body_off"] + SHUNT_HEAD}
    print(f"# temp dirs: {tmp} (tools, templates), {bench.c.dir} (configs, logs)", flush=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    raw: list[dict[str, Any]] = []
    sc_runs: list[dict[str, Any]] = []
    bad = False

    def one(
        rep: int,
        scen: str,
        system: str,
        conns: int,
        inflight: int,
        lay: dict[str, str],
        nlg: int,
        count: bool,
    ) -> dict[str, Any]:
        nonlocal bad
        r = bench.run(system, conns, inflight, args.duration, args.warmup, lay, nlg, count)
        print(
            f"  [{rep + 1}/{args.repeat}] {scen:<15} {system:<8} {r.get('rps', 0):>9.0f} rps "
            f"p50 {r.get('p50_us', 0):7.1f} p99 {r.get('p99_us', 0):8.1f} us  "
            f"lg cpu {r.get('cpu_share', 0):.0%} ({r.get('runq_wait_share', 0):.0%})"
            + (
                f"  A+B {r['proxies_cpu_us_per_req']:.2f} us/req; CPU (run queue wait) "
                f"A {r['a_cpu_share']:.0%} ({r['a_runq_wait_share']:.0%}) "
                f"B {r['b_cpu_share']:.0%} ({r['b_runq_wait_share']:.0%})"
                if r.get("proxies_cpu_us_per_req") is not None
                else ""
            ),
            flush=True,
        )
        if not r["ok"]:
            bad = True
            print(f"    PROBLEM: {json.dumps({k: v for k, v in r.items() if k != 'stderr'})}")
            if r["stderr"]:
                print("    loadgen stderr:\n      " + r["stderr"].replace("\n", "\n      "))
        return r

    try:
        for rep in range(args.repeat):
            for scen, conns, inflight, layout, nlg in scenarios:
                lay = bench.apply_layout(layout)
                for system in rotation(systems, rep):
                    r = one(rep, scen, system, conns, inflight, lay, nlg, False)
                    runs.setdefault((scen, system), []).append(r)
                    raw.append({"round": rep, "scenario": scen, "system": system, **r})
        if args.syscalls:
            lay = bench.apply_layout("split")
            for system in systems:
                if system != "direct":
                    r = one(0, "32x8 split", system, 32, 8, lay, 1, True)
                    sc_runs.append({"system": system, **r})
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
        f"\nmedians over {args.repeat} round(s); latencies in us; lg_cpu = load generator CPU s / "
        f"wall s; A+B_us/req = both proxies' CPU (/proc utime+stime) per request; "
        f"A/B cpu(wait) = each proxy's CPU share (and share of time runnable but waiting for a CPU); "
        f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print_table(rows)
    print()
    for line in compare_table(rows, systems):
        print(line)
    print()
    print_goals(rows)
    if sc_runs:
        print_syscalls(sc_runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": rows, "runs": raw, "syscalls": sc_runs}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
