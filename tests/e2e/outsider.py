"""Helpers for the tests that drive real proxy processes the way an outside
control plane and an outside client would: the xDS double
(tests/e2e/xds_double.py) serving hand-written Envoy resources from a thread
of its own, and a raw OCTO client speaking the wire format of
docs/protocol.md (frame.encode_request), signing by hand as a legacy client
does (docs/protocol.md 7.6): the one copy of these for every e2e test."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from octoproxy._core import frame

from harness import wait_for
from xds_double import AdsDouble, Behaviour


class DoubleThread:
    """An AdsDouble on its own event loop in a thread; every change goes
    through ``do`` (run on that loop)."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.double = AdsDouble(behaviour)
        self._run(self.double.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def do(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def go() -> Any:
            return fn(*args)

        return self._run(go())

    @property
    def target(self) -> str:
        return self.double.target

    def nacks(self, type_url: str) -> list[str]:
        """The error_detail messages of the NACKs of that type received so far."""
        def read() -> list[str]:
            return [r.msg.error_detail.message for r in self.double.requests
                    if r.msg.type_url == type_url and r.msg.error_detail.message]

        return list(self.do(read))

    def close(self) -> None:
        try:
            self._run(self.double.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()  # its self-pipe sockets too (ResourceWarnings are errors)


def pb(d: dict[str, Any], cls: Any) -> Any:
    """A protobuf message from its JSON form (how Envoy's docs write resources)."""
    return json_format.ParseDict(d, cls())


ECHO = "com.demo.echo"  # the appkey the tests' echo provider (provider_app.py) serves as


def now_s() -> int:
    return int(time.time())


def mac(caller: str, ts: int, method: str = "", token: str | None = None,
        provider: str = ECHO) -> str:
    """The signature as a legacy client computes it from docs/protocol.md 7.6
    alone: base64url without padding of HMAC-SHA256's first 16 bytes."""
    if token is None:
        raise TypeError("mac: the caller's token is needed")
    d = hmac.new(token.encode(), f"{caller}|{provider}|{ts}|{method}".encode(),
                 hashlib.sha256).digest()
    return base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()


def auth_context(caller: str, ts: int | str, sig: str) -> dict[str, str]:
    """localContext's octo-auth entry of a request signed by hand (docs/protocol.md 7.6)."""
    return {"octo-auth": f"{caller}:{ts}:{sig}"}


def request(seq: int, body: bytes, *, service: str = "com.demo.echo.Echo",
            caller: str | None = None, appkey: str | None = None,
            local: dict[str, str] | None = None, glob: dict[str, str] | None = None) -> bytes:
    """One raw OCTO request: traceInfo.clientAppkey `caller`, localContext
    octo-remote-appkey `appkey` (the provider asked for) and `local`."""
    loc = {"octo-remote-appkey": appkey} if appkey is not None else {}
    loc.update(local or {})
    return frame.encode_request(
        seq, service, body, trace_info={"clientAppkey": caller} if caller else None,
        local_context=loc or None, global_context=glob or None)


class Wire:
    """One connection to a proxy's UDS or TCP port, sending raw OCTO requests
    and reading each answer."""

    def __init__(self, where: str | int) -> None:
        if isinstance(where, str):
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(where)
        else:
            self.s = socket.create_connection(("127.0.0.1", where))
        self.s.settimeout(15)
        self.sc = frame.FrameScanner()
        self.seq = 0

    def call(self, body: bytes, caller: str | None = None, local: dict[str, str] | None = None,
             *, service: str = "com.demo.echo.Echo", appkey: str | None = ECHO,
             glob: dict[str, str] | None = None) -> dict[str, Any]:
        self.seq += 1
        self.s.sendall(request(self.seq, body, service=service, caller=caller, appkey=appkey,
                               local=local, glob=glob))
        got: list[Any] = []
        wait_for(lambda: got.extend(self.sc.feed(self.s.recv(65536))) or got, 15, "an answer")
        f = got[0]
        assert f.seq_id == self.seq
        return {"status": f.status, "message": f.message or "", "body": bytes(f.body)}

    def signed(self, body: bytes, caller: str, ts: int | None = None, sig: str | None = None,
               method: str = "", *, token: str | None = None) -> dict[str, Any]:
        """A call signed by hand as `caller` (a legacy client): sig, else
        the signature with token, of timestamp ts (else now)."""
        ts = now_s() if ts is None else ts
        sig = sig if sig is not None else mac(caller, ts, method, token)
        return self.call(body, caller, auth_context(caller, ts, sig))

    def close(self) -> None:
        self.s.close()


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)
