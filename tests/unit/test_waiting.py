"""octoproxy.waiting.wait_until: the one deadline loop over a "changed" event
that the keyring's and the xDS client's waits share."""

from __future__ import annotations

import asyncio
import time

from octoproxy.waiting import wait_until


class Changing:
    """What the keyring and the xDS client do: a fresh event per change."""

    def __init__(self) -> None:
        self.value = 0
        self.changed = asyncio.Event()

    def set(self, v: int) -> None:
        self.value = v
        ev = self.changed
        self.changed = asyncio.Event()
        ev.set()


def test_true_at_once_without_waiting() -> None:
    async def main() -> float:
        c = Changing()
        c.value = 1
        t0 = time.monotonic()
        assert await wait_until(lambda: c.value == 1, lambda: c.changed, 30)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1


def test_wakes_on_the_change_that_makes_it_true() -> None:
    async def main() -> float:
        c = Changing()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, c.set, 1)  # a change that does not make it true
        loop.call_later(0.1, c.set, 2)
        t0 = time.monotonic()
        assert await wait_until(lambda: c.value == 2, lambda: c.changed, 30)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 10  # far below the 30 s timeout: woken, not timed out


def test_false_after_the_timeout() -> None:
    async def main() -> float:
        c = Changing()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, c.set, 1)  # changes, never true
        t0 = time.monotonic()
        assert not await wait_until(lambda: c.value == 2, lambda: c.changed, 0.3)
        return time.monotonic() - t0

    assert 0.3 <= asyncio.run(main()) < 10


def test_zero_timeout_checks_once() -> None:
    async def main() -> None:
        c = Changing()
        assert not await wait_until(lambda: c.value == 1, lambda: c.changed, 0)
        c.value = 1
        assert await wait_until(lambda: c.value == 1, lambda: c.changed, 0)

    asyncio.run(main())
