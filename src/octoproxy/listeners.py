"""Listening sockets: the outbound UDS for local apps, the inbound TCP ports.

Sockets are opened here (or received from the previous generation on hot
restart) and then served by the core's protocols.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat

from octoproxy.config import InboundListener, OutboundListener

log = logging.getLogger("octoproxy.listeners")


class ListenerError(Exception):
    pass


class FdWatch:
    """Notices when the process runs out of file descriptors.  The event
    loop (libuv) handles EMFILE on accept by accepting and closing the
    connection at once, without telling anyone; this samples the open fds
    against RLIMIT_NOFILE (once per `check`, from the proxy's 1 s loop) and
    logs when the limit is (nearly) reached.  The log line is rate-limited
    like every repeated line; `hits` counts the samples at the limit."""

    def __init__(self, margin: int = 8) -> None:
        self.margin = margin
        self.hits = 0

    def check(self) -> bool:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return False
        try:
            used = len(os.listdir("/proc/self/fd")) - 1  # minus the listdir's own
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                return False
            used = soft  # not even one fd left to look
        if used < soft - self.margin:
            return False
        self.hits += 1
        log.warning("file descriptor limit reached: %d of %d open (ulimit -n); new connections "
                    "are closed at once (EMFILE) until some close", used, soft)
        return True


def replace_stale_uds(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: nobody accepts on it any more
            return
        raise ListenerError(f"cannot probe existing socket {path}: {e.strerror}") from None
    else:
        raise ListenerError(
            f"{path} is in use by a live process; refusing to steal it "
            "(stop that process, or hot-restart it with SIGUSR2)"
        )
    finally:
        probe.close()


def open_outbound(cfg: OutboundListener) -> socket.socket:
    replace_stale_uds(cfg.path)
    parent = os.path.dirname(os.path.abspath(cfg.path))
    if not os.path.isdir(parent):
        raise ListenerError(f"directory of {cfg.path} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind under a umask that never exposes the file beyond `mode`, then set it exactly
        old = os.umask(0o777 & ~cfg.mode)
        try:
            sock.bind(cfg.path)
        finally:
            os.umask(old)
        os.chmod(cfg.path, cfg.mode)
        sock.listen(cfg.backlog)
    except OSError as e:
        sock.close()
        raise ListenerError(f"cannot listen on {cfg.path}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def open_inbound(cfg: InboundListener) -> socket.socket:
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(cfg.backlog)
    except OSError as e:
        sock.close()
        raise ListenerError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def open_http_socket(host: str, port: int | None, uds: str | None) -> socket.socket:
    """A listening socket for an HTTP endpoint (admin, subscribe API): a UDS
    (mode 0600) or host:port.  Opened here so that hot restart can hand it over."""
    if uds:
        replace_stale_uds(uds)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            s.bind(uds)
        except OSError as e:
            s.close()
            raise ListenerError(f"cannot listen on {uds}: {e.strerror}") from None
        finally:
            os.umask(old)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port or 0))
        except OSError as e:
            s.close()
            raise ListenerError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    s.listen(128)
    s.setblocking(False)
    return s
