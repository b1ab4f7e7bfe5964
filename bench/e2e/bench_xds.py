"""xDS end to end: file change -> control plane -> ADS -> client -> routes in the sink.

Runs the bundled control plane as a real process on loopback and the xDS
client in this process (uvloop), subscribed to every service, and prints:

- initial sync: subscribe to all N services, until all are in the sink
- one node of one service changed in the file -> the new route in the sink
  (p50 / p90 / max over --rounds; includes the control plane's file poll, 100 ms)
- one node of every service changed -> all N services updated
- memory per subscribed service in the client (tracemalloc, and RSS delta)

    PYTHONPATH=src python bench/e2e/bench_xds.py [--services 1000] [--nodes 100] [--delta]

With ``--proxy`` it measures a real proxy process instead (``octo-proxy run``
with xds + the subscribe API) and prints what issue 12 asks for:

- the services subscribed through the subscribe API in ``--batches``
  concurrent calls (20 of 50 by default): time until every call answered 200
  (= every service has its endpoints in the route table), and how many
  services are left with no endpoints (must be 0);
- the proxy's RSS (VmRSS) per subscribed service;
- propagation of one endpoint change (a node added/removed in one service of
  the file) until GET /v1/subscriptions shows it: p50 / p90 over --rounds.

    PYTHONPATH=src python bench/e2e/bench_xds.py --proxy [--delta] [--batches 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop

import octoproxy
from octoproxy import model
from octoproxy.controlplane.store import _Cache, build
from octoproxy.ports import free_tcp_port as free_port
from octoproxy.xds import ResourceState, XdsClient

SRC = str(Path(octoproxy.__file__).resolve().parents[1])


class TimingSink:
    """Keeps only what the bench checks: the weight of each service's first node."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.first_weight: dict[str, int] = {}
        self.at: dict[str, float] = {}
        self.updates = 0
        self.services: dict[str, model.Service] = {}

    def update_service(self, service: model.Service) -> None:
        self.updates += 1
        self.at[service.appkey] = time.perf_counter()
        if service.endpoints:
            ep0 = min(service.endpoints, key=lambda e: (e.host, e.port))
            self.first_weight[service.appkey] = ep0.weight
        if self.keep:
            self.services[service.appkey] = service

    def remove_service(self, appkey: str) -> None:
        self.services.pop(appkey, None)

    def has_service(self, appkey: str) -> bool:
        return appkey in self.first_weight


def make_services(n: int, nodes: int) -> list[dict[str, Any]]:
    out = []
    for s in range(n):
        eps = [
            {
                "address": f"10.{s // 250}.{s % 250}.{i + 1}:9000",
                "weight": 100,
                "idc": f"idc-{i % 4}",
                "region": f"region-{i % 2}",
                "cell": "" if i % 10 else "gray",
                "swimlane": "" if i % 20 else "lane-1",
            }
            for i in range(nodes)
        ]
        out.append(
            {"appkey": f"com.bench.svc{s:05d}", "service_names": [f"svc{s}.Api"], "endpoints": eps}
        )
    return out


def dump(services: list[dict[str, Any]]) -> str:
    return json.dumps({"services": services})


def write(path: Path, text: str) -> float:
    """Atomically replace the file; returns the time it was in place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return time.perf_counter()


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


async def wait(cond: Any, timeout: float) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("bench condition not met")
        await asyncio.sleep(0.001)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


class StallMeter:
    """The longest time the event loop did not get back to a 1 ms timer."""

    def __init__(self) -> None:
        self.max = 0.0
        self.gc_max = 0.0
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc)
        self._task = asyncio.get_running_loop().create_task(self._tick())

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_max = max(self.gc_max, time.perf_counter() - self._gc_t0)

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.max = max(self.max, time.perf_counter() - t - 0.001)

    def take(self) -> str:
        m, g = self.max, self.gc_max
        self.max = self.gc_max = 0.0
        return f"longest event-loop stall {m * 1000:.0f} ms, longest GC pause {g * 1000:.0f} ms"

    def stop(self) -> None:
        gc.callbacks.remove(self._gc)
        self._task.cancel()


async def bench(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-xds-"))
    path = tmp / "endpoints.json"
    services = make_services(a.services, a.nodes)
    write(path, dump(services))
    keys = [s["appkey"] for s in services]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "octoproxy.controlplane", "--endpoints", str(path),
        "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    assert b"listening" in line, line
    mode = "delta" if a.delta else "sotw"
    print(
        f"xDS bench: {a.services} services x {a.nodes} nodes, {mode}, client on uvloop; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    try:
        # --- initial sync
        sink = TimingSink(keep=True)
        c = XdsClient(f"127.0.0.1:{port}", sink, node_id="bench", delta=a.delta,
                      resource_timeout_s=120)  # fmt: skip
        c.start()
        gc.collect()
        rss0 = rss_kib()
        stall = StallMeter()
        await asyncio.sleep(0.01)
        stall.take()
        t0 = time.perf_counter()
        c.subscribe(keys)
        states = await c.wait_for(keys, 300)
        t_sync = time.perf_counter() - t0
        assert all(s is ResourceState.READY for s in states.values())
        gc.collect()
        rss1 = rss_kib()
        print(f"  initial sync of {a.services} services: {t_sync * 1000:.0f} ms ({stall.take()})")

        # --- one node of one service changes
        lat = []
        stalls = []
        for r in range(a.rounds):
            s = services[(r * 7919) % a.services]
            new = 1000 + r
            s["endpoints"][0]["weight"] = new
            appkey = s["appkey"]
            text = dump(services)  # the bench's own JSON work is not counted as a stall
            await asyncio.sleep(0.01)
            stall.take()
            t0 = write(path, text)
            await wait(lambda k=appkey, w=new: sink.first_weight.get(k) == w, 60)
            lat.append(sink.at[appkey] - t0)
            await asyncio.sleep(0.05)
            stalls.append(stall.take())
        s_one = max(stalls, key=lambda x: float(x.split()[3]))
        print(
            f"  one node changed -> route in sink: p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p90 {pct(lat, 0.9) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
            f"over {a.rounds} rounds (file poll every 100 ms included; "
            f"{s_one})"
        )

        # --- the control plane's share: reloading the file with one service changed
        copy = tmp / "copy.json"  # not the watched file
        write(copy, dump(services))
        cache, _ = build(copy, _Cache())
        reloads = []
        for w in (3, 4, 5):
            services[0]["endpoints"][0]["weight"] = w
            write(copy, dump(services))
            t0 = time.perf_counter()
            cache, _ = build(copy, cache)
            reloads.append(time.perf_counter() - t0)
        t_reload = min(reloads)
        print(
            f"    of which the control plane's reload (parse {copy.stat().st_size >> 20} MiB JSON, "
            f"diff, rebuild 1 service): {t_reload * 1000:.0f} ms; the rest is the 100 ms poll, "
            f"gRPC and the client"
        )

        # --- every service changes
        for s in services:
            s["endpoints"][0]["weight"] = 7
        text = dump(services)
        await asyncio.sleep(0.01)
        stall.take()
        t0 = write(path, text)
        await wait(lambda: all(sink.first_weight[k] == 7 for k in keys), 300)
        t_all = max(sink.at[k] for k in keys) - t0
        print(
            f"  one node in every service changed -> all {a.services} updated: "
            f"{t_all * 1000:.0f} ms ({stall.take()})"
        )
        stall.stop()

        # --- memory per subscribed service in a fresh client (sink keeps nothing)
        await c.stop()
        sink.services.clear()
        gc.collect()
        sink2 = TimingSink(keep=False)
        c2 = XdsClient(f"127.0.0.1:{port}", sink2, node_id="bench-mem", delta=a.delta,
                       resource_timeout_s=120)  # fmt: skip
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        c2.start()
        c2.subscribe(keys)
        await c2.wait_for(keys, 600)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        await c2.stop()
        print(
            f"  client memory per subscribed service ({a.nodes} nodes): "
            f"{used / a.services / 1024:.1f} KiB (tracemalloc); "
            f"RSS delta incl. a sink holding the services: {(rss1 - rss0) / a.services:.1f} KiB"
        )
    finally:
        proc.kill()
        await proc.wait()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (for a loaded, shared host:
    CPU time says what wall time would be on an idle one)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def bench_proxy(a: argparse.Namespace) -> None:
    import aiohttp
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bx-"))
    path = tmp / "endpoints.json"
    services = make_services(a.services, a.nodes)
    write(path, dump(services))
    keys = [s["appkey"] for s in services]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    cp_port, sub_port = free_port(), free_port()
    cp = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "octoproxy.controlplane", "--endpoints", str(path),
        "--listen", f"127.0.0.1:{cp_port}", "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert cp.stdout is not None
    line = await asyncio.wait_for(cp.stdout.readline(), 120)
    assert b"listening" in line, line
    cfg = {
        "node": {"id": "bench-proxy"},
        "listeners": {"outbound": [{"path": str(tmp / "px.sock")}]},
        "xds": {"server": f"127.0.0.1:{cp_port}", "delta": a.delta},
        "subscribe": {"port": sub_port, "timeout_s": 120},
    }
    (tmp / "proxy.yaml").write_text(yaml.safe_dump(cfg))
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "octoproxy", "run", "-c", str(tmp / "proxy.yaml"),
        "--log-level", "warning", env=env, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    mode = "delta" if a.delta else "sotw"
    base = f"http://127.0.0.1:{sub_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            t_start = time.monotonic()
            while True:
                try:
                    async with http.get(base + "/v1/subscriptions") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() - t_start > 60:
                    raise TimeoutError("proxy did not start")
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            rss0 = vm_rss_kib(proxy.pid)
            size = a.services // a.batches
            batches = [keys[i * size : (i + 1) * size] for i in range(a.batches)]

            async def one(b: list[str]) -> int:
                async with http.post(base + "/v1/subscribe", json={"appkeys": b}) as r:
                    await r.read()
                    return r.status

            c0, cp0 = cpu_s(proxy.pid), cpu_s(cp.pid)
            t0 = time.perf_counter()
            statuses = await asyncio.gather(*(one(b) for b in batches))
            t_all = time.perf_counter() - t0
            c1, cp1 = cpu_s(proxy.pid), cpu_s(cp.pid)
            async with http.get(base + "/v1/subscriptions") as r:
                subs = (await r.json())["subscriptions"]
            empty = sum(1 for v in subs.values() if not v.get("endpoints"))
            await asyncio.sleep(1.0)
            rss1 = vm_rss_kib(proxy.pid)
            print(
                f"xDS proxy bench ({mode}): {a.services} services x {a.nodes} nodes in "
                f"{a.batches} concurrent subscribe calls of {size}: all answered in "
                f"{t_all * 1000:.0f} ms (statuses {sorted(set(statuses))}), "
                f"{empty} services left without endpoints (CPU used meanwhile: proxy "
                f"{c1 - c0:.2f} s, control plane {cp1 - cp0:.2f} s), proxy RSS "
                f"{rss0 // 1024} -> {rss1 // 1024} MiB = {(rss1 - rss0) / a.services:.1f} KiB "
                f"per service; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
            )
            if empty or set(statuses) != {200}:
                raise SystemExit("FAILED: not every service got its endpoints")
            lat = []
            cpu_cp: list[float] = []
            cpu_px: list[float] = []
            for r_ in range(a.rounds):
                s = services[(r_ * 7919) % a.services]
                eps = s["endpoints"]
                if len(eps) > a.nodes:
                    eps.pop()
                else:
                    eps.append(dict(eps[0], address=f"10.250.{r_ % 250}.1:9000"))
                want = len(eps)
                text = dump(services)
                await asyncio.sleep(0.3)  # the previous round's work is over
                cp0, px0 = cpu_s(cp.pid), cpu_s(proxy.pid)
                t0 = write(path, text)
                while True:
                    async with http.get(base + "/v1/subscriptions") as r:
                        got = (await r.json())["subscriptions"][s["appkey"]]["endpoints"]
                    if got == want:
                        break
                    if time.perf_counter() - t0 > 60:
                        raise TimeoutError("change did not arrive")
                    await asyncio.sleep(0.02)
                lat.append(time.perf_counter() - t0)
                cpu_cp.append(cpu_s(cp.pid) - cp0)
                cpu_px.append(cpu_s(proxy.pid) - px0)
            print(
                f"  one endpoint changed in the file -> in the proxy's route table: "
                f"p50 {statistics.median(lat) * 1000:.0f} ms, p90 {pct(lat, 0.9) * 1000:.0f} ms "
                f"over {a.rounds} rounds (100 ms file poll and 20 ms polling of "
                f"GET /v1/subscriptions included); CPU per change (median): control plane "
                f"{statistics.median(cpu_cp) * 1000:.0f} ms (re-reading the "
                f"{path.stat().st_size >> 20} MiB file), proxy {statistics.median(cpu_px) * 1000:.0f} ms "
                f"(with answering the polls)"
            )
    finally:
        for p in (proxy, cp):
            if p.returncode is None:
                p.kill()
            await p.wait()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--delta", action="store_true", help="incremental ADS (default: SotW)")
    p.add_argument("--proxy", action="store_true", help="measure a real proxy process")
    p.add_argument("--batches", type=int, default=20, help="--proxy: concurrent subscribe calls")
    a = p.parse_args(argv)
    uvloop.run(bench_proxy(a) if a.proxy else bench(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
