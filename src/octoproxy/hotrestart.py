"""Lossless hot restart: listening sockets passed by SCM_RIGHTS, then drain.

The live generation listens on a hot-restart UDS.  A new generation (started
by SIGUSR2, or by an operator with ``run --hot-restart-from SOCK``) connects
and the two speak newline-delimited JSON (docs/operating.md):

    new -> old   {"magic": MAGIC, "version": 1, "pid": N}
    old -> new   {"ok": true, "version": 1, "pid": M, "generation": G,
                  "listeners": [keys], "state": {...}}        + the fds (SCM_RIGHTS)
                 or {"ok": false, "error": "..."}
    new -> old   {"ready": true}          (the new one serves on the sockets)
    old -> new   {"released": true}       (the old stopped accepting, freed this UDS)

The old generation then drains and exits; it keeps the connection open until
it exits, so the new one knows when its predecessor is gone.  If the new one
fails before "ready", the old one never stopped serving.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("octoproxy.hotrestart")

MAGIC = "octo-proxy-hot-restart"
VERSION = 1
MAX_FDS = 64


class HotRestartError(Exception):
    pass


@dataclass
class Handover:
    """What a new generation received from the old one."""

    sockets: dict[str, socket.socket]
    state: dict[str, Any]
    generation: int
    old_pid: int
    conn: socket.socket = field(repr=False)


def _recv_line(sock: socket.socket, deadline: float, buf: bytearray,
               fds: list[int] | None = None) -> dict[str, Any] | None:
    """Read one JSON line (blocking, with a deadline); collect passed fds."""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HotRestartError("timed out waiting for the other generation")
        sock.settimeout(left)
        if fds is not None:
            fdarr = array.array("i")
            msg, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fdarr.itemsize))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fdarr.frombytes(data[: len(data) - (len(data) % fdarr.itemsize)])
            fds.extend(fdarr)
        else:
            msg = sock.recv(65536)
        if not msg:
            return None
        buf += msg
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


def take_over(path: str, timeout: float) -> Handover | None:
    """New generation: get the listening sockets and state from the old one.

    Returns None when no old generation answers at `path` (it died: start
    fresh).  Raises HotRestartError when the old one refuses."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as e:
        conn.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            log.warning("no previous generation at %s (%s): starting fresh", path, e.strerror)
            return None
        raise HotRestartError(f"cannot reach the previous generation at {path}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    conn.sendall(json.dumps({"magic": MAGIC, "version": VERSION, "pid": os.getpid()}).encode()
                 + b"\n")
    fds: list[int] = []
    buf = bytearray()
    try:
        msg = _recv_line(conn, deadline, buf, fds)
    except (OSError, ValueError) as e:
        conn.close()
        raise HotRestartError(f"handshake with the previous generation failed: {e}") from None
    if msg is None:
        conn.close()
        raise HotRestartError("the previous generation closed the hot-restart connection")
    if not msg.get("ok"):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise HotRestartError(f"refused by the previous generation: {msg.get('error')}")
    keys = msg["listeners"]
    if len(keys) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise HotRestartError(f"expected {len(keys)} sockets, received {len(fds)}")
    sockets = {}
    for key, fd in zip(keys, fds, strict=True):
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        sockets[key] = s
    conn.setblocking(True)
    log.info("took over %d listening socket(s) from generation %d (pid %d)",
             len(sockets), msg.get("generation", 0), msg.get("pid", 0))
    return Handover(sockets, msg.get("state", {}), int(msg.get("generation", 0)),
                    int(msg.get("pid", 0)), conn)


async def finish_take_over(h: Handover, timeout: float) -> None:
    """New generation, once it serves: tell the old one and wait until it
    stopped accepting and released the hot-restart UDS."""
    loop = asyncio.get_running_loop()
    h.conn.setblocking(False)
    await loop.sock_sendall(h.conn, b'{"ready": true}\n')
    buf = b""
    async with asyncio.timeout(timeout):
        while b"\n" not in buf:
            data = await loop.sock_recv(h.conn, 4096)
            if not data:
                raise HotRestartError("the previous generation went away before releasing")
            buf += data
    msg = json.loads(buf.partition(b"\n")[0])
    if not msg.get("released"):
        raise HotRestartError(f"unexpected answer from the previous generation: {msg}")


async def wait_predecessor_gone(h: Handover) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(h.conn, 4096):
            pass
    h.conn.close()


class HotRestartServer:
    """Live generation: hands its sockets over to a new one on request."""

    def __init__(self, path: str, proxy: Any) -> None:
        self.path = path
        self.proxy = proxy
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a handover is under way
        self.handed_over = asyncio.Event()
        self.peer: socket.socket | None = None  # kept open until we exit
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        from octoproxy.listeners import replace_stale_uds

        replace_stale_uds(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(8)
        s.setblocking(False)
        self.sock = s
        self.task = asyncio.get_running_loop().create_task(self._accept_loop())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            t = loop.create_task(self._handle(conn))
            self._handlers.add(t)
            t.add_done_callback(self._handlers.discard)

    async def _send(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, json.dumps(msg).encode() + b"\n")

    async def _recv(self, conn: socket.socket, timeout: float) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        buf = b""
        async with asyncio.timeout(timeout):
            while b"\n" not in buf:
                data = await loop.sock_recv(conn, 4096)
                if not data:
                    return None
                buf += data
        return json.loads(buf.partition(b"\n")[0])

    async def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        proxy = self.proxy
        try:
            hello = await self._recv(conn, 5.0)
        except (TimeoutError, OSError, ValueError) as e:
            log.warning("hot restart: bad hello from a new generation: %s", e)
            conn.close()
            return
        if not hello or hello.get("magic") != MAGIC or hello.get("version") != VERSION:
            why = (f"handshake version mismatch: this generation speaks {MAGIC} v{VERSION}, "
                   f"the new one sent {hello!r}")
            log.error("hot restart refused: %s", why)
            with contextlib.suppress(OSError):
                await self._send(conn, {"ok": False, "error": why})
            conn.close()
            return
        if self.busy or proxy.draining:
            why = "another hot restart is under way" if self.busy else "this generation is draining"
            log.warning("hot restart from pid %s refused: %s", hello.get("pid"), why)
            with contextlib.suppress(OSError):
                await self._send(conn, {"ok": False, "error": why})
            conn.close()
            return
        self.busy = True
        new_pid = hello.get("pid")
        try:
            keys = list(proxy.sockets)
            fds = [proxy.sockets[k].fileno() for k in keys]
            msg = {"ok": True, "version": VERSION, "pid": os.getpid(),
                   "generation": proxy.generation, "listeners": keys,
                   "state": proxy.handover_state()}
            data = json.dumps(msg).encode() + b"\n"
            conn.setblocking(True)
            socket.send_fds(conn, [data], fds)
            conn.setblocking(False)
            log.info("hot restart: sent %d socket(s) to pid %s; waiting for it to be ready",
                     len(fds), new_pid)
            try:
                ready = await self._recv(conn, proxy.cfg.hot_restart.start_timeout_s)
            except TimeoutError:
                ready = None
                log.error("hot restart: new generation (pid %s) not ready within %.1f s; "
                          "still serving", new_pid, proxy.cfg.hot_restart.start_timeout_s)
                proxy.kill_child(new_pid)
            if not ready or not ready.get("ready"):
                if ready is None:
                    log.error("hot restart: new generation (pid %s) failed before ready%s; "
                              "still serving", new_pid, proxy.child_exit_reason(new_pid))
                conn.close()
                return
            # the new generation serves: stop accepting, free the UDS, drain
            self.close()
            await proxy.release_listeners()
            await self._send(conn, {"released": True})
            self.peer = conn
            self.handed_over.set()
        except (OSError, ValueError) as e:
            log.error("hot restart: handover to pid %s failed: %s; still serving", new_pid, e)
            conn.close()
        finally:
            self.busy = False
