"""Apps registering for signing through the subscribe API (docs/auth.md,
"Apps that register themselves"): the answers that need no proxy process
(the end-to-end behaviour is in tests/e2e/test_auth_register.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from octoproxy import model
from octoproxy._core.route import RouteTable
from octoproxy.config import ConfigError, parse_config
from octoproxy.keyring import Keyring
from octoproxy.subscribe import MAX_REGISTERED, StaticDiscovery, SubscribeApi, SubscribeError


def _cfg(**outbound: Any) -> Any:
    return parse_config({
        "auth": {"token_file": "/nonexistent/tokens.yaml"},
        "subscribe": {"port": 1},
        "listeners": {"outbound": [{"path": "/tmp/x.sock", **outbound}]}})


def _api(cfg: Any) -> tuple[SubscribeApi, Keyring]:
    ring = Keyring(cfg, None)
    return SubscribeApi(StaticDiscovery(RouteTable(model.Labels())), keyring=ring), ring


def test_sign_registered_needs_the_subscribe_api() -> None:
    with pytest.raises(ConfigError, match="sign_registered needs the subscribe API"):
        parse_config({"auth": {"token_file": "/t"},
                      "listeners": {"outbound": [{"path": "/x", "sign_registered": True}]}})


def test_refused_without_a_listener_that_takes_registrations() -> None:
    api, ring = _api(_cfg(sign_for=["com.demo.web"]))
    with pytest.raises(SubscribeError) as e:
        asyncio.run(api.register("com.demo.web"))
    assert e.value.status == 409 and ring.registered() == []


def test_no_token_registers_nothing_and_the_number_is_bounded() -> None:
    api, ring = _api(_cfg(sign_registered=True))
    with pytest.raises(SubscribeError) as e:
        asyncio.run(api.register("com.demo.web"))
    assert e.value.status == 404 and ring.registered() == []
    for i in range(MAX_REGISTERED):
        ring.register(f"com.demo.app{i}")
    with pytest.raises(SubscribeError) as e:
        asyncio.run(api.register("com.demo.one-more"))
    assert e.value.status == 429 and "com.demo.one-more" not in ring.registered()
    assert ring.unregister("com.demo.app0") and not ring.unregister("com.demo.app0")
