"""`octo-proxy demo`: the whole mesh on one host, traffic, hot restarts, a report.

Everything runs as real processes in a private temp dir: the bundled xDS
control plane, a server-side proxy with one inbound listener per provider
node, the provider apps (this module, ``python -m octoproxy.demo provider``),
and a client-side proxy that learns its routes over xDS after the consumer
subscribes through its subscribe API.  The consumer is the SDK's AsyncClient
in this process; callers with different routing contexts (trunk, LiteSet
gray, swimlane feature-x, Set s1, consistent-hash keys) drive pipelined
traffic while each proxy is hot-restarted in turn.  At the end: where the
requests went, latency percentiles, failures (zero), optionally a chart.

Every process started here (and every proxy generation started by SIGUSR2,
found by the temp dir in its command line) is stopped on the way out, also
on an exception or Ctrl-C; the temp dir is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

import octoproxy
from octoproxy.demo_results import (
    CLIENT_IDC,
    CLIENT_REGION,
    Caller,
    Node,
    RestartEvent,
    Results,
    percentile,
)
from octoproxy.ports import can_connect_tcp, can_connect_uds, free_tcp_port
from octoproxy.process import pid_alive, pids_mentioning, read_pid_file


@dataclass(frozen=True)
class Service:
    appkey: str
    service_name: str
    lb_policy: str = "round_robin"
    set_enabled: bool = False


SERVICES = [
    Service("com.demo.echo", "com.demo.EchoService"),
    Service("com.demo.order", "com.demo.OrderService", set_enabled=True),
    Service("com.demo.cart", "com.demo.CartService", lb_policy="consistent_hash"),
]

NODES = [
    Node("echo-gh-1", "com.demo.echo"),
    Node("echo-gh-2", "com.demo.echo"),
    Node("echo-yf-1", "com.demo.echo", idc="yf",
         idle_why="IDC yf: trunk callers in gh stay in their own IDC"),
    Node("echo-sh-1", "com.demo.echo", idc="sh", region="shanghai",
         idle_why="region shanghai: trunk callers in gh stay in their own IDC"),
    Node("echo-gray-gh", "com.demo.echo", cell="gray"),
    Node("echo-fx-yf", "com.demo.echo", swimlane="feature-x", idc="yf"),
    Node("echo-fx-sh", "com.demo.echo", swimlane="feature-x", idc="sh", region="shanghai",
         idle_why="region shanghai: lane feature-x has a node in the caller's region"),
    Node("echo-canary-gh", "com.demo.echo", group="canary"),
    Node("order-gh-1", "com.demo.order"),
    Node("order-s1-gh", "com.demo.order", cell="s1"),
    Node("order-s2-sh", "com.demo.order", cell="s2", idc="sh", region="shanghai",
         idle_why="Set s2: no caller of the demo is in Set s2"),
    Node("cart-gh-1", "com.demo.cart"),
    Node("cart-gh-2", "com.demo.cart"),
    Node("cart-gh-3", "com.demo.cart"),
]

CALLERS = [
    Caller("trunk", "com.demo.echo", 6, frozenset({"echo-gh-1", "echo-gh-2"})),
    Caller("liteset=gray", "com.demo.echo", 2, frozenset({"echo-gray-gh"}), liteset="gray"),
    Caller("swimlane=feature-x", "com.demo.echo", 2, frozenset({"echo-fx-yf"}),
           swimlane="feature-x"),
    Caller("uid=17", "com.demo.echo", 1, frozenset({"echo-canary-gh"}), extra=(("uid", "17"),)),
    Caller("trunk", "com.demo.order", 2, frozenset({"order-gh-1"})),
    Caller("set=s1", "com.demo.order", 2, frozenset({"order-s1-gh"}), set="s1"),
    Caller("hash-key=user-0..23", "com.demo.cart", 3,
           frozenset({"cart-gh-1", "cart-gh-2", "cart-gh-3"}), hash_keys=24),
]

# Traffic shunting (docs/shunting.md): echo's users with uid % 10 == 7 go to
# its canary group; every other request only ever reaches its default nodes.
SHUNTING: dict[str, list[dict[str, Any]]] = {"com.demo.echo": [
    {"name": "canary-users", "group": "canary",
     "match": [{"source": "context", "key": "uid", "op": "mod", "modulus": 10, "remainders": [7]}]},
]}

CONNECTIONS = 4  # SDK connections to the client-side proxy; callers share them


# ---------------------------------------------------------------- processes


def _package_root() -> str:
    """The directory that holds the `octoproxy` package (src/ or site-packages)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(octoproxy.__file__)))


def _child_env() -> dict[str, str]:
    e = dict(os.environ)
    root = _package_root()
    e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def _free_port() -> int:
    return free_tcp_port()


class DemoError(Exception):
    """Something in the setup did not come up; the message says what."""


class Proc:
    """A process of the demo, in its own session (Ctrl-C at the terminal reaches
    only the demo, which then stops everything in order), output to a log file."""

    def __init__(self, name: str, args: list[str], workdir: str) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.p = subprocess.Popen(args, env=_child_env(), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=workdir, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- provider app


def _provider_main(specs: list[str]) -> None:
    """``python -m octoproxy.demo provider [--fail-flag] NAME=UDS ...``: each UDS
    answers with NAME; with --fail-flag, status 2 while UDS + ".fail" exists
    (the governance scene's failing node)."""
    import uvloop

    from octoproxy.sdk import Request, serve

    fail_flag = specs[:1] == ["--fail-flag"]
    if fail_flag:
        specs = specs[1:]

    def make_handler(name: str, path: str) -> Callable[[Request], Any]:
        answer = name.encode()
        flag = path + ".fail"

        def handler(req: Request) -> bytes:
            return answer

        def handler_with_flag(req: Request) -> Any:
            if os.path.exists(flag):
                return (2, b"", f"{name}: failing on purpose")
            return answer

        return handler_with_flag if fail_flag else handler

    async def main() -> None:
        servers = []
        for spec in specs:
            name, path = spec.split("=", 1)
            servers.append(await serve(path, make_handler(name, path)))
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for s in servers:
            s.close()

    uvloop.run(main())


# ---------------------------------------------------------------- results


# ---------------------------------------------------------------- the demo


class Demo:
    def __init__(self, seconds: float, progress: bool, out: TextIO, err: TextIO) -> None:
        self.seconds = seconds
        self.progress = progress
        self.out = out
        self.err = err
        # UDS paths are limited to 107 bytes: a short dir right under /tmp
        self.dir = tempfile.mkdtemp(prefix="octodemo", dir="/tmp")
        self.procs: list[Proc] = []
        self.node_ports: dict[str, int] = {}
        self.cp_port = 0
        self.sub_port = 0
        self.res = Results(CALLERS, NODES)
        self._t0 = 0.0
        self._bar_shown = False
        self._status = ""

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- messages

    def say(self, msg: str) -> None:
        if self._bar_shown:
            self.err.write("\r\x1b[K")
            self._bar_shown = False
        self.err.write(msg + "\n")
        self.err.flush()

    # -- setup

    def _start(self, name: str, args: list[str]) -> Proc:
        p = Proc(name, [sys.executable, *args], self.dir)
        self.procs.append(p)
        return p

    def _wait(self, cond: Callable[[], Any], procs: list[Proc], what: str,
              timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            for p in procs:
                if not p.alive():
                    raise DemoError(f"{p.name} exited with code {p.p.returncode} while "
                                    f"waiting for {what}; its log:\n{p.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.02)

    def _write_yaml(self, name: str, data: dict[str, Any]) -> str:
        path = self.path(name)
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(path + ".tmp", path)
        return path

    def _start_proxy(self, name: str, cfg: dict[str, Any]) -> Proc:
        """`octo-proxy run` with cfg written to NAME.yaml, as process NAME-proxy."""
        return self._start(f"{name}-proxy", ["-m", "octoproxy", "run", "-c",
                                             self._write_yaml(f"{name}.yaml", cfg)])

    def _hot_restart_cfg(self, name: str) -> dict[str, Any]:
        return {"socket": self.path(f"{name}.hr"), "pid_file": self.path(f"{name}.pid"),
                "drain_s": 2.0, "shutdown_s": 6.0, "proxy_restart_spread_s": 0.2,
                "start_timeout_s": 20.0}

    def setup(self) -> None:
        t0 = time.monotonic()
        self.say(f"octo-proxy demo: setting up in {self.dir}")
        self.node_ports = {n.name: _free_port() for n in NODES}
        self.cp_port = _free_port()
        self.sub_port = _free_port()

        endpoints = {"services": [
            {"appkey": s.appkey, "lb_policy": s.lb_policy, "set_enabled": s.set_enabled,
             "service_names": [s.service_name],
             "endpoints": [{"address": f"127.0.0.1:{self.node_ports[n.name]}", "cell": n.cell,
                            "swimlane": n.swimlane, "idc": n.idc, "region": n.region,
                            "group": n.group}
                           for n in NODES if n.appkey == s.appkey],
             **({"shunting": SHUNTING[s.appkey]} if s.appkey in SHUNTING else {})}
            for s in SERVICES]}
        ep_file = self._write_yaml("endpoints.yaml", endpoints)
        server_cfg = {
            "node": {"id": "demo-server", "idc": CLIENT_IDC, "region": CLIENT_REGION},
            "listeners": {"inbound": [
                {"host": "127.0.0.1", "port": self.node_ports[n.name],
                 "upstream_uds": self.path(f"{n.name}.sock")} for n in NODES]},
            "hot_restart": self._hot_restart_cfg("server"),
        }
        client_cfg = {
            "node": {"id": "demo-client", "idc": CLIENT_IDC, "region": CLIENT_REGION},
            "listeners": {"outbound": [{"path": self.path("px.sock")}]},
            "xds": {"server": f"127.0.0.1:{self.cp_port}", "backoff_base_s": 0.1,
                    "backoff_max_s": 0.5},
            "subscribe": {"port": self.sub_port, "state_file": self.path("subs.json"),
                          "timeout_s": 10},
            "hot_restart": self._hot_restart_cfg("client"),
        }

        # everything starts at once; each is waited for below
        half = len(NODES) // 2
        provs = [self._start(f"providers{i}", ["-m", "octoproxy.demo", "provider",
                                               *(f"{n.name}={self.path(n.name + '.sock')}"
                                                 for n in part)])
                 for i, part in enumerate((NODES[:half], NODES[half:]))]
        cp = self._start("control-plane", ["-m", "octoproxy", "control-plane", "--endpoints",
                                           ep_file, "--listen", f"127.0.0.1:{self.cp_port}"])
        server = self._start_proxy("server", server_cfg)
        client = self._start_proxy("client", client_cfg)

        self._wait(lambda: all(can_connect_uds(self.path(f"{n.name}.sock")) for n in NODES),
                   provs, "the providers")
        self.say(f"  providers: {len(NODES)} nodes in {len(provs)} processes "
                 f"(pids {', '.join(str(p.pid) for p in provs)})")
        self._wait(lambda: can_connect_tcp(self.cp_port), [cp], "the control plane")
        self.say(f"  control plane: 127.0.0.1:{self.cp_port} (pid {cp.pid}), "
                 f"{len(SERVICES)} services, {len(NODES)} endpoints")
        self._wait(lambda: all(can_connect_tcp(p) for p in self.node_ports.values())
                   and read_pid_file(self.path("server.pid")) == server.pid,
                   [server], "the server-side proxy")
        self.say(f"  server-side proxy: {len(NODES)} inbound listeners (pid {server.pid})")
        self._wait(lambda: can_connect_uds(self.path("px.sock"))
                   and can_connect_tcp(self.sub_port)
                   and read_pid_file(self.path("client.pid")) == client.pid,
                   [client], "the client-side proxy")
        from octoproxy.sdk.subscribe import subscribe

        subscribe(f"http://127.0.0.1:{self.sub_port}", [s.appkey for s in SERVICES],
                  timeout=10, retry_until=20)
        self._wait(self._rules_in, [client], "the shunting rule at the client-side proxy")
        self.say(f"  client-side proxy: idc {CLIENT_IDC}/{CLIENT_REGION} (pid {client.pid}), "
                 f"subscribed to {', '.join(s.appkey for s in SERVICES)} over xDS")
        self.say(f"  ready in {time.monotonic() - t0:.1f} s")

    def _rules_in(self) -> bool:
        """The shunting rules come on their own xDS resource, maybe after the
        services: a uid=17 request reaches the canary group once they are in."""
        from octoproxy.sdk import Client, Context

        with Client(self.path("px.sock")) as c:
            r = c.call(SERVICES[0].service_name, b"demo", raise_on_error=False,
                       context=Context(appkey=SERVICES[0].appkey, global_extra={"uid": "17"}))
        return r.ok and r.body == b"echo-canary-gh"

    # -- traffic

    def now(self) -> float:
        return time.perf_counter() - self._t0

    async def _hot_restart(self, name: str, which: str) -> None:
        pidf = self.path(f"{name}.pid")
        old = read_pid_file(pidf)
        if not old or not pid_alive(old):
            raise DemoError(f"{which}: no live process in {pidf}")
        ev = RestartEvent(which, self.now(), old)
        self.res.restarts.append(ev)
        self.say(f"{ev.t_signal:6.2f} s  hot restart of the {which}: SIGUSR2 to pid {old}")
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while True:
            p = read_pid_file(pidf)
            if p and p != old and pid_alive(p):
                ev.new_pid, ev.t_serving = p, self.now()
                break
            if time.monotonic() > deadline:
                raise DemoError(f"{which}: no new generation after 30 s")
            await asyncio.sleep(0.01)
        while pid_alive(old):
            if time.monotonic() > deadline:
                raise DemoError(f"{which}: the old generation (pid {old}) did not exit")
            await asyncio.sleep(0.01)
        ev.t_old_gone = self.now()
        self.say(f"{ev.t_old_gone:6.2f} s  {which}: pid {ev.new_pid} serving after "
                 f"{ev.t_serving - ev.t_signal:.2f} s, old pid {old} drained and exited after "
                 f"{ev.t_old_gone - ev.t_signal:.2f} s")

    def _draw_bar(self) -> None:
        el = self.now()
        frac = min(1.0, el / self.seconds) if self.seconds > 0 else 1.0
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "." * (width - fill)
        n = self.res.requests
        rate = n / el if el > 0 else 0.0
        restarts = "  ".join(
            f"{e.which.split('-')[0]} restart: "
            f"{'done' if not math.isnan(e.t_old_gone) else 'under way'}"
            for e in self.res.restarts)
        line = (f"[{bar}] {el:4.1f}/{self.seconds:g} s  {n:,} req  {rate:,.0f}/s  "
                f"failed {self.res.failed}  retried {self.res.retried}  {restarts}")
        line = line[:max(20, shutil.get_terminal_size((120, 24)).columns - 1)]
        self.err.write("\r\x1b[K" + line)
        self.err.flush()
        self._bar_shown = True

    async def traffic(self) -> None:
        from octoproxy.sdk import AsyncClient, Context

        res = self.res
        dest_of = {n.name.encode(): i for i, n in enumerate(NODES)}
        expect = [frozenset(dest_of[d.encode()] for d in c.expect) for c in CALLERS]
        service_name = {s.appkey: s.service_name for s in SERVICES}
        clients = [await AsyncClient.connect(self.path("px.sock"), default_timeout_ms=3000)
                   for _ in range(CONNECTIONS)]
        stop = asyncio.Event()
        worker_no = itertools.count()
        self._t0 = time.perf_counter()

        async def worker(ci: int, caller: Caller) -> None:
            client = clients[next(worker_no) % len(clients)]
            svc = service_name[caller.service]
            base = Context(appkey=caller.service, swimlane=caller.swimlane, set=caller.set,
                           liteset=caller.liteset, global_extra=dict(caller.extra))
            keys = [Context(appkey=caller.service, hash_key=f"user-{k}")
                    for k in range(caller.hash_keys)]
            k = 0
            while not stop.is_set():
                ctx = base
                if keys:
                    ctx = keys[k % len(keys)]
                    k += 1
                t = time.perf_counter()
                try:
                    r = await client.call(svc, b"demo", context=ctx, raise_on_error=False)
                except Exception as e:  # a lost connection, a local timeout
                    res.failures.append((t - self._t0, f"{caller.label}: {type(e).__name__}: {e}"))
                    continue
                lat = time.perf_counter() - t
                if not r.ok:
                    res.failures.append((t - self._t0,
                                         f"{caller.label}: status {r.status}: {r.message}"))
                    continue
                d = dest_of.get(r.body)
                if d is None:
                    res.failures.append((t - self._t0, f"{caller.label}: odd answer {r.body!r}"))
                    continue
                res.t_send.append(t - self._t0)
                res.latency.append(lat)
                res.caller_ix.append(ci)
                res.dest_ix.append(d)
                if d not in expect[ci]:
                    res.misrouted += 1
                if ctx.hash_key is not None:
                    res.hash_homes.setdefault(ctx.hash_key, set()).add(d)

        async def bar() -> None:
            while not stop.is_set():
                res.retried = sum(c.retries for c in clients)
                if self.progress:
                    self._draw_bar()
                await asyncio.sleep(0.1)

        async def restarts() -> None:
            await asyncio.sleep(self.seconds * 0.3)
            await self._hot_restart("client", "client-side proxy")
            await asyncio.sleep(max(0.0, self.seconds * 0.6 - self.now()))
            await self._hot_restart("server", "server-side proxy")

        tasks = [asyncio.create_task(worker(ci, c))
                 for ci, c in enumerate(CALLERS) for _ in range(c.workers)]
        tasks.append(asyncio.create_task(bar()))
        self.say(f"  0.00 s  traffic: {len(CALLERS)} caller contexts, "
                 f"{sum(c.workers for c in CALLERS)} requests in flight on "
                 f"{CONNECTIONS} SDK connections, for {self.seconds:g} s")
        try:
            # the run lasts `seconds`, or longer if a restart has not finished by then
            rtask = asyncio.create_task(restarts())
            await asyncio.sleep(self.seconds)
            await rtask
            await asyncio.sleep(max(0.0, min(0.3, self.seconds - self.now())))
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            res.duration = self.now()
            res.retried = sum(c.retries for c in clients)
            if self.progress:
                self._draw_bar()
                self.say("")
            for c in clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), 2)

    # -- teardown

    def cleanup(self) -> None:
        """Stop every process of the demo (and every proxy generation), remove the dir."""
        mine = {p.pid for p in self.procs if p.alive()}
        others = set(pids_mentioning(self.dir))
        for name in ("client", "server"):
            pid = read_pid_file(self.path(f"{name}.pid"))
            if pid and pid_alive(pid):
                others.add(pid)
        for pid in mine | others:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for p in self.procs:
                p.p.poll()
            if not any(pid_alive(pid) for pid in mine | others) \
                    and not pids_mentioning(self.dir):
                break
            time.sleep(0.05)
        # whatever is left (and anything forked in between): by process group, then by name
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid in pids_mentioning(self.dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.p.wait(5)
        keep = os.environ.get("OCTOPROXY_DEMO_LOGS")  # a dir to copy the processes' logs to
        if keep:
            with contextlib.suppress(OSError):
                os.makedirs(keep, exist_ok=True)
                for p in self.procs:
                    shutil.copy(p.log_path, keep)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dump_logs(self) -> None:
        for p in self.procs:
            tail = p.log_tail(10)
            if tail:
                self.err.write(f"--- {p.name} (pid {p.pid}) log tail ---\n{tail}\n")


# ---------------------------------------------------------------- report


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _ms(v: float) -> str:
    return f"{v * 1e3:.2f} ms" if v < 0.1 else f"{v * 1e3:.0f} ms"


def _shunting_lines(res: Results, per: Counter[tuple[int, int]]) -> list[str]:
    """The traffic-shunting rows under the routing table: what each node
    group got, from which callers (docs/shunting.md)."""
    out = []
    for rules in SHUNTING.values():
        for r in rules:
            nodes = {i for i, n in enumerate(res.nodes) if n.group and n.group == r["group"]}
            m = r["match"][0]
            got = {res.callers[c].label: k for (c, d), k in per.items() if d in nodes}
            out.append(f"  Traffic shunting: rule {r['name']!r} ({m['key']} % {m['modulus']} in "
                       f"{m['remainders']}) -> group {r['group']!r}: "
                       + (", ".join(f"{k:,} from {c}" for c, k in sorted(got.items()))
                          or "nothing"))
    return out


def report(res: Results) -> str:
    total_ok = len(res.latency)
    lines = [""]
    lines.append(f"Where requests went ({total_ok:,} answered; caller node: "
                 f"IDC {CLIENT_IDC}, region {CLIENT_REGION})")
    per = Counter(zip(res.caller_ix, res.dest_ix, strict=True))
    per_caller = Counter(res.caller_ix)
    rows = [["caller context", "service", "requests", "share", "destination", "cell",
             "swimlane", "IDC/region", "requests", "share"]]
    for ci, c in enumerate(res.callers):
        n_c = per_caller.get(ci, 0)
        dests = sorted((d for (cc, d) in per if cc == ci), key=lambda d: res.nodes[d].name)
        first = True
        for d in dests or [-1]:
            head = [c.label, c.service, f"{n_c:,}", f"{n_c / max(1, total_ok):.1%}"] if first \
                else ["", "", "", ""]
            first = False
            if d < 0:
                rows.append([*head, "(none)", "", "", "", "0", ""])
                continue
            n = res.nodes[d]
            k = per[(ci, d)]
            rows.append([*head, n.name, n.cell or "-", n.swimlane or "trunk",
                         f"{n.idc}/{n.region}", f"{k:,}", f"{k / max(1, n_c):.1%}"])
    lines += _table(rows, {2, 3, 8, 9})
    lines += _shunting_lines(res, per)
    used = set(res.dest_ix)
    idle = [n for i, n in enumerate(res.nodes) if i not in used]
    if idle:
        lines.append("  Nodes that got nothing, as the routing rules say:")
        for n in idle:
            lines.append(f"    {n.name:<13} {n.idle_why or '(unexpected!)'}")
    if res.hash_homes:
        sticky = sum(1 for v in res.hash_homes.values() if len(v) == 1)
        lines.append(f"  Consistent hash: {sticky} of {len(res.hash_homes)} keys always "
                     f"went to the same node")

    lat = sorted(res.latency)
    lines.append("")
    lines.append("Latency (consumer -> client-side proxy -> server-side proxy -> provider "
                 "and back)")
    lines += _table([["p50", "p90", "p99", "p99.9", "max", "requests/s"],
                     [_ms(percentile(lat, 0.5)), _ms(percentile(lat, 0.9)),
                      _ms(percentile(lat, 0.99)), _ms(percentile(lat, 0.999)),
                      _ms(lat[-1]) if lat else "-",
                      f"{total_ok / max(res.duration, 1e-9):,.0f}"]], {0, 1, 2, 3, 4, 5})
    lines.append("")
    lines.append("Hot restarts (SIGUSR2)")
    for e in res.restarts:
        lines.append(f"  {e.which:<18} at {e.t_signal:5.2f} s: pid {e.old_pid} -> {e.new_pid}, "
                     f"new one serving after {e.t_serving - e.t_signal:.2f} s, "
                     f"old one exited after {e.t_old_gone - e.t_signal:.2f} s")
    lines.append("")
    lines.append(f"Requests: {res.requests:,} in {res.duration:.1f} s; "
                 f"transparently retried: {res.retried:,} (answered with the restart flag "
                 f"by a draining proxy, retried once by the SDK)")
    lines.append(f"Failed: {res.failed}" + (f" ({len(res.failures)} with an error, "
                                            f"{res.misrouted} misrouted)" if res.failed else ""))
    for t, msg in res.failures[:10]:
        lines.append(f"  at {t:.2f} s: {msg}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry points


def run_demo(seconds: float, chart: str | None, progress: bool) -> int:
    """Set up the mesh, run traffic with hot restarts, print the report.
    Returns 0 when no request failed, 1 otherwise (130 on Ctrl-C)."""
    import uvloop

    out, err = sys.stdout, sys.stderr
    progress = progress and err.isatty()
    restore: dict[int, Any] = {}

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        restore[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
        restore[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = Demo(max(0.5, seconds), progress, out, err)
    rc = 1
    chart_ok = True
    try:
        demo.setup()
        uvloop.run(demo.traffic())
        out.write(report(demo.res))
        out.flush()
        from octoproxy.demo_auth import auth_scene

        out.write(auth_scene(demo))
        out.flush()
        from octoproxy.demo_governance import governance_scene

        out.write(governance_scene(demo))
        out.flush()
        if chart:
            from octoproxy.demo_chart import write_chart

            try:
                err.write(write_chart(demo.res, chart) + "\n")
                chart_ok = True
            except OSError as e:
                err.write(f"chart: cannot write {chart}: {e}\n")
                chart_ok = False
        rc = 0 if demo.res.failed == 0 and (not chart or chart_ok) else 1
        if demo.res.failed:
            demo.dump_logs()
    except KeyboardInterrupt:
        demo.say("\ninterrupted: stopping everything")
        rc = 130
    except DemoError as e:
        demo.say(f"demo failed: {e}")
        demo.dump_logs()
        rc = 1
    except Exception:
        import traceback

        demo.say(f"demo failed:\n{traceback.format_exc()}")
        demo.dump_logs()
        rc = 1
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.cleanup()
        finally:
            with contextlib.suppress(ValueError):
                for sig, h in restore.items():
                    signal.signal(sig, h)
        if rc == 130:
            err.write("cleaned up\n")
    return rc


def main(argv: list[str]) -> int:
    if argv[:1] == ["provider"]:
        _provider_main(argv[1:])
        return 0
    seconds = float(argv[0]) if argv else 12.0
    return run_demo(seconds=seconds, chart=None, progress=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
