"""Helpers for the tests that drive real proxy processes the way an outside
control plane and an outside client would: the xDS double
(tests/e2e/xds_double.py) serving hand-written Envoy resources from a thread
of its own, and a raw OCTO client speaking the wire format of
docs/protocol.md (frame.encode_request)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
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


class Wire:
    """One connection to a proxy's UDS or TCP port, sending raw OCTO requests."""

    def __init__(self, where: str | int) -> None:
        if isinstance(where, str):
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(where)
        else:
            self.s = socket.create_connection(("127.0.0.1", where))
        self.s.settimeout(15)
        self.sc = frame.FrameScanner()
        self.seq = 0

    def call(self, body: bytes, *, service: str = "com.spec.Svc", caller: str | None = None,
             appkey: str | None = None, local: dict[str, str] | None = None,
             glob: dict[str, str] | None = None) -> dict[str, Any]:
        self.seq += 1
        loc = dict(local or {})
        if appkey is not None:
            loc["octo-remote-appkey"] = appkey
        self.s.sendall(frame.encode_request(
            self.seq, service, body, trace_info={"clientAppkey": caller} if caller else None,
            local_context=loc or None, global_context=glob or None))
        got: list[Any] = []
        wait_for(lambda: got.extend(self.sc.feed(self.s.recv(65536))) or got, 15, "an answer")
        f = got[0]
        assert f.seq_id == self.seq
        return {"status": f.status, "message": f.message or "", "body": bytes(f.body)}

    def close(self) -> None:
        self.s.close()


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)
