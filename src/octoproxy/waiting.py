"""Waiting on a condition that changes only when an asyncio.Event is set.

The keyring and the xDS client each keep a "changed" event that they replace
and set on every change; their waits (a token arrived, the stream connected,
no resource pending, nothing missing) are all the same deadline loop, here
once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


async def wait_until(pred: Callable[[], bool], event: Callable[[], asyncio.Event],
                     timeout: float) -> bool:
    """Wait until pred() is true (True) or timeout seconds passed (False).

    event() returns the event set on the next change; it is read before
    pred() is checked, so a change that comes after the check wakes the wait.
    pred() is checked once more at the deadline, never after it."""
    deadline = time.monotonic() + timeout
    while True:
        ev = event()
        if pred():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), remaining)
