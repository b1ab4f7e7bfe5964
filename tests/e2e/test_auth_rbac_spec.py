"""Service authentication driven the way an outside control plane would
drive it (issue 15): tokens as SDS generic secrets and ACLs as RBAC
policies, written by hand in Envoy's JSON form and served over ADS by a
scripted control plane (not the bundled one, not built with octo-proxy's own
mapping), to real proxy processes.

Real processes: the client-side proxy signs for three apps, each on its own
outbound listener (web, batch, ops); the server-side proxy verifies and
applies the provider's ACL; one provider node counts what it handles.
Checked through documented interfaces only (docs/auth.md, docs/xds.md
section 2): status 7 and its reason on the wire, the ADS stream's requests
(names asked for, ACK/NACK), the admin pages, the logs.  Nothing here
depends on the signature's wire encoding: the proxies sign."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from octoproxy._core.frame import thrift_call
from octoproxy.xds.authres import NETWORK_RBAC, RBAC_TYPE, SECRET_TYPE

from harness import Cluster, cluster, free_port, wait_for
from outsider import DoubleThread, Wire, pb

pytestmark = pytest.mark.timeout(180)

P = "com.spec.echo"
WEB, BATCH, OPS, ROGUE = "com.spec.web", "com.spec.batch", "com.spec.ops", "com.spec.rogue"
LATE = "com.spec.late"  # registers itself through the subscribe API
TOKENS = {WEB: "spec-web-tok-1f0c2d", BATCH: "spec-batch-tok-77e3a9", OPS: "spec-ops-tok-5b8e41",
          ROGUE: "spec-rogue-tok-c3d2e1", LATE: "spec-late-tok-6a7b8c"}
USED: set[str] = set(TOKENS.values())  # every token the test hands out: none may leak


def secret(appkey: str, token: str, previous: str | None = None) -> secret_pb2.Secret:
    USED.update(t for t in (token, previous) if t)
    d: dict[str, Any] = {"name": appkey, "generic_secret": {"secret": {"inline_string": token}}}
    if previous:
        d["generic_secret"]["secrets"] = {"previous": {"inline_string": previous}}
    return pb(d, secret_pb2.Secret)


def caller(appkey: str) -> dict[str, Any]:
    return {"authenticated": {"principal_name": {"exact": appkey}}}


def method(name: str) -> dict[str, Any]:
    return {"url_path": {"path": {"exact": name}}}


def acl(policies: dict[str, Any], action: str = "ALLOW") -> extension_pb2.TypedExtensionConfig:
    return pb({"name": P, "typed_config": {
        "@type": NETWORK_RBAC, "stat_prefix": "spec",
        "rules": {"action": action, "policies": policies}}}, extension_pb2.TypedExtensionConfig)


READERS = {"principals": [caller(WEB), caller(BATCH)],
           "permissions": [method("get"), method("list")]}
OPS_ALL = {"principals": [{"or_ids": {"ids": [caller(OPS), caller(LATE)]}}],
           "permissions": [{"any": True}]}


@pytest.fixture(scope="module", params=[False, True], ids=["sotw", "delta"])
def mesh(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, DoubleThread]]:
    delta: bool = request.param
    with cluster() as c:
        cp = DoubleThread()
        try:
            cp.do(cp.double.put_other, SECRET_TYPE, *(secret(a, t) for a, t in TOKENS.items()))
            cp.do(cp.double.put_other, RBAC_TYPE, acl({"readers": READERS, "ops": OPS_ALL}))
            c.providers(echo="echo.sock")
            port, c.port_log, c.port_off = free_port(), free_port(), free_port()  # type: ignore[attr-defined]
            c.server_admin = free_port()  # type: ignore[attr-defined]
            c.client_admin = free_port()  # type: ignore[attr-defined]
            c.sub = free_port()  # type: ignore[attr-defined]
            xds = {"server": cp.target, "delta": delta}
            c.proxy("server", {
                "node": {"id": "server"}, "xds": xds, "auth": {"source": "xds"},
                "admin": {"port": c.server_admin},  # type: ignore[attr-defined]
                "listeners": {"inbound": [{
                    "host": "127.0.0.1", "port": pt, "upstream_uds": c.path("echo.sock"),
                    "appkey": P, "auth": {"mode": mode}}
                    for pt, mode in ((port, "enforce"), (c.port_log, "log-only"),  # type: ignore[attr-defined]
                                     (c.port_off, "off"))]}})  # type: ignore[attr-defined]
            c.proxy("client", {
                "node": {"id": "client"}, "xds": xds, "auth": {"source": "xds"},
                "admin": {"port": c.client_admin},  # type: ignore[attr-defined]
                "listeners": {"outbound": [
                    *({"path": c.path(f"{a.split('.')[-1]}.sock"), "sign_for": [a]}
                      for a in (WEB, BATCH, OPS, ROGUE)),
                    {"path": c.path("reg.sock"), "sign_registered": True}]},
                "subscribe": {"port": c.sub},  # type: ignore[attr-defined]
                "static": {"services": [{"appkey": P,
                                         "endpoints": [{"address": f"127.0.0.1:{port}"}]}]}})
            c.port = port  # type: ignore[attr-defined]
            for admin in (c.server_admin, c.client_admin):  # type: ignore[attr-defined]
                wait_for(lambda a=admin: not dump(a)["auth"]["missing"], 30, "tokens and ACLs")
            yield c, cp
        finally:
            cp.close()


def stats(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def dump(port: int) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config_dump", timeout=10) as r:
        return json.load(r)


def wire(c: Cluster, app: str) -> Wire:
    return Wire(c.path(f"{app.split('.')[-1]}.sock"))


def call(w: Wire, app: str, m: str = "get", body: bytes = b"echo:x") -> dict[str, Any]:
    return w.call(thrift_call(m, 1, body), caller=app, appkey=P)


def handled(c: Cluster) -> int:
    """Requests the provider has handled so far (asked by ops, allowed every method)."""
    w = wire(c, OPS)
    try:
        r = w.call(b"handled", caller=OPS, appkey=P)
        assert r["status"] == 0, r
        return int(r["body"].split(b"|")[1])
    finally:
        w.close()


def names_asked(cp: DoubleThread, type_url: str, node: str) -> set[str]:
    """The names of that type the proxy `node` is subscribed to (SotW: the
    last request's list; delta: subscriptions minus unsubscriptions)."""
    def read() -> set[str]:
        streams = {r.stream for r in cp.double.requests if r.msg.node.id == node}
        last = max(streams)  # the current stream
        names: set[str] = set()
        for r in cp.double.requests:
            if r.stream != last or r.msg.type_url != type_url:
                continue
            if r.delta:
                names |= set(r.msg.resource_names_subscribe)
                names -= set(r.msg.resource_names_unsubscribe)
            else:
                names = set(r.msg.resource_names)
        return names

    return set(cp.do(read))


def test_policy_is_any_principal_times_any_permission(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    before = handled(c)
    web, batch = wire(c, WEB), wire(c, BATCH)
    try:
        for w, app in ((web, WEB), (batch, BATCH)):
            for m in ("get", "list"):
                r = call(w, app, m)
                assert r["status"] == 0 and r["body"] == b"echo|x", (app, m, r)
            r = call(w, app, "put")
            assert r["status"] == 7, r
            assert f"caller '{app}' is not authorized for method 'put' of {P}" in r["message"], r
        # a signed caller the ACL does not name
        rogue = wire(c, ROGUE)
        r = call(rogue, ROGUE)
        rogue.close()
        assert r["status"] == 7 and f"caller '{ROGUE}' is not allowed to call {P}" in r["message"]
    finally:
        web.close()
        batch.close()
    # the 4 allowed calls reached the provider, the 3 refused ones did not
    assert handled(c) == before + 1 + 4


def test_an_app_cannot_sign_as_another(mesh: tuple[Cluster, DoubleThread]) -> None:
    c, _ = mesh
    before = handled(c)
    w = wire(c, WEB)
    try:
        for claimed in (BATCH, OPS, ""):
            r = w.call(thrift_call("get", 1, b"echo:x"), caller=claimed or None, appkey=P)
            assert r["status"] == 7, (claimed, r)
            assert "does not sign for" in r["message"], r
        assert call(w, WEB)["status"] == 0  # the connection stays usable
    finally:
        w.close()
    assert handled(c) == before + 1 + 1


def test_secrets_asked_on_demand_only(mesh: tuple[Cluster, DoubleThread]) -> None:
    _, cp = mesh
    # the signing proxy: the apps it signs for; the verifying one: the callers its ACL names
    assert names_asked(cp, SECRET_TYPE, "client") == {WEB, BATCH, OPS, ROGUE}
    assert names_asked(cp, SECRET_TYPE, "server") == {WEB, BATCH, OPS, LATE}
    assert names_asked(cp, RBAC_TYPE, "server") == {P}
    assert names_asked(cp, RBAC_TYPE, "client") == set()


def test_an_app_registered_through_the_subscribe_api_is_signed_for(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    """The signing proxy asks for an app's token when the app registers, and
    drops it when the app leaves (docs/auth.md, "Apps that register")."""
    c, cp = mesh
    assert LATE not in names_asked(cp, SECRET_TYPE, "client")
    w = wire(c, "com.spec.reg")
    try:
        r = call(w, LATE)
        assert r["status"] == 7 and "does not sign for" in r["message"], r
        req = urllib.request.Request(
            f"http://127.0.0.1:{c.sub}/v1/register",  # type: ignore[attr-defined]
            data=json.dumps({"appkey": LATE}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.load(resp)["registered"] == [LATE]
        assert LATE in names_asked(cp, SECRET_TYPE, "client")
        assert call(w, LATE)["status"] == 0
        assert call(w, WEB)["status"] == 7  # registered apps only
        req = urllib.request.Request(
            f"http://127.0.0.1:{c.sub}/v1/unregister",  # type: ignore[attr-defined]
            data=json.dumps({"appkey": LATE}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.load(resp)["removed"] is True
        assert call(w, LATE)["status"] == 7
        wait_for(lambda: LATE not in names_asked(cp, SECRET_TYPE, "client"), 10,
                 "the token unsubscribed")
    finally:
        w.close()


UNSUPPORTED: list[tuple[extension_pb2.TypedExtensionConfig, str]] = [
    (acl({"readers": READERS}, action="DENY"), "action DENY is not supported"),
    (acl({"readers": READERS, "anyone": {"principals": [{"any": True}],
                                         "permissions": [{"any": True}]}}),
     "principals[0]: any is not supported"),
    (acl({"readers": READERS, "not-web": {"principals": [{"not_id": caller(WEB)}],
                                          "permissions": [{"any": True}]}}),
     "not_id is not supported"),
    (acl({"readers": {**READERS, "permissions": [{"not_rule": method("put")}]}}),
     "not_rule is not supported"),
    (acl({"readers": {**READERS, "principals": [{"and_ids": {"ids": [caller(WEB)]}}]}}),
     "and_ids is not supported"),
]


@pytest.mark.parametrize(("bad", "why"), UNSUPPORTED, ids=["deny", "any", "not_id", "not_rule",
                                                           "and_ids"])
def test_unsupported_rbac_is_nacked_and_the_old_acl_stays(
        mesh: tuple[Cluster, DoubleThread], bad: extension_pb2.TypedExtensionConfig,
        why: str) -> None:
    c, cp = mesh
    before = len(cp.nacks(RBAC_TYPE))
    cp.do(cp.double.put_other, RBAC_TYPE, bad)
    wait_for(lambda: len(cp.nacks(RBAC_TYPE)) > before, 15, "a NACK")
    msg = cp.nacks(RBAC_TYPE)[-1]
    assert f"TypedExtensionConfig '{P}'" in msg and why in msg, msg
    # the last good ACL is in force: neither widened nor narrowed
    w, r = wire(c, WEB), wire(c, ROGUE)
    try:
        assert call(w, WEB, "get")["status"] == 0
        assert call(w, WEB, "put")["status"] == 7
        assert call(r, ROGUE)["status"] == 7
    finally:
        w.close()
        r.close()


def test_bad_secret_is_nacked_without_the_token_and_the_old_one_stays(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, cp = mesh
    before = len(cp.nacks(SECRET_TYPE))
    bad = pb({"name": WEB, "tls_certificate": {"private_key": {"inline_string": "spec-leak-1"}}},
             secret_pb2.Secret)
    bad2 = pb({"name": BATCH, "generic_secret": {"secret": {"filename": "/etc/spec-leak-2"}}},
              secret_pb2.Secret)
    USED.update(("spec-leak-1", "/etc/spec-leak-2"))
    cp.do(cp.double.put_other, SECRET_TYPE, bad, bad2)
    wait_for(lambda: len(cp.nacks(SECRET_TYPE)) >= before + 2, 15, "NACKs from both proxies")
    for msg in cp.nacks(SECRET_TYPE)[before:]:
        assert f"Secret '{WEB}'" in msg and f"Secret '{BATCH}'" in msg, msg
        assert not any(t in msg for t in USED), msg
    for app in (WEB, BATCH):
        w = wire(c, app)
        try:
            assert call(w, app)["status"] == 0
        finally:
            w.close()
    # put the good ones back for the next tests
    cp.do(cp.double.put_other, SECRET_TYPE, secret(WEB, TOKENS[WEB]), secret(BATCH, TOKENS[BATCH]))


def test_rotation_and_revocation_within_1s_on_open_connections(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    c, cp = mesh
    web, batch = wire(c, WEB), wire(c, BATCH)
    try:
        assert call(web, WEB)["status"] == 0 and call(batch, BATCH)["status"] == 0
        # rotation, two steps (docs/auth.md): [old, new] accepted everywhere, then new signs
        admins = (c.server_admin, c.client_admin)  # type: ignore[attr-defined]
        v0 = {a: dump(a)["auth"]["tokens"][WEB]["version"] for a in admins}

        def web_token(count: int) -> bool:
            return all((t := dump(a)["auth"]["tokens"][WEB])["tokens"] == count
                       and t["version"] != v0[a] for a in admins)

        new = "spec-web-tok-2a9b77"
        cp.do(cp.double.put_other, SECRET_TYPE, secret(WEB, TOKENS[WEB], new))
        wait_for(lambda: web_token(2), 5, "step 1 on both proxies")
        assert all(call(web, WEB)["status"] == 0 for _ in range(20))
        v0 = {a: dump(a)["auth"]["tokens"][WEB]["version"] for a in admins}
        cp.do(cp.double.put_other, SECRET_TYPE, secret(WEB, new))
        for _ in range(20):  # signed with old or new while step 2 spreads: every call passes
            assert call(web, WEB)["status"] == 0
        wait_for(lambda: web_token(1), 5, "step 2 on both proxies")
        assert all(call(web, WEB)["status"] == 0 for _ in range(20))
        # revoke web: only batch is left in the policy
        t0 = time.monotonic()
        cp.do(cp.double.put_other, RBAC_TYPE, acl({
            "readers": {**READERS, "principals": [caller(BATCH)]}, "ops": OPS_ALL}))

        def refused() -> bool:
            r = call(web, WEB)
            return r["status"] == 7 and "is not allowed to call" in r["message"]

        wait_for(refused, 5, "the revocation")
        took = time.monotonic() - t0
        print(f"\nACL revocation over xDS to the first refused call: {took * 1000:.0f} ms")
        assert took < 1.0, took
        # the same connections: web is answered 7, batch still passes
        assert call(web, WEB)["status"] == 7
        assert call(batch, BATCH)["status"] == 0
        # the verifying proxy drops web's token subscription: no ACL names it
        wait_for(lambda: WEB not in names_asked(cp, SECRET_TYPE, "server"), 5,
                 "web's secret unsubscribed")
        # granted again
        cp.do(cp.double.put_other, RBAC_TYPE, acl({"readers": READERS, "ops": OPS_ALL}))
        wait_for(lambda: call(web, WEB)["status"] == 0, 5, "the grant")
    finally:
        web.close()
        batch.close()


def test_unsigned_legacy_traffic_per_provider_setting(
        mesh: tuple[Cluster, DoubleThread]) -> None:
    """A legacy client calling the inbound port without signing: refused
    (enforce), forwarded but logged and counted (log-only), forwarded (off)."""
    c, _ = mesh
    before = handled(c)
    s0 = stats(c.server_admin)  # type: ignore[attr-defined]
    for port, want in ((c.port, 7), (c.port_log, 0), (c.port_off, 0)):  # type: ignore[attr-defined]
        w = Wire(port)
        try:
            r = w.call(thrift_call("get", 1, b"echo:legacy"), caller=WEB, appkey=P)
        finally:
            w.close()
        assert r["status"] == want, (port, r)
        if want == 7:
            assert "is not signed" in r["message"], r
        else:
            assert r["body"] == b"echo|legacy", r
    assert handled(c) == before + 1 + 2
    server = next(p for p in c.procs if p.name == "server")
    wait_for(lambda: "auth (log-only) forwarded a request that fails" in server.log(), 10,
             "the log-only line")
    s1 = stats(c.server_admin)  # type: ignore[attr-defined]
    enforce, log_only = (f"tcp:127.0.0.1:{c.port}", f"tcp:127.0.0.1:{c.port_log}")  # type: ignore[attr-defined]

    def grew(name: str, **labels: str) -> float:
        return metric(s1, name, **labels) - metric(s0, name, **labels)

    assert grew("octo_proxy_auth_checks_total", listener=enforce, result="unsigned") == 1, s1
    assert grew("octo_proxy_auth_checks_total", listener=log_only, result="unsigned") == 1
    assert grew("octo_proxy_auth_logged_total", listener=log_only) == 1
    assert grew("octo_proxy_auth_logged_total", listener=enforce) == 0
    assert metric(s1, "octo_proxy_auth_checks_total", listener=enforce, result="ok") > 0
    assert f"tcp:127.0.0.1:{c.port_off}" not in s1  # type: ignore[attr-defined]  # checks nothing
    client = stats(c.client_admin)  # type: ignore[attr-defined]
    assert metric(client, "octo_proxy_auth_signed_total", listener=c.path("web.sock")) > 0
    assert metric(client, "octo_proxy_auth_sign_refused_total", listener=c.path("web.sock")) >= 3


def test_no_token_in_dumps_logs_or_nacks(mesh: tuple[Cluster, DoubleThread]) -> None:
    c, cp = mesh
    blobs = [json.dumps(dump(c.server_admin)), json.dumps(dump(c.client_admin)),  # type: ignore[attr-defined]
             stats(c.server_admin), stats(c.client_admin)]  # type: ignore[attr-defined]
    blobs += [p.log() for p in c.procs]
    blobs += cp.nacks(SECRET_TYPE) + cp.nacks(RBAC_TYPE)
    for token in USED:
        for b in blobs:
            assert token not in b and token.encode().hex() not in b, token
