"""Cluster quotas against a Redis that misbehaves (docs/governance.md,
"Cluster quotas on Redis"), in process on a real redis-server: one that
answers PING but refuses the quota's commands (an ACL a careless operator
set), one that accepts connections and never answers (CLIENT PAUSE), one
that answers protocol junk.  The quota must fall back within a bounded
time, keep nothing piling up (tasks, connections, memory), log once per
state change, and come back by itself when Redis answers properly again."""

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvloop

from octoproxy import model
from octoproxy._core import frame as F
from octoproxy._core import limits as L
from octoproxy.governance import Manager
from octoproxy.ports import free_tcp_port as free_port

from harness import RedisServer

FRAME = F.encode_request(1, "s", F.thrift_call("m", 1))


class _Table:
    def rebuild(self, appkey: str) -> None:  # pragma: no cover - no ejection here
        pass



def svc(rate: float) -> model.Service:
    return model.Service("q", governance=model.Governance(
        cluster_quota=model.ClusterQuota(rate, "local_share", 0.5)))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def offer(g: L.ServiceGov, seconds: float, per_s: float) -> list[int]:
    """[allowed, refused] of `per_s` requests a second for `seconds`."""
    counts = [0, 0]
    t0 = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * per_s)
        for _ in range(due - sent):
            counts[0 if g.check_inbound(FRAME) is None else 1] += 1
        sent = due
        await asyncio.sleep(0.001)
    return counts


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[_Warnings]:
    h = _Warnings()
    lg = logging.getLogger("octoproxy.governance")
    lg.addHandler(h)
    try:
        yield h
    finally:
        lg.removeHandler(h)


def test_redis_refusing_the_quota_commands_does_not_flap(
        redis: RedisServer, warnings: _Warnings) -> None:
    """An ACL that lets the proxy PING but not INCRBY (NOPERM on every step):
    Redis is down for the quota until the ACL is fixed, once; not up at each
    PING and down again at the next step (a warning pair per retry)."""

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        m = Manager(loop, _Table(), redis.url, redis_timeout_s=0.2, redis_retry_s=0.1)
        m.on_build(svc(1000.0), [])
        g = m.service_gov("q")
        await offer(g, 0.5, 400.0)
        assert g.qmode == L.QM_REDIS and m.redis.up
        assert redis.command("ACL", "SETUSER", "default", "-incrby").startswith(b"+OK")
        try:
            await offer(g, 3.0, 400.0)  # 30 retries
            during = {"failures": m.redis.failures, "mode": g.qmode, "up": m.redis.up,
                      "errors": m.redis.errors, "last_error": m.redis.last_error,
                      "warnings": list(warnings.lines)}
        finally:
            assert redis.command("ACL", "SETUSER", "default", "+incrby").startswith(b"+OK")
        deadline = time.monotonic() + 10
        while g.qmode != L.QM_REDIS and time.monotonic() < deadline:
            await offer(g, 0.1, 400.0)
        back = g.qmode == L.QM_REDIS
        await m.close()
        return {"during": during, "back": back, "warnings": list(warnings.lines)}

    r = uvloop.run(main())
    during = r["during"]
    assert isinstance(during, dict)
    assert during["failures"] == 1, during
    assert not during["up"] and during["mode"] == L.QM_LOCAL, during
    assert "NOPERM" in str(during["last_error"]) or "permission" in str(during["last_error"])
    assert r["back"], r
    # one warning when lost, one when back
    assert len(r["warnings"]) == 2, r["warnings"]  # type: ignore[arg-type]


def test_redis_that_never_answers_under_load(redis: RedisServer, warnings: _Warnings) -> None:
    """CLIENT PAUSE: connections are accepted, no command is answered.  Under
    load the quota falls back within 2 * timeout_s (+ a loaded host's slack),
    keeps at most a few tasks and connections, and is back once Redis answers."""

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        m = Manager(loop, _Table(), redis.url, redis_timeout_s=0.1, redis_retry_s=0.05)
        m.on_build(svc(1_000_000.0), [])
        g = m.service_gov("q")
        await offer(g, 0.5, 2000.0)
        assert g.qmode == L.QM_REDIS
        tasks0, fds0 = len(asyncio.all_tasks()), fds()
        assert redis.command("CLIENT", "PAUSE", "4000", "ALL").startswith(b"+OK")
        t0 = time.monotonic()
        max_tasks = max_fds = 0
        fell_back = None
        counts = [0, 0]
        while time.monotonic() - t0 < 3.0:
            c = await offer(g, 0.05, 4000.0)
            counts = [counts[0] + c[0], counts[1] + c[1]]
            if fell_back is None and g.qmode != L.QM_REDIS:
                fell_back = time.monotonic() - t0
            max_tasks = max(max_tasks, len(asyncio.all_tasks()))
            max_fds = max(max_fds, fds())
        paused = {"fell_back": fell_back, "tasks0": tasks0, "max_tasks": max_tasks,
                  "fds0": fds0, "max_fds": max_fds, "errors": m.redis.errors,
                  "failures": m.redis.failures, "counts": counts}
        deadline = time.monotonic() + 10
        while g.qmode != L.QM_REDIS and time.monotonic() < deadline:
            await offer(g, 0.1, 2000.0)
        back = g.qmode == L.QM_REDIS
        await m.close()
        return {"paused": paused, "back": back, "fds": fds(),
                "warnings": list(warnings.lines)}

    r = uvloop.run(main())
    p = r["paused"]
    print(p)
    assert isinstance(p, dict)
    # the step's bound is 2 * timeout_s = 0.2 s; a loaded host adds to it
    assert p["fell_back"] is not None and p["fell_back"] < 1.5, p
    assert p["failures"] == 1, p
    # nothing piles up: the quota's step, the next window's step, the probe
    # and a client being closed
    assert p["max_tasks"] <= p["tasks0"] + 4, p
    assert p["max_fds"] <= p["fds0"] + 6, p
    assert r["back"], r
    assert len(r["warnings"]) == 2, r["warnings"]  # type: ignore[arg-type]


class JunkRedis:
    """A TCP server that reads and answers every read with `reply` (its own
    thread): protocol junk, or a well-formed error."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = free_port()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.conns = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.conns += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(0.5)
        with c:
            while not self.stop:
                try:
                    if not c.recv(65536):
                        return
                    c.sendall(self.reply)
                except TimeoutError:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("reply", [
    b"this is not RESP\r\n",
    b"$99999999999\r\n",  # a bulk string that never ends
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
])
def test_redis_answering_junk(reply: bytes, warnings: _Warnings) -> None:
    junk = JunkRedis(reply)

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        m = Manager(loop, _Table(), junk.url, redis_timeout_s=0.1, redis_retry_s=0.05)
        m.on_build(svc(100.0), [])
        g = m.service_gov("q")
        counts = await offer(g, 2.0, 400.0)
        st = {"mode": g.qmode, "up": m.redis.up, "failures": m.redis.failures,
              "errors": m.redis.errors, "counts": counts, "conns": junk.conns}
        await m.close()
        return st

    try:
        st = uvloop.run(main())
    finally:
        junk.close()
    print(st)
    assert st["mode"] == L.QM_LOCAL and not st["up"], st
    assert st["failures"] == 1, st
    # the local share (50/s, burst 50) for 2 s, and nothing allowed past it
    allowed = st["counts"][0]  # type: ignore[index]
    assert 50 <= allowed <= 160, st
    assert len(warnings.lines) == 1, warnings.lines
