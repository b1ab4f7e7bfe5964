"""Pipelined load for the container tests; runs inside a container of the
image (its Python has the SDK and the compiled frame codec).

    python load.py --out DIR [--uds PATH --clients N --inflight M]
                   [--legacy-tcp HOST:PORT --legacy N --pipeline M]
                   [--service S --appkey A --subscribe URL --tag T]

Restart-aware clients: the SDK on the proxy's outbound UDS (it reconnects and
retries once on a hot-restart answer).  Legacy clients: plain OCTO frames,
pipelined, on the proxy's inbound TCP port, as a client without the mesh
would send them; on a closed connection they reconnect and send again what
was not answered (the provider counts executions, so a request that was
executed and then resent shows up as a duplicate there).

Every request body is "id:<tag>-<n>"; the answer must carry the same id.
Writes DIR/progress.json a few times a second and DIR/result.json when it
stops (SIGTERM, or DIR/stop appearing): nothing is left owed by then.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import time
import urllib.request
from typing import Any

import uvloop

from octoproxy._core import frame
from octoproxy.sdk import AsyncClient


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed: list[str] = []
        self.retries = 0
        self.legacy_sent = 0
        self.legacy_ok = 0
        self.legacy_failed: list[str] = []
        self.legacy_resent = 0
        self.legacy_reconnects = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "ok": self.ok, "failed": len(self.failed),
            "failures": self.failed[:20], "retries": self.retries,
            "legacy_sent": self.legacy_sent, "legacy_ok": self.legacy_ok,
            "legacy_failed": len(self.legacy_failed), "legacy_failures": self.legacy_failed[:20],
            "legacy_resent": self.legacy_resent, "legacy_reconnects": self.legacy_reconnects,
        }


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def sdk_client(a: argparse.Namespace, st: Stats, stop: asyncio.Event, ids: Any) -> None:
    c = await AsyncClient.connect(a.uds)

    async def one() -> None:
        while not stop.is_set():
            n = next(ids)
            body = b"id:%s-%d" % (a.tag.encode(), n)
            st.sent += 1
            try:
                r = await c.call(a.service, body, appkey=a.appkey, timeout_ms=10000,
                                 raise_on_error=False)
            except Exception as e:  # a lost connection, a local timeout
                st.failed.append(f"{n}: {type(e).__name__}: {e}")
                continue
            if r.ok and r.body.endswith(b"|" + body[3:]):
                st.ok += 1
            else:
                st.failed.append(f"{n}: status {r.status}: {r.message} {r.body[:60]!r}")

    await asyncio.gather(*(one() for _ in range(a.inflight)))
    st.retries += c.retries
    await c.close()


async def legacy_client(a: argparse.Namespace, st: Stats, stop: asyncio.Event, ids: Any) -> None:
    """Plain sockets, as a blocking Thrift client reads: recv() returns what
    arrived before a reset, a reset only after it (an asyncio StreamReader
    would drop data it already holds when the reset comes)."""
    loop = asyncio.get_running_loop()
    host, port = a.legacy_tcp.rsplit(":", 1)
    owed: dict[int, bytes] = {}  # seq id -> body, sent and not answered
    seqs = itertools.count(1)
    while not stop.is_set() or owed:
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (host, int(port)))
        except OSError:
            s.close()
            await asyncio.sleep(0.05)
            continue
        st.legacy_reconnects += 1
        sc = frame.FrameScanner()

        def take(data: bytes, sc: frame.FrameScanner = sc) -> None:
            for f in sc.feed(data):
                body = owed.pop(f.seq_id, None)
                if body is None:
                    continue
                if f.status == 0 and f.body.endswith(b"|" + body[3:]):
                    st.legacy_ok += 1
                else:
                    st.legacy_failed.append(f"{body!r}: status {f.status}: {f.message}")

        try:
            if owed:  # answers lost with the previous connection: send again
                st.legacy_resent += len(owed)
                await loop.sock_sendall(s, b"".join(frame.encode_request(q, a.service, b)
                                                    for q, b in owed.items()))
            while not stop.is_set() or owed:
                batch = []
                while not stop.is_set() and len(owed) < a.pipeline:
                    q = next(seqs)
                    body = b"id:%s-L%d" % (a.tag.encode(), next(ids))
                    owed[q] = body
                    st.legacy_sent += 1
                    batch.append(frame.encode_request(q, a.service, body))
                if batch:
                    await loop.sock_sendall(s, b"".join(batch))
                data = await asyncio.wait_for(loop.sock_recv(s, 65536), 15)
                if not data:
                    break
                take(data)
        except TimeoutError:
            st.legacy_failed.extend(f"{b!r}: no answer in 15 s" for b in owed.values())
            owed.clear()
        except OSError:
            # a reset, met by a send: the answers that arrived before it are
            # still readable, and only what is left unanswered goes again (a
            # client that dropped them would run those requests twice)
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                take(data)
        finally:
            s.close()


def subscribe(url: str, appkey: str) -> None:
    req = urllib.request.Request(f"{url}/v1/subscribe", method="POST",
                                 data=json.dumps({"appkeys": [appkey], "timeout_s": 10}).encode())
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                r.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def main(a: argparse.Namespace) -> None:
    st = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if a.subscribe:
        await loop.run_in_executor(None, subscribe, a.subscribe, a.appkey)
    ids = itertools.count(1)
    tasks = [loop.create_task(sdk_client(a, st, stop, ids)) for _ in range(a.clients if a.uds else 0)]
    tasks += [loop.create_task(legacy_client(a, st, stop, ids))
              for _ in range(a.legacy if a.legacy_tcp else 0)]
    stop_file = os.path.join(a.out, "stop")
    while not stop.is_set():
        if os.path.exists(stop_file):
            stop.set()
        write_json(os.path.join(a.out, "progress.json"), st.as_dict())
        done = [t for t in tasks if t.done()]
        for t in done:
            if t.exception() is not None:
                st.failed.append(f"client crashed: {t.exception()!r}")
                stop.set()
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks, return_exceptions=True)
    write_json(os.path.join(a.out, "result.json"), st.as_dict())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--uds")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--legacy-tcp")
    p.add_argument("--legacy", type=int, default=2)
    p.add_argument("--pipeline", type=int, default=16)
    p.add_argument("--service", default="com.demo.Echo")
    p.add_argument("--appkey", default=None)
    p.add_argument("--subscribe", default=None)
    p.add_argument("--tag", default="x")
    uvloop.run(main(p.parse_args()))
