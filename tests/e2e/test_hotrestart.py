"""Lossless hot restart with real processes, real signals and real SCM_RIGHTS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
import time

import pytest

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import Client

from harness import (
    Cluster,
    LoadThread,
    Proc,
    can_connect_uds,
    children_of,
    client_proxy_cfg,
    cluster,
    fd_count,
    free_port,
    server_proxy_cfg,
    wait_for,
)


def hr(c: Cluster, name: str, **kw: float) -> dict:
    return {
        "socket": c.path(f"{name}.hr"),
        "pid_file": c.path(f"{name}.pid"),
        "drain_s": kw.get("drain_s", 3.0),
        "shutdown_s": kw.get("shutdown_s", 10.0),
        "proxy_restart_spread_s": kw.get("spread_s", 0.2),
        "start_timeout_s": kw.get("start_timeout_s", 20.0),
    }


def restart(c: Cluster, name: str, timeout: float = 40.0) -> int:
    """SIGUSR2 the live generation; wait until a new one owns the pid file and
    the old one has exited.  Returns the new pid."""
    pidf = c.path(f"{name}.pid")
    old = read_pid(pidf)
    assert old and pid_alive(old)
    os.kill(old, signal.SIGUSR2)
    new = wait_for(
        lambda: (p := read_pid(pidf)) != old and p and pid_alive(p) and p,
        timeout,
        f"{name}: a new generation",
    )
    wait_for(lambda: not pid_alive(old), timeout, f"{name}: the old generation (pid {old}) to exit")
    return new


def kill_live(c: Cluster, *names: str) -> None:
    for n in names:
        pid = read_pid(c.path(f"{n}.pid"))
        if pid and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def chain():
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        scfg = server_proxy_cfg({port: c.path("p.sock")})
        scfg["hot_restart"] = hr(c, "server")
        c.proxy("server", scfg)
        ccfg = client_proxy_cfg(
            c.path("px.sock"),
            [
                {
                    "appkey": "com.demo.echo",
                    "service_names": ["com.demo.Echo"],
                    "endpoints": [{"address": f"127.0.0.1:{port}"}],
                }
            ],
            hot_restart=hr(c, "client"),
        )
        c.proxy("client", ccfg)
        c.ccfg = ccfg  # type: ignore[attr-defined]
        try:
            yield c
        finally:
            kill_live(c, "client", "server")


def dups(c: Cluster) -> tuple[int, int]:
    with Client(c.path("px.sock")) as cl:
        seen, dup = cl.call("com.demo.Echo", b"dups").body.split(b"|")[1].split()
    return int(seen), int(dup)


def check_exactly_once(load: LoadThread, c: Cluster) -> None:
    assert load.errors == [], load.errors[:10]
    assert load.ok == load.sent, (load.ok, load.sent)
    assert all(v == 1 for v in load.answers.values())
    assert len(load.answers) == load.sent
    seen, dup = dups(c)
    assert seen == load.sent and dup == 0, (seen, load.sent, dup)


def test_restarts_under_load_lose_nothing(chain: Cluster) -> None:
    c = chain
    load = LoadThread(c.path("px.sock"), clients=4, inflight=8).start()
    try:
        for _ in range(3):
            restart(c, "client")
            wait_for(lambda n=load.ok: load.ok > n + 200, 10, "traffic after a client restart")
        for _ in range(3):
            restart(c, "server")
            wait_for(lambda n=load.ok: load.ok > n + 200, 10, "traffic after a server restart")
        for _ in range(2):
            restart(c, "client")
            restart(c, "server")
            wait_for(lambda n=load.ok: load.ok > n + 200, 10, "traffic after both restarted")
    finally:
        load.stop()
    check_exactly_once(load, c)
    assert load.sent > 2000


def test_sockets_keep_address_and_mode_and_no_fd_leak(chain: Cluster) -> None:
    c = chain
    path = c.path("px.sock")
    ino = os.stat(path).st_ino
    with Client(path) as cl:
        assert cl.call("com.demo.Echo", b"echo:x").ok
    pid = read_pid(c.path("client.pid"))
    baseline = None
    for _ in range(4):
        pid = restart(c, "client")
        with Client(path) as cl:
            assert cl.call("com.demo.Echo", b"echo:x").ok
        # steady state: listeners, hot-restart socket, loop fds, one pool connection
        wait_for(lambda p=pid, b=baseline: fd_count(p) <= (b or 10**6), 5, "fds to settle")
        baseline = baseline or fd_count(pid)
    assert os.stat(path).st_ino == ino  # the same socket file, never re-bound
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert fd_count(pid) <= baseline


def test_failed_new_generation_leaves_old_serving(chain: Cluster) -> None:
    c = chain
    pidf = c.path("client.pid")
    old = read_pid(pidf)
    assert old
    cfg_path = c.path("client.yaml")
    with open(cfg_path) as f:
        good = f.read()
    load = LoadThread(c.path("px.sock"), clients=2, inflight=4).start()
    fds_before = fd_count(old)  # with the load's connections open
    try:
        # 1. the new generation finds a bad config and exits
        with open(cfg_path, "w") as f:
            f.write(good + "\nbogus_key: 1\n")
        os.kill(old, signal.SIGUSR2)
        proxy_log = c.procs[-1]
        wait_for(
            lambda: "before taking over; still serving" in proxy_log.log(),
            15,
            "the old generation to notice the failure",
        )
        with open(cfg_path, "w") as f:
            f.write(good)
        # 2. the new generation is killed before it is ready
        os.kill(old, signal.SIGUSR2)
        child = wait_for(lambda: children_of(old), 5, "the new generation to be spawned")[0]
        os.kill(child, signal.SIGKILL)
        wait_for(
            lambda: proxy_log.log().count("still serving") >= 2,
            15,
            "the old generation to notice the kill",
        )
        assert read_pid(pidf) == old and pid_alive(old)
        n = load.ok
        wait_for(lambda: load.ok > n + 200, 10, "traffic on the old generation")
        wait_for(lambda: fd_count(old) <= fds_before, 5, "the old generation's fds to settle")
        # 3. the next SIGUSR2 succeeds
        new = restart(c, "client")
        assert new != old
        n = load.ok
        wait_for(lambda: load.ok > n + 200, 10, "traffic on the new generation")
    finally:
        load.stop()
    check_exactly_once(load, c)


def test_sigusr2_during_drain_keeps_two_generations_at_most(chain: Cluster) -> None:
    c = chain
    pidf = c.path("client.pid")
    gen1 = read_pid(pidf)
    assert gen1
    seen_at_once = 0

    def live_generations() -> int:
        # proxy processes of this config; a fork that has not exec'd yet (same
        # command line as its parent) is not a generation
        procs = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        cmd = f.read()
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    if c.path("client.yaml").encode() in cmd and pid_alive(int(d)):
                        procs[int(d)] = (cmd, ppid)
        gens = [p for p, (cmd, ppid) in procs.items() if procs.get(ppid, (None,))[0] != cmd]
        if len(gens) > 2:
            print("live:", {p: (c[-60:], pp) for p, (c, pp) in procs.items()})
        return len(gens)

    # a slow request keeps generation 1 draining for ~1.5 s
    cl = Client(c.path("px.sock"))
    cl._ensure().sendall(
        __import__("octoproxy._core.frame", fromlist=["x"]).encode_request(
            1, "com.demo.Echo", b"sleep:1500:slow"
        )
    )
    with Client(c.path("px.sock")) as probe:  # until the provider has the slow call
        wait_for(lambda: probe.call("com.demo.Echo", b"started").body == b"p|1", 10,
                 "the slow call to reach the provider")
    os.kill(gen1, signal.SIGUSR2)
    gen2 = wait_for(lambda: (p := read_pid(pidf)) != gen1 and p, 15, "generation 2")
    assert pid_alive(gen1), "generation 1 should still be draining"
    os.kill(gen2, signal.SIGUSR2)  # during generation 1's drain: deferred
    os.kill(gen1, signal.SIGUSR2)  # to the draining one: ignored
    deadline = time.monotonic() + 45
    gen3 = None
    while time.monotonic() < deadline:
        seen_at_once = max(seen_at_once, live_generations())
        p = read_pid(pidf)
        if p not in (gen1, gen2) and p and not pid_alive(gen2):
            gen3 = p
            break
        time.sleep(0.02)
    assert gen3, ("the deferred restart did not happen: pid file "
                  f"{read_pid(pidf)}, gen1 {gen1} alive={pid_alive(gen1)}, gen2 {gen2} "
                  f"alive={pid_alive(gen2)}\n" + c.procs[-1].log()[-4000:])
    assert seen_at_once <= 2
    assert not pid_alive(gen1)
    with Client(c.path("px.sock")) as cl2:
        assert cl2.call("com.demo.Echo", b"echo:3").ok
    cl.close()


def test_operator_takeover_with_hot_restart_from(chain: Cluster) -> None:
    c = chain
    old = read_pid(c.path("client.pid"))
    load = LoadThread(c.path("px.sock"), clients=2, inflight=4).start()
    try:
        p = Proc(
            [
                sys.executable,
                "-m",
                "octoproxy",
                "run",
                "-c",
                c.path("client.yaml"),
                "--hot-restart-from",
                c.path("client.hr"),
            ],
            "operator",
            c.dir,
        )
        c.procs.append(p)
        wait_for(lambda: read_pid(c.path("client.pid")) == p.pid, 15, "the operator's process")
        wait_for(lambda: not pid_alive(old), 15, "the old generation to exit")
        n = load.ok
        wait_for(lambda: load.ok > n + 200, 10, "traffic on the operator's process")
    finally:
        load.stop()
    check_exactly_once(load, c)


def test_takeover_without_old_generation_starts_fresh() -> None:
    with cluster() as c:
        cfg = client_proxy_cfg(c.path("px.sock"), [], hot_restart=hr(c, "client"))
        p = c.proxy("client", cfg, extra_args=["--hot-restart-from", c.path("gone.hr")])
        assert p.alive() and can_connect_uds(c.path("px.sock"))
        assert "starting fresh" in p.log()


def test_handshake_version_mismatch_refused_on_both_sides(chain: Cluster) -> None:
    c = chain
    # a "new generation" that speaks another version
    s = socket.socket(socket.AF_UNIX)
    s.connect(c.path("client.hr"))
    s.sendall(json.dumps({"magic": "octo-proxy-hot-restart", "version": 99}).encode() + b"\n")
    s.settimeout(5)
    msg = json.loads(s.recv(4096).split(b"\n")[0])
    assert msg["ok"] is False and "version mismatch" in msg["error"]
    s.close()
    # an "old generation" that refuses: the new process exits with the reason
    fake = socket.socket(socket.AF_UNIX)
    fake.bind(c.path("fake.hr"))
    fake.listen(1)
    cfg = client_proxy_cfg(c.path("px2.sock"), [], hot_restart=hr(c, "other"))
    p = c.proxy("newgen", cfg, wait=False, extra_args=["--hot-restart-from", c.path("fake.hr")])
    conn, _ = fake.accept()
    conn.recv(4096)
    conn.sendall(b'{"ok": false, "error": "handshake version mismatch: test"}\n')
    wait_for(lambda: not p.alive(), 10, "the refused process to exit")
    assert p.p.returncode != 0 and "handshake version mismatch" in p.log()
    conn.close()
    fake.close()
    with Client(c.path("px.sock")) as cl:
        assert cl.call("com.demo.Echo", b"echo:still").ok


def test_pid_file_and_systemd_notifications_follow_the_live_process(chain: Cluster) -> None:
    with cluster() as c:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(c.path("notify"))
            notify.settimeout(10)
            os.environ["NOTIFY_SOCKET"] = c.path("notify")
            try:
                cfg = client_proxy_cfg(c.path("px.sock"), [], hot_restart=hr(c, "client"))
                p = c.proxy("client", cfg)
            finally:
                del os.environ["NOTIFY_SOCKET"]
            msgs = [notify.recv(4096).decode()]
            assert f"MAINPID={p.pid}" in msgs[0] and "READY=1" in msgs[0]
            assert read_pid(c.path("client.pid")) == p.pid
            new = restart(c, "client")
            msgs = [notify.recv(4096).decode() for _ in range(2)]
            assert any("RELOADING=1" in m for m in msgs)
            assert any(f"MAINPID={new}" in m and "READY=1" in m for m in msgs)
            os.kill(new, signal.SIGTERM)
            wait_for(lambda: not pid_alive(new), 10, "stop")
            assert not os.path.exists(c.path("client.pid"))


def test_sigusr2_to_a_generation_still_starting_is_honoured_once_it_serves(chain: Cluster) -> None:
    # a service manager may reload as soon as it sees a new pid: a generation
    # that gets SIGUSR2 before it serves must not die of it (the signal's
    # default action), and the restart it asks for happens once it serves
    c = chain
    pidf = c.path("client.pid")
    gen1 = read_pid(pidf)
    assert gen1
    os.kill(gen1, signal.SIGUSR2)
    gen2 = wait_for(lambda: children_of(gen1), 10, "generation 2 to be spawned")[0]
    os.kill(gen2, signal.SIGUSR2)  # while it is still importing and starting
    wait_for(lambda: read_pid(pidf) == gen2, 40, "generation 2 to serve")
    gen3 = wait_for(lambda: (p := read_pid(pidf)) not in (gen1, gen2) and p and pid_alive(p) and p,
                    40, "the restart generation 2 was asked for while starting")
    wait_for(lambda: not pid_alive(gen2), 40, "generation 2 to exit")
    wait_for(lambda: not pid_alive(gen1), 40, "generation 1 to exit")
    with Client(c.path("px.sock")) as cl:
        assert cl.call("com.demo.Echo", b"echo:ok").ok
    assert pid_alive(gen3)
