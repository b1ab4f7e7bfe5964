"""Provider side: listen on a UDS and answer OCTO requests with a handler.

    async def handler(req: Request) -> bytes:
        return b"echo:" + req.body

    server = await serve("/run/app.sock", handler)

A handler returns the response body, or (status, body, message); it may be a
plain function or a coroutine function (then requests are answered in the
order they finish, not the order they came).  One-way requests get no answer.

Interoperability with Dorado (docs/protocol.md, "Compatibility with Dorado"):
an error answer (status != 0) with an empty body to a request whose body is a
strict TBinaryProtocol call gets a Thrift EXCEPTION body carrying the message,
since that is where a Dorado client reads it; a ScannerHeartbeat (messageType
2) is answered with messageType 2 and heartbeatInfo{sendTime (ms), status 2}.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from octoproxy._core import frame as _frame
from octoproxy._core.constants import CallType

log = logging.getLogger("octoproxy.sdk.provider")

Result = bytes | tuple[int, bytes, str | None]
Handler = Callable[["Request"], Result | Awaitable[Result]]


@dataclass(frozen=True, slots=True)
class Request:
    seq_id: int
    service_name: str | None
    body: bytes
    one_way: bool
    timeout_ms: int
    swimlane: str | None
    set: str | None
    liteset: str | None
    hash_key: str | None
    protocol: int
    checksum: bool = False
    method: str | None = None  # the body's Thrift method (strict TBinaryProtocol bodies)
    body_seq_id: int | None = None  # that message's seqid
    frame: bytes = b""  # the whole request frame as received (headers and all)


class _ProviderConn(asyncio.Protocol):
    def __init__(self, handler: Handler, is_async: bool) -> None:
        self.handler = handler
        self.is_async = is_async
        self.scanner = _frame.FrameScanner()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.scanner.feed(data)
        except _frame.FrameError as e:
            log.warning("closing connection: malformed frame: %s", e)
            assert self.transport is not None
            self.transport.abort()
            return
        out = []
        for f in frames:
            if f.msg_type == _frame.MT_SCANNER_HEARTBEAT:
                if f.is_request or not f.is_response:
                    # OCTO's health checker: this process serves, so ALIVE
                    out.append(_frame.encode_scanner_heartbeat_response(f.seq_id,
                                                                        protocol=f.protocol))
                continue
            if f.msg_type == _frame.MT_HEARTBEAT:
                if f.is_request or not f.is_response:
                    out.append(_frame.encode_heartbeat(f.seq_id, response=True))
                continue
            if not f.is_request:
                continue
            req = Request(f.seq_id, f.service_name, f.body, f.call_type == CallType.CALL_ONEWAY,
                          f.timeout, f.swimlane, f.set, f.liteset, f.hash_key, f.protocol & 3,
                          bool(f.checksum), f.method, f.body_seq_id, f.bytes)
            if self.is_async:
                t = asyncio.get_running_loop().create_task(self._run_async(req))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            else:
                r = self._answer(req, self.handler)
                if r is not None:
                    out.append(r)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _answer(self, req: Request, handler: Handler) -> bytes | None:
        try:
            result = handler(req)
        except Exception as e:  # the app's error becomes status 1
            result = (1, b"", f"{type(e).__name__}: {e}")
        return None if req.one_way else _encode_result(req, result)  # type: ignore[arg-type]

    async def _run_async(self, req: Request) -> None:
        try:
            result = await self.handler(req)  # type: ignore[misc]
        except Exception as e:
            result = (1, b"", f"{type(e).__name__}: {e}")
        if not req.one_way and self.transport is not None and not self.transport.is_closing():
            self.transport.write(_encode_result(req, result))

    def connection_lost(self, exc: Exception | None) -> None:
        for t in self.tasks:
            t.cancel()


def _encode_result(req: Request, result: Result) -> bytes:
    if isinstance(result, tuple):
        status, body, message = result
    else:
        status, body, message = 0, result, None
    if status != 0 and not body and req.method is not None and req.body_seq_id is not None:
        body = _frame.encode_thrift_exception(req.method, req.body_seq_id, message)
    return _frame.encode_response(req.seq_id, body, status=status, message=message,
                                  protocol=req.protocol, checksum=req.checksum)


async def serve(path: str, handler: Handler, *, mode: int = 0o660) -> asyncio.AbstractServer:
    """Listen on the UDS `path` (replacing a stale file) and answer with `handler`."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    is_async = inspect.iscoroutinefunction(handler)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _ProviderConn(handler, is_async), path)
    os.chmod(path, mode)
    return server
