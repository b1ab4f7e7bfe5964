"""Adaptive concurrency (docs/governance.md) against a provider that slows
down 10x under load: caller p99 and the provider's concurrency with the
limiter off, on, and a fixed limit.

    caller (open loop, --rate req/s) --UDS--> A (client side) --TCP--> B --UDS--> provider

The provider serves at most --workers requests at once, each taking
--service-ms; the rest queue in it (its concurrency = in service + queued).
After --normal-s seconds each request takes 10x as long: its capacity falls
from workers/service to a tenth of that, below the offered rate.  Per
system, the slow phase's figures: p50/p99 of the calls answered with
success, the share refused by the proxy (status 6), timeouts (status 4),
and the provider's peak and mean concurrency; and the share refused before
the slowdown (a fixed limit low enough for the slow phase sheds then).

    PYTHONPATH=src python bench/e2e/bench_adaptive.py [--rate 1500] [--slow-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import uvloop  # noqa: E402
from test_governance_e2e import Raw  # noqa: E402

from octoproxy._core import frame as F  # noqa: E402

import harness  # noqa: E402


async def provider(sock: str, workers: int, service_ms: float, normal_s: float) -> None:
    """The capacity-limited provider (its own process)."""
    q: asyncio.Queue[tuple[asyncio.StreamWriter, F.Frame]] = asyncio.Queue()
    t0: list[float] = []
    conc = [0]
    samples: list[tuple[float, int]] = []

    async def worker() -> None:
        while True:
            w, fr = await q.get()
            slow = t0 and time.monotonic() - t0[0] >= normal_s
            await asyncio.sleep(service_ms * (10 if slow else 1) / 1000)
            conc[0] -= 1
            w.write(F.encode_response(fr.seq_id, b"ok"))

    async def conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sc = F.FrameScanner()
        while data := await r.read(65536):
            for fr in sc.feed(data):
                if fr.msg_type != 0:
                    continue
                if not t0:
                    t0.append(time.monotonic())
                conc[0] += 1
                q.put_nowait((w, fr))

    async def sampler() -> None:
        while True:
            await asyncio.sleep(0.01)
            if t0:
                samples.append((time.monotonic() - t0[0], conc[0]))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    srv = await asyncio.start_unix_server(conn, sock)
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    tasks.append(asyncio.create_task(sampler()))
    await stop.wait()
    srv.close()
    slow = [c for t, c in samples if t >= normal_s + 0.5]
    print(json.dumps({"peak": max(slow, default=0),
                      "mean": statistics.mean(slow) if slow else 0.0}), flush=True)


async def caller(uds: str, rate: float, seconds: float, normal_s: float,
                 timeout_ms: int) -> list[tuple[float, float, int]]:
    raws = [await Raw.connect(uds) for _ in range(4)]
    out: list[tuple[float, float, int]] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(raw: Raw, t_send: float) -> None:
        try:
            st = (await raw.call(b"x", timeout_ms=timeout_ms)).status
        except ConnectionError:
            st = -1
        out.append((t_send, time.monotonic() - t_send, st))

    t0 = time.monotonic()
    sent = 0
    i = 0
    while time.monotonic() - t0 < seconds:
        owed = int((time.monotonic() - t0) * rate) - sent
        for _ in range(owed):
            i += 1
            t = asyncio.create_task(one(raws[i % len(raws)], time.monotonic()))
            pending.add(t)
            t.add_done_callback(pending.discard)
        sent += owed
        await asyncio.sleep(0.001)
    if pending:
        await asyncio.wait(pending, timeout=timeout_ms / 1000 + 2)
    for r in raws:
        await r.close()
    return [(t - t0, lat, st) for t, lat, st in out]


def run(system: str, policy: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with harness.cluster() as c:
        psock = c.path("p.sock")
        prov = subprocess.Popen(
            [sys.executable, __file__, "--provider", psock, str(args.workers),
             str(args.service_ms), str(args.normal_s)],
            stdout=subprocess.PIPE, env=harness.env())
        harness.wait_for(lambda: os.path.exists(psock), 15, "provider socket")
        port = harness.free_port()
        c.proxy("b", harness.server_proxy_cfg({port: psock}))
        svc = {"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}], **policy}
        c.proxy("a", harness.client_proxy_cfg(c.path("a.sock"), [svc]))
        res = uvloop.run(caller(c.path("a.sock"), args.rate, args.normal_s + args.slow_s,
                                args.normal_s, args.timeout_ms))
        prov.send_signal(signal.SIGTERM)
        pout, _ = prov.communicate(timeout=15)
    pc = json.loads(pout.decode().strip().splitlines()[-1])
    slow = [(lat, st) for t, lat, st in res if t >= args.normal_s + 0.5]
    normal = [st for t, lat, st in res if 0.5 <= t < args.normal_s]
    ok = sorted(lat for lat, st in slow if st == 0)
    n = max(len(slow), 1)

    def pct(p: float) -> float:
        return ok[min(len(ok) - 1, int(len(ok) * p))] * 1000 if ok else 0.0

    return {"system": system, "calls": len(slow), "ok": len(ok),
            "refused": sum(1 for _, st in slow if st == 6) / n,
            "timeouts": sum(1 for _, st in slow if st == 4) / n,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "normal_refused": sum(1 for st in normal if st == 6) / max(len(normal), 1),
            "provider_peak": pc["peak"], "provider_mean": pc["mean"]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--provider":
        sock, workers, service_ms, normal_s = sys.argv[2:6]
        uvloop.run(provider(sock, int(workers), float(service_ms), float(normal_s)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1500.0, help="offered calls per second")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--service-ms", type=float, default=2.0)
    ap.add_argument("--normal-s", type=float, default=2.0)
    ap.add_argument("--slow-s", type=float, default=4.0)
    ap.add_argument("--timeout-ms", type=int, default=2000)
    ap.add_argument("--fixed", default="40,3", help="fixed limits compared (max_requests)")
    ap.add_argument("--smoke", action="store_true", help="CI: short phases")
    args = ap.parse_args()
    if args.smoke:
        args.normal_s, args.slow_s = 1.0, 1.5
    systems = {
        "off": {},
        "adaptive": {"adaptive_concurrency": {"enabled": True, "initial_limit": 20,
                                              "min_limit": 2, "max_limit": 1000,
                                              "sample_s": 0.1}},
    }
    for f in args.fixed.split(","):
        systems[f"fixed {f}"] = {"circuit_breakers": {"max_requests": int(f)}}
    print(f"# provider: {args.workers} workers x {args.service_ms:g} ms, 10x slower after "
          f"{args.normal_s:g} s; offered {args.rate:g}/s; slow phase {args.slow_s:g} s; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    bad = False
    for name, pol in systems.items():
        r = run(name, pol, args)
        # every call answered (a success, a refusal or a timeout), and the
        # limiter served some in the slow phase
        bad |= r["calls"] == 0 or (name == "adaptive" and r["ok"] == 0)
        print(f"  {name:<10} ok {r['ok']:>6}/{r['calls']:<6} refused {r['refused']:6.1%} "
              f"timeouts {r['timeouts']:6.1%}  p50 {r['p50_ms']:7.1f} ms  p99 "
              f"{r['p99_ms']:7.1f} ms  provider concurrency peak {r['provider_peak']:>5} "
              f"mean {r['provider_mean']:7.1f}; before the slowdown refused "
              f"{r['normal_refused']:.1%}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
