"""Concurrent subscriptions through the subscribe API, against the bundled
control plane and against the control-plane double behaving like the servers
met in production (tests/e2e/xds_double.py); SotW and delta.

Every call must end 200 with endpoints for every service it asked for, and
the client must keep the protocol's ordering rules (the double checks them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from octoproxy import model
from octoproxy.controlplane import ControlPlane
from octoproxy.subscribe import SubscribeApi
from octoproxy.xds import XdsClient

from xds_double import AdsDouble, Behaviour, services
from xds_helpers import Sink
from xds_helpers import run as _run

pytestmark = pytest.mark.timeout(90)
MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
BEHAVIOURS: dict[str, Callable[[], Behaviour] | None] = {
    "bundled": None,
    "double": Behaviour,
    "eds-first": lambda: Behaviour(eds_first=True),
    "stale-nonce": lambda: Behaviour(ignore_stale_nonce=True, only_changed=True),
    "slow-cds": lambda: Behaviour(
        delay_s={"type.googleapis.com/envoy.config.cluster.v3.Cluster": 0.05}
    ),
}


def run(coro: Any, timeout: float = 80) -> None:
    _run(coro, timeout)


def write_endpoints(path: Path, svcs: list[model.Service]) -> None:
    doc = {
        "services": [
            {"appkey": s.appkey, "endpoints": [{"address": e.address} for e in s.endpoints]}
            for s in svcs
        ]
    }
    path.write_text(json.dumps(doc))


async def with_server(
    kind: str,
    tmp_path: Path,
    svcs: list[model.Service],
    fn: Callable[[str, AdsDouble | None], Awaitable[None]],
) -> None:
    make = BEHAVIOURS[kind]
    if make is None:
        f = tmp_path / "endpoints.json"
        write_endpoints(f, svcs)
        cp = ControlPlane(str(f), port=0, poll_s=0.05)
        await cp.start()
        try:
            await fn(f"127.0.0.1:{cp.port}", None)
        finally:
            await cp.stop()
        return
    double = AdsDouble(make())
    double.put(*svcs)
    await double.start()
    try:
        await fn(double.target, double)
    finally:
        await double.stop()


async def subscribe_all(base: str, batches: list[list[str]]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as http:

        async def one(keys: list[str]) -> tuple[int, Any]:
            async with http.post(f"{base}/v1/subscribe", json={"appkeys": keys}) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one(b) for b in batches))


@pytest.mark.parametrize("kind", list(BEHAVIOURS))
@MODES
def test_30_concurrent_subscribes_of_10_services_all_get_endpoints(
    tmp_path: Path, kind: str, delta: bool
) -> None:
    svcs = services("app.s", 300)
    batches = [[s.appkey for s in svcs[i * 10 : (i + 1) * 10]] for i in range(30)]

    async def body(target: str, double: AdsDouble | None) -> None:
        sink = Sink()
        c = XdsClient(target, sink, node_id="p", delta=delta, backoff_base_s=0.05)
        c.start()
        api = SubscribeApi(c, port=0, timeout_s=30)
        await api.start()
        try:
            results = await subscribe_all(f"http://127.0.0.1:{api.port}", batches)
            bad = [(st, r) for st, r in results if st != 200]
            assert not bad, bad[:3]
            for (_, r), keys in zip(results, batches, strict=True):
                assert {k: v["endpoints"] for k, v in r["services"].items()} == dict.fromkeys(
                    keys, 2
                )
            assert all(len(sink.services[s.appkey].endpoints) == 2 for s in svcs)
            assert c.stats.nacks == 0, c.stats.last_nack
            if double is not None:
                assert double.violations == []
        finally:
            await api.stop()
            await c.stop()

    run(with_server(kind, tmp_path, svcs, body))
