"""Tokens and ACLs over xDS: a change in the bundled control plane's files ->
ADS -> in force in a real server-side proxy (docs/auth.md).

Runs the control plane (``--tokens``), a provider and a server-side proxy
(``auth.source: xds``) as real processes on loopback; a legacy client signs
by itself on one connection that stays open throughout, and prints, over
``--rounds`` (p50 / p90 / max, seconds from the file's rename to the first
answer that shows the change; each includes the control plane's 100 ms poll):

- an ACL revoked (the caller removed from ``acls``) -> status 7
- an ACL granted again -> status 0
- a caller's token replaced in the token file -> the new token verifies

    PYTHONPATH=src python bench/e2e/bench_auth_xds.py [--rounds 20] [--delta]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from octoproxy._core import frame  # noqa: E402

import harness  # noqa: E402

PROVIDER = "com.bench.echo"
CALLER = "com.bench.caller"


def write(path: str, data: Any, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f)
    os.replace(tmp, path)


class Legacy:
    """One TCP connection to the server-side proxy, signing by itself."""

    def __init__(self, port: int) -> None:
        import socket

        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.settimeout(10)
        self.sc = frame.FrameScanner()
        self.seq = 0

    def call(self, token: str) -> int:
        self.seq += 1
        ts = str(int(time.time()))
        d = hmac.new(token.encode(), f"{CALLER}|{PROVIDER}|{ts}|".encode(), hashlib.sha256).digest()
        sig = base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()
        self.s.sendall(frame.encode_request(
            self.seq, "com.bench.Echo", b"echo:x", trace_info={"clientAppkey": CALLER},
            local_context={"octo-auth": f"{CALLER}:{ts}:{sig}"}))
        got: list[Any] = []
        while not got:
            got.extend(self.sc.feed(self.s.recv(65536)))
        return int(got[0].status)


def until(leg: Legacy, token: str, want: int, t0: float) -> float:
    while leg.call(token) != want:
        if time.monotonic() - t0 > 30:
            raise TimeoutError(f"no status {want} 30 s after the change")
    return time.monotonic() - t0


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return (f"p50 {statistics.median(xs) * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms  "
            f"max {xs[-1] * 1000:6.1f} ms  (n={len(xs)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--delta", action="store_true")
    a = ap.parse_args()
    with harness.cluster() as c:
        tok, eps = c.path("tokens.yaml"), c.path("eps.yaml")
        token = "bench-token-0"
        write(tok, {CALLER: token}, 0o600)
        acl = {"services": [], "acls": {PROVIDER: [{"caller": CALLER}]}}
        write(eps, acl, 0o644)
        cp_port = harness.free_port()
        cp = harness.Proc([sys.executable, "-m", "octoproxy", "control-plane", "--endpoints", eps,
                           "--tokens", tok, "--listen", f"127.0.0.1:{cp_port}"], "cp", c.dir)
        c.procs.append(cp)
        harness.wait_for(lambda: "listening on" in cp.log() or not cp.alive(), 20, "control plane")
        c.providers(echo="echo.sock")
        port = harness.free_port()
        c.proxy("server", {
            "node": {"id": "bench-server"},
            "xds": {"server": f"127.0.0.1:{cp_port}", "delta": a.delta},
            "auth": {"source": "xds", "max_skew_s": 60},
            "listeners": {"inbound": [{
                "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
                "appkey": PROVIDER, "auth": {"mode": "enforce"}}]}})
        leg = Legacy(port)
        until(leg, token, 0, time.monotonic())
        revoke, grant, rotate = [], [], []
        for i in range(a.rounds):
            t0 = time.monotonic()
            write(eps, {"services": [], "acls": {PROVIDER: []}}, 0o644)
            revoke.append(until(leg, token, 7, t0))
            t0 = time.monotonic()
            write(eps, acl, 0o644)
            grant.append(until(leg, token, 0, t0))
            new = f"bench-token-{i + 1}"
            t0 = time.monotonic()
            write(tok, {CALLER: new}, 0o600)
            rotate.append(until(leg, new, 0, t0))
            token = new
        print(f"xDS {'delta' if a.delta else 'SotW'}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"ACL revoked  -> refused:       {stats(revoke)}")
        print(f"ACL granted  -> passes:        {stats(grant)}")
        print(f"token changed -> new verifies: {stats(rotate)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
