"""Opening connections for the data path (per connection, not per frame).

The core asks for a connection through a *connector* callable; this module
runs the connect with a timeout and reports failure back to the core, which
answers the requests waiting on it and backs off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("octoproxy.upstream")


class Connector:
    """connector(conn, host, target): TCP to host:target, or UDS at target when host is None."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connect_timeout: float) -> None:
        self._loop = loop
        self._timeout = connect_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, conn: Any, host: str | None, target: Any) -> None:
        task = self._loop.create_task(self._connect(conn, host, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: Any, host: str | None, target: Any) -> None:
        where = target if host is None else f"{host}:{target}"
        try:
            if host is None:
                coro = self._loop.create_unix_connection(lambda: conn, target)
            else:
                coro = self._loop.create_connection(lambda: conn, host, target)
            await asyncio.wait_for(coro, self._timeout)
        except asyncio.CancelledError:
            conn.connect_failed("proxy shutting down")
            raise
        except TimeoutError:
            log.warning("connect to %s timed out after %.0f ms", where, self._timeout * 1000)
            conn.connect_failed(f"connect timed out after {self._timeout * 1000:.0f} ms")
        except OSError as e:
            log.warning("connect to %s failed: %s", where, e.strerror or e)
            conn.connect_failed(e.strerror or str(e))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
