"""Discovery through the proxy: control plane -> xDS -> route table -> traffic.

Real processes: the bundled control plane, a client-side proxy with the
subscribe API, a server-side proxy and providers.
"""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import Client
from octoproxy.sdk.subscribe import SubscribeError, subscribe

from harness import Cluster, cluster, free_port, wait_for, xds_client_cfg


def write_endpoints(c: Cluster, services: list[dict]) -> None:
    c.write_endpoints({"services": services})


@pytest.fixture
def mesh():
    with cluster() as c:
        ports = c.provider_nodes("abc")
        c.ports = ports  # type: ignore[attr-defined]
        write_endpoints(c, [
            {"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
             "endpoints": [{"address": f"127.0.0.1:{ports['a']}"}]},
            {"appkey": "com.demo.other", "endpoints": [{"address": f"127.0.0.1:{ports['c']}"}]},
        ])
        c.cp_port = free_port()  # type: ignore[attr-defined]
        c.cp = c.control_plane(c.path("endpoints.yaml"), port=c.cp_port)  # type: ignore[attr-defined]
        c.sub_port = free_port()  # type: ignore[attr-defined]
        c.ccfg = xds_client_cfg(  # type: ignore[attr-defined]
            c.path("px.sock"), c.cp.target, c.sub_port,  # type: ignore[attr-defined]
            # SotW says "does not exist" only by the resource timeout (15 s by default)
            xds={"backoff_base_s": 0.1, "backoff_max_s": 0.5, "resource_timeout_s": 2},
            subscribe={"state_file": c.path("subs.json"), "timeout_s": 5},
            admin={"port": free_port()},
            hot_restart={"socket": c.path("client.hr"), "pid_file": c.path("client.pid"),
                         "drain_s": 2, "shutdown_s": 5},
        )
        c.proxy("client", c.ccfg)  # type: ignore[attr-defined]
        try:
            yield c
        finally:
            pid = read_pid(c.path("client.pid"))
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def url(c: Cluster) -> str:
    return f"http://127.0.0.1:{c.sub_port}"  # type: ignore[attr-defined]


def who(c: Cluster) -> str:
    with Client(c.path("px.sock")) as cl:
        return cl.call("com.demo.Echo", b"echo:x").body.split(b"|")[0].decode()


def test_subscribe_then_traffic_flows(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        r = cl.call("com.demo.Echo", b"echo:x", raise_on_error=False)
        assert r.status == 8  # not subscribed yet: unknown here
    ans = subscribe(url(mesh), ["com.demo.echo"])
    assert "com.demo.echo" in str(ans)
    assert who(mesh) == "a"  # the answer came only once the endpoints were in place


def test_unknown_service_subscription_fails_clearly(mesh: Cluster) -> None:
    with pytest.raises(SubscribeError) as e:
        subscribe(url(mesh), ["com.nobody"], timeout=5, retry_until=1)
    assert e.value.status == 404 and "com.nobody" in str(e.value)
    # SotW: settled by the resource timeout, which is counted
    admin = mesh.ccfg["admin"]["port"]  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5) as r:
        metrics = r.read().decode()
    assert "octo_proxy_xds_resource_timeouts_total 1.0" in metrics, metrics[-2000:]
    assert "octo_proxy_xds_nacks_total 0.0" in metrics


def test_node_change_reaches_traffic_within_a_second(mesh: Cluster) -> None:
    import time

    subscribe(url(mesh), ["com.demo.echo"])
    assert who(mesh) == "a"
    t0 = time.monotonic()
    write_endpoints(mesh, [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
                            "endpoints": [{"address": f"127.0.0.1:{mesh.ports['b']}"}]}])
    wait_for(lambda: who(mesh) == "b", 5, "the new node to get traffic")
    assert time.monotonic() - t0 < 1.0


def test_unhealthy_node_stops_getting_traffic(mesh: Cluster) -> None:
    subscribe(url(mesh), ["com.demo.echo"])
    eps = [{"address": f"127.0.0.1:{mesh.ports['a']}"},
           {"address": f"127.0.0.1:{mesh.ports['b']}"}]
    write_endpoints(mesh, [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
                            "endpoints": eps}])
    wait_for(lambda: {who(mesh) for _ in range(10)} == {"a", "b"}, 5, "both nodes in use")
    eps[0]["health"] = "unhealthy"
    write_endpoints(mesh, [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
                            "endpoints": eps}])
    wait_for(lambda: {who(mesh) for _ in range(20)} == {"b"}, 5, "only the healthy node")


def test_control_plane_down_keeps_routes_and_resubscribes(mesh: Cluster) -> None:
    subscribe(url(mesh), ["com.demo.echo"])
    mesh.cp.kill()  # type: ignore[attr-defined]
    for _ in range(20):
        assert who(mesh) == "a"  # last good config keeps serving
    write_endpoints(mesh, [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
                            "endpoints": [{"address": f"127.0.0.1:{mesh.ports['b']}"}]}])
    mesh.control_plane(mesh.path("endpoints.yaml"), port=mesh.cp_port)  # type: ignore[attr-defined]
    wait_for(lambda: who(mesh) == "b", 10, "re-subscription after the control plane is back")


def test_hot_restart_with_control_plane_down_keeps_serving(mesh: Cluster) -> None:
    subscribe(url(mesh), ["com.demo.echo"])
    assert who(mesh) == "a"
    mesh.cp.kill()  # type: ignore[attr-defined]
    old = read_pid(mesh.path("client.pid"))
    assert old
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: (p := read_pid(mesh.path("client.pid"))) != old and p, 20, "new generation")
    wait_for(lambda: not pid_alive(old), 20, "old generation to exit")
    assert who(mesh) == "a"  # routes came with the handover
    with open(mesh.path("subs.json")) as f:
        assert "com.demo.echo" in f.read()


def test_subscription_file_restores_services_after_restart(mesh: Cluster) -> None:
    subscribe(url(mesh), ["com.demo.echo"])
    pid = read_pid(mesh.path("client.pid"))
    assert pid
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 10, "the proxy to stop")
    # a plain restart: the subscription comes back from the file before ready
    mesh.proxy("client2", mesh.ccfg)  # type: ignore[attr-defined]
    assert who(mesh) == "a"


def test_unsubscribe_stops_updates(mesh: Cluster) -> None:
    from octoproxy.sdk.subscribe import unsubscribe

    subscribe(url(mesh), ["com.demo.echo"])
    unsubscribe(url(mesh), ["com.demo.echo"])
    with Client(mesh.path("px.sock")) as cl:
        r = cl.call("com.demo.Echo", b"echo:x", raise_on_error=False)
    assert r.status == 8
