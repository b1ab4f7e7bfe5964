"""Hot restart attacked by another local user and by a careless operator
(docs/protocol.md section 13): real processes, a real second uid (`nobody`,
via setuid in the attacker's subprocess; the tests run as root), real signals.

Each test prints a FIGURE line (pytest -s) with what the attack achieved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import Client

from harness import (
    Cluster,
    LoadThread,
    can_connect_tcp,
    children_of,
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    wait_for,
)

NOBODY = 65534
# the attacker's interpreter must be one another user can run (not under /root)
ATTACKER_PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or ATTACKER_PY is None,
                                reason="runs the attacker as another user: needs root and "
                                       "a system python3")


def figure(name: str, **values: Any) -> None:
    print(f"FIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    """The attacker: a Python process running as uid/gid nobody."""
    assert ATTACKER_PY is not None
    return subprocess.Popen([ATTACKER_PY, "-I", "-c", code, *args], user=NOBODY, group=NOBODY,
                            extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 30.0) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.communicate()


@contextlib.contextmanager
def shared_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A cluster whose directory other users may traverse (not list), with a
    world-writable sticky `shared/` inside (like /tmp) and a runtime
    directory of its own (XDG_RUNTIME_DIR), so nothing lands in /run."""
    with cluster() as c:
        os.chmod(c.dir, 0o711)
        os.mkdir(c.path("shared"))
        os.chmod(c.path("shared"), 0o1777)
        os.mkdir(c.path("xdg"))
        os.chmod(c.path("xdg"), 0o711)
        monkeypatch.setenv("XDG_RUNTIME_DIR", c.path("xdg"))
        yield c


def hr_cfg(c: Cluster, name: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"pid_file": c.path(f"{name}.pid"), "drain_s": 2.0,
                           "shutdown_s": 6.0, "proxy_restart_spread_s": 0.1,
                           "start_timeout_s": 20.0}
    cfg.update(extra)
    return cfg


def default_hr_path(cfg: dict[str, Any]) -> str:
    """Where the code under test puts its hot-restart socket by default."""
    from octoproxy.config import parse_config
    from octoproxy.server import hot_restart_path

    return hot_restart_path(parse_config(cfg))


def restart(c: Cluster, name: str, timeout: float = 40.0) -> int:
    pidf = c.path(f"{name}.pid")
    old = read_pid(pidf)
    assert old and pid_alive(old)
    os.kill(old, signal.SIGUSR2)
    new = wait_for(lambda: (p := read_pid(pidf)) != old and p and pid_alive(p) and p, timeout,
                   f"{name}: a new generation")
    wait_for(lambda: not pid_alive(old), timeout, f"{name}: the old generation to exit")
    return int(new)


BIND = r"""
import os, socket, sys, time, json
path, seconds = sys.argv[1], float(sys.argv[2])
stop = sys.argv[4] if len(sys.argv) > 4 else None
won, tries, err = 0, 0, ""
held = []
end = time.monotonic() + seconds
while tries == 0 or (time.monotonic() < end and not (stop and os.path.exists(stop))):
    s = socket.socket(socket.AF_UNIX)
    tries += 1
    try:
        s.bind(path)
        s.listen(1)
        held.append(s)
        won += 1
    except OSError as e:
        err = e.strerror
        s.close()
print(json.dumps({"won": won, "tries": tries, "error": err}))
sys.stdout.flush()
if won:
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


def test_prebound_default_socket_path_cannot_keep_the_proxy_from_starting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with shared_cluster(monkeypatch) as c:
        c.providers(p="p.sock")
        cfg = server_proxy_cfg({free_port(): c.path("p.sock")})
        cfg["hot_restart"] = hr_cfg(c, "server")
        path = default_hr_path(cfg)
        attacker = as_nobody(BIND, path, "0", "60")
        result = json.loads(attacker.stdout.readline() if attacker.stdout else "{}")
        try:
            p = c.proxy("server", cfg, wait=False)
            started = True
            try:
                c.wait_ready(p, cfg)
            except (AssertionError, TimeoutError):
                started = False
            figure("prebound", path=path, attacker_bound=result.get("won"),
                   attacker_error=result.get("error"), proxy_started=started)
            assert result["won"] == 0, f"another user could bind {path}"
            assert started, p.log()
            d = os.path.dirname(path)
            assert os.stat(d).st_uid == 0 and os.stat(d).st_mode & 0o077 == 0
            restart(c, "server")  # and the socket is ours: hot restart works
        finally:
            attacker.kill()
            finish(attacker)
            with contextlib.suppress(OSError):
                if path.startswith("/tmp/"):
                    os.unlink(path)


def test_rebinding_race_during_restarts_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # the attacker spins on bind() at the server-side proxy's hot-restart
    # socket path while it restarts under load
    with shared_cluster(monkeypatch) as c:
        c.providers(p="p.sock")
        port = free_port()
        scfg = server_proxy_cfg({port: c.path("p.sock")})
        scfg["hot_restart"] = hr_cfg(c, "server")
        path = default_hr_path(scfg)
        c.proxy("server", scfg)
        c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [{"appkey": "a", "service_names": ["com.demo.Echo"],
                                 "endpoints": [{"address": f"127.0.0.1:{port}"}]}]))
        load = LoadThread(c.path("px.sock"), clients=2, inflight=4).start()
        attacker = as_nobody(BIND, path, "120", "0", c.path("stop"))
        done = 0
        try:
            for _ in range(3):
                try:
                    restart(c, "server", timeout=20)
                    done += 1
                except TimeoutError:
                    break
                wait_for(lambda n=load.ok: load.ok > n + 100 or not can_connect_tcp(port), 10,
                         "traffic after the restart")
        finally:
            Path(c.path("stop")).touch()
            out, err = finish(attacker)
            load.stop()
            with contextlib.suppress(OSError):
                if path.startswith("/tmp/"):
                    os.unlink(path)
        assert out.strip(), err
        result = json.loads(out.splitlines()[0])
        figure("rebind-race", restarts_completed=f"{done}/3", attacker_binds=result.get("won"),
               attacker_tries=result.get("tries"), requests_failed=len(load.errors),
               requests_ok=load.ok, port_serving=can_connect_tcp(port))
        assert result.get("won") == 0
        assert done == 3 and load.errors == [], load.errors[:5]


FAKE_PARENT = r"""
import json, os, socket, sys, time
path, evil_port = sys.argv[1], int(sys.argv[2])
evil = socket.socket(); evil.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
evil.bind(("127.0.0.1", evil_port)); evil.listen(16); evil.settimeout(0.2)
srv = socket.socket(socket.AF_UNIX); srv.bind(path); os.chmod(path, 0o777); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept(); conn.settimeout(20)
f = conn.makefile("rwb")
line = b""
try:
    if f.readline():  # the new generation's hello (it closes at once if it checks us)
        state = {"services": [{"appkey": "com.pay.billing", "service_names": ["com.pay.Billing"],
                               "endpoints": [{"host": "127.0.0.1", "port": evil_port}]}]}
        f.write(json.dumps({"ok": True, "version": 1, "pid": os.getpid(), "generation": 7,
                            "listeners": [], "state": state}).encode() + b"\n"); f.flush()
        line = f.readline()  # "ready"
        if line:
            f.write(b'{"released": true}\n'); f.flush()
except OSError:
    pass
got, stolen = 0, 0
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        c, _ = evil.accept()
    except OSError:
        continue
    got += 1
    c.settimeout(2)
    try:
        stolen += len(c.recv(65536))
    except OSError:
        pass
print(json.dumps({"handshake": bool(line), "connections": got, "bytes": stolen}), flush=True)
"""


def test_impersonated_old_generation_is_refused_by_the_new_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # an operator starts a proxy with --hot-restart-from a path another user
    # controls: it must not take that user's "state" (routes to the attacker)
    with shared_cluster(monkeypatch) as c:
        fake = c.path("shared/old.hr")
        evil_port = free_port()
        attacker = as_nobody(FAKE_PARENT, fake, str(evil_port), "8")
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "listening", finish(attacker)
        cfg = client_proxy_cfg(c.path("px.sock"), [], hot_restart=hr_cfg(c, "client"))
        p = c.proxy("client", cfg, wait=False, extra_args=["--hot-restart-from", fake])
        answered_by = "nobody"
        try:
            wait_for(lambda: not p.alive() or read_pid(c.path("client.pid")) == p.pid, 20,
                     "the proxy to serve or exit")
            if p.alive() and read_pid(c.path("client.pid")) == p.pid:
                with Client(c.path("px.sock"), default_timeout_ms=3000) as cl:
                    r = cl.call("com.pay.Billing", b"card=4111", raise_on_error=False)
                    answered_by = f"status {r.status}"
            else:
                wait_for(lambda: not p.alive(), 20, "the refused proxy to exit")
        except (OSError, TimeoutError) as e:
            answered_by = f"{type(e).__name__}"
        out, err = finish(attacker)
        assert out.strip(), err
        result = json.loads(out.strip().splitlines()[-1])
        figure("impersonated-old-generation", proxy_took_state=result["handshake"],
               connections_to_attacker=result["connections"],
               request_bytes_to_attacker=result["bytes"], app_call=answered_by,
               proxy_exit=p.p.returncode)
        assert result["connections"] == 0 and result["bytes"] == 0
        assert not p.alive() and p.p.returncode != 0
        assert f"running as uid {NOBODY}" in p.log()


FAKE_CHILD = r"""
import array, json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connected": False, "error": e.strerror, "fds": 0})); sys.exit()
fds = array.array("i")
try:
    s.sendall(json.dumps({"magic": "octo-proxy-hot-restart", "version": 1, "pid": 1}).encode()
              + b"\n")
    msg, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
except OSError:
    msg, anc = b"", []
for level, kind, data in anc:
    fds.frombytes(data[: len(data) - len(data) % 4])
print(json.dumps({"connected": True, "answer": msg[:200].decode("utf-8", "replace"),
                  "fds": len(fds)}))
"""


def test_impersonated_new_generation_gets_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    # even if the socket file's mode lets another user connect (an operator's
    # chmod), the live generation hands nothing to a process of another uid
    with shared_cluster(monkeypatch) as c:
        os.mkdir(c.path("hr"))
        os.chmod(c.path("hr"), 0o755)
        hr = c.path("hr/client.hr")
        cfg = client_proxy_cfg(c.path("px.sock"), [], hot_restart=hr_cfg(c, "client", socket=hr))
        p = c.proxy("client", cfg)
        os.chmod(hr, 0o666)
        out, err = finish(as_nobody(FAKE_CHILD, hr))
        assert out.strip(), err
        result = json.loads(out)
        figure("impersonated-new-generation", fds_received=result["fds"],
               answer=result.get("answer", result.get("error")))
        assert result["fds"] == 0
        wait_for(lambda: f"running as uid {NOBODY}" in p.log(), 10, "the refusal log line")
        restart(c, "client")  # the real successor still gets them


def test_symlinked_pid_temp_file_and_pid_file_are_never_followed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with shared_cluster(monkeypatch) as c:
        victim, victim2 = c.path("victim"), c.path("victim2")
        for v in (victim, victim2):
            Path(v).write_text("precious\n")
        pidf = c.path("shared/client.pid")
        os.symlink(victim2, pidf)
        cfg = client_proxy_cfg(c.path("px.sock"), [], hot_restart=hr_cfg(c, "client"))
        cfg["hot_restart"]["pid_file"] = pidf
        cfg_path = c.write_config("client", cfg)
        from harness import Proc

        p = Proc([sys.executable, "-m", "octoproxy", "run", "-c", cfg_path], "client", c.dir)
        c.procs.append(p)
        # the temporary name the pid file used to be written through
        os.symlink(victim, f"{pidf}.{p.pid}.tmp")
        wait_for(lambda: read_pid(pidf) == p.pid or not p.alive(), 20, "the pid file")
        figure("symlinked-pid-file", victim=Path(victim).read_text().strip(),
               victim2=Path(victim2).read_text().strip(),
               pid_file_is_symlink=os.path.islink(pidf))
        assert Path(victim).read_text() == "precious\n"
        assert Path(victim2).read_text() == "precious\n"
        assert not os.path.islink(pidf) and read_pid(pidf) == p.pid


def test_symlinked_subscription_state_file_is_never_followed(tmp_path: Path) -> None:
    # the other state file a proxy writes (subscriptions, handed across
    # restarts): a symlink planted at its path is replaced, never written through
    from octoproxy.subscribe import read_state, write_state

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "client.subscriptions.json"
    os.symlink(victim, state)
    write_state(state, ["com.demo.Echo"])
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(state) and read_state(state) == ["com.demo.Echo"]


def _chain(c: Cluster, admin_uds: str | None = None, **client_hr: Any) -> dict[str, Any]:
    c.providers(p="p.sock")
    port = free_port()
    scfg = server_proxy_cfg({port: c.path("p.sock")})
    scfg["hot_restart"] = hr_cfg(c, "server", socket=c.path("server.hr"))
    c.proxy("server", scfg)
    ccfg = client_proxy_cfg(c.path("px.sock"), [
        {"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
         "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
        hot_restart=hr_cfg(c, "client", socket=c.path("client.hr"), **client_hr))
    if admin_uds:
        ccfg["admin"] = {"uds": admin_uds}
    c.proxy("client", ccfg)
    return ccfg


@pytest.mark.parametrize("key", ["socket", "pid_file"])
def test_new_generation_with_a_path_in_a_missing_directory_leaves_the_old_one_serving(
        monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    with shared_cluster(monkeypatch) as c:
        ccfg = _chain(c)
        old = read_pid(c.path("client.pid"))
        assert old
        bad = json.loads(json.dumps(ccfg))
        bad["hot_restart"][key] = c.path(f"missing/dir/client.{key}")
        bad_path = c.write_config("bad", bad)
        r = subprocess.run([sys.executable, "-m", "octoproxy", "validate", "-c", bad_path],
                           capture_output=True, text=True, timeout=60)
        validate_caught = r.returncode != 0 and "does not exist" in r.stderr
        load = LoadThread(c.path("px.sock"), clients=2, inflight=4).start()
        try:
            c.write_config("client", bad)
            os.kill(old, signal.SIGUSR2)
            log = c.procs[-1]
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: "still serving" in log.log() or not pid_alive(old), 30,
                         "the new generation to fail")
            with contextlib.suppress(TimeoutError):  # a few hundred more requests, if served
                wait_for(lambda n=load.ok: load.ok > n + 300, 10, "traffic")
        finally:
            load.stop()
        serving = can_connect_uds_ok(c.path("px.sock"))
        figure(f"bad-{key}-dir", old_alive=pid_alive(old), serving=serving,
               requests_failed=len(load.errors), requests_ok=load.ok,
               validate_caught=validate_caught)
        assert validate_caught, r.stderr
        assert pid_alive(old) and read_pid(c.path("client.pid")) == old
        assert serving and load.errors == [], load.errors[:5]
        c.write_config("client", ccfg)
        restart(c, "client")


def can_connect_uds_ok(path: str) -> bool:
    try:
        with Client(path, default_timeout_ms=3000) as cl:
            return cl.call("com.demo.Echo", b"echo:x", raise_on_error=False).ok
    except OSError:
        return False


def test_new_generation_hanging_before_it_connects_is_killed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with shared_cluster(monkeypatch) as c:
        ccfg = _chain(c, start_timeout_s=3.0)
        old = read_pid(c.path("client.pid"))
        assert old
        cfg_path = c.path("client.yaml")
        os.unlink(cfg_path)
        os.mkfifo(cfg_path)  # the next generation blocks reading its config
        os.kill(old, signal.SIGUSR2)
        child = wait_for(lambda: children_of(old), 10, "the new generation")[0]
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not pid_alive(child), 20, "the hung generation to be killed")
        killed_after = time.monotonic() - t0
        hung_alive = pid_alive(child)
        os.unlink(cfg_path)
        with open(cfg_path, "w") as f:
            yaml.safe_dump(ccfg, f)
        second = "ok"
        try:
            restart(c, "client", timeout=30)
        except (TimeoutError, AssertionError) as e:
            second = f"failed: {e}"
        figure("hanging-new-generation", hung_child_alive_after_s=f"{killed_after:.1f}",
               still_alive=hung_alive, next_sigusr2=second)
        if hung_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        assert not hung_alive
        assert "has not started within" in c.procs[-1].log()
        assert second == "ok"


# the hand-over state docs/protocol.md 13.3 lists (server.Proxy.handover_state)
HANDED_OVER = {"counters", "histogram", "nodes", "subscriptions", "registered", "services",
               "governance", "shunting", "shunt_counts"}


def _read_line(s: socket.socket, fds: list[int]) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        data, got, _, _ = socket.recv_fds(s, 1 << 20, 64)
        assert data, "the live generation closed the connection"
        fds.extend(got)
        buf += data
    return dict(json.loads(buf.split(b"\n", 1)[0]))


def _admin_ready(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(4096).split(b"\r\n", 1)[0]
    except OSError:
        return False


def test_new_generation_dying_after_the_release_hands_the_listeners_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a "new generation" (this test, same uid) takes the sockets, says ready,
    # is released, and dies before it says serving
    with shared_cluster(monkeypatch) as c:
        _chain(c, admin_uds=c.path("admin.sock"))
        old = read_pid(c.path("client.pid"))
        assert old and _admin_ready(c.path("admin.sock"))
        load = LoadThread(c.path("px.sock"), clients=2, inflight=4).start()
        fds: list[int] = []
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(20)
                s.connect(c.path("client.hr"))
                s.sendall(b'{"magic": "octo-proxy-hot-restart", "version": 1, "pid": 1}\n')
                offer = _read_line(s, fds)
                assert offer["ok"] is True
                # secrets never travel to the next generation: a new key here
                # must be checked for that before it is added to this list
                assert set(offer["state"]) <= HANDED_OVER, set(offer["state"]) - HANDED_OVER
                s.sendall(b'{"ready": true}\n')
                assert _read_line(s, fds).get("released") is True
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: "took the listeners back" in c.procs[-1].log()
                         or not pid_alive(old), 30, "the old generation to react")
            app_ok = can_connect_uds_ok(c.path("px.sock"))
            admin_ok = _admin_ready(c.path("admin.sock"))
            with contextlib.suppress(TimeoutError):
                wait_for(lambda n=load.ok: load.ok > n + 300, 10, "traffic")
        finally:
            load.stop()
        figure("dies-after-release", old_alive=pid_alive(old), new_app_connections=app_ok,
               admin=admin_ok, requests_failed=len(load.errors), requests_ok=load.ok)
        assert pid_alive(old) and read_pid(c.path("client.pid")) == old
        assert app_ok and admin_ok
        assert load.errors == [], load.errors[:5]
        restart(c, "client")  # a real successor still takes over
