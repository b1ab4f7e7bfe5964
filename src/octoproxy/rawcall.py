"""A raw pipelined OCTO caller for the demo, the tests and the benches.

The Mesh SDK leaves the caller's identity to the proxy and sends only what an
app sends; a demo scene or a test that plays several calling apps on one
host needs what the SDK does not offer: the caller appkey in
``traceInfo.clientAppkey``, any body (a Thrift call), one-way requests on
the same connection.  `RawCaller` writes the frames itself (the core's
``frame.encode_request``) and matches the answers by sequence id.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from octoproxy._core import frame as F


class RawCaller:
    """One pipelined OCTO connection (a UDS path or a TCP port on 127.0.0.1).
    `service`, `appkey` (the provider, ``octo-remote-appkey``), `caller`
    (``traceInfo.clientAppkey``, none by default) and `timeout_ms` are the
    defaults of every request; `send` and `call` take each of them too."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 service: str, appkey: str, caller: str | None = None,
                 timeout_ms: int = 5000) -> None:
        self.r = reader
        self.w = writer
        self.service, self.appkey, self.caller = service, appkey, caller
        self.timeout_ms = timeout_ms
        self.seq = 0
        self.waiters: dict[int, asyncio.Future[F.Frame]] = {}
        self.scanner = F.FrameScanner()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, where: str | int, **defaults: Any) -> RawCaller:
        if isinstance(where, int):
            r, w = await asyncio.open_connection("127.0.0.1", where)
        else:
            r, w = await asyncio.open_unix_connection(where)
        return cls(r, w, **defaults)

    async def _read(self) -> None:
        while True:
            data = await self.r.read(65536)
            if not data:
                for f in self.waiters.values():
                    if not f.done():
                        f.set_exception(ConnectionError("closed"))
                return
            for fr in self.scanner.feed(data):
                w = self.waiters.pop(fr.seq_id, None)
                if w is not None and not w.done():
                    w.set_result(fr)

    def send(self, body: bytes, *, service: str | None = None, appkey: str | None = None,
             caller: str | None = None, timeout_ms: int | None = None,
             one_way: bool = False) -> asyncio.Future[F.Frame]:
        """Write one request now; the future of its answer (None at once if one-way)."""
        self.seq += 1
        fut: asyncio.Future[F.Frame] = asyncio.get_running_loop().create_future()
        if not one_way:
            self.waiters[self.seq] = fut
        else:
            fut.set_result(None)  # type: ignore[arg-type]
        caller = caller or self.caller
        self.w.write(F.encode_request(
            self.seq, service or self.service, body,
            timeout=self.timeout_ms if timeout_ms is None else timeout_ms,
            call_type=1 if one_way else 0,
            local_context={"octo-remote-appkey": appkey or self.appkey},
            trace_info={"clientAppkey": caller} if caller else None))
        return fut

    async def call(self, body: bytes, **kw: Any) -> F.Frame:
        return await self.send(body, **kw)

    async def close(self) -> None:
        self.task.cancel()
        self.w.close()
        with contextlib.suppress(Exception):  # already gone
            await self.w.wait_closed()
