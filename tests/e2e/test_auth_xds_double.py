"""Tokens (SDS) and ACLs (RBAC) against an xDS double that behaves like
go-control-plane (tests/e2e/xds_double.py): secrets pushed before clusters,
every resource of a type resent (under a new version, and a response repeated
with the same one), delta removals, a bad policy.  The real XdsClient on a real gRPC stream feeds a Keyring whose
Verifier is checked with signed frames (docs/auth.md, docs/xds.md section 2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from google.protobuf import any_pb2

from octoproxy import model
from octoproxy._core import auth as core_auth
from octoproxy._core import frame
from octoproxy._core.route import RouteTable
from octoproxy.config import parse_config
from octoproxy.keyring import Keyring
from octoproxy.xds.authres import (
    RBAC_RULES,
    RBAC_TYPE,
    SECRET_TYPE,
    acl_to_rbac,
    tokens_to_secret,
)
from octoproxy.xds.authsource import attach
from octoproxy.xds.client import XdsClient

from xds_double import CDS, AdsDouble, Behaviour

PROVIDER = "com.demo.echo"
WEB, BATCH, OTHER = "com.demo.web", "com.demo.batch", "com.demo.other"
TOK = {WEB: b"dbl-web-1", BATCH: b"dbl-batch-1", OTHER: b"dbl-other-1"}
NOW = 1_800_000_000_000


def request(caller: str, token: bytes, method: str = "get") -> bytes:
    return frame.encode_request(
        1, "com.demo.echo.Svc", frame.thrift_call(method, 1), trace_info={"clientAppkey": caller},
        local_context=core_auth.context(token, caller, PROVIDER, NOW // 1000, method))


async def until(cond: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, behaviour: Behaviour, delta: bool) -> None:
        self.double = AdsDouble(behaviour)
        self.delta = delta

    async def __aenter__(self) -> Rig:
        await self.double.start()
        cfg = parse_config({
            "xds": {"server": self.double.target}, "auth": {"source": "xds"},
            "listeners": {
                "outbound": [{"path": "/tmp/unused.sock", "sign_for": [WEB]}],
                "inbound": [{"port": 1, "upstream_uds": "/tmp/unused-p.sock", "appkey": PROVIDER,
                             "auth": {"mode": "enforce"}}]}})
        self.ring = Keyring(cfg, None)
        self.verifier = self.ring.verifier(cfg.listeners.inbound[0])
        self.client = XdsClient(self.double.target, RouteTable(model.Labels()), node_id="dbl",
                                delta=self.delta, backoff_base_s=0.05)
        self.secrets, self.rbac = attach(self.client, self.ring)
        self.client.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.stop()
        await self.double.stop()

    def asked(self, t: str) -> set[str]:
        names: set[str] = set()
        for r in self.double.requests_of(t):
            names |= set(r.resource_names_subscribe if self.delta else r.resource_names)
        return names

    def verify(self, caller: str, method: str = "get") -> int:
        return self.verifier.verify(request(caller, TOK[caller], method), NOW)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_go_control_plane_like_sds_first_resend_all(delta: bool) -> None:
    """Secrets and policies pushed before clusters, every resource of a type
    resent on any change: only the needed names are asked for, unchanged
    resends change nothing, the ACL's new caller is fetched on demand."""

    async def go() -> None:
        b = Behaviour(push_order=[SECRET_TYPE, RBAC_TYPE, CDS], resend_all=True)
        async with Rig(b, delta) as rig:
            d = rig.double
            d.put_other(SECRET_TYPE, *(tokens_to_secret(a, (t,)) for a, t in TOK.items()))
            d.put_other(RBAC_TYPE, acl_to_rbac(PROVIDER, {BATCH: frozenset({"get"})}))
            rig.client.subscribe([PROVIDER])
            d.put(model.Service(PROVIDER, (model.Endpoint("10.0.0.1", 9000),)))
            await until(lambda: not rig.ring.missing(), "tokens and ACL")
            assert rig.verify(BATCH) == 0 and rig.verify(BATCH, "put") == 6
            # on demand: the own appkey and the ACL's caller, never another
            assert rig.asked(SECRET_TYPE) == {WEB, BATCH}
            assert rig.asked(RBAC_TYPE) == {PROVIDER}
            # a change elsewhere resends every secret under a new version: nothing re-applied
            updates = rig.ring.updates
            sent = len(d.responses)
            d.put(model.Service(PROVIDER, (model.Endpoint("10.0.0.2", 9000),)))
            d.put_other(SECRET_TYPE, tokens_to_secret(OTHER, (b"dbl-other-2",)))
            await until(lambda: len(d.responses) > sent and rig.client.stats.acks
                        + rig.client.stats.nacks == len(d.responses), "the resends answered")
            if not delta:  # SotW: the unchanged secrets came again
                assert any(r.type_url == SECRET_TYPE and len(r.resources) == 2
                           for _, r in d.responses[sent:])
            assert rig.ring.updates == updates
            # the same response again, same version_info: ACKed, nothing re-applied
            last = next(r for _, r in reversed(d.responses) if r.type_url == SECRET_TYPE)
            sent = len(d.responses)
            d.send_raw(last)
            await until(lambda: rig.client.stats.acks + rig.client.stats.nacks
                        == sent + 1, "the repeated response answered")
            assert rig.ring.updates == updates
            # the ACL grants OTHER: its token is asked for and arrives
            d.put_other(RBAC_TYPE, acl_to_rbac(PROVIDER, {BATCH: frozenset({"get"}), OTHER: None}))
            TOK[OTHER] = b"dbl-other-2"
            await until(lambda: rig.verify(OTHER) == 0, "the new caller verified")
            assert OTHER in rig.asked(SECRET_TYPE)
            assert d.violations == [] and d.nacks == []

    asyncio.run(go())


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_bad_policy_nacked_naming_it_old_one_kept_and_delta_removals(delta: bool) -> None:
    async def go() -> None:
        async with Rig(Behaviour(), delta) as rig:
            d = rig.double
            d.put_other(SECRET_TYPE, *(tokens_to_secret(a, (t,)) for a, t in TOK.items()))
            d.put_other(RBAC_TYPE, acl_to_rbac(PROVIDER, {BATCH: None}))
            await until(lambda: not rig.ring.missing() and rig.verify(BATCH) == 0, "the ACL")
            bad = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
            tec = acl_to_rbac(PROVIDER, {})
            tec.typed_config.CopyFrom(any_pb2.Any(type_url=RBAC_RULES, value=bad.SerializeToString()))
            d.put_other(RBAC_TYPE, tec)
            await until(lambda: d.nacks, "a NACK")
            t, msg = d.nacks[0]
            assert t == RBAC_TYPE
            assert f"TypedExtensionConfig {PROVIDER!r}: typed_config.action DENY" in msg, msg
            assert rig.verify(BATCH) == 0  # the last good ACL stays in force
            assert rig.rbac.dump()["rejected"][PROVIDER] == msg
            # a bad secret: NACKed naming it, never quoting it; the old token stays
            s = tokens_to_secret(BATCH, (b"x",))
            s.generic_secret.secret.filename = "/etc/batch-token"
            d.put_other(SECRET_TYPE, s)
            await until(lambda: len(d.nacks) >= 2, "a second NACK")
            assert f"Secret {BATCH!r}: generic_secret.secret: filename" in d.nacks[1][1]
            assert rig.verify(BATCH) == 0
            # removals: delta says so (unknown caller while the ACL names it, then
            # nobody allowed: not allowed, docs/auth.md "Which reason"); SotW cannot
            d.remove_other(SECRET_TYPE, BATCH)
            if delta:
                await until(lambda: rig.verify(BATCH) == 2, "the token removed")
            d.remove_other(RBAC_TYPE, PROVIDER)
            if delta:
                await until(lambda: rig.ring.dump()["acls"][PROVIDER]["callers"] == {},
                            "the ACL removed")
                assert rig.verify(BATCH) == 5
            else:
                acks = rig.client.stats.acks
                await asyncio.sleep(0.3)
                assert rig.client.stats.acks == acks and rig.verify(BATCH) == 0
            assert d.violations == []

    asyncio.run(go())
