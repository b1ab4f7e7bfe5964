"""Tokens as SDS secrets and ACLs as RBAC policies (docs/xds.md section 2,
docs/auth.md): the mapping both ways, what is rejected (never quoting a
token), and the sources feeding a Keyring whose core objects change in place."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2

from octoproxy._core import auth as core_auth
from octoproxy._core import frame
from octoproxy.config import parse_config
from octoproxy.controlplane.store import FileError, Store
from octoproxy.keyring import Keyring
from octoproxy.xds.authres import (
    NETWORK_RBAC,
    RBAC_RULES,
    RBAC_TYPE,
    SECRET_TYPE,
    acl_to_rbac,
    rbac_to_acl,
    secret_to_tokens,
    tokens_to_secret,
)
from octoproxy.xds.authsource import attach
from octoproxy.xds.resources import ResourceError

TOKEN = b"tok-web-secret-4b1d9e0c"
OLD = b"tok-web-old-77a0b3c2"
PROVIDER = "com.demo.echo"


def test_secret_roundtrip_current_and_previous() -> None:
    assert secret_to_tokens("com.demo.web", tokens_to_secret("com.demo.web", (TOKEN,))) == (TOKEN,)
    s = tokens_to_secret("com.demo.web", (TOKEN, OLD))
    assert secret_to_tokens("com.demo.web", s) == (TOKEN, OLD)
    s2 = secret_pb2.Secret(name="a")
    s2.generic_secret.secret.inline_string = "as-a-string"
    assert secret_to_tokens("a", s2) == (b"as-a-string",)


def _bad_secrets() -> list[secret_pb2.Secret]:
    out = []
    s = secret_pb2.Secret(name="a")
    s.generic_secret.secret.filename = "/etc/" + TOKEN.decode()
    out.append(s)
    s = secret_pb2.Secret(name="a")
    s.generic_secret.secret.inline_bytes = TOKEN
    s.generic_secret.secrets["next-" + TOKEN.decode()].inline_bytes = OLD
    out.append(s)
    s = secret_pb2.Secret(name="a")
    s.tls_certificate.private_key.inline_bytes = TOKEN
    out.append(s)
    s = secret_pb2.Secret(name="a")
    s.generic_secret.secret.inline_bytes = b""
    out.append(s)
    s = secret_pb2.Secret(name="b")
    s.generic_secret.secret.inline_bytes = TOKEN
    out.append(s)
    s = secret_pb2.Secret(name="a")
    s.generic_secret.secret.inline_bytes = TOKEN
    s.generic_secret.secrets["previous"].environment_variable = "X"
    out.append(s)
    return out


@pytest.mark.parametrize("secret", _bad_secrets())
def test_bad_secret_rejected_naming_it_never_quoting_a_token(secret: secret_pb2.Secret) -> None:
    with pytest.raises(ResourceError) as e:
        secret_to_tokens("a", secret)
    msg = str(e.value)
    assert "Secret 'a'" in msg or "delivered under the name 'a'" in msg
    assert TOKEN.decode() not in msg and OLD.decode() not in msg


def test_rbac_roundtrip_and_bare_rules() -> None:
    acl: dict[str, frozenset[str] | None] = {"com.demo.web": None,
                                             "com.demo.batch": frozenset({"get", "list"})}
    assert rbac_to_acl(PROVIDER, acl_to_rbac(PROVIDER, acl)) == acl
    assert rbac_to_acl(PROVIDER, acl_to_rbac(PROVIDER, {})) == {}
    # a bare envoy.config.rbac.v3.RBAC; two policies naming a caller add up
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    for pname, methods in (("p1", ["get"]), ("p2", ["put"])):
        pol = rules.policies[pname]
        ids = pol.principals.add().or_ids.ids
        ids.add().authenticated.principal_name.exact = "com.demo.batch"
        for m in methods:
            pol.permissions.add().url_path.path.exact = m
    tec = extension_pb2.TypedExtensionConfig(
        name=PROVIDER, typed_config=any_pb2.Any(type_url=RBAC_RULES, value=rules.SerializeToString()))
    assert rbac_to_acl(PROVIDER, tec) == {"com.demo.batch": frozenset({"get", "put"})}


def _rules_tec(rules: rbac_pb2.RBAC, name: str = PROVIDER) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(
        name=name, typed_config=any_pb2.Any(type_url=RBAC_RULES, value=rules.SerializeToString()))


def _bad_rbacs() -> list[tuple[extension_pb2.TypedExtensionConfig, str]]:
    out = []
    r = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    out.append((_rules_tec(r), "action DENY is not supported"))
    r = rbac_pb2.RBAC()
    r.policies["all"].principals.add(any=True)
    r.policies["all"].permissions.add(any=True)
    out.append((_rules_tec(r), "policies['all'].principals[0]: any is not supported"))
    r = rbac_pb2.RBAC()
    r.policies["h"].principals.add().authenticated.principal_name.exact = "com.demo.web"
    r.policies["h"].permissions.add().header.name = ":path"
    out.append((_rules_tec(r), "policies['h'].permissions[0]: header is not supported"))
    r = rbac_pb2.RBAC()
    r.policies["p"].principals.add().authenticated.principal_name.prefix = "com."
    r.policies["p"].permissions.add(any=True)
    out.append((_rules_tec(r), "principal_name must be an exact match"))
    r = rbac_pb2.RBAC()
    r.policies["p"].principals.add().authenticated.principal_name.exact = "bad appkey*"
    r.policies["p"].permissions.add(any=True)
    out.append((_rules_tec(r), "character outside"))
    out.append((_rules_tec(rbac_pb2.RBAC(), "other"), "delivered under the name"))
    r = rbac_pb2.RBAC()
    for i in range(10_001):
        r.policies["many"].principals.add().authenticated.principal_name.exact = f"c{i}"
    r.policies["many"].permissions.add(any=True)
    out.append((_rules_tec(r), "more than 10000 callers"))
    out.append((extension_pb2.TypedExtensionConfig(
        name=PROVIDER, typed_config=any_pb2.Any(type_url=NETWORK_RBAC, value=b"")),
        "typed_config.rules is missing"))
    out.append((extension_pb2.TypedExtensionConfig(
        name=PROVIDER, typed_config=any_pb2.Any(type_url="type.googleapis.com/x.Y")),
        "is not an RBAC config"))
    return out


@pytest.mark.parametrize(("tec", "why"), _bad_rbacs())
def test_bad_rbac_rejected_naming_resource_and_field(tec: Any, why: str) -> None:
    with pytest.raises(ResourceError) as e:
        rbac_to_acl(PROVIDER, tec)
    assert f"TypedExtensionConfig {PROVIDER!r}" in str(e.value) or "delivered" in str(e.value)
    assert why in str(e.value), str(e.value)


class _Client:
    """What the sources call back (XdsClient.names_changed)."""

    def __init__(self) -> None:
        self.types: dict[str, Any] = {}
        self.flushes = 0

    def add_type(self, h: Any) -> None:
        self.types[h.type_url] = h

    def names_changed(self) -> None:
        self.flushes += 1


def _any(t: str, msg: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url=t, value=msg.SerializeToString())


def _xds_cfg() -> Any:
    return parse_config({
        "xds": {"server": "127.0.0.1:1"}, "auth": {"source": "xds"},
        "listeners": {"outbound": [{"path": "/tmp/x.sock", "sign_for": ["com.demo.web"]}],
                      "inbound": [{"port": 1, "upstream_uds": "/tmp/p.sock", "appkey": PROVIDER,
                                   "auth": {"mode": "enforce"}}]}})


def _request(caller: str, token: bytes, ms: int, method: str = "echo") -> bytes:
    """A request signed at `ms` (its timestamp: the second)."""
    return frame.encode_request(
        1, "com.demo.echo.Svc", frame.thrift_call(method, 1),
        trace_info={"clientAppkey": caller},
        local_context=core_auth.context(token, caller, PROVIDER, ms // 1000, method))


def test_sources_feed_live_verifier_on_demand() -> None:
    async def go() -> None:
        cfg = _xds_cfg()
        ring = Keyring(cfg, None)
        client = _Client()
        secrets, rbac = attach(client, ring)
        v = ring.verifier(cfg.listeners.inbound[0])
        assert ring.signer(cfg.listeners.outbound[0]) is not None
        # before anything: the ACL, then the own token are missing
        assert rbac.names() == {PROVIDER} and secrets.names() == {"com.demo.web"}
        assert ring.missing() == [f"ACL of {PROVIDER}", "token of com.demo.web"]
        ts = 1_800_000_000_000
        # the ACL names a caller: its token is asked for (on demand)
        errs = rbac.on_response([("", "", _any(RBAC_TYPE, acl_to_rbac(
            PROVIDER, {"com.demo.batch": frozenset({"get"})})))], [], True)
        assert errs == [] and client.flushes == 1
        assert secrets.names() == {"com.demo.web", "com.demo.batch"}
        assert v.verify(_request("com.demo.batch", TOKEN, ts, "get"), ts) == 2  # unknown caller yet
        errs = secrets.on_response([("com.demo.batch", "v1", _any(SECRET_TYPE, tokens_to_secret(
            "com.demo.batch", (TOKEN,))))], [], False)
        assert errs == []
        assert v.verify(_request("com.demo.batch", TOKEN, ts, "get"), ts) == 0
        assert v.verify(_request("com.demo.batch", TOKEN, ts, "put"), ts) == 6
        # a bad ACL is rejected naming it; the old one stays
        bad = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
        errs = rbac.on_response([("", "", _any(RBAC_TYPE, _rules_tec(bad)))], [], True)
        assert len(errs) == 1 and f"TypedExtensionConfig {PROVIDER!r}" in errs[0]
        assert v.verify(_request("com.demo.batch", TOKEN, ts, "get"), ts) == 0
        # revoked: the caller's token is no longer needed, dropped and unsubscribed
        errs = rbac.on_response([("", "", _any(RBAC_TYPE, acl_to_rbac(PROVIDER, {})))], [], True)
        assert errs == [] and secrets.names() == {"com.demo.web"} and client.flushes == 2
        assert v.verify(_request("com.demo.batch", TOKEN, ts, "get"), ts) in (2, 5)
        # delta removal of the ACL: nobody allowed (it stays subscribed)
        rbac.on_response([], [PROVIDER], False)
        assert ring.dump()["acls"][PROVIDER]["callers"] == {}
        # dumps name appkeys and versions, never a token
        assert TOKEN.decode() not in repr(ring.dump()) + repr(secrets.dump()) + repr(ring)

    asyncio.run(go())


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_control_plane_store_serves_tokens_and_acls_and_refuses_unsafe_token_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    eps = tmp_path / "eps.yaml"
    eps.write_text("services: []\nacls:\n  com.demo.echo:\n    - caller: com.demo.web\n"
                   "    - {caller: com.demo.batch, methods: [get]}\n")
    tok = tmp_path / "tokens.yaml"
    _write_private(tok, f"com.demo.web: {TOKEN.decode()}\n")

    async def go() -> None:
        store = Store(eps, poll_s=0.02, tokens_path=tok)
        store.load()
        res = store.snapshot.resources
        assert rbac_to_acl(PROVIDER, extension_pb2.TypedExtensionConfig.FromString(
            res[RBAC_TYPE][PROVIDER].raw)) == {"com.demo.web": None,
                                               "com.demo.batch": frozenset({"get"})}
        assert secret_to_tokens("com.demo.web", secret_pb2.Secret.FromString(
            res[SECRET_TYPE]["com.demo.web"].raw)) == (TOKEN,)
        store.start()
        try:
            changed = asyncio.Event()
            store.listen(changed.set)
            # a rotation: picked up at run time
            _write_private(tok, f"com.demo.web: [{OLD.decode()}x, {TOKEN.decode()}]\n")
            await asyncio.wait_for(changed.wait(), 10)
            raw = store.snapshot.resources[SECRET_TYPE]["com.demo.web"].raw
            assert secret_to_tokens("com.demo.web", secret_pb2.Secret.FromString(raw))[1] == TOKEN
            # made group-readable: refused, the previous tokens kept, logged once
            errors = store.errors
            os.chmod(tok, 0o640)
            for _ in range(500):
                if store.errors > errors:
                    break
                await asyncio.sleep(0.01)
            assert store.errors == errors + 1 and "mode 0640" in store.last_error
            assert store.snapshot.resources[SECRET_TYPE]["com.demo.web"].raw == raw
            await asyncio.sleep(0.2)  # several polls: still one error
            assert store.errors == errors + 1
            # replaced by a symlink: refused too
            os.chmod(tok, 0o600)
            real = tmp_path / "real.yaml"
            _write_private(real, f"com.demo.web: {TOKEN.decode()}\n")
            os.replace(tok, tmp_path / "old.yaml")
            os.symlink(real, tok)
            for _ in range(500):
                if store.errors > errors + 1:
                    break
                await asyncio.sleep(0.01)
            assert store.errors == errors + 2
            assert store.snapshot.resources[SECRET_TYPE]["com.demo.web"].raw == raw
        finally:
            await store.stop()

    asyncio.run(go())
    logged = caplog.text + repr([r.getMessage() for r in caplog.records])
    assert TOKEN.decode() not in logged and OLD.decode() not in logged


def test_control_plane_acls_validated(tmp_path: Path) -> None:
    eps = tmp_path / "eps.yaml"
    eps.write_text("services: []\nacls:\n  com.demo.echo:\n    - caller: 'bad*'\n"
                   "    - {caller: com.demo.web, methods: ['']}\n")
    with pytest.raises(FileError) as e:
        Store(eps).load()
    assert "acls['com.demo.echo'][0].caller" in str(e.value)
    assert "acls['com.demo.echo'][1].methods" in str(e.value)
