"""A mesh in containers: app -> client-side proxy -> server-side proxy ->
provider, routes from the bundled control plane, every piece in its own
container; `podman kill --signal USR2` hot-restarts a proxy container's
process in place under load, and nothing fails.

The containers use the host's network namespace (every address is on
loopback); the UDS are in host directories mounted as /run/octo-proxy,
shared between the proxy and the app (client side) or the provider
(server side)."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from octoproxy.ports import free_tcp_port as free_port
from octoproxy.sdk import Client

from ctr import REPO, Podman, read_json, wait_for, write_config

# the first test also builds the images (minutes when nothing is cached)
pytestmark = pytest.mark.timeout(1200)



def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=3) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def hot_restart_in_place(podman: Podman, c: str, admin: int) -> float:
    """USR2 to the container (PID 1 forwards it to the proxy); wait until the
    next generation serves and the old one has exited.  Returns the seconds."""
    gen = metric(admin, "octo_proxy_hot_restart_generation")
    assert gen is not None
    exited = podman.logs(c).count("has exited")
    t0 = time.monotonic()
    podman("kill", "--signal", "USR2", c)
    wait_for(lambda: metric(admin, "octo_proxy_hot_restart_generation") == gen + 1, 60,
             f"{c}: generation {gen + 1}")
    wait_for(lambda: podman.logs(c).count("has exited") > exited, 60,
             f"{c}: the old generation to exit")
    assert podman.running(c), podman.logs(c)
    return time.monotonic() - t0


def test_mesh_in_containers_with_in_place_hot_restarts(podman: Podman, images: dict[str, str],
                                                       shared_dir: Path, tmp_path: Path) -> None:
    img = images["v1"]
    d = shared_dir
    srv = d / "srv"
    srv.mkdir()
    os.chown(srv, 10001, 10001)
    cp, sp, sa, ca, sub = (free_port() for _ in range(5))
    host = ("--network", "host")
    tests = ("-v", f"{REPO / 'tests'}:/tests:ro")
    cfg = ("-v", f"{d / 'cfg'}:/cfg:ro")
    hr = {"socket": "/run/octo-proxy/hot-restart/restart.sock", "drain_s": 3.0, "shutdown_s": 10.0,
          "proxy_restart_spread_s": 0.2}
    write_config(d, "endpoints.yaml", {"services": [{
        "appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
        "endpoints": [{"address": f"127.0.0.1:{sp}"}]}]})
    server_cfg = write_config(d, "server.yaml", {
        "node": {"id": "server"},
        "listeners": {"inbound": [{"host": "127.0.0.1", "port": sp,
                                   "upstream_uds": "/run/octo-proxy/provider.sock"}]},
        "admin": {"host": "127.0.0.1", "port": sa}, "hot_restart": hr})
    client_cfg = write_config(d, "client.yaml", {
        "node": {"id": "client"},
        "listeners": {"outbound": [{"path": "/run/octo-proxy/octo-proxy.sock"}]},
        "xds": {"server": f"127.0.0.1:{cp}"},
        "subscribe": {"host": "127.0.0.1", "port": sub},
        "admin": {"host": "127.0.0.1", "port": ca}, "hot_restart": hr})

    podman.start("cp", img, "octo-proxy", "control-plane", "--endpoints", "/cfg/endpoints.yaml",
                 "--listen", f"127.0.0.1:{cp}", opts=(*host, *cfg))
    podman.start("provider", img, "python", "/tests/e2e/provider_app.py",
                 "p=/run/octo-proxy/provider.sock",
                 opts=(*host, *tests, "-v", f"{srv}:/run/octo-proxy"))
    server = podman.start("server", img, "octo-proxy", "run", "-c", server_cfg,
                          opts=(*host, *cfg, "-v", f"{srv}:/run/octo-proxy"))
    client = podman.start("client", img, "octo-proxy", "run", "-c", client_cfg,
                          opts=(*host, *cfg, "-v", f"{d / 'run'}:/run/octo-proxy"))
    app = podman.start("app", img, "python", "/tests/container/load.py", "--out", "/out",
                       "--uds", "/run/octo-proxy/octo-proxy.sock", "--clients", "4",
                       "--inflight", "8", "--appkey", "com.demo.echo",
                       "--subscribe", f"http://127.0.0.1:{sub}", "--tag", "mesh",
                       opts=(*host, *tests, "-v", f"{d / 'run'}:/run/octo-proxy",
                             "-v", f"{d / 'out'}:/out"))
    progress = d / "out" / "progress.json"

    def ok_count() -> int:
        p = read_json(progress)
        assert p is None or p["failed"] == 0, (p, podman.logs(app), podman.logs(client))
        return p["ok"] if p else 0

    try:
        wait_for(lambda: ok_count() > 300, 90, "requests to flow app -> client -> server -> provider")
        took = []
        for c, admin in ((client, ca), (server, sa), (client, ca), (server, sa)):
            took.append(hot_restart_in_place(podman, c, admin))
            n = ok_count()
            wait_for(lambda n=n: ok_count() > n + 200, 30, f"traffic after restarting {c}")
        (d / "out" / "stop").touch()
        podman("wait", app, timeout=60)
        res = read_json(d / "out" / "result.json")
        assert res, podman.logs(app)
        print(f"mesh: {res['sent']} requests, {res['failed']} failed, {res['retries']} retried "
              f"on the new generation; in-place hot restarts took "
              f"{', '.join(f'{t:.1f}' for t in took)} s")
        assert res["failed"] == 0 and res["ok"] == res["sent"], res
        with Client(str(srv / "provider.sock")) as cl:
            seen, dup = cl.call("com.demo.Echo", b"dups").body.split(b"|")[1].split()
        assert (int(seen), int(dup)) == (res["sent"], 0)
        for c in (client, server):
            assert "generation 3 serving" in podman.logs(c)
    except BaseException:
        for c in (client, server, app):
            print(f"--- {c}:\n{podman.logs(c)[-3000:]}")
        raise
