"""Service authentication end to end (docs/auth.md, docs/protocol.md 7.6):
an app -> client-side proxy (signs) -> server-side proxy (verifies, ACL) ->
provider, and legacy clients that sign by themselves; real processes and
sockets.  Every refusal is status 7 with its reason and never reaches the
provider (counted there)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import uvloop

from octoproxy._core import frame
from octoproxy.config import parse_config

import outsider
from harness import Cluster, cluster, free_port, wait_for, write_token_file
from outsider import Wire, now_s

PROVIDER = "com.demo.echo"
TOKENS = {
    "com.demo.web": "tok-web-4b1d9e0c7f3a",
    "com.demo.batch": "tok-batch-90ce12aa5d77",
    "com.demo.intruder": "tok-intruder-1f2e3d4c",
    "com.demo.legacy": "tok-legacy-77a0b3c2e1",
}


def mac(caller: str, ts: int, method: str = "", token: str | None = None,
        provider: str = PROVIDER) -> str:
    """outsider.mac, with the caller's token from TOKENS unless given."""
    return outsider.mac(caller, ts, method, TOKENS[caller] if token is None else token, provider)


@pytest.fixture(scope="module")
def mesh() -> Any:
    with cluster() as c:
        tok = write_token_file(c, TOKENS)
        c.providers(echo="echo.sock")
        port = free_port()
        c.port_log = free_port()  # type: ignore[attr-defined]
        c.server_admin = free_port()  # type: ignore[attr-defined]
        c.client_admin = free_port()  # type: ignore[attr-defined]
        c.port = port  # type: ignore[attr-defined]
        c.server_cfg = {  # type: ignore[attr-defined]
            "node": {"id": "server"},
            "auth": {"token_file": tok, "max_skew_s": 60},
            "admin": {"port": c.server_admin},  # type: ignore[attr-defined]
            "listeners": {"inbound": [{
                "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
                "appkey": PROVIDER,
                "auth": {"mode": "enforce", "allow": [
                    {"caller": "com.demo.web"}, {"caller": "com.demo.legacy"},
                    {"caller": "com.demo.batch", "methods": ["get"]},
                    {"caller": "com.demo.tokenless"}]}},  # named, but no token in the file
                {"host": "127.0.0.1", "port": c.port_log,  # type: ignore[attr-defined]
                 "upstream_uds": c.path("echo.sock"), "appkey": PROVIDER,
                 "auth": {"mode": "log-only"}}]},
        }
        c.proxy("server", c.server_cfg)  # type: ignore[attr-defined]
        c.client_cfg = {  # type: ignore[attr-defined]
            "node": {"id": "client"},
            "auth": {"token_file": tok},
            "admin": {"port": c.client_admin},  # type: ignore[attr-defined]
            "listeners": {"outbound": [
                {"path": c.path("web.sock"), "sign_for": ["com.demo.web"]},
                {"path": c.path("batch.sock"), "sign_for": ["com.demo.batch"]},
                {"path": c.path("intr.sock"), "sign_for": ["com.demo.intruder"]}]},
            "static": {"services": [{"appkey": PROVIDER,
                                     "endpoints": [{"address": f"127.0.0.1:{port}"}]}]},
        }
        c.proxy("client", c.client_cfg)  # type: ignore[attr-defined]
        yield c


def handled(c: Cluster) -> int:
    """Requests the provider has handled so far (asked with a legacy signed call)."""
    w = Wire(c.port)  # type: ignore[attr-defined]
    try:
        r = w.signed(b"handled", "com.demo.legacy", token=TOKENS["com.demo.legacy"])
        assert r["status"] == 0, r
        return int(r["body"].split(b"|")[1])
    finally:
        w.close()


def test_authorized_caller_passes_through_both_proxies(mesh: Cluster) -> None:
    w = Wire(mesh.path("web.sock"))
    for i in range(20):
        r = w.call(b"echo:%d" % i, "com.demo.web")
        assert r["status"] == 0 and r["body"] == b"echo|%d" % i, r
    # methods alternating within one second: each is signed for its own method
    # (the signer reuses a signature only for the same second, provider and method)
    for i in range(12):
        r = w.call(frame.thrift_call(("get", "put", "echo")[i % 3], i), "com.demo.web")
        assert r["status"] == 0, r
    w.close()


def test_refusals_are_status_7_with_reason_and_never_reach_the_provider(mesh: Cluster) -> None:
    before = handled(mesh)
    web = Wire(mesh.path("web.sock"))
    # an app cannot sign as another app's appkey: refused by the client-side proxy
    r = web.call(b"echo:x", "com.demo.batch")
    assert r["status"] == 7 and "does not sign for caller appkey 'com.demo.batch'" in r["message"]
    r = web.call(b"echo:x", "")
    assert r["status"] == 7 and "does not sign for" in r["message"]
    # signed, but not in the provider's ACL
    intr = Wire(mesh.path("intr.sock"))
    r = intr.call(b"echo:x", "com.demo.intruder")
    assert r["status"] == 7 and "caller 'com.demo.intruder' is not allowed to call com.demo.echo" \
        in r["message"], r
    # in the ACL for method get only: put is refused, get passes
    batch = Wire(mesh.path("batch.sock"))
    r = batch.call(frame.thrift_call("put", 3), "com.demo.batch")
    assert r["status"] == 7 and "not authorized for method 'put'" in r["message"], r
    # the answer is a Thrift EXCEPTION with the request's method (docs/protocol.md 11)
    assert frame.thrift_method(r["body"]) == "put"
    # legacy clients on the inbound port
    leg = Wire(mesh.port)  # type: ignore[attr-defined]
    r = leg.signed(b"echo:x", "com.demo.ghost", sig=mac("com.demo.ghost", now_s(), token="guess"))
    assert r["status"] == 7 and "caller 'com.demo.ghost' is not allowed to call" in r["message"], r
    r = leg.signed(b"echo:x", "com.demo.tokenless", sig=mac("com.demo.tokenless", now_s(), token="guess"))
    assert r["status"] == 7 and "unknown caller appkey 'com.demo.tokenless'" in r["message"], r
    r = leg.signed(b"echo:x", "com.demo.legacy", sig=mac("com.demo.legacy", now_s(), token="wrong"))
    assert r["status"] == 7 and "bad signature from caller 'com.demo.legacy'" in r["message"]
    old = now_s() - 120   # a replay outside the 60 s skew, correctly signed
    r = leg.signed(b"echo:x", "com.demo.legacy", ts=old, token=TOKENS["com.demo.legacy"])
    assert r["status"] == 7 and "expired" in r["message"] and "60000 ms" in r["message"]
    r = leg.call(b"echo:x", "com.demo.legacy")
    assert r["status"] == 7 and "not signed" in r["message"]
    # a signature for another method or provider does not verify
    ts = now_s()
    r = leg.signed(frame.thrift_call("echo", 1), "com.demo.legacy", ts=ts, sig=mac("com.demo.legacy", ts, "other"))
    assert r["status"] == 7 and "bad signature" in r["message"]
    r = leg.signed(b"echo:x", "com.demo.legacy", sig=mac("com.demo.legacy", ts, provider="com.demo.x"), ts=ts)
    assert r["status"] == 7 and "bad signature" in r["message"]
    # none of those reached the provider: only the first count call itself
    assert handled(mesh) == before + 1
    # the connections stay usable after refusals
    assert batch.call(frame.thrift_call("get", 4), "com.demo.batch")["status"] == 0
    assert web.call(b"echo:ok", "com.demo.web")["body"] == b"echo|ok"
    assert handled(mesh) == before + 4
    for w in (web, intr, batch, leg):
        w.close()


def test_caller_without_token_is_answered_by_the_acl(mesh: Cluster) -> None:
    """A signed caller the proxy has no token for: `not allowed` when the ACL
    does not name it (what it gets with a token too), `unknown caller` when it
    does; a caller with a token is authenticated first (docs/auth.md, "Which
    reason").  None of them reaches the provider."""
    before = handled(mesh)
    leg = Wire(mesh.port)  # type: ignore[attr-defined]
    ts = now_s()
    cases = [
        # no token, not in the ACL: a good-looking signature, a bad one, expired
        ("com.demo.ghost", ts, mac("com.demo.ghost", ts, token="ghost-own"), "is not allowed to call"),
        ("com.demo.ghost", ts, "0" * 64, "is not allowed to call"),
        ("com.demo.ghost", ts - 120, "0" * 64, "is not allowed to call"),
        # no token, in the ACL
        ("com.demo.tokenless", ts, mac("com.demo.tokenless", ts, token="t"), "unknown caller appkey"),
        ("com.demo.tokenless", ts - 120, "0" * 64, "unknown caller appkey"),
        # a token (for its own listener on the client side), not in this ACL
        ("com.demo.intruder", ts, mac("com.demo.intruder", ts), "is not allowed to call"),
        ("com.demo.intruder", ts, mac("com.demo.intruder", ts, token="wrong"), "bad signature"),
        ("com.demo.intruder", ts - 120, mac("com.demo.intruder", ts - 120), "expired"),
    ]
    for caller, t, sig, want in cases:
        r = leg.signed(b"echo:x", caller, ts=t, sig=sig)
        assert r["status"] == 7 and want in r["message"] and repr(caller) in r["message"], (caller, r)
    leg.close()
    assert handled(mesh) == before + 1   # only the count call itself


def test_legacy_client_signing_by_itself_is_verified(mesh: Cluster) -> None:
    leg = Wire(mesh.port)  # type: ignore[attr-defined]
    ts = now_s()
    r = leg.signed(b"echo:legacy", "com.demo.legacy", ts=ts, sig=mac("com.demo.legacy", ts))
    assert r["status"] == 0 and r["body"] == b"echo|legacy", r
    body = frame.thrift_call("get", 9)
    r = leg.signed(body, "com.demo.legacy", ts=ts, sig=mac("com.demo.legacy", ts, "get"))
    assert r["status"] == 0, r
    leg.close()


def test_log_only_mode_forwards_and_logs(mesh: Cluster) -> None:
    w = Wire(mesh.port_log)  # type: ignore[attr-defined]
    r = w.call(b"echo:migrating", "com.demo.old")
    assert r["status"] == 0 and r["body"] == b"echo|migrating", r
    w.close()
    server = next(p for p in mesh.procs if p.name == "server")
    wait_for(lambda: "auth (log-only) forwarded a request that fails" in server.log()
             and "is not signed" in server.log(), 10, "the log-only line")


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


def test_tokens_never_in_logs_config_dump_or_handover_state(mesh: Cluster) -> None:
    # traffic of every kind first, so that whatever is logged has been logged
    test_refusals_are_status_7_with_reason_and_never_reach_the_provider(mesh)
    dumps = [_get(mesh.server_admin, "/config_dump"), _get(mesh.client_admin, "/config_dump")]  # type: ignore[attr-defined]
    assert b"token_file" in dumps[0] + dumps[1]
    # every other admin page too (counters, clusters, governance, readiness, drain)
    for port in (mesh.server_admin, mesh.client_admin):  # type: ignore[attr-defined]
        for page in ("/stats", "/clusters", "/governance", "/ready", "/drain"):
            try:
                dumps.append(_get(port, page))
            except urllib.error.HTTPError as e:  # /ready answers 503 while not ready
                dumps.append(e.read())
    logs = [p.log() for p in mesh.procs]
    state = _handover_state(mesh)
    assert "counters" in state
    blobs = [d.decode() for d in dumps] + logs + [json.dumps(state)]
    for name, token in TOKENS.items():
        for blob in blobs:
            # the value, and its hex (a dump of the bytes, or of state built from them)
            assert token not in blob and token.encode().hex() not in blob, f"the token of {name} leaked"


def test_proxies_holding_tokens_write_no_core_dump(mesh: Cluster) -> None:
    # the core file size limit of both proxies, soft and hard: 0
    procs = [p for p in mesh.procs if p.name in ("server", "client")]
    assert len(procs) == 2
    for p in procs:
        with open(f"/proc/{p.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max core file size"))
        assert line.split()[4:6] == ["0", "0"], (p.name, line)


def _handover_state(mesh: Cluster) -> dict[str, Any]:
    """What a generation hands to the next in a hot restart, from a proxy
    with the client's configuration (its own sockets), after one signed call."""
    from octoproxy.server import Proxy

    cfg = dict(mesh.client_cfg)  # type: ignore[attr-defined]
    cfg["admin"] = {}
    cfg["listeners"] = {"outbound": [{"path": mesh.path("hs.sock"), "sign_for": ["com.demo.web"]}]}
    cfg["hot_restart"] = {"socket": mesh.path("hs.hr")}

    async def go() -> dict[str, Any]:
        p = Proxy(parse_config(cfg))
        await p.start()
        try:
            loop = asyncio.get_running_loop()

            def one() -> dict[str, Any]:
                w = Wire(mesh.path("hs.sock"))
                try:
                    return w.call(b"echo:hs", "com.demo.web")
                finally:
                    w.close()

            assert (await loop.run_in_executor(None, one))["status"] == 0
            return p.handover_state()
        finally:
            await p.close()

    return uvloop.run(go())
