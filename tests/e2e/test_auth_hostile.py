"""Hostile callers against a verifying proxy (docs/auth.md): thousands of
distinct unknown caller appkeys as long as a header allows, signatures of
the wrong length, timestamps that are not numbers or overflow.  Each is
answered status 7 at once, never forwarded, the proxy's memory bounded and
a legitimate caller unaffected.  No token is fetched for a claimed appkey
(only the ACL's callers' tokens are, docs/auth.md), so claiming appkeys
costs the control plane nothing; here the tokens come from a file."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from octoproxy._core import frame

from harness import Cluster, auth_mesh, cluster
from outsider import auth_context, mac, now_s, request

PROVIDER = "com.demo.echo"
TOKENS = {"com.demo.legacy": "hostile-tok-legacy-5a5a"}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def server() -> Any:
    with cluster() as c:
        m = auth_mesh(c, TOKENS, PROVIDER, ["com.demo.legacy"], None,
                      server={"auth": {"max_skew_s": 60}})
        c.port, c.proc = m.port, m.server  # type: ignore[attr-defined]
        yield c


def pipelined(port: int, frames: list[bytes]) -> list[Any]:
    """Send every frame on one connection, read every answer."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    sc = frame.FrameScanner()
    got: list[Any] = []
    try:
        s.sendall(b"".join(frames))
        while len(got) < len(frames):
            data = s.recv(1 << 20)
            assert data, f"closed after {len(got)} answers"
            got.extend(sc.feed(data))
    finally:
        s.close()
    return got


def req(seq: int, caller: str, ts: str, sig: str, method: str = "echo") -> bytes:
    # signed as `caller`, sent by another app (traceInfo says com.demo.x)
    return request(seq, frame.thrift_call(method, seq), caller="com.demo.x",
                   local=auth_context(caller, ts, sig))


def legit(seq: int) -> bytes:
    ts = now_s()
    return req(seq, "com.demo.legacy", str(ts),
               mac("com.demo.legacy", ts, "echo", TOKENS["com.demo.legacy"]))


def test_thousands_of_long_unknown_callers_keep_memory_bounded(server: Cluster) -> None:
    port, pid = server.port, server.proc.pid  # type: ignore[attr-defined]
    assert pipelined(port, [legit(1)])[0].status == 0
    rss0 = rss_kib(pid)
    n, size = 3000, 40_000
    for batch in range(0, n, 250):
        frames = [req(i + 1, f"com.evil.{i:06d}." + "x" * size, str(now_s()), "0" * 64)
                  for i in range(batch, batch + 250)]
        answers = pipelined(port, frames)
        assert {a.status for a in answers} == {7}
        assert all("not allowed" in (a.message or "") and len(a.message or "") < 400
                   for a in answers)
    rss1 = rss_kib(pid)
    assert server.proc.alive()  # type: ignore[attr-defined]
    assert pipelined(port, [legit(2)])[0].status == 0
    print({"rss_kib": (rss0, rss1), "callers": n, "appkey_bytes": size})
    # the refusals kept for reuse hold bounded names, not 1024 x 40 KB
    assert rss1 - rss0 < 16 * 1024, (rss0, rss1)


@pytest.mark.parametrize(("ts", "sig", "reason"), [
    ("", None, "expired"),
    ("99999999999999999999999", None, "expired"),  # overflows int64
    ("9223372036854775808", None, "expired"),
    ("-5", None, "expired"),
    ("1e12", None, "expired"),
    (" 1", None, "expired"),
    (None, "", "bad signature"),
    (None, "0" * 21, "bad signature"),
    (None, "0" * 23, "bad signature"),
    (None, "A" * 22, "bad signature"),
    (None, "f" * 20_000, "bad signature"),
    (None, "\u00e9" * 11, "bad signature"),  # 22 bytes, not base64url
])
def test_malformed_timestamps_and_signatures(server: Cluster, ts: str | None, sig: str | None,
                                             reason: str) -> None:
    port = server.port  # type: ignore[attr-defined]
    now = now_s()
    t = ts if ts is not None else str(now)
    s = sig if sig is not None else mac("com.demo.legacy", now, "echo", TOKENS["com.demo.legacy"])
    a, b = pipelined(port, [req(1, "com.demo.legacy", t, s), legit(2)])
    assert a.status == 7 and reason in (a.message or ""), a.message
    assert b.status == 0, b.message
