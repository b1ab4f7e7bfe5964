"""octo-proxy-init on the host (as a child subreaper instead of PID 1): it
follows the proxy across in-place hot restarts, reaps every generation,
exits with the last one; --slot decides serve / take over / standby.  The
same in real containers: tests/container."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from octoproxy.sdk import Client

from harness import can_connect_uds, children_of, client_proxy_cfg, cluster, env, wait_for


def start_init(c, name: str, cfg_path: str, *pre: str, image: str = "img-1") -> subprocess.Popen:
    e = env()
    e["OCTO_PROXY_IMAGE_ID"] = image
    with open(c.path(f"{name}.log"), "ab") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "octoproxy.containerinit", *pre, "--",
                                 sys.executable, "-m", "octoproxy", "run", "-c", cfg_path],
                                env=e, stdout=log, stderr=subprocess.STDOUT)


def log_of(c, name: str) -> str:
    with open(c.path(f"{name}.log"), errors="replace") as f:
        return f.read()


def proxy_cfg(c) -> dict:
    cfg = client_proxy_cfg(c.path("px.sock"), [{"appkey": "a", "endpoints": [
        {"address": "127.0.0.1:1"}]}])
    cfg["hot_restart"] = {"socket": c.path("restart.sock"), "drain_s": 1.0, "shutdown_s": 5.0}
    return cfg


def only_child(pid: int) -> int | None:
    kids = children_of(pid)
    return kids[0] if len(kids) == 1 else None


def test_init_follows_generations_and_exits_with_the_last() -> None:
    with cluster() as c:
        init = start_init(c, "init", c.write_config("p", proxy_cfg(c)),
                          "--hot-restart-socket", c.path("restart.sock"))
        try:
            wait_for(lambda: can_connect_uds(c.path("px.sock")), 20, "the proxy")
            gen = wait_for(lambda: only_child(init.pid), 10, "the first generation")
            for n in (2, 3):
                init.send_signal(signal.SIGUSR2)  # forwarded to the proxy's process group
                new = wait_for(lambda g=gen: (k := only_child(init.pid)) and k != g and k, 30,
                               f"generation {n} to be the init's only child")
                # the old generation exited and was reaped (no zombie left behind)
                assert not os.path.exists(f"/proc/{gen}"), f"generation {n - 1} not reaped"
                gen = new
                with Client(c.path("px.sock")) as cl:
                    assert cl.call("m", b"x", appkey="a", raise_on_error=False).status == 4  # answered (no route up)
            assert init.poll() is None
            init.send_signal(signal.SIGTERM)
            assert init.wait(20) == 0, log_of(c, "init")
            assert not os.path.exists(c.path("px.sock"))
        finally:
            if init.poll() is None:
                init.kill()
                init.wait()


def test_slots_serve_stand_by_and_take_over_when_their_image_changes() -> None:
    with cluster() as c:
        cfg = c.write_config("p", proxy_cfg(c))
        slot = ("--hot-restart-socket", c.path("restart.sock"))
        procs = []
        try:
            a = start_init(c, "a", cfg, "--slot", "a", *slot, image="v1")
            procs.append(a)
            wait_for(lambda: "serving (pid" in log_of(c, "a"), 20, "slot a to serve")
            assert "no proxy serves: starting one" in log_of(c, "a")
            b = start_init(c, "b", cfg, "--slot", "b", *slot, image="v1")
            procs.append(b)
            wait_for(lambda: "standby" in log_of(c, "b"), 20, "slot b on standby")
            assert children_of(b.pid) == []  # standby runs nothing
            b.send_signal(signal.SIGTERM)
            assert b.wait(10) == 0
            # slot b gets another image: it takes over, a's proxy drains and a exits
            b = start_init(c, "b2", cfg, "--slot", "b", *slot, image="v2")
            procs.append(b)
            assert a.wait(30) == 0, log_of(c, "a")
            assert "taking over" in log_of(c, "b2") and b.poll() is None
            with Client(c.path("px.sock")) as cl:
                assert cl.call("m", b"x", appkey="a", raise_on_error=False).status == 4
            # a restarted with its old image: standby, not a second take-over
            a = start_init(c, "a2", cfg, "--slot", "a", *slot, image="v1")
            procs.append(a)
            wait_for(lambda: "standby" in log_of(c, "a2"), 20, "slot a on standby")
            assert b.poll() is None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(15)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
