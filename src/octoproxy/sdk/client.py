"""Clients that talk OCTO to the local proxy over its UDS.

Requests are pipelined: many calls share one connection and are matched to
their responses by sequence id.  A response carrying the hot-restart flag
(`octo-proxy-restart: 1`) makes the client reconnect (to the new proxy
process) and retry that request once, so the app never sees it.

On connect, each client sends one heartbeat announcing that it understands
the restart notice (`octo-restart-notice: 1`, docs/protocol.md): a proxy
that hot-restarts then sends it a ProxyRestart frame, and the client moves
its next calls to a new connection (the new process) while the answers still
owed arrive on the old one.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import time
from dataclasses import dataclass, field

from octoproxy._core import frame as _frame
from octoproxy._core.constants import Status

STATUS_SUCCESS = int(Status.STATUS_SUCCESS)
STATUS_RPC = int(Status.STATUS_RPC)

# the first frame on every connection: "send me the restart notice"
_ANNOUNCE = _frame.encode_heartbeat(0, local_context={"octo-restart-notice": "1"})
_NOT_ANSWERS = (_frame.MT_HEARTBEAT, _frame.MT_SCANNER_HEARTBEAT)


class RpcError(Exception):
    """A call answered with a non-zero status (by the provider or by a proxy)."""

    def __init__(self, status: int, message: str | None) -> None:
        self.status = status
        self.message = message or ""
        super().__init__(f"status {status}: {self.message}")


@dataclass(frozen=True, slots=True)
class Context:
    """Per-request routing context (docs/protocol.md section 7.1)."""

    appkey: str | None = None  # octo-remote-appkey
    swimlane: str | None = None  # octo-swimlane
    set: str | None = None  # octo-set
    liteset: str | None = None  # octo-liteset
    hash_key: str | None = None  # octo-hash-key
    global_extra: dict[str, str] = field(default_factory=dict)
    local_extra: dict[str, str] = field(default_factory=dict)

    def contexts(self) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        g = dict(self.global_extra)
        loc = dict(self.local_extra)
        if self.liteset is not None:
            g["octo-liteset"] = self.liteset
        if self.set is not None:
            g["octo-set"] = self.set
        if self.swimlane is not None:
            g["octo-swimlane"] = self.swimlane
        if self.appkey is not None:
            loc["octo-remote-appkey"] = self.appkey
        if self.hash_key is not None:
            loc["octo-hash-key"] = self.hash_key
        return g or None, loc or None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    message: str | None
    body: bytes
    restart: bool = False

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


def _encode(seq: int, service: str, body: bytes, ctx: Context | None, timeout_ms: int,
            one_way: bool) -> bytes:
    g, loc = ctx.contexts() if ctx is not None else (None, None)
    return _frame.encode_request(
        seq, service, body, call_type=1 if one_way else 0, timeout=timeout_ms,
        global_context=g, local_context=loc,
    )


def _response(f: _frame.Frame) -> Response:
    return Response(f.status, f.message, f.body, bool(f.proxy_restart))


class _AsyncConn(asyncio.Protocol):
    def __init__(self, owner: AsyncClient) -> None:
        self.owner = owner
        self.scanner = _frame.FrameScanner()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[int, asyncio.Future[Response]] = {}
        self.lost = asyncio.get_running_loop().create_future()
        self.draining = False  # the proxy behind it is hot-restarting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(_ANNOUNCE)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.scanner.feed(data)
        except _frame.FrameError as e:
            self._fail(ConnectionError(f"malformed frame from proxy: {e}"))
            if self.transport is not None:
                self.transport.abort()
            return
        for f in frames:
            if f.msg_type == _frame.MT_PROXY_RESTART:
                self._restart_notice()
                continue
            if not f.is_response or f.msg_type in _NOT_ANSWERS:
                continue
            w = self.waiters.pop(f.seq_id, None)
            if w is not None and not w.done():
                w.set_result(_response(f))
        if self.draining and not self.waiters and self.transport is not None:
            self.transport.close()

    def _restart_notice(self) -> None:
        # new calls go to a new connection (the new process); this one
        # closes once nothing is owed on it
        self.draining = True
        if self.owner._conn is self:
            self.owner._conn = None

    def _fail(self, exc: Exception) -> None:
        waiters, self.waiters = self.waiters, {}
        for w in waiters.values():
            if not w.done():
                w.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to the proxy lost: {exc or 'closed'}"))
        if not self.lost.done():
            self.lost.set_result(None)


class AsyncClient:
    """asyncio client: `await client.call(...)`, pipelined over one connection."""

    def __init__(self, path: str, *, default_timeout_ms: int = 3000,
                 connect_timeout: float = 5.0) -> None:
        self.path = path
        self.default_timeout_ms = default_timeout_ms
        self.connect_timeout = connect_timeout
        self._conn: _AsyncConn | None = None
        self._connecting: asyncio.Future[_AsyncConn] | None = None
        self._seq = itertools.count(1)
        self.retries = 0  # requests retried after a hot-restart answer

    @classmethod
    async def connect(cls, path: str, **kw: float) -> AsyncClient:
        c = cls(path, **kw)  # type: ignore[arg-type]
        await c._ensure()
        return c

    async def _ensure(self) -> _AsyncConn:
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.lost.done() \
                and not conn.draining:
            return conn
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            deadline = loop.time() + self.connect_timeout
            while True:
                try:
                    _, proto = await loop.create_unix_connection(lambda: _AsyncConn(self), self.path)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    # the proxy is (re)starting: its socket appears or accepts again shortly
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(0.02)
            self._conn = proto
            self._connecting.set_result(proto)
            return proto
        except BaseException as e:
            self._connecting.set_exception(e)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            self._connecting = None

    async def call(self, service: str, body: bytes = b"", *, appkey: str | None = None,
                   context: Context | None = None, timeout_ms: int | None = None,
                   raise_on_error: bool = True) -> Response:
        """Call `service` and wait for the answer.  Raises RpcError on a
        non-zero status unless raise_on_error is False."""
        if appkey is not None:
            context = Context(appkey=appkey) if context is None else _with_appkey(context, appkey)
        t = self.default_timeout_ms if timeout_ms is None else timeout_ms
        resp = await self._roundtrip(service, body, context, t)
        if resp.restart:
            # the proxy is hot-restarting: reconnect (lands on the new process), retry once
            self.retries += 1
            old = self._conn
            if old is not None:
                old.draining = True
                if not old.waiters and old.transport is not None:
                    old.transport.close()
            self._conn = None
            resp = await self._roundtrip(service, body, context, t)
        if raise_on_error and resp.status != STATUS_SUCCESS:
            raise RpcError(resp.status, resp.message)
        return resp

    async def _roundtrip(self, service: str, body: bytes, ctx: Context | None,
                         timeout_ms: int) -> Response:
        conn = await self._ensure()
        seq = next(self._seq)
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        conn.waiters[seq] = fut
        assert conn.transport is not None
        conn.transport.write(_encode(seq, service, body, ctx, timeout_ms, False))
        # the proxy answers a timeout itself; the local bound only guards a dead proxy
        try:
            return await asyncio.wait_for(fut, timeout_ms / 1000 + 5.0)
        finally:
            conn.waiters.pop(seq, None)

    async def send_one_way(self, service: str, body: bytes = b"", *, appkey: str | None = None,
                           context: Context | None = None) -> None:
        if appkey is not None:
            context = Context(appkey=appkey) if context is None else _with_appkey(context, appkey)
        conn = await self._ensure()
        assert conn.transport is not None
        conn.transport.write(_encode(next(self._seq), service, body, context, 0, True))

    async def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
            await self._conn.lost
        self._conn = None


def _with_appkey(ctx: Context, appkey: str) -> Context:
    return Context(appkey, ctx.swimlane, ctx.set, ctx.liteset, ctx.hash_key,
                   ctx.global_extra, ctx.local_extra)


class Client:
    """Blocking client: `call()` one request, `call_many()` a pipelined batch."""

    def __init__(self, path: str, *, default_timeout_ms: int = 3000,
                 connect_timeout: float = 5.0) -> None:
        self.path = path
        self.default_timeout_ms = default_timeout_ms
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._scanner = _frame.FrameScanner()
        self._seq = itertools.count(1)
        self._pending: dict[int, Response] = {}
        self.retries = 0

    def _ensure(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        s.sendall(_ANNOUNCE)
        self._sock = s
        self._scanner = _frame.FrameScanner()
        return s

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def call(self, service: str, body: bytes = b"", *, appkey: str | None = None,
             context: Context | None = None, timeout_ms: int | None = None,
             raise_on_error: bool = True) -> Response:
        return self.call_many([(service, body)], appkey=appkey, context=context,
                              timeout_ms=timeout_ms, raise_on_error=raise_on_error)[0]

    def call_many(self, calls: list[tuple[str, bytes]], *, appkey: str | None = None,
                  context: Context | None = None, timeout_ms: int | None = None,
                  raise_on_error: bool = True) -> list[Response]:
        """Send every call before reading any answer (pipelined); answers in call order."""
        if appkey is not None:
            context = Context(appkey=appkey) if context is None else _with_appkey(context, appkey)
        t = self.default_timeout_ms if timeout_ms is None else timeout_ms
        results = self._batch(calls, context, t)
        redo = [i for i, r in enumerate(results) if r.restart]
        if redo:
            self.retries += len(redo)
            self._reset()
            again = self._batch([calls[i] for i in redo], context, t)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
        if raise_on_error:
            for r in results:
                if r.status != STATUS_SUCCESS:
                    raise RpcError(r.status, r.message)
        return results

    def _check_idle(self) -> None:
        """Between batches: a closed connection or a restart notice from the
        proxy means the next batch goes on a new connection."""
        if self._sock is None:
            return
        # poll, not recv(MSG_DONTWAIT): on a socket with a timeout Python would
        # wait for the whole timeout before reporting "nothing there"
        if not select.select([self._sock], [], [], 0)[0]:
            return
        try:
            data = self._sock.recv(65536)
        except OSError:
            self._reset()
            return
        if not data or any(f.msg_type == _frame.MT_PROXY_RESTART for f in self._scanner.feed(data)):
            self._reset()

    def _batch(self, calls: list[tuple[str, bytes]], ctx: Context | None,
               timeout_ms: int) -> list[Response]:
        self._check_idle()
        sock = self._ensure()
        seqs = [next(self._seq) for _ in calls]
        sock.sendall(b"".join(_encode(s, svc, body, ctx, timeout_ms, False)
                              for s, (svc, body) in zip(seqs, calls, strict=True)))
        want = set(seqs)
        got: dict[int, Response] = {}
        draining = False
        sock.settimeout(timeout_ms / 1000 + 5.0)
        try:
            while want - got.keys():
                data = sock.recv(262144)
                if not data:
                    self._reset()
                    raise ConnectionError("connection to the proxy closed")
                for f in self._scanner.feed(data):
                    if f.msg_type == _frame.MT_PROXY_RESTART:
                        draining = True
                    elif f.is_response and f.msg_type not in _NOT_ANSWERS and f.seq_id in want:
                        got[f.seq_id] = _response(f)
        except TimeoutError:
            self._reset()
            raise
        if draining:
            self._reset()
        return [got[s] for s in seqs]

    def send_one_way(self, service: str, body: bytes = b"", *, appkey: str | None = None,
                     context: Context | None = None) -> None:
        if appkey is not None:
            context = Context(appkey=appkey) if context is None else _with_appkey(context, appkey)
        self._ensure().sendall(_encode(next(self._seq), service, body, context, 0, True))

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
