"""The startup gate (octoproxy.startup): named dependencies a generation
awaits before it accepts, under one timeout, naming what is missing."""

from __future__ import annotations

import asyncio
import time

import pytest

from octoproxy.startup import Dependency, StartupGate


class Source:
    """A dependency's state: the items still missing, a fresh event per change."""

    def __init__(self, *missing: str) -> None:
        self.items = list(missing)
        self.ev = asyncio.Event()

    def set(self, *missing: str) -> None:
        self.items = list(missing)
        ev = self.ev
        self.ev = asyncio.Event()
        ev.set()

    def dep(self, name: str, without: str = "") -> Dependency:
        return Dependency(name, "not received", lambda: list(self.items), lambda: self.ev,
                          without=without)


def test_no_dependency_is_ready_at_once() -> None:
    async def main() -> None:
        gate = StartupGate()
        assert not gate and gate.names() == []
        assert await gate.wait(30) == {}

    asyncio.run(main())


def test_ready_once_every_dependency_is_in() -> None:
    async def main() -> float:
        a, b = Source("token of x"), Source("route of y", "route of z")
        gate = StartupGate()
        gate.add(a.dep("auth"))
        gate.add(b.dep("routes"))
        assert gate and gate.names() == ["auth", "routes"]
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, b.set, "route of z")      # one comes in part by part
        loop.call_later(0.1, b.set)
        loop.call_later(0.15, a.set)
        t0 = time.monotonic()
        assert await gate.wait(30) == {}
        return time.monotonic() - t0

    assert asyncio.run(main()) < 10     # woken by the changes, not by the 30 s timeout


def test_one_timeout_for_all_and_what_is_missing_named() -> None:
    async def main() -> tuple[float, dict[str, list[str]], str]:
        gate = StartupGate()
        gate.add(Source("token of a").dep("auth", without="refused with status 7"))
        gate.add(Source("x", "y").dep("other"))
        gate.add(Source().dep("present"))
        t0 = time.monotonic()
        missing = await gate.wait(0.4)
        return time.monotonic() - t0, missing, gate.describe(missing, consequences=True)

    took, missing, line = asyncio.run(main())
    assert missing == {"auth": ["token of a"], "other": ["x", "y"]}
    assert 0.4 <= took < 0.4 + 5   # one timeout, not one per dependency (0.8)
    assert line == ("auth: not received: token of a (refused with status 7); "
                    "other: not received: x, y")


def test_a_dependency_that_went_missing_meanwhile_is_reported() -> None:
    async def main() -> dict[str, list[str]]:
        a, b = Source(), Source("late")
        gate = StartupGate()
        gate.add(a.dep("a"))
        gate.add(b.dep("b"))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, a.set, "gone again")   # a was in when it was checked
        loop.call_later(0.1, b.set)
        return await gate.wait(30)

    assert asyncio.run(main()) == {"a": ["gone again"]}


def test_long_lists_are_cut_and_names_are_unique() -> None:
    dep = Dependency("auth", "not received", list, asyncio.Event)
    items = [f"token of a{i}" for i in range(25)]
    line = dep.describe(items)
    assert line.startswith("auth: not received: token of a0, ") and line.endswith(
        "token of a19 and 5 more")
    gate = StartupGate()
    gate.add(dep)
    with pytest.raises(ValueError, match="auth"):
        gate.add(dep)
