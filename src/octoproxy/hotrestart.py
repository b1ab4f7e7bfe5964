"""Lossless hot restart: the protocol between two generations of one proxy.

The whole protocol is here (docs/protocol.md section 13); server.py only
wires it to a Proxy.  Two roles, as in Envoy's hot_restarting_parent/child:

- HotRestartChild: the new generation.  Connects to the live one's
  hot-restart UDS, receives the listening sockets (SCM_RIGHTS) and state,
  says "ready" once it serves and has checked everything that can fail,
  and "serving" once it owns the hot-restart socket and the pid file.
- HotRestartParent: the live generation.  Listens on the hot-restart UDS,
  starts the next generation on SIGUSR2 (and kills it if it has not started
  within hot_restart.start_timeout_s), hands its sockets over, stops
  accepting on "ready", and takes its listeners back if the new generation
  fails before "serving".

Both sides speak through one Channel (newline-delimited JSON plus passed
fds) and accept a peer only if it runs as the same user or as root
(SO_PEERCRED).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from octoproxy.config import HotRestart
from octoproxy.process import (
    HELD_SIGNALS,
    UnsafePath,
    check_private_dir,
    monotonic_usec,
    sd_notify,
    write_pid_file,
)

log = logging.getLogger("octoproxy.hotrestart")

MAGIC = "octo-proxy-hot-restart"
VERSION = 1
MAX_FDS = 64
MAX_LINE = 16 * 1024 * 1024  # one message (the state) at most
HELLO_TIMEOUT_S = 5.0


class HotRestartError(Exception):
    pass


class RestartingProxy(Protocol):
    """What hot restart needs from the proxy of one generation (server.Proxy)."""

    generation: int
    draining: bool
    sockets: dict[str, socket.socket]  # listener key -> listening socket (owned)

    def handover_state(self) -> dict[str, Any]:
        """JSON-able state for the next generation (never secrets)."""
        ...

    async def release_listeners(self) -> None:
        """Stop accepting on every listener; keep the sockets open."""
        ...

    async def resume_listeners(self) -> None:
        """Accept again on the sockets kept by release_listeners()."""
        ...


# -- peer credentials ---------------------------------------------------------

def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UDS."""
    fmt = "3i"
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, data)
    return pid, uid, gid


def check_peer(sock: socket.socket, role: str) -> int:
    """The peer's pid if it runs as this user or as root; HotRestartError otherwise."""
    pid, uid, _ = peer_credentials(sock)
    me = os.geteuid()
    if uid not in (me, 0):
        raise HotRestartError(f"refused a {role} (pid {pid}) running as uid {uid}: only this "
                              f"user (uid {me}) or root may take part in a hot restart")
    return pid


# -- the channel: the one reader and writer of the protocol -----------------------

class Channel:
    """Newline-delimited JSON over a connected UDS, with fds passed by
    SCM_RIGHTS alongside a message; non-blocking, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray()
        self.fds: list[int] = []  # received and not yet taken

    async def _io(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            while True:
                try:
                    sent = socket.send_fds(self.sock, [data], list(fds))
                    break
                except BlockingIOError:
                    await self._io(writable=True)
            data = data[sent:]
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None when the peer closed the connection.
        TimeoutError after `timeout` seconds; HotRestartError for garbage."""
        async with asyncio.timeout(timeout):
            while b"\n" not in self._buf:
                try:
                    data, anc, _flags, _addr = self.sock.recvmsg(
                        65536, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
                except BlockingIOError:
                    await self._io(writable=False)
                    continue
                except OSError as e:
                    if e.errno in (errno.ECONNRESET, errno.EPIPE):
                        return None
                    raise
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fda = array.array("i")
                        fda.frombytes(payload[: len(payload) - len(payload) % fda.itemsize])
                        self.fds.extend(fda)
                if not data:
                    return None
                self._buf += data
                if len(self._buf) > MAX_LINE:
                    raise HotRestartError(f"message over {MAX_LINE} bytes")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise HotRestartError(f"not a protocol message: {e}") from None
        if not isinstance(msg, dict):
            raise HotRestartError("not a protocol message: not a JSON object")
        return msg

    async def closed(self) -> None:
        """Wait until the peer closes the connection (whatever it still sends)."""
        with contextlib.suppress(OSError, HotRestartError):
            while await self.recv(None) is not None:
                pass

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()


# -- the new generation -----------------------------------------------------------

@dataclass
class Handover:
    """What a new generation received from the old one."""

    sockets: dict[str, socket.socket]
    state: dict[str, Any]
    generation: int
    old_pid: int


class HotRestartChild:
    """The new generation's side of one hot restart."""

    def __init__(self, chan: Channel, handover: Handover) -> None:
        self.chan = chan
        self.handover = handover

    @classmethod
    async def connect(cls, path: str, timeout: float) -> HotRestartChild | None:
        """Take over from the generation listening at `path`.  None when
        nobody listens there (it died: start fresh); HotRestartError when it
        refuses, is not a proxy of this user, or fails."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
        except OSError as e:
            sock.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("no previous generation at %s (%s): starting fresh", path, e.strerror)
                return None
            raise HotRestartError(f"cannot reach the previous generation at {path}: "
                                  f"{e.strerror}") from None
        chan = Channel(sock)
        try:
            check_peer(sock, "previous generation")
            await chan.send({"magic": MAGIC, "version": VERSION, "pid": os.getpid()})
            msg = await chan.recv(timeout)
            if msg is None:
                raise HotRestartError("the previous generation closed the hot-restart connection")
            if not msg.get("ok"):
                raise HotRestartError(f"refused by the previous generation: {msg.get('error')}")
            keys = msg.get("listeners")
            fds = chan.take_fds()
            if not isinstance(keys, list) or len(keys) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise HotRestartError(f"expected {len(keys) if isinstance(keys, list) else '?'} "
                                      f"sockets, received {len(fds)}")
        except (OSError, TimeoutError) as e:
            chan.close()
            raise HotRestartError(f"handshake with the previous generation failed: "
                                  f"{e or type(e).__name__}") from None
        except HotRestartError:
            chan.close()
            raise
        sockets = {}
        for key, fd in zip(keys, fds, strict=True):
            s = socket.socket(fileno=fd)
            s.setblocking(False)
            sockets[str(key)] = s
        state = msg.get("state")
        h = Handover(sockets, state if isinstance(state, dict) else {},
                     int(msg.get("generation", 0)), int(msg.get("pid", 0)))
        log.info("took over %d listening socket(s) from generation %d (pid %d)",
                 len(sockets), h.generation, h.old_pid)
        return cls(chan, h)

    async def ready(self, timeout: float) -> None:
        """We serve and checked everything: the old generation may let go.
        Returns once it stopped accepting."""
        await self.chan.send({"ready": True})
        try:
            msg = await self.chan.recv(timeout)
        except TimeoutError:
            raise HotRestartError("the previous generation did not release within "
                                  f"{timeout:.1f} s") from None
        if msg is None:
            raise HotRestartError("the previous generation went away before releasing")
        if not msg.get("released"):
            raise HotRestartError(f"unexpected answer from the previous generation: {msg}")

    async def serving(self) -> None:
        """We own the hot-restart socket and the pid file: the old one drains."""
        await self.chan.send({"serving": True})

    async def wait_gone(self) -> None:
        """Until the previous generation has exited (it closes the connection)."""
        await self.chan.closed()
        self.chan.close()

    def close(self) -> None:
        self.chan.close()


# -- the live generation ------------------------------------------------------------

class HotRestartParent:
    """The live generation's side: the hot-restart socket, the next
    generation's process, and the handover to it."""

    def __init__(self, path: str, proxy: RestartingProxy, settings: HotRestart,
                 argv: Sequence[str], predecessor: HotRestartChild | None = None,
                 pid_file: str | None = None) -> None:
        self.path = os.path.abspath(path)
        self.proxy = proxy
        self.settings = settings
        self.argv = list(argv)  # `octo-proxy` arguments for the next generation
        self.pid_file = pid_file
        self.predecessor = predecessor
        self.handed_over = asyncio.Event()  # a new generation serves; we drain
        self.successor: Channel | None = None  # kept open until we exit
        self.busy = False  # a handover is under way
        self.deferred = False  # SIGUSR2 while the predecessor still drains
        self.child: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._tmp: str | None = None
        self._ino = -1
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the hot-restart socket

    def bind(self) -> None:
        """Listen under a private temporary name beside `path` (publish()
        renames it into place).  Everything that can fail about the socket
        fails here, before a predecessor lets go.  Raises UnsafePath."""
        d, name = os.path.split(self.path)
        check_private_dir(d)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            raise UnsafePath(f"{self.path} exists and is not a socket; refusing to replace it")
        if st is not None and self.predecessor is None and _accepts(self.path):
            raise UnsafePath(f"{self.path} is in use by a live process; refusing to steal it "
                             "(stop that process, or hot-restart it with SIGUSR2)")
        tmp = os.path.join(d, f".{name}.{secrets.token_hex(6)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(tmp)
            s.listen(8)
        except OSError as e:
            s.close()
            raise UnsafePath(f"cannot listen on {tmp}: {e.strerror}") from None
        finally:
            os.umask(old)
        s.setblocking(False)
        self._sock, self._tmp = s, tmp
        self._ino = os.lstat(tmp).st_ino  # rename keeps it: tells our socket file from others

    def publish(self) -> None:
        """Atomically put our socket at `path` (replacing the predecessor's)."""
        assert self._tmp is not None
        os.rename(self._tmp, self.path)
        self._tmp = None

    def start(self) -> None:
        assert self._sock is not None and self._tmp is None
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        self._tasks.add(self._accept_task)
        if self.predecessor is not None:
            self._spawn_task(self._watch_predecessor(self.predecessor))

    def close(self, unlink: bool = True) -> None:
        """Stop listening; unlink the path if it is still our socket."""
        me = asyncio.current_task()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
        elif unlink and self._owns_path():
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _owns_path(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino

    def _reclaim(self) -> None:
        """After a failed handover: make `path` reach us again (the new
        generation may have put its socket there before it failed)."""
        if self._owns_path() or self._sock is None:
            return
        log.warning("hot restart: %s no longer reaches this generation; re-binding it", self.path)
        if self._accept_task is not None:
            self._accept_task.cancel()
        self._sock.close()
        self._sock = None
        pred, self.predecessor = self.predecessor, None
        try:
            self.bind()
        finally:
            self.predecessor = pred
        self.publish()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- SIGUSR2

    def request_restart(self) -> None:
        """SIGUSR2: start the next generation, now or once the predecessor is gone."""
        if self.proxy.draining or self.handed_over.is_set():
            log.warning("SIGUSR2: this generation has handed over and is draining; "
                        "signal the new one (pid file: %s)", self.pid_file)
            return
        if self.predecessor is not None:
            log.info("SIGUSR2: the previous generation is still draining; "
                     "the restart starts when it has exited")
            self.deferred = True
            return
        if self.child is not None and self.child.poll() is not None:
            self.child = None  # it failed and exited; its watcher has not looked yet
        if self.busy or self.child is not None:
            log.warning("SIGUSR2: a hot restart is already under way; ignored")
            return
        argv = [sys.executable, "-m", "octoproxy", *self.argv, "--hot-restart-from", self.path]
        log.info("SIGUSR2: starting the next generation: %s", " ".join(argv))
        sd_notify("RELOADING=1", monotonic_usec(), "STATUS=hot restart under way")
        # the child starts with SIGUSR2, SIGTERM and SIGINT blocked (the mask
        # survives exec) and unblocks them once its handlers are in place: a
        # reload or a stop sent to it while it starts is then kept, not fatal
        # (their default action)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.child = child
        self._spawn_task(self._watch_child(child))

    async def _watch_child(self, child: subprocess.Popen[bytes]) -> None:
        """Until the child serves: reap it if it exits, kill it if it has not
        started within start_timeout_s (whether or not it ever connected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout_s
        try:
            while not self.handed_over.is_set():
                rc = child.poll()
                if rc is not None:
                    log.error("hot restart: new generation (pid %d) exited with code %d "
                              "before taking over; still serving", child.pid, rc)
                    return
                if loop.time() >= deadline:
                    log.error("hot restart: new generation (pid %d) has not started within "
                              "%.1f s (hot_restart.start_timeout_s); killed it; still serving",
                              child.pid, self.settings.start_timeout_s)
                    child.kill()
                    await loop.run_in_executor(None, child.wait)
                    return
                await asyncio.sleep(0.05)
        finally:
            if self.child is child and not self.handed_over.is_set():
                self.child = None

    async def _watch_predecessor(self, pred: HotRestartChild) -> None:
        await pred.wait_gone()
        self.predecessor = None
        log.info("previous generation (pid %d) has exited", pred.handover.old_pid)
        if self.deferred:
            self.deferred = False
            self.request_restart()

    # -- the handover

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            self._spawn_task(self._handle(conn))

    async def _handle(self, conn: socket.socket) -> None:
        try:
            new_pid = check_peer(conn, "new generation")
        except (HotRestartError, OSError) as e:
            log.error("hot restart: %s", e)
            conn.close()
            return
        chan = Channel(conn)
        keep = False
        try:
            keep = await self._handover(chan, new_pid)
        except (OSError, HotRestartError, TimeoutError) as e:
            log.error("hot restart: handover to pid %d failed: %s; still serving",
                      new_pid, e or type(e).__name__)
        finally:
            if not keep:
                chan.close()

    async def _refuse(self, chan: Channel, why: str) -> bool:
        with contextlib.suppress(OSError):
            await chan.send({"ok": False, "error": why})
        return False

    async def _handover(self, chan: Channel, new_pid: int) -> bool:
        """One handover; True when the new generation serves (keep `chan`)."""
        proxy, settings = self.proxy, self.settings
        try:
            hello = await chan.recv(HELLO_TIMEOUT_S)
        except (TimeoutError, HotRestartError) as e:
            log.warning("hot restart: bad hello from pid %d: %s", new_pid, e or "timeout")
            return False
        if not hello or hello.get("magic") != MAGIC or hello.get("version") != VERSION:
            why = (f"handshake version mismatch: this generation speaks {MAGIC} v{VERSION}, "
                   f"the new one sent {hello!r}")
            log.error("hot restart refused: %s", why)
            return await self._refuse(chan, why)
        if self.busy or proxy.draining or self.handed_over.is_set():
            why = "another hot restart is under way" if self.busy else "this generation is draining"
            log.warning("hot restart from pid %d refused: %s", new_pid, why)
            return await self._refuse(chan, why)
        self.busy = True
        try:
            keys = [k for k, s in proxy.sockets.items() if s.fileno() >= 0]  # not closed
            await chan.send({"ok": True, "version": VERSION, "pid": os.getpid(),
                             "generation": proxy.generation, "listeners": keys,
                             "state": proxy.handover_state()},
                            [proxy.sockets[k].fileno() for k in keys])
            log.info("hot restart: sent %d socket(s) to pid %d; waiting for it to be ready",
                     len(keys), new_pid)
            try:
                ready = await chan.recv(settings.start_timeout_s)
            except TimeoutError:
                ready = None
            if not ready or not ready.get("ready"):
                log.error("hot restart: new generation (pid %d) failed before ready%s; "
                          "still serving", new_pid, self._child_fate(new_pid))
                return False
            # the new generation serves: stop accepting; drain only once it
            # says it owns everything (else take the listeners back)
            await proxy.release_listeners()
            try:
                await chan.send({"released": True})
                serving = await chan.recv(settings.start_timeout_s)
            except (OSError, TimeoutError, HotRestartError):
                serving = None
            if not serving or not serving.get("serving"):
                log.error("hot restart: new generation (pid %d) failed after the handover%s; "
                          "took the listeners back; still serving", new_pid,
                          self._child_fate(new_pid))
                await proxy.resume_listeners()
                self._reclaim()
                if self.pid_file:  # it may name the failed generation now
                    try:
                        write_pid_file(self.pid_file)
                    except OSError as e:
                        log.error("cannot rewrite the pid file %s: %s", self.pid_file, e)
                return False
            self.successor = chan
            self.handed_over.set()
            self.close(unlink=False)  # the path is the new generation's socket now
            return True
        finally:
            self.busy = False

    def _child_fate(self, pid: int) -> str:
        """Kill our own child that failed; say how it ended."""
        child = self.child
        if child is None or child.pid != pid:
            return ""
        if child.poll() is None:
            child.kill()
        try:
            rc = child.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return " (it is still running)"
        self.child = None  # gone: the next SIGUSR2 may start another at once
        return f" (it exited with code {rc})"


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _same_socket(path: str, ino: int | None) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_ino == ino
