"""The admin endpoint end to end: real proxies, real traffic, real scrapes.

/stats is parsed with prometheus_client's own parser and compared with the
traffic sent; /clusters, /config_dump, /ready, /healthcheck, /drain; counters
across a SIGUSR2 hot restart; access log and JSON logs.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import AsyncClient, Client

from harness import (
    Cluster,
    client_proxy_cfg,
    cluster,
    free_port,
    server_proxy_cfg,
    wait_for,
)

ECHO = "com.demo.echo"


# ---------------------------------------------------------------- helpers


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()  # not ours to leak while the proxy is not listening yet
            raise
        self.sock = s


def http_req(admin: int | str, method: str, path: str) -> tuple[int, bytes]:
    """One request to an admin endpoint: a TCP port on loopback or a UDS path."""
    conn = (_UnixHTTP(admin) if isinstance(admin, str)
            else http.client.HTTPConnection("127.0.0.1", admin, timeout=5))
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_json(admin: int | str, path: str) -> Any:
    st, body = http_req(admin, "GET", path)
    assert st == 200, (st, body)
    return json.loads(body)


class Stats:
    """One /stats scrape, parsed by prometheus_client."""

    def __init__(self, admin: int | str) -> None:
        st, body = http_req(admin, "GET", "/stats")
        assert st == 200, (st, body)
        self.families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for f in self.families.values():
            for s in f.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {lb: v for (n, lb), v in self.samples.items() if n == name}


def admin_ready(admin: int | str) -> bool:
    try:
        return http_req(admin, "GET", "/ready")[0] == 200
    except OSError:
        return False


def hr(c: Cluster, name: str) -> dict[str, Any]:
    return {"socket": c.path(f"{name}.hr"), "pid_file": c.path(f"{name}.pid"),
            "drain_s": 2.0, "shutdown_s": 5.0, "proxy_restart_spread_s": 0.1}


def hot_restart(c: Cluster, name: str, admin: int | str, timeout: float = 20.0) -> int:
    """SIGUSR2 the live generation, wait for the new pid and the old one's exit."""
    pidf = c.path(f"{name}.pid")
    old = read_pid(pidf)
    assert old and pid_alive(old)
    os.kill(old, signal.SIGUSR2)
    new = wait_for(lambda: (p := read_pid(pidf)) != old and p and pid_alive(p) and p,
                   timeout, f"{name}: a new generation")
    wait_for(lambda: not pid_alive(old), timeout, f"{name}: the old generation to exit")
    wait_for(lambda: admin_ready(admin), timeout, f"{name}: admin of the new generation")
    return new


def kill_live(c: Cluster, *names: str) -> None:
    for n in names:
        pid = read_pid(c.path(f"{n}.pid"))
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def echo_service(port: int) -> dict[str, Any]:
    return {"appkey": ECHO, "service_names": ["com.demo.Echo"],
            "endpoints": [{"address": f"127.0.0.1:{port}", "idc": "gh", "region": "bj",
                           "weight": 120}]}


# ---------------------------------------------------------------- the traffic


N_OK, N_FAIL, N_UNKNOWN, N_TIMEOUT = 20, 5, 3, 2


def batch(uds: str, calls: list[tuple[str, bytes]], **kw: Any) -> list[Any]:
    """One pipelined batch on a fresh connection (counts stay per batch)."""
    with Client(uds) as c:
        return c.call_many(calls, raise_on_error=False, **kw)


def send_known_traffic(uds: str) -> None:
    for r in batch(uds, [("com.demo.Echo", b"echo:%d" % i) for i in range(N_OK)]):
        assert r.ok
    for r in batch(uds, [("com.demo.Echo", b"fail:x")] * N_FAIL):
        assert r.status == 1 and r.message == "x"
    for r in batch(uds, [("com.nobody.Svc", b"")] * N_UNKNOWN):
        assert r.status == 8
    for r in batch(uds, [("com.demo.Echo", b"sleep:700:late")] * N_TIMEOUT, timeout_ms=150):
        assert r.status == 4 and "timeout" in r.message


@pytest.fixture
def chain():
    """provider <- server proxy (admin on TCP) <- client proxy (admin on TCP);
    both hot-restartable and access-logging."""
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        sadm, cadm = free_port(), free_port()
        scfg = server_proxy_cfg({port: c.path("p.sock")})
        scfg.update(admin={"port": sadm}, hot_restart=hr(c, "server"))
        c.proxy("server", scfg)
        ccfg = client_proxy_cfg(c.path("px.sock"), [echo_service(port)],
                                node={"idc": "gh", "region": "bj", "swimlane": ""},
                                admin={"port": cadm}, hot_restart=hr(c, "client"),
                                upstream={"default_timeout_ms": 2000},
                                logging={"access_log": True})
        c.proxy("client", ccfg)
        c.port, c.sadm, c.cadm = port, sadm, cadm  # type: ignore[attr-defined]
        try:
            yield c
        finally:
            kill_live(c, "client", "server")


def at_rest(*admins: int | str) -> None:
    for a in admins:
        wait_for(lambda a=a: Stats(a)("octo_proxy_in_flight") == 0, 10, f"nothing in flight at {a}")


def test_stats_match_traffic_and_continue_across_hot_restart(chain: Cluster) -> None:
    c = chain
    cadm, sadm = c.cadm, c.sadm  # type: ignore[attr-defined]
    node = f"127.0.0.1:{c.port}"  # type: ignore[attr-defined]
    send_known_traffic(c.path("px.sock"))
    routed = N_OK + N_FAIL + N_TIMEOUT
    at_rest(cadm, sadm)
    # the server proxy has sent the late answers back by now (dropped by the client)
    wait_for(lambda: Stats(sadm)("octo_proxy_inbound_answers_total") == routed, 10,
             "late answers through the server proxy")

    s = Stats(cadm)
    assert s.families["octo_proxy_outbound_requests"].type == "counter"
    assert s("octo_proxy_outbound_requests_total") == routed
    assert s("octo_proxy_outbound_answers_total") == N_OK + N_FAIL
    assert s("octo_proxy_timeouts_total") == N_TIMEOUT
    assert s("octo_proxy_service_requests_total", service=ECHO) == routed
    assert s.labelled("octo_proxy_service_answers_total") == {
        frozenset({("service", ECHO), ("status", "success")}): N_OK,
        frozenset({("service", ECHO), ("status", "application")}): N_FAIL,
        frozenset({("service", ECHO), ("status", "transport")}): N_TIMEOUT,
        frozenset({("service", "com.nobody.Svc"), ("status", "service")}): N_UNKNOWN,
    }
    assert s("octo_proxy_node_requests_total", service=ECHO, node=node) == routed
    assert s("octo_proxy_node_active", service=ECHO, node=node) == 0
    assert s("octo_proxy_node_effective_weight", service=ECHO, node=node) == 120
    # answers the proxy made itself: unknown service and timeouts, not the provider's status 1
    assert s.labelled("octo_proxy_errors_total") == {
        frozenset({("status", "service")}): N_UNKNOWN,
        frozenset({("status", "transport")}): N_TIMEOUT,
    }
    # every answered (routed) request is in the latency histogram once
    assert s("octo_proxy_request_duration_seconds_count") == routed
    assert s("octo_proxy_request_duration_seconds_bucket", le="+Inf") == routed
    assert s("octo_proxy_request_duration_seconds_sum") > N_TIMEOUT * 0.14
    assert s("octo_proxy_in_flight") == 0
    assert s("octo_proxy_connections", kind="app") == 0
    assert s("octo_proxy_upstream_connections", upstream=node) >= 1
    assert s("octo_proxy_upstream_connect_failures_total", upstream=node) == 0
    assert s("octo_proxy_route_table_version") >= 1
    assert s("octo_proxy_hot_restart_generation") == 1
    assert s("octo_proxy_malformed_frames_total") == 0

    ss = Stats(sadm)
    assert ss("octo_proxy_inbound_requests_total") == routed
    assert ss("octo_proxy_outbound_requests_total") == 0
    assert ss("octo_proxy_connections", kind="inbound") >= 1
    assert ss("octo_proxy_hot_restart_generation") == 1

    # hot restart both: the generation goes up, the counters continue
    hot_restart(c, "client", cadm)
    hot_restart(c, "server", sadm)
    s2, ss2 = Stats(cadm), Stats(sadm)
    assert s2("octo_proxy_hot_restart_generation") == 2
    assert ss2("octo_proxy_hot_restart_generation") == 2
    assert s2("octo_proxy_outbound_requests_total") == routed
    assert s2("octo_proxy_outbound_answers_total") == N_OK + N_FAIL
    assert s2("octo_proxy_timeouts_total") == N_TIMEOUT
    assert s2("octo_proxy_errors_total", status="service") == N_UNKNOWN
    assert ss2("octo_proxy_inbound_requests_total") == routed
    # per-service and per-node series and the histogram continue too
    assert s2("octo_proxy_service_requests_total", service=ECHO) == routed
    assert s2("octo_proxy_service_answers_total", service=ECHO, status="success") == N_OK
    assert s2("octo_proxy_node_requests_total", service=ECHO, node=node) == routed
    assert s2("octo_proxy_request_duration_seconds_count") == routed
    assert s2("octo_proxy_service_answers_total", service="com.nobody.Svc",
              status="service") == N_UNKNOWN
    with Client(c.path("px.sock")) as cl:
        assert all(r.ok for r in cl.call_many([("com.demo.Echo", b"echo:more")] * 10))
    at_rest(cadm, sadm)
    s3 = Stats(cadm)
    assert s3("octo_proxy_outbound_requests_total") == routed + 10
    assert s3("octo_proxy_outbound_answers_total") == N_OK + N_FAIL + 10
    assert s3("octo_proxy_in_flight") == 0
    assert Stats(sadm)("octo_proxy_inbound_requests_total") == routed + 10


def test_per_service_counters_continue_across_hot_restart(chain: Cluster) -> None:
    c = chain
    cadm = c.cadm  # type: ignore[attr-defined]
    with Client(c.path("px.sock")) as cl:
        assert all(r.ok for r in cl.call_many([("com.demo.Echo", b"echo:x")] * 10))
    at_rest(cadm)
    hot_restart(c, "client", cadm)
    s = Stats(cadm)
    assert s("octo_proxy_service_requests_total", service=ECHO) == 10
    assert s("octo_proxy_request_duration_seconds_count") == 10


def test_access_log_one_line_per_answered_request(chain: Cluster) -> None:
    c = chain
    send_known_traffic(c.path("px.sock"))
    at_rest(c.cadm)  # type: ignore[attr-defined]
    client = next(p for p in c.procs if p.name == "client")
    lines = [ln for ln in client.log().splitlines() if "octoproxy.access" in ln]
    routed = N_OK + N_FAIL + N_TIMEOUT
    assert len(lines) == routed, lines
    node = f"127.0.0.1:{c.port}"  # type: ignore[attr-defined]
    for ln in lines:
        assert f"service={ECHO} " in ln and f"upstream={node} " in ln and "latency_ms=" in ln
    by_status = {st: sum(f"status={st} " in ln for ln in lines) for st in (0, 1, 4)}
    assert by_status == {0: N_OK, 1: N_FAIL, 4: N_TIMEOUT}


# ---------------------------------------------------------------- clusters, config, health


@pytest.fixture(scope="module")
def mesh():
    """A server proxy and a client proxy whose admin listens on a UDS, with
    JSON logs and an access log sampled at 0."""
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
        ccfg = client_proxy_cfg(
            c.path("px.sock"),
            [echo_service(port),
             {"appkey": "com.demo.backup", "lb_policy": "least_request",
              "endpoints": [{"address": f"127.0.0.1:{port}", "role": 1, "cell": "l1",
                             "swimlane": "w1", "status": 0, "warmup_s": 60,
                             "start_time": 1.0}]}],
            node={"id": "admin-uds", "idc": "gh", "region": "bj"},
            admin={"uds": c.path("admin.sock")},
            logging={"format": "json", "access_log": True, "access_log_sample": 0.0})
        c.proxy("client", ccfg)
        wait_for(lambda: admin_ready(c.path("admin.sock")), 10, "admin on its UDS")
        c.port = port  # type: ignore[attr-defined]
        yield c


def test_clusters_lists_every_node_with_labels_weight_health_active(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        cl.call_many([("com.demo.Echo", b"echo:x")] * 7)
    out = get_json(mesh.path("admin.sock"), "/clusters")
    assert out["version"] >= 1
    assert set(out["services"]) == {ECHO, "com.demo.backup"}
    addr = f"127.0.0.1:{mesh.port}"  # type: ignore[attr-defined]
    (n,) = out["services"][ECHO]["nodes"]
    assert n["address"] == addr and n["idc"] == "gh" and n["region"] == "bj"
    assert n["cell"] == "" and n["swimlane"] == "" and n["role"] == 0
    assert n["weight"] == 120 and n["effective_weight"] == 120
    assert n["healthy"] is True and n["status"] == 2
    assert n["active"] == 0 and n["requests"] >= 7 and n["answers"]["success"] >= 7
    (b,) = out["services"]["com.demo.backup"]["nodes"]
    assert b["healthy"] is False and b["status"] == 0 and b["role"] == 1
    assert b["cell"] == "l1" and b["swimlane"] == "w1" and b["warmup_s"] == 60
    assert b["active"] == 0 and "effective_weight" in b


def test_config_dump_is_the_effective_config(mesh: Cluster) -> None:
    d = get_json(mesh.path("admin.sock"), "/config_dump")
    cfg = d["config"]
    assert d["config_path"].endswith("client.yaml") and d["generation"] == 1
    assert isinstance(d["pid"], int) and d["xds"] is None
    assert cfg["node"]["id"] == "admin-uds" and cfg["node"]["idc"] == "gh"
    assert cfg["listeners"]["outbound"] == [{"path": mesh.path("px.sock"), "mode": 0o660,
                                             "backlog": 1024, "sign_for": [],
                                             "sign_registered": False}]
    assert cfg["admin"] == {"host": "127.0.0.1", "port": None, "uds": mesh.path("admin.sock"),
                            "max_connections": 32, "timeout_s": 10.0}
    # defaults filled in
    assert cfg["limits"]["max_frame_bytes"] == 16 * 1024 * 1024
    assert cfg["upstream"]["default_timeout_ms"] == 3000
    assert cfg["hot_restart"]["drain_s"] == 5.0
    assert cfg["logging"] == {"level": "info", "format": "json", "access_log": True,
                              "access_log_sample": 0.0, "repeat_burst": 5,
                              "repeat_window_s": 10.0}
    assert [s["appkey"] for s in cfg["static"]["services"]] == [ECHO, "com.demo.backup"]


def test_ready_and_healthcheck_fail_ok(mesh: Cluster) -> None:
    adm = mesh.path("admin.sock")
    assert http_req(adm, "GET", "/ready") == (200, b"LIVE\n")
    assert http_req(adm, "POST", "/healthcheck/fail")[0] == 200
    st, body = http_req(adm, "GET", "/ready")
    assert st == 503 and b"health check failed" in body
    # failing health does not stop the data path
    with Client(mesh.path("px.sock")) as cl:
        assert cl.call("com.demo.Echo", b"echo:still").body == b"p|still"
    assert http_req(adm, "POST", "/healthcheck/ok")[0] == 200
    assert http_req(adm, "GET", "/ready") == (200, b"LIVE\n")
    assert http_req(adm, "GET", "/healthcheck/fail")[0] == 405  # POST only


def test_json_logs_parse_and_access_log_sample_zero_logs_nothing(mesh: Cluster) -> None:
    with Client(mesh.path("px.sock")) as cl:
        assert all(r.ok for r in cl.call_many([("com.demo.Echo", b"echo:j")] * 20))
    client = next(p for p in mesh.procs if p.name == "client")
    lines = [ln for ln in client.log().splitlines() if ln.strip()]
    assert lines
    recs = [json.loads(ln) for ln in lines]  # every line is one JSON object
    for r in recs:
        assert {"ts", "level", "logger", "msg"} <= r.keys()
    assert any(r["msg"].startswith("ready:") for r in recs)
    assert not [r for r in recs if r["logger"] == "octoproxy.access"]


def test_json_access_log_has_fields() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
        client = c.proxy("client", client_proxy_cfg(
            c.path("px.sock"), [echo_service(port)],
            logging={"format": "json", "access_log": True}))
        batch(c.path("px.sock"), [("com.demo.Echo", b"echo:a")] * 3 + [("com.demo.Echo", b"fail:y")])

        def access() -> list[dict[str, Any]]:
            recs = [json.loads(ln) for ln in client.log().splitlines() if ln.strip()]
            return [r for r in recs if r["logger"] == "octoproxy.access"]

        recs = wait_for(lambda: len(access()) == 4 and access(), 5, "4 access log records")
        assert sorted(r["status"] for r in recs) == [0, 0, 0, 1]
        for r in recs:
            assert r["service"] == ECHO and r["upstream"] == f"127.0.0.1:{port}"
            assert isinstance(r["latency_ms"], float | int) and r["latency_ms"] >= 0


# ---------------------------------------------------------------- drain


def test_drain_stops_accepting_fails_ready_keeps_existing_connections() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        c.proxy("server", server_proxy_cfg({port: c.path("p.sock")}))
        adm = c.path("admin.sock")
        c.proxy("client", client_proxy_cfg(c.path("px.sock"), [echo_service(port)],
                                           admin={"uds": adm}))
        wait_for(lambda: admin_ready(adm), 10, "admin")
        uvloop.run(drain_with_an_open_connection(c.path("px.sock"), adm))
        assert Stats(adm)("octo_proxy_outbound_requests_total") == 2


async def drain_with_an_open_connection(uds: str, adm: str) -> None:
    existing = await AsyncClient.connect(uds)
    assert (await existing.call("com.demo.Echo", b"echo:before")).ok
    # a failed health check is not a drain
    assert http_req(adm, "POST", "/healthcheck/fail")[0] == 200
    assert get_json(adm, "/drain") == {"draining": False, "in_flight": 0}
    assert http_req(adm, "POST", "/healthcheck/ok")[0] == 200
    st, body = http_req(adm, "POST", "/drain")
    assert st == 200 and json.loads(body)["draining"] is True
    # no new connection is accepted
    s = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        s.connect(uds)
    s.close()
    st, body = http_req(adm, "GET", "/ready")
    assert st == 503 and b"draining" in body
    # a drain cannot be undone by the health check switch
    assert http_req(adm, "POST", "/healthcheck/ok")[0] == 200
    assert http_req(adm, "GET", "/ready")[0] == 503
    # the existing connection still works, and admin still answers
    assert (await existing.call("com.demo.Echo", b"echo:after")).body == b"p|after"
    await existing.close()
    assert get_json(adm, "/drain") == {"draining": True, "in_flight": 0}
