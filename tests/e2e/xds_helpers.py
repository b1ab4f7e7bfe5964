"""What the xDS client tests share: a sink recording what the client pushes
(the route table as the client sees it), and running / waiting on uvloop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from octoproxy import model


class Sink:
    """Records what an XdsClient pushes: services (and every update and
    removal, in order, counted in `calls`) and shunting rules per scope."""

    def __init__(self) -> None:
        self.services: dict[str, model.Service] = {}
        self.calls = 0
        self.updates: list[str] = []
        self.removes: list[str] = []
        self.rules: dict[str, tuple[model.ShuntRule, ...]] = {}
        self.rule_calls: list[str] = []

    def update_service(self, service: model.Service) -> None:
        self.services[service.appkey] = service
        self.updates.append(service.appkey)
        self.calls += 1

    def remove_service(self, appkey: str) -> None:
        self.services.pop(appkey, None)
        self.removes.append(appkey)
        self.calls += 1

    def has_service(self, appkey: str) -> bool:
        return appkey in self.services

    def update_shunting(self, scope: str, rules: tuple[model.ShuntRule, ...]) -> None:
        self.rule_calls.append(scope)
        if rules:
            self.rules[scope] = rules
        else:
            self.rules.pop(scope, None)

    def names(self, scope: str) -> list[str]:
        """The names of the rules held for scope."""
        return [r.name for r in self.rules.get(scope, ())]

    def ep(self, appkey: str, addr: str) -> model.Endpoint:
        return next(e for e in self.services[appkey].endpoints if e.address == addr)


def run(coro: Coroutine[Any, Any, None], timeout: float = 40) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout))


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> float:
    """Wait for cond() to be true; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0
