"""The static token file changed at run time (docs/auth.md): real proxies
re-read it within a second, on the connections already open; content made
group-readable or replaced by a symbolic link is refused (logged once, never
quoted) and the previous tokens stay in force."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from harness import Cluster, cluster, free_port, wait_for
from outsider import Wire, mac, now_s

PROVIDER = "com.demo.echo"
OLD = {"com.demo.web": "file-tok-web-a1", "com.demo.legacy": "file-tok-legacy-b2"}
NEW_LEGACY = "file-tok-legacy-rotated-c3"


def write(path: str, tokens: dict[str, Any], mode: int = 0o600) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def mesh() -> Any:
    with cluster() as c:
        tok = c.path("tokens.json")
        write(tok, OLD)
        c.providers(echo="echo.sock")
        port = free_port()
        c.port = port  # type: ignore[attr-defined]
        c.server = c.proxy("server", {  # type: ignore[attr-defined]
            "node": {"id": "server"}, "auth": {"token_file": tok, "max_skew_s": 60},
            "listeners": {"inbound": [{
                "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
                "appkey": PROVIDER, "auth": {"mode": "enforce", "allow": [
                    {"caller": "com.demo.web"}, {"caller": "com.demo.legacy"}]}}]}})
        c.proxy("client", {
            "node": {"id": "client"}, "auth": {"token_file": tok},
            "listeners": {"outbound": [{"path": c.path("web.sock"), "sign_for": ["com.demo.web"]}]},
            "static": {"services": [{"appkey": PROVIDER,
                                     "endpoints": [{"address": f"127.0.0.1:{port}"}]}]}})
        yield c


def legacy(w: Wire, token: str) -> dict[str, Any]:
    ts = now_s()
    return w.signed(b"echo:leg", "com.demo.legacy", ts=ts,
                    sig=mac("com.demo.legacy", ts, token=token))


def test_token_file_changed_at_run_time_and_unsafe_content_refused(mesh: Cluster) -> None:
    tok = mesh.path("tokens.json")
    leg = Wire(mesh.port)  # type: ignore[attr-defined]
    web = Wire(mesh.path("web.sock"))
    assert legacy(leg, OLD["com.demo.legacy"])["status"] == 0
    assert legacy(leg, NEW_LEGACY)["status"] == 7
    # a rotation written to the file: in force within a second, same connections
    write(tok, {**OLD, "com.demo.legacy": [NEW_LEGACY, OLD["com.demo.legacy"]]})
    t0 = time.monotonic()
    wait_for(lambda: legacy(leg, NEW_LEGACY)["status"] == 0, 10, "the new token accepted")
    took = time.monotonic() - t0
    print(f"\ntoken file changed -> new token accepted: {took:.3f} s")
    assert took < 1.0
    assert legacy(leg, OLD["com.demo.legacy"])["status"] == 0  # the previous one too
    assert web.call(b"echo:w", "com.demo.web")["status"] == 0
    # made group-readable: refused, logged once, the tokens in force stay
    server = mesh.server  # type: ignore[attr-defined]
    os.chmod(tok, 0o640)
    wait_for(lambda: server.log().count("token file changed but refused") == 1, 10,
             "the refusal logged")
    assert "mode 0640" in server.log()
    time.sleep(0.5)  # several polls of the unchanged file: logged once only
    assert server.log().count("token file changed but refused") == 1
    assert legacy(leg, NEW_LEGACY)["status"] == 0
    # replaced by a symbolic link (to a file with other tokens): refused too
    other = mesh.path("other.json")
    write(other, {"com.demo.web": "x", "com.demo.legacy": "y"})
    os.replace(tok, mesh.path("tokens.bak"))
    os.symlink(other, tok)
    wait_for(lambda: server.log().count("token file changed but refused") == 2, 10,
             "the symlink refused")
    assert "not a regular file" in server.log() or "cannot open" in server.log()
    assert legacy(leg, NEW_LEGACY)["status"] == 0
    assert legacy(leg, "y")["status"] == 7
    assert web.call(b"echo:w2", "com.demo.web")["status"] == 0
    # a good file again: applied
    os.unlink(tok)
    write(tok, {**OLD, "com.demo.legacy": NEW_LEGACY})
    wait_for(lambda: legacy(leg, NEW_LEGACY)["status"] == 0
             and legacy(leg, "y")["status"] == 7, 10, "the good file")
    for p in mesh.procs:
        for t in [*OLD.values(), NEW_LEGACY]:
            assert t not in p.log(), "a token leaked into a log"
    leg.close()
    web.close()
