"""Structured logs: one line per event, text or JSON, with repeats rate-limited."""

from __future__ import annotations

import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class RepeatLimiter(logging.Filter):
    """Rate-limits repetitive lines: per (logger, level, message template) at
    most `burst` lines per `window_s` seconds.  The first line let through
    after some were held back says how many were (" [N similar line(s)
    suppressed in the last W s]"); `suppressed` counts them all (exported as
    octo_proxy_log_lines_suppressed).  The access log is never limited: it
    has its own sampling."""

    MAX_KEYS = 4096

    def __init__(self, burst: int = 5, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock  # seconds; a test passes its own
        self.suppressed = 0
        # key -> [window start, lines let through in it, held back since the last line out]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "octoproxy.access" or self.burst <= 0:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        st = self._seen.get(key)
        if st is None:
            if len(self._seen) >= self.MAX_KEYS:
                self._expire(now)
            self._seen[key] = [now, 1.0, 0.0]
            return True
        if now - st[0] >= self.window_s:
            st[0] = now
            st[1] = 0.0
        if st[1] >= self.burst:
            st[2] += 1
            self.suppressed += 1
            return False
        st[1] += 1
        if st[2]:
            held = int(st[2])
            st[2] = 0.0
            # the record is formatted once, by the handler: fold the note into it
            record.msg = f"{record.getMessage()} [{held} similar line(s) suppressed in the last " \
                         f"{self.window_s:g} s]"
            record.args = None
        return True

    def _expire(self, now: float) -> None:
        for k in [k for k, v in self._seen.items() if now - v[0] >= self.window_s]:
            del self._seen[k]
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()


_limiter = RepeatLimiter()


def repeat_limiter() -> RepeatLimiter:
    """The process's limiter (its `suppressed` count is in the admin stats)."""
    return _limiter


def setup_logging(level: str = "info", fmt: str = "text", *, repeat_burst: int = 5,
                  repeat_window_s: float = 10.0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    _limiter.burst = repeat_burst
    _limiter.window_s = repeat_window_s
    handler.addFilter(_limiter)
    root = logging.getLogger("octoproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_UCRED = struct.Struct("3i")


def peer_name(transport: Any) -> str:
    """Who is at the other end of a transport, for log lines: `host:port` for
    TCP, `pid=N uid=N` (SO_PEERCRED) for a Unix socket, whose peer name is
    empty; `?` when it cannot be told (the connection is already gone)."""
    if transport is None:
        return "?"
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            return f"pid={pid} uid={uid}"
        peer = transport.get_extra_info("peername")
    except (OSError, ValueError, AttributeError):
        return "?"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer) if peer else "?"
