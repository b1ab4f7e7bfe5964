"""Tools for the attack tests: raw OCTO peers written from docs/protocol.md
alone (no SDK), process measurements (RSS, fds) and admin scrapes."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import sys
import time
import urllib.request
from typing import Any

from octoproxy._core import frame as F

from harness import Cluster, Proc, free_port, wait_for


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_proxy(c: Cluster, name: str, cfg: dict[str, Any], *, nofile: int | None = None,
                wait: bool = True) -> Proc:
    """A proxy process, optionally under `ulimit -n nofile`."""
    if nofile is None:
        return c.proxy(name, cfg, wait=wait)
    path = c.write_config(name, cfg)
    p = Proc(["sh", "-c", f'ulimit -n {nofile} && exec "$0" -m octoproxy run -c "$1"',
              sys.executable, path], name, c.dir)
    c.procs.append(p)
    if wait:
        c.wait_ready(p, cfg)
    return p


def admin_cfg(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port}


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=timeout) as r:
        return str(r.read().decode())


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample (`name{labels}`) in Prometheus text; 0 if absent."""
    pat = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{\})?")
    for line in text.splitlines():
        m = re.match(pat + r" (\S+)$", line)
        if m:
            return float(m.group(m.lastindex or 1))
    return 0.0


def req(seq: int, body: bytes = b"echo:x", *, appkey: str = "a", timeout_ms: int = 5000,
        one_way: bool = False, global_context: dict[str, str] | None = None,
        local_context: dict[str, str] | None = None, service: str = "com.demo.Echo") -> bytes:
    loc = {"octo-remote-appkey": appkey, **(local_context or {})}
    return F.encode_request(seq, service, body, call_type=1 if one_way else 0, timeout=timeout_ms,
                            global_context=global_context, local_context=loc)


PEERS: list[Peer] = []  # every Peer of the running test: conftest closes them after it


class Peer:
    """A blocking raw OCTO peer on a UDS or TCP socket: sends bytes, collects
    every frame it receives (nothing is dropped or matched away).  Every peer
    is closed at the end of its test (conftest.py)."""

    opened: list[Peer] = []

    def __init__(self, where: str | int, *, rcvbuf: int | None = None) -> None:
        Peer.opened.append(self)
        if isinstance(where, int):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.connect(("127.0.0.1", where))
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.connect(where)
        self.scanner = F.FrameScanner()
        self.frames: list[F.Frame] = []
        self.closed = False
        PEERS.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def poll(self, timeout: float = 0.0) -> bool:
        """Read what is there (waiting up to timeout for the first bytes);
        False once the peer closed."""
        if self.closed:
            return False
        end = time.monotonic() + timeout
        while True:
            left = max(0.0, end - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return True
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                self.closed = True
                return False
            self.frames.extend(self.scanner.feed(data))
            timeout = 0.0
            end = time.monotonic()

    def wait(self, cond: Any, timeout: float = 10.0, what: str = "frames") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; got {self.describe()}")
            if not self.poll(0.05) and not cond():
                raise ConnectionError(f"closed while waiting for {what}; got {self.describe()}")

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.poll(0.05):
                return True
        return False

    def answers(self) -> dict[int, list[F.Frame]]:
        out: dict[int, list[F.Frame]] = {}
        for f in self.frames:
            if f.is_response and f.msg_type in (-1, 0):
                out.setdefault(f.seq_id, []).append(f)
        return out

    def describe(self) -> str:
        return ", ".join(f"(type {f.msg_type} seq {f.seq_id} status {f.status} "
                         f"{f.message!r})" for f in self.frames[:12]) + (
            f" ... {len(self.frames)} frames" if len(self.frames) > 12 else "")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def log_lines(p: Proc, needle: str) -> int:
    return sum(1 for line in p.log().splitlines() if needle in line)


def chain_cfgs(c: Cluster, *, server_extra: dict[str, Any] | None = None,
               client_extra: dict[str, Any] | None = None,
               provider: bool = True) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Configs for provider "p" behind a server proxy (inbound port) and a
    client proxy at px.sock routing appkey "a" there; returns (server, client, port)."""
    from harness import client_proxy_cfg, server_proxy_cfg

    if provider:
        c.providers(p="p.sock")
    port = free_port()
    scfg = server_proxy_cfg({port: c.path("p.sock")})
    scfg.update(server_extra or {})
    ccfg = client_proxy_cfg(c.path("px.sock"),
                            [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
                            **(client_extra or {}))
    return scfg, ccfg, port


__all__ = ["wait_for"]
