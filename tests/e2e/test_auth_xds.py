"""Tokens as SDS secrets and ACLs as RBAC policies from the bundled control
plane's files, over a real ADS gRPC stream, to real proxy processes
(docs/auth.md "Tokens and ACLs from the control plane", docs/xds.md): a
change in the files takes effect in the proxies within a second, on the
connections already open; a rotation under load loses nothing; a caller new
to an ACL is unknown until its token arrives; no token reaches a log or a dump."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from typing import Any

import pytest
import yaml

from harness import Cluster, cluster, free_port, wait_for
from outsider import Wire, mac, now_s

PROVIDER = "com.demo.echo"
TOKENS: dict[str, Any] = {
    "com.demo.web": "xds-tok-web-5c0ffee1",
    "com.demo.batch": "xds-tok-batch-7e57ab1e",
    "com.demo.legacy": "xds-tok-legacy-0b5e55ed",
    "com.demo.intruder": "xds-tok-intruder-baddcafe",  # signs (client), in no ACL
}
ACL: list[dict[str, Any]] = [
    {"caller": "com.demo.web"},
    {"caller": "com.demo.batch", "methods": ["get"]},
    {"caller": "com.demo.legacy"},
]
SEEN_TOKENS: set[str] = set()  # every token written in the test (none may leak)


def _write(path: str, data: Any, mode: int = 0o644) -> None:
    """Replace a file atomically (write + rename), as an operator would."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f)
    os.replace(tmp, path)


def write_tokens(c: Cluster, tokens: dict[str, Any]) -> None:
    for v in tokens.values():
        SEEN_TOKENS.update([v] if isinstance(v, str) else v)
    _write(c.path("tokens.yaml"), tokens, 0o600)


def write_acl(c: Cluster, acl: list[dict[str, Any]]) -> None:
    _write(c.path("eps.yaml"), {"services": [], "acls": {PROVIDER: acl}})


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()  # type: ignore[no-any-return]


def auth_dump(port: int) -> dict[str, Any]:
    return json.loads(_get(port, "/config_dump"))["auth"]  # type: ignore[no-any-return]


def _complete(admin: int) -> bool:
    """The proxy serves its admin API (it waits for its tokens and ACLs
    first, docs/auth.md) and misses nothing."""
    try:
        return not auth_dump(admin)["missing"]
    except OSError:  # not serving yet
        return False


@pytest.fixture(scope="module")
def mesh() -> Any:
    with cluster() as c:
        write_tokens(c, TOKENS)
        write_acl(c, ACL)
        cp = c.control_plane(c.path("eps.yaml"), "--tokens", c.path("tokens.yaml"))
        c.providers(echo="echo.sock")
        port = free_port()
        c.port = port  # type: ignore[attr-defined]
        c.server_admin = free_port()  # type: ignore[attr-defined]
        c.client_admin = free_port()  # type: ignore[attr-defined]
        xds = {"server": cp.target}
        c.cp_target = xds["server"]  # type: ignore[attr-defined]
        c.proxy("server", {
            "node": {"id": "server"}, "xds": xds,
            "auth": {"source": "xds", "max_skew_s": 60},
            "admin": {"port": c.server_admin},  # type: ignore[attr-defined]
            "listeners": {"inbound": [{
                "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
                "appkey": PROVIDER, "auth": {"mode": "enforce"}}]}})
        c.proxy("client", {
            "node": {"id": "client"}, "xds": xds, "auth": {"source": "xds"},
            "admin": {"port": c.client_admin},  # type: ignore[attr-defined]
            "listeners": {"outbound": [
                {"path": c.path("web.sock"), "sign_for": ["com.demo.web"]},
                {"path": c.path("batch.sock"), "sign_for": ["com.demo.batch"]},
                {"path": c.path("intr.sock"), "sign_for": ["com.demo.intruder"]}]},
            "static": {"services": [{"appkey": PROVIDER,
                                     "endpoints": [{"address": f"127.0.0.1:{port}"}]}]}})
        for admin in (c.server_admin, c.client_admin):  # type: ignore[attr-defined]
            wait_for(lambda a=admin: _complete(a), 30, "tokens and ACLs")
        yield c


def handled(c: Cluster, token: str | None = None) -> int:
    """Requests the provider has handled so far (a legacy client signing by itself)."""
    w = Wire(c.port)  # type: ignore[attr-defined]
    try:
        ts = now_s()
        r = w.signed(b"handled", "com.demo.legacy", ts=ts,
                     sig=mac("com.demo.legacy", ts, token=token or TOKENS["com.demo.legacy"]))
        assert r["status"] == 0, r
        return int(r["body"].split(b"|")[1])
    finally:
        w.close()


def test_tokens_and_acl_from_the_control_plane(mesh: Cluster) -> None:
    web = Wire(mesh.path("web.sock"))
    assert web.call(b"echo:1", "com.demo.web") == {"status": 0, "message": "", "body": b"echo|1"}
    from octoproxy._core import frame

    batch = Wire(mesh.path("batch.sock"))
    assert batch.call(frame.thrift_call("get", 1), "com.demo.batch")["status"] == 0
    r = batch.call(frame.thrift_call("put", 2), "com.demo.batch")
    assert r["status"] == 7 and "not authorized for method 'put'" in r["message"], r
    assert handled(mesh) >= 2
    for w in (web, batch):
        w.close()


def count(c: Cluster, ident: str) -> int:
    """How many times the provider handled b"id:<ident>" (asked as the legacy client)."""
    w = Wire(c.port)  # type: ignore[attr-defined]
    try:
        ts = now_s()
        r = w.signed(b"count:" + ident.encode(), "com.demo.legacy", ts=ts,
                     sig=mac("com.demo.legacy", ts, token=TOKENS["com.demo.legacy"]))
        assert r["status"] == 0, r
        return int(r["body"].split(b"|")[1])
    finally:
        w.close()


def test_signed_caller_in_no_acl_is_not_allowed(mesh: Cluster) -> None:
    """The server-side proxy fetches tokens only for the callers its ACLs
    name, so it has none for com.demo.intruder (the client-side proxy has
    one and signs): its requests are answered `not allowed`, as with a token
    file, not `unknown caller` (docs/auth.md, "Which reason"), and never
    reach the provider."""
    server = auth_dump(mesh.server_admin)  # type: ignore[attr-defined]
    assert "com.demo.intruder" not in server["tokens"], server["tokens"].keys()
    assert "com.demo.intruder" in auth_dump(mesh.client_admin)["tokens"]  # type: ignore[attr-defined]
    want = "authorization failed: caller 'com.demo.intruder' is not allowed to call com.demo.echo"
    intr = Wire(mesh.path("intr.sock"))
    for i in range(3):
        r = intr.call(b"id:xds-intruder", "com.demo.intruder")
        assert r["status"] == 7 and want in r["message"], (i, r)
    intr.close()
    # a legacy client claiming it, with its real token or a guess: the same
    leg = Wire(mesh.port)  # type: ignore[attr-defined]
    for token in (TOKENS["com.demo.intruder"], "a-guess"):
        ts = now_s()
        r = leg.signed(b"id:xds-intruder", "com.demo.intruder", ts=ts,
                       sig=mac("com.demo.intruder", ts, token=token))
        assert r["status"] == 7 and want in r["message"], r
    leg.close()
    assert count(mesh, "xds-intruder") == 0
    # a caller of the ACL still passes (the count sees what reaches the provider)
    web = Wire(mesh.path("web.sock"))
    assert web.call(b"id:xds-web", "com.demo.web")["status"] == 0
    web.close()
    assert count(mesh, "xds-web") == 1


def _until_status(w: Wire, caller: str, want: int, timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
    """Call until the answer has status `want`; returns (seconds, that answer)."""
    t0 = time.monotonic()
    while True:
        r = w.call(b"echo:x", caller)
        if r["status"] == want:
            return time.monotonic() - t0, r
        assert time.monotonic() - t0 < timeout, f"still {r} after {timeout} s"


def test_acl_revoked_over_xds_takes_effect_within_1s(mesh: Cluster) -> None:
    """Revoke and grant com.demo.web 3 times on one open connection; each
    change is timed from the file's rename to the first answer that shows it."""
    web = Wire(mesh.path("web.sock"))
    assert web.call(b"echo:x", "com.demo.web")["status"] == 0
    revoke, grant = [], []
    for _ in range(3):
        write_acl(mesh, [r for r in ACL if r["caller"] != "com.demo.web"])
        dt, r = _until_status(web, "com.demo.web", 7)
        assert "com.demo.web" in r["message"], r
        revoke.append(dt)
        before = handled(mesh)
        for _ in range(5):
            assert web.call(b"echo:x", "com.demo.web")["status"] == 7
        assert handled(mesh) == before + 1  # refused requests never reach the provider
        write_acl(mesh, ACL)
        grant.append(_until_status(web, "com.demo.web", 0)[0])
    print(f"\nACL change -> effect in the proxy (s): revoke {[round(x, 3) for x in revoke]}, "
          f"grant {[round(x, 3) for x in grant]}")
    assert max(revoke) < 1.0, revoke
    assert max(grant) < 1.0, grant
    web.close()


class _Load:
    """Threads calling through the client-side proxy as com.demo.web, each on
    its own long-lived connection; every answer counted."""

    def __init__(self, path: str, threads: int = 3) -> None:
        self.path = path
        self.ok = 0
        self.errors: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        w = Wire(self.path)
        try:
            while not self._stop.is_set():
                r = w.call(b"echo:load", "com.demo.web")
                if r["status"] == 0:
                    self.ok += 1
                else:
                    self.errors.append(r)
        finally:
            w.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_token_rotation_under_load_loses_nothing(mesh: Cluster) -> None:
    """The documented rotation over xDS (docs/auth.md): [old] -> [old, new]
    (new accepted everywhere) -> new (signed with new, old accepted for the
    grace period); the second step once both proxies hold the first.  Every
    request passes; the provider handles exactly the requests answered."""
    old, new = TOKENS["com.demo.web"], "xds-tok-web-rotated-9d1e"
    before = handled(mesh)
    load = _Load(mesh.path("web.sock"))
    try:
        wait_for(lambda: load.ok > 50 or load.errors, 20, "load to flow")
        for i, step in enumerate(([old, new], new)):
            versions = [auth_dump(a)["tokens"]["com.demo.web"]["version"]
                        for a in (mesh.server_admin, mesh.client_admin)]  # type: ignore[attr-defined]
            write_tokens(mesh, {**TOKENS, "com.demo.web": step})
            for a, v in zip((mesh.server_admin, mesh.client_admin), versions, strict=True):  # type: ignore[attr-defined]
                wait_for(lambda a=a, v=v: auth_dump(a)["tokens"]["com.demo.web"]["version"] != v,
                         10, f"step {i + 1} in the proxy on :{a}")
            n = load.ok
            wait_for(lambda n=n: load.ok > n + 50 or load.errors, 20, "load after the step")
    finally:
        load.stop()
        TOKENS["com.demo.web"] = new
    assert load.errors == [], load.errors[:3]
    assert load.ok > 150
    # every answered request was handled once, nothing else (+1: the first count call)
    assert handled(mesh) == before + 1 + load.ok
    print(f"\nrotation under load: {load.ok} requests, 0 lost")


def test_unknown_caller_until_its_token_arrives(mesh: Cluster) -> None:
    """A caller added to the ACL before the control plane has its token is
    answered 'unknown caller'; once the token is in the token file it passes."""
    late, token = "com.demo.late", "xds-tok-late-3a7c"
    write_acl(mesh, [*ACL, {"caller": late}])
    wait_for(lambda: late in auth_dump(mesh.server_admin)["acls"][PROVIDER]["callers"], 10,  # type: ignore[attr-defined]
             "the new ACL")
    w = Wire(mesh.port)  # type: ignore[attr-defined]
    ts = now_s()
    r = w.signed(b"echo:late", late, ts=ts, sig=mac(late, ts, token=token))
    assert r["status"] == 7 and f"unknown caller appkey {late!r}" in r["message"], r
    write_tokens(mesh, {**TOKENS, late: token})
    t0 = time.monotonic()
    while True:
        ts = now_s()
        r = w.signed(b"echo:late", late, ts=ts, sig=mac(late, ts, token=token))
        if r["status"] == 0:
            break
        assert "unknown caller" in r["message"] and time.monotonic() - t0 < 10, r
    print(f"\ntoken written -> caller verified: {time.monotonic() - t0:.3f} s")
    assert r["body"] == b"echo|late"
    w.close()
    write_acl(mesh, ACL)
    write_tokens(mesh, TOKENS)


def _handover_state(mesh: Cluster) -> dict[str, Any]:
    """What a generation with tokens from the control plane hands to the
    next in a hot restart (its own socket), after one signed call."""
    import asyncio

    import uvloop

    from octoproxy.config import parse_config
    from octoproxy.server import Proxy

    cfg = parse_config({
        "node": {"id": "handover"}, "xds": {"server": mesh.cp_target},  # type: ignore[attr-defined]
        "auth": {"source": "xds"}, "hot_restart": {"socket": mesh.path("hs.hr")},
        "listeners": {"outbound": [{"path": mesh.path("hs.sock"), "sign_for": ["com.demo.web"]}]},
        "static": {"services": [{"appkey": PROVIDER, "endpoints": [
            {"address": f"127.0.0.1:{mesh.port}"}]}]}})  # type: ignore[attr-defined]

    async def go() -> dict[str, Any]:
        p = Proxy(cfg)
        await p.start()
        try:
            def one() -> dict[str, Any]:
                w = Wire(mesh.path("hs.sock"))
                try:
                    return w.call(b"echo:hs", "com.demo.web")
                finally:
                    w.close()

            assert (await asyncio.get_running_loop().run_in_executor(None, one))["status"] == 0
            return p.handover_state()
        finally:
            await p.close()

    return uvloop.run(go())


def test_tokens_never_in_logs_dumps_handover_or_control_plane_log(mesh: Cluster) -> None:
    test_tokens_and_acl_from_the_control_plane(mesh)
    dumps = [_get(a, "/config_dump").decode()
             for a in (mesh.server_admin, mesh.client_admin)]  # type: ignore[attr-defined]
    assert all('"source": "xds"' in d or '"source":"xds"' in d for d in dumps)
    state = _handover_state(mesh)
    assert "counters" in state
    blobs = dumps + [p.log() for p in mesh.procs] + [json.dumps(state)]
    for token in SEEN_TOKENS:
        for blob in blobs:
            assert token not in blob, "a token leaked"
