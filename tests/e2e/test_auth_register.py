"""An app registers its own appkey through the subscribe API and the proxy
signs for it (issue 15: "declared in its config or through the subscribe API
by the app itself"; docs/auth.md, docs/xds.md section 4).  Real processes:
a client-side proxy whose outbound listener has ``sign_registered`` and no
``sign_for``, a server-side proxy verifying with an ACL, a provider that
counts; then a hot restart of the client-side proxy."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from octoproxy._core.frame import thrift_call
from octoproxy.process import pid_alive, read_pid_file
from octoproxy.sdk.subscribe import SubscribeError, register

from harness import Cluster, auth_mesh, cluster, free_port, wait_for
from outsider import Wire

pytestmark = pytest.mark.timeout(180)

P = "com.reg.echo"
WEB, BATCH, NOKEY = "com.reg.web", "com.reg.batch", "com.reg.nokey"
TOKENS = {WEB: "reg-web-tok-0a1b2c", BATCH: "reg-batch-tok-3d4e5f"}


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with cluster() as c:
        c.sub = free_port()  # type: ignore[attr-defined]
        c.sub2 = free_port()  # type: ignore[attr-defined]
        m = auth_mesh(
            c, TOKENS, P, [WEB, BATCH], [{"path": c.path("app.sock"), "sign_registered": True}],
            client={"subscribe": {"port": c.sub,  # type: ignore[attr-defined]
                                  "state_file": c.path("client.state.json")},
                    "hot_restart": {"socket": c.path("client.hr"),
                                    "pid_file": c.path("client.pid"),
                                    "drain_s": 0.5, "shutdown_s": 5.0}})
        # a proxy that signs only for its configured apps takes no registration
        c.proxy("fixed", {
            "node": {"id": "fixed"}, "auth": {"token_file": m.token_file},
            "listeners": {"outbound": [{"path": c.path("fixed.sock"), "sign_for": [BATCH]}]},
            "subscribe": {"port": c.sub2},  # type: ignore[attr-defined]
            "static": {"services": [{"appkey": P,
                                     "endpoints": [{"address": f"127.0.0.1:{m.port}"}]}]}})
        yield c


def call(c: Cluster, caller: str, sock: str = "app.sock") -> dict[str, Any]:
    w = Wire(c.path(sock))
    try:
        return w.call(thrift_call("get", 1, b"echo:x"), caller=caller, appkey=P)
    finally:
        w.close()


def test_an_app_registers_its_appkey_and_is_signed_for(mesh: Cluster) -> None:
    c = mesh
    r = call(c, WEB)
    assert r["status"] == 7 and f"does not sign for caller appkey '{WEB}'" in r["message"], r
    # the Mesh SDK's helper, as the app itself calls it
    body = register(f"http://127.0.0.1:{c.sub}", WEB)  # type: ignore[attr-defined]
    assert body["registered"] == [WEB], body
    assert call(c, WEB) == {"status": 0, "message": "", "body": b"echo|x"}
    # one app cannot sign as another: an appkey nobody registered is still refused
    r = call(c, BATCH)
    assert r["status"] == 7 and "does not sign for" in r["message"], r
    assert get(c.sub, "/v1/subscriptions")["registered"] == [WEB]  # type: ignore[attr-defined]
    # persisted with the subscriptions
    with open(c.path("client.state.json")) as f:
        text = f.read()
    assert json.loads(text)["registered"] == [WEB]
    assert not any(t in text for t in TOKENS.values())  # names only, never a token


def test_registration_refused_without_token_or_listener(mesh: Cluster) -> None:
    c = mesh
    code, body = post(c.sub, "/v1/register", {"appkey": NOKEY})  # type: ignore[attr-defined]
    assert code == 404 and "no token for" in body["error"], (code, body)
    assert NOKEY not in get(c.sub, "/v1/subscriptions")["registered"]  # type: ignore[attr-defined]
    code, body = post(c.sub, "/v1/register", {"appkey": "bad appkey*"})  # type: ignore[attr-defined]
    assert code == 400, body
    code, body = post(c.sub2, "/v1/register", {"appkey": WEB})  # type: ignore[attr-defined]
    assert code == 409 and "sign_registered" in body["error"], (code, body)
    with pytest.raises(SubscribeError) as e:
        register(f"http://127.0.0.1:{c.sub2}", WEB, retry_until=1)  # type: ignore[attr-defined]
    assert e.value.status == 409
    r = call(c, WEB, "fixed.sock")
    assert r["status"] == 7 and "does not sign for" in r["message"], r


def test_registration_survives_a_hot_restart_and_unregister_stops_signing(mesh: Cluster) -> None:
    c = mesh
    post(c.sub, "/v1/register", {"appkey": WEB})  # type: ignore[attr-defined]
    assert call(c, WEB)["status"] == 0
    pidf = c.path("client.pid")
    old = read_pid_file(pidf)
    assert old and pid_alive(old)
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: (p := read_pid_file(pidf)) not in (None, old) and pid_alive(p), 30,
             "a new generation")
    wait_for(lambda: not pid_alive(old), 30, "the old generation to exit")
    assert call(c, WEB)["status"] == 0
    assert get(c.sub, "/v1/subscriptions")["registered"] == [WEB]  # type: ignore[attr-defined]
    code, body = post(c.sub, "/v1/unregister", {"appkey": WEB})  # type: ignore[attr-defined]
    assert code == 200 and body["removed"] and body["registered"] == [], body
    r = call(c, WEB)
    assert r["status"] == 7 and "does not sign for" in r["message"], r
    with open(c.path("client.state.json")) as f:
        assert "registered" not in json.load(f)
