"""Real processes for end-to-end tests: proxies and provider apps.

Everything waits on conditions with timeouts, never on fixed sleeps.
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
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from octoproxy.ports import can_connect_tcp, can_connect_uds
from octoproxy.ports import free_tcp_port as free_port
from octoproxy.process import pids_mentioning
from octoproxy.process import read_pid_file as read_pid

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_APP = Path(__file__).with_name("provider_app.py")


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(ROOT / "src")
    e["PYTHONPATH"] = src + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def short_tmpdir() -> str:
    # UDS paths are limited to 107 bytes: keep them short
    return tempfile.mkdtemp(prefix="op", dir="/tmp")


class Proc:
    def __init__(self, args: list[str], name: str, logdir: str) -> None:
        self.name = name
        self.target = ""  # a server's address, where it has one (Cluster.control_plane)
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(args, env=env(), stdout=self._log, stderr=subprocess.STDOUT,
                                  cwd=str(ROOT))

    @property
    def pid(self) -> int:
        return self.p.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self._log.close()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


class Cluster:
    """Provider apps, server-side proxies and client-side proxies in one temp dir."""

    def __init__(self) -> None:
        self.dir = short_tmpdir()
        self.procs: list[Proc] = []

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def providers(self, **named_uds: str) -> Proc:
        specs = [f"{n}={self.path(u)}" for n, u in named_uds.items()]
        p = Proc([sys.executable, str(PROVIDER_APP), *specs], f"prov{len(self.procs)}", self.dir)
        self.procs.append(p)
        for u in named_uds.values():
            wait_for(lambda u=u: can_connect_uds(self.path(u)) or not p.alive(), 15,
                     f"provider socket {u}")
        assert p.alive(), p.log()
        return p

    def provider_nodes(self, names: Iterable[str], **node: str) -> dict[str, int]:
        """Provider nodes (one provider app, node n on n.sock) behind a
        server-side proxy "server" with one inbound listener per node;
        returns node -> its listener's port."""
        names = list(names)
        self.providers(**{n: f"{n}.sock" for n in names})
        ports = {n: free_port() for n in names}
        self.proxy("server", server_proxy_cfg({ports[n]: self.path(f"{n}.sock") for n in names},
                                              **node))
        return ports

    def write_endpoints(self, data: dict[str, Any], name: str = "endpoints.yaml") -> str:
        """The control plane's file, replaced in one rename (it polls it)."""
        path = self.path(name)
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(data, f)
        os.replace(path + ".tmp", path)
        return path

    def control_plane(self, endpoints: str, *args: str, port: int = 0,
                      timeout: float = 20.0) -> Proc:
        """The bundled control plane serving the file `endpoints` (extra
        arguments: --tokens ...) on 127.0.0.1:port (a free one by default),
        once it listens; its address is proc.target."""
        port = port or free_port()
        p = Proc([sys.executable, "-m", "octoproxy", "control-plane", "--endpoints", endpoints,
                  *args, "--listen", f"127.0.0.1:{port}"], "cp", self.dir)
        self.procs.append(p)
        wait_for(lambda: "listening on" in p.log() or not p.alive(), timeout, "the control plane")
        assert p.alive(), p.log()
        p.target = f"127.0.0.1:{port}"
        return p

    def write_config(self, name: str, cfg: dict[str, Any]) -> str:
        path = self.path(f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    def proxy(self, name: str, cfg: dict[str, Any], *, wait: bool = True,
              extra_args: list[str] | None = None) -> Proc:
        cfg_path = self.write_config(name, cfg)
        p = Proc([sys.executable, "-m", "octoproxy", "run", "-c", cfg_path, *(extra_args or [])],
                 name, self.dir)
        self.procs.append(p)
        if wait:
            self.wait_ready(p, cfg)
        return p

    def wait_ready(self, p: Proc, cfg: dict[str, Any], timeout: float = 15.0) -> None:
        lst = cfg.get("listeners", {})
        for ob in lst.get("outbound", []):
            wait_for(lambda ob=ob: can_connect_uds(ob["path"]) or not p.alive(), timeout,
                     f"{p.name} outbound {ob['path']}")
        for ib in lst.get("inbound", []):
            wait_for(lambda ib=ib: can_connect_tcp(ib["port"]) or not p.alive(), timeout,
                     f"{p.name} inbound :{ib['port']}")
        pid_file = cfg.get("hot_restart", {}).get("pid_file")
        if pid_file:
            wait_for(lambda: read_pid(pid_file) == p.pid or not p.alive(), timeout,
                     f"{p.name} pid file")
        assert p.alive(), f"{p.name} died:\n{p.log()}"

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(5)
        # generations started by SIGUSR2 are not our children: find them by their config path
        for pid in pids_mentioning(self.dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A Cluster that is stopped and whose temp dir is removed on the way out
    (the benches use Cluster itself and keep the dir on request)."""
    c = Cluster()
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(c.dir, ignore_errors=True)


def server_proxy_cfg(ports_to_uds: dict[int, str], **node: str) -> dict[str, Any]:
    return {
        "node": {"id": "server", **node},
        "listeners": {"inbound": [{"host": "127.0.0.1", "port": port, "upstream_uds": uds}
                                  for port, uds in ports_to_uds.items()]},
    }


def client_proxy_cfg(uds: str, services: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    node = extra.pop("node", {})
    cfg: dict[str, Any] = {
        "node": {"id": "client", **node},
        "listeners": {"outbound": [{"path": uds}]},
        "static": {"services": services},
    }
    cfg.update(extra)
    return cfg


def xds_client_cfg(uds: str, server: str, sub_port: int, **extra: Any) -> dict[str, Any]:
    """A client-side proxy "client" that learns its routes over xDS from
    `server` once the app subscribes on sub_port; extra: more top-level
    sections ("xds" and "subscribe" are merged)."""
    cfg: dict[str, Any] = {
        "node": {"id": "client"},
        "listeners": {"outbound": [{"path": uds}]},
        "xds": {"server": server, **extra.pop("xds", {})},
        "subscribe": {"port": sub_port, **extra.pop("subscribe", {})},
    }
    cfg.update(extra)
    return cfg


def write_token_file(c: Cluster, tokens: dict[str, str], name: str = "tokens.json") -> str:
    """A static token file (docs/auth.md) in c's dir, created with mode 0600
    as the proxy demands (it refuses a file others can read); its path."""
    path = c.path(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    return path


class AuthMesh(NamedTuple):
    token_file: str
    port: int                   # the server-side proxy's inbound port
    server: Proc
    client: Proc | None


def auth_mesh(c: Cluster, tokens: dict[str, str], provider: str, allow: list[str],
              outbound: list[dict[str, Any]] | None, *, server: dict[str, Any] | None = None,
              client: dict[str, Any] | None = None) -> AuthMesh:
    """Service authentication's usual setup (docs/auth.md), started: a token
    file holding `tokens`, the echo provider on echo.sock, a server-side
    proxy "server" whose inbound listener for `provider` enforces an ACL
    allowing the callers in `allow`, and (unless outbound is None) a
    client-side proxy "client" with the `outbound` listeners (sign_for /
    sign_registered), routing `provider` statically to the server, both
    reading the token file.  server/client: more top-level sections of each
    config (an "auth" section is merged into the token file's)."""
    tok = write_token_file(c, tokens)
    c.providers(echo="echo.sock")
    port = free_port()
    srv = dict(server or {})
    sp = c.proxy("server", {
        "node": {"id": "server"}, "auth": {"token_file": tok, **srv.pop("auth", {})},
        "listeners": {"inbound": [{
            "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
            "appkey": provider,
            "auth": {"mode": "enforce", "allow": [{"caller": a} for a in allow]}}]},
        **srv})
    if outbound is None:
        return AuthMesh(tok, port, sp, None)
    cli = dict(client or {})
    cp = c.proxy("client", {
        "node": {"id": "client"}, "auth": {"token_file": tok, **cli.pop("auth", {})},
        "listeners": {"outbound": outbound},
        "static": {"services": [{"appkey": provider,
                                 "endpoints": [{"address": f"127.0.0.1:{port}"}]}]},
        **cli})
    return AuthMesh(tok, port, sp, cp)


def xds_auth_server(c: Cluster, xds: str, provider: str) -> tuple[Proc, int, str]:
    """A server-side proxy "server" whose tokens and ACLs come from the
    control plane at `xds` (auth.source: xds, docs/auth.md), ready for hot
    restarts (subscribe.timeout_s 2: a new generation gives up within it),
    enforcing on one inbound listener for `provider` in front of the echo
    provider (started here).  Returns (its process, its port, its pid file)."""
    c.providers(echo="echo.sock")
    port = free_port()
    pidf = c.path("server.pid")
    proc = c.proxy("server", {
        "node": {"id": "server"}, "xds": {"server": xds},
        "auth": {"source": "xds", "max_skew_s": 60},
        "subscribe": {"timeout_s": 2},
        "hot_restart": {"socket": c.path("server.hr"), "pid_file": pidf,
                        "drain_s": 1.0, "start_timeout_s": 20.0},
        "listeners": {"inbound": [{
            "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
            "appkey": provider, "auth": {"mode": "enforce"}}]}})
    return proc, port, pidf


class LoadThread:
    """Continuous pipelined load from several SDK clients on long-lived
    connections, in a thread with its own uvloop; counts every answer and
    keeps (send time, request id, answering node) of each in `answered`.
    `context(i)`: the SDK Context of request i (none by default)."""

    def __init__(
        self,
        uds: str,
        *,
        clients: int = 4,
        inflight: int = 8,
        appkey: str | None = None,
        service: str = "com.demo.Echo",
        timeout_ms: int = 5000,
        context: Callable[[int], Any] | None = None,
    ) -> None:
        import threading

        self.uds = uds
        self.clients = clients
        self.inflight = inflight
        self.appkey = appkey
        self.service = service
        self.timeout_ms = timeout_ms
        self.context = context
        self.sent = 0
        self.ok = 0
        self.errors: list[str] = []
        self.answers: dict[int, int] = {}  # request id -> answers received
        self.answered: list[tuple[float, int, str]] = []  # (send time, id, node), in order
        self.retries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadThread:
        self._thread.start()
        wait_for(lambda: self.ok > 100 or self.errors, 15, "load to flow")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "load thread hung"

    def _run(self) -> None:
        import uvloop

        uvloop.run(self._main())

    async def _main(self) -> None:
        import asyncio
        import itertools

        from octoproxy.sdk import AsyncClient

        ids = itertools.count(1)

        async def one(c: AsyncClient) -> None:
            while not self._stop.is_set():
                i = next(ids)
                self.sent += 1
                t = time.monotonic()
                try:
                    r = await c.call(
                        self.service,
                        b"id:%d" % i,
                        appkey=self.appkey,
                        timeout_ms=self.timeout_ms,
                        raise_on_error=False,
                        context=self.context(i) if self.context else None,
                    )
                except Exception as e:  # a lost connection, a local timeout
                    self.errors.append(f"{i}: {type(e).__name__}: {e}")
                    continue
                if r.ok and r.body.endswith(b"|%d" % i):
                    self.ok += 1
                    self.answers[i] = self.answers.get(i, 0) + 1
                    self.answered.append((t, i, r.body.split(b"|", 1)[0].decode()))
                else:
                    self.errors.append(f"{i}: status {r.status}: {r.message} {r.body!r}")

        async def client() -> None:
            c = await AsyncClient.connect(self.uds)
            await asyncio.gather(*(one(c) for _ in range(self.inflight)))
            self.retries += c.retries
            await c.close()

        await asyncio.gather(*(client() for _ in range(self.clients)))


def stat_value(admin_port: int, name: str) -> float:
    """The value of an unlabelled counter or gauge on a proxy's /stats (the
    Prometheus text an operator scrapes); AssertionError when it is absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /stats")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def simple_chain(c: Cluster, **client_extra: Any) -> tuple[Proc, Proc]:
    """Provider "p" behind a server-side proxy, and a client-side proxy at
    c.path("px.sock") that routes appkey "a" to it; client_extra goes into
    the client's config (limits=..., upstream=...).  Returns (server, client)."""
    c.providers(p="p.sock")
    port = free_port()
    server = c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
    client = c.proxy("client", client_proxy_cfg(
        c.path("px.sock"), [{"appkey": "a", "endpoints": [{"address": f"127.0.0.1:{port}"}]}],
        **client_extra))
    return server, client


class RedisServer:
    """A real redis-server on a free loopback port (no persistence); can be
    killed and started again on the same port mid-test."""

    def __init__(self, logdir: str | None = None) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (ci/test.sh installs it)")
        self.exe = exe
        self.dir = logdir or short_tmpdir()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.p: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(os.path.join(self.dir, f"redis-{self.port}.log"), "ab")
        self.p = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.ping() or self.p is None or self.p.poll() is not None, 15,
                 "redis-server to answer PING")
        assert self.p.poll() is None, "redis-server exited"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command in RESP; the raw reply."""
        req = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(req)
            return s.recv(65536)

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.p = None

    def stop(self) -> None:
        self.kill()
