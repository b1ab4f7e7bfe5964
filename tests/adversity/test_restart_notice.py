"""The hot-restart notice reaches only clients that asked for it.

Attack (issue 11): the old generation used to send every app connection an
unsolicited response with sequence id 0.  A client written from the protocol
alone sees an answer to a request it never sent, and one with request 0 in
flight takes the notice as that request's answer.  Now (docs/protocol.md,
"Restart notice"): a client that announced `octo-restart-notice: 1` in a
heartbeat gets a ProxyRestart frame (messageType 3, no sequence id); any
other client gets only flagged answers to its own new requests.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest
from attack import req

from octoproxy._core import frame as F
from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid

from harness import (
    Cluster,
    LoadThread,
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    wait_for,
)

RESTARTS = int(os.environ.get("OCTOPROXY_RESTARTS", "20"))


class LegacyClient(threading.Thread):
    """Pipelined requests with sequence ids 0..63 over and over (0 is a legal
    id and often in flight).  Follows the protocol: a status-3 answer flagged
    octo-proxy-restart to one of its requests makes it reconnect and send
    that request again; a closed connection makes it reconnect.  Every frame
    that answers no request in flight on its connection is unsolicited."""

    def __init__(self, path: str, inflight: int = 8, idle: bool = False) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.inflight = inflight
        self.idle = idle
        self.stop = threading.Event()
        self.unsolicited: list[str] = []
        self.answered = 0
        self.retried = 0
        self.lost = 0
        self.frames = 0
        self.reconnects = 0

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def run(self) -> None:
        s = self._connect()
        scanner = F.FrameScanner()
        owed: dict[int, int] = {}  # seq id -> request number
        redo: list[int] = []
        n = 0
        next_id = 0
        while not self.stop.is_set():
            if not self.idle:
                while len(owed) < self.inflight:
                    while next_id in owed:
                        next_id = (next_id + 1) % 64
                    num = redo.pop() if redo else n
                    if num == n:
                        n += 1
                    owed[next_id] = num
                    s.sendall(req(next_id, b"id:L%d" % num, appkey="com.demo.echo"))
                    next_id = (next_id + 1) % 64
            if not select.select([s], [], [], 0.05)[0]:
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            move = False
            if data:
                for f in scanner.feed(data):
                    self.frames += 1
                    if f.msg_type == F.MT_HEARTBEAT:
                        continue
                    if not f.is_response or f.seq_id not in owed:
                        self.unsolicited.append(
                            f"type {f.msg_type} seq {f.seq_id if f.is_response else None} "
                            f"status {f.status} restart {f.proxy_restart} {f.message!r}")
                        continue
                    num = owed.pop(f.seq_id)
                    if f.status == 3 and f.proxy_restart:
                        self.retried += 1
                        redo.append(num)
                        move = True
                    elif f.status == 0 and f.body.endswith(b"|L%d" % num):
                        self.answered += 1
                    else:
                        self.unsolicited.append(f"wrong answer for {num}: {f.status} {f.body!r}")
            if not data or move:
                if not data:
                    self.lost += len(owed)
                    redo.extend(owed.values())
                owed.clear()
                s.close()
                s = self._connect()
                scanner = F.FrameScanner()
                self.reconnects += 1
        s.close()


class AnnouncedClient(threading.Thread):
    """Idle, but announced the capability: expects one ProxyRestart frame per
    restart and nothing else but its heartbeat answers."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.notices = 0
        self.other: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                time.sleep(0.02)
                continue
            s.sendall(F.encode_heartbeat(7, local_context={"octo-restart-notice": "1"}))
            scanner = F.FrameScanner()
            moved = False
            while not self.stop.is_set() and not moved:
                if not select.select([s], [], [], 0.05)[0]:
                    continue
                data = s.recv(65536)
                if not data:
                    break  # closed at the end of the old generation's drain
                for f in scanner.feed(data):
                    if f.msg_type == F.MT_PROXY_RESTART:
                        self.notices += 1
                        moved = True
                    elif not (f.msg_type == F.MT_HEARTBEAT and f.seq_id == 7):
                        self.other.append(f"type {f.msg_type} seq {f.seq_id} {f.message!r}")
            s.close()


def _restart(pidf: str) -> None:
    old = read_pid(pidf)
    assert old and pid_alive(old)
    os.kill(old, 12)  # SIGUSR2
    wait_for(lambda: (p := read_pid(pidf)) != old and p and pid_alive(p), 40, "a new generation")
    wait_for(lambda: not pid_alive(old), 40, f"the old generation (pid {old}) to exit")


def _chain(c: Cluster) -> None:
    c.providers(p="p.sock")
    port = free_port()
    c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
    ccfg = client_proxy_cfg(
        c.path("px.sock"),
        [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
          "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
        hot_restart={"socket": c.path("c.hr"), "pid_file": c.path("c.pid"), "drain_s": 1.0,
                     "shutdown_s": 5.0, "start_timeout_s": 30.0})
    c.proxy("client", ccfg)


def _run(restarts: int) -> None:
    with cluster() as c:
        _chain(c)
        px = c.path("px.sock")
        legacy = LegacyClient(px)
        idle = LegacyClient(px, idle=True)
        announced = AnnouncedClient(px)
        for t in (legacy, idle, announced):
            t.start()
        load = LoadThread(px, clients=2, inflight=4).start()
        try:
            wait_for(lambda: legacy.answered > 50, 15, "the legacy client's traffic")
            for i in range(restarts):
                _restart(c.path("c.pid"))
                wait_for(lambda n=legacy.answered: legacy.answered > n + 20, 15,
                         f"legacy traffic after restart {i + 1}")
        finally:
            load.stop()
            for t in (legacy, idle, announced):
                t.stop.set()
                t.join(10)
        print(f"{restarts} restarts: legacy client {legacy.answered} answered, "
              f"{len(legacy.unsolicited)} unsolicited, {legacy.lost} lost, {legacy.retried} retried; "
              f"idle legacy client {idle.frames} frames; announced client {announced.notices} "
              f"notices, {len(announced.other)} other frames; SDK load {load.ok}/{load.sent}")
        assert legacy.unsolicited == [], legacy.unsolicited[:5]
        assert idle.unsolicited == [] and idle.frames == 0, idle.unsolicited[:5]
        assert legacy.lost == 0
        assert legacy.retried >= restarts  # flagged answers to its own requests
        assert announced.notices == restarts and announced.other == [], announced.other[:5]
        assert load.errors == [], load.errors[:5]
        assert load.ok == load.sent


def test_no_unsolicited_frames_across_restarts_short() -> None:
    _run(min(RESTARTS, 4))


@pytest.mark.slow
def test_no_unsolicited_frames_across_20_restarts() -> None:
    _run(RESTARTS)
