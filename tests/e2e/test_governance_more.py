"""Governance end to end, the rest of issue 14 (docs/governance.md): the
per-service connection limit, governance state across a hot restart (limits
changed in the config file), and the caller taken from the signed appkey.
Real processes: provider apps, server-side and client-side proxies."""

from __future__ import annotations

import socket
import urllib.request

import uvloop
import yaml
from test_auth import PROVIDER, TOKENS, mac
from test_governance_e2e import Raw, _server_proc, admin_json, call, three_nodes
from test_hotrestart import hr, restart

from octoproxy._core import frame
from octoproxy.sdk import Client

from harness import Cluster, cluster, free_port, server_proxy_cfg, wait_for, write_token_file
from outsider import now_s


def prom(port: int, name: str) -> dict[str, float]:
    """The samples of one Prometheus metric: labels text -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


# ------------------------------------------------------------ max_connections


def test_max_connections_per_service() -> None:
    with cluster() as c:
        # 3 nodes, one connection per node, at most 2 for the service
        _, uds, aport = three_nodes(c, 3, lb_policy="round_robin",
                                    circuit_breakers={"max_connections": 2})
        client = next(p for p in c.procs if p.name == "client")
        client.stop()
        with open(c.path("client.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["upstream"] = {"connections_per_node": 1}
        c.proxy("client", cfg)

        async def calls(raw: Raw, n: int, tag: bytes) -> list[tuple[int, str, bytes]]:
            out = []
            for i in range(n):
                f = await raw.call(b"%s%d" % (tag, i))
                out.append((f.status, f.message or "", f.body or b""))
            return out

        async def main(tag: bytes) -> list[tuple[int, str, bytes]]:
            raw = await Raw.connect(uds)
            out = await calls(raw, 12, tag)
            await raw.close()
            return out

        first = uvloop.run(main(b"a"))
        g = admin_json(aport, "/governance")["services"]["a"]
        cl = admin_json(aport, "/clusters")["services"]["a"]
        refused_metric = prom(aport, "octo_proxy_breaker_refused_total")
        serving = {b.split(b"|")[0] for st, _, b in first if st == 0}
        refused = [m for st, m, _ in first if st == 6]
        # two nodes got the service's two connections; the third has none and
        # cannot open one: every request routed to it is refused, named
        assert len(serving) == 2, first
        assert len(refused) == 4 and all("too many connections" in m for m in refused), first
        assert all(st in (0, 6) for st, _, _ in first)
        assert g["connections"] == 2 and g["max_connections"] == 2
        assert g["breakers"]["max_connections"] == 4
        assert cl["connections"] == 2 and cl["max_connections"] == 2
        assert refused_metric.get('{breaker="max_connections",service="a"}') == 4.0, refused_metric
        # one serving node's proxy goes away: its connection no longer counts,
        # and the node that had none gets one
        gone = sorted(serving)[0].decode()  # "n0".."n2"
        idle = ({b"n0", b"n1", b"n2"} - serving).pop()
        _server_proc(c, int(gone[1:])).stop()
        wait_for(lambda: admin_json(aport, "/governance")["services"]["a"]["connections"] <= 1,
                 15, "the lost connection uncounted")

        second = uvloop.run(main(b"b"))
    assert any(b.startswith(idle + b"|") for st, _, b in second if st == 0), \
        (gone, idle, [(st, b) for st, _, b in second])


# ------------------------------------------------------------ across a hot restart


def test_buckets_and_counters_survive_a_hot_restart_with_a_changed_file() -> None:
    """The limit is changed in the config file and taken by a hot restart
    (SIGUSR2): the tokens a caller has already spent stay spent, the other
    callers keep theirs, the new burst applies, the counters continue."""
    def cfg_with(burst: int, port: int, aport: int, c: Cluster) -> dict[str, object]:
        cfg = server_proxy_cfg({port: c.path("p.sock")})
        cfg["listeners"]["inbound"][0]["appkey"] = "a"
        cfg["hot_restart"] = hr(c, "server")
        cfg["admin"] = {"port": aport}
        cfg["static"] = {"services": [{"appkey": "a", "rate_limits": [
            {"rate": 0.01, "burst": burst, "caller": "*", "name": "per-caller"}]}]}
        return cfg

    async def calls(port: int, n: int, caller: str) -> list[int]:
        raw = await Raw.connect(port)
        out = [(await raw.call(call("m"), caller=caller)).status for _ in range(n)]
        await raw.close()
        return out

    with cluster() as c:
        c.providers(p="p.sock")
        port, aport = free_port(), free_port()
        c.proxy("server", cfg_with(4, port, aport, c))
        greedy1 = uvloop.run(calls(port, 6, "com.greedy"))
        nice1 = uvloop.run(calls(port, 1, "com.nice"))
        before = admin_json(aport, "/governance")["services"]["a"]["rate_limits"][0]
        c.write_config("server", cfg_with(6, port, aport, c))  # a bigger burst
        restart(c, "server")
        wait_for(lambda: admin_json(aport, "/governance")["services"]["a"]["rate_limits"][0]
                 ["burst"] == 6, 15, "the new generation's admin")
        greedy2 = uvloop.run(calls(port, 2, "com.greedy"))
        nice2 = uvloop.run(calls(port, 4, "com.nice"))
        fresh = uvloop.run(calls(port, 7, "com.fresh"))
        after = admin_json(aport, "/governance")["services"]["a"]["rate_limits"][0]
    assert greedy1 == [0, 0, 0, 0, 6, 6] and nice1 == [0]
    assert (before["allowed"], before["limited"]) == (5, 2)
    assert greedy2 == [6, 6]  # its spent tokens were not given back by the restart
    assert nice2 == [0, 0, 0, 6]  # it kept its 3
    assert fresh == [0] * 6 + [6]  # a new caller starts with the new burst
    assert (after["allowed"], after["limited"]) == (5 + 3 + 6, 2 + 2 + 1 + 1)


# ------------------------------------------------------------ the caller's appkey


def test_caller_is_the_signed_appkey_when_verified() -> None:
    """Per-caller limits on the provider side: a request whose signature the
    listener verified is counted for its octo-auth's caller, whatever its
    traceInfo.clientAppkey says; without verification traceInfo wins, and
    octo-auth's caller is used only when there is no traceInfo.clientAppkey."""
    def send(port: int, trace_caller: str | None, signer: str | None) -> tuple[int, str]:
        local = {"octo-remote-appkey": PROVIDER}
        if signer is not None:
            ts = now_s()
            local["octo-auth"] = f"{signer}:{ts}:{mac(signer, ts)}"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(frame.encode_request(
                1, "com.demo.echo.Echo", b"x", local_context=local,
                trace_info={"clientAppkey": trace_caller} if trace_caller else None))
            sc = frame.FrameScanner()
            got: list[frame.Frame] = []
            wait_for(lambda: got.extend(sc.feed(s.recv(65536))) or got, 10, "an answer")
        return got[0].status, got[0].message or ""

    with cluster() as c:
        tok = write_token_file(c, TOKENS)
        c.providers(p="p.sock")
        signed_port, open_port = free_port(), free_port()
        allow = [{"caller": "com.demo.legacy"}, {"caller": "com.demo.web"}]
        cfg = {
            "node": {"id": "server"},
            "auth": {"token_file": tok, "max_skew_s": 60},
            "listeners": {"inbound": [
                {"host": "127.0.0.1", "port": signed_port, "upstream_uds": c.path("p.sock"),
                 "appkey": PROVIDER, "auth": {"mode": "enforce", "allow": allow}},
                {"host": "127.0.0.1", "port": open_port, "upstream_uds": c.path("p.sock"),
                 "appkey": PROVIDER}]},
            "static": {"services": [{"appkey": PROVIDER, "rate_limits": [
                {"rate": 0.01, "burst": 3, "caller": "com.demo.legacy", "name": "legacy"}]}]},
        }
        c.proxy("server", cfg)
        # signed by legacy, claiming to be web in traceInfo: counted for legacy
        lying = [send(signed_port, "com.demo.web", "com.demo.legacy") for _ in range(4)]
        # no verification on this listener: traceInfo.clientAppkey is the caller
        open_trace = [send(open_port, "com.demo.web", "com.demo.legacy") for _ in range(3)]
        # no traceInfo.clientAppkey: the (unverified) octo-auth's caller
        open_auth = send(open_port, None, "com.demo.legacy")
    assert [s for s, _ in lying] == [0, 0, 0, 6] and "legacy" in lying[3][1], lying
    assert [s for s, _ in open_trace] == [0, 0, 0], open_trace
    assert open_auth[0] == 6, open_auth


def test_ejection_and_counters_survive_a_client_side_hot_restart() -> None:
    od = {"consecutive_errors": 3, "error_statuses": [2], "base_ejection_s": 60,
          "max_ejection_percent": 50}
    with cluster() as c:
        _, uds, aport = three_nodes(c, 3, lb_policy="round_robin", outlier_detection=od,
                                    circuit_breakers={"max_requests": 1000})
        client = next(p for p in c.procs if p.name == "client")
        client.stop()
        with open(c.path("client.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["hot_restart"] = hr(c, "client")
        c.proxy("client", cfg)
        with Client(c.path("n1.sock")) as direct:
            assert direct.call("x", b"break").ok

        async def calls(tag: bytes, n: int) -> list[frame.Frame]:
            raw = await Raw.connect(uds)
            out = [await raw.call(b"%s%d" % (tag, i)) for i in range(n)]
            await raw.close()
            return out

        first = uvloop.run(calls(b"a", 30))
        before = {n["address"]: n for n in admin_json(aport, "/clusters")["services"]["a"]["nodes"]}
        restart(c, "client")
        wait_for(lambda: _get_ok(aport), 15, "the new generation's admin")
        after = {n["address"]: n for n in admin_json(aport, "/clusters")["services"]["a"]["nodes"]}
        g = admin_json(aport, "/governance")["services"]["a"]
        second = uvloop.run(calls(b"b", 30))
    assert sum(f.status == 2 for f in first) == 3
    ejected = [a for a, n in before.items() if n["ejected"]]
    assert len(ejected) == 1
    a = ejected[0]
    assert after[a]["ejected"] and after[a]["ejections"] == 1
    assert abs(after[a]["ejected_until"] - before[a]["ejected_until"]) < 0.01
    assert g["ejections"] == 1 and g["ejected"] == [a]
    assert all(f.status == 0 for f in second), [(f.status, f.message) for f in second]
    assert not any(f.body.startswith(b"n1|") for f in second)


def _get_ok(aport: int) -> bool:
    try:
        admin_json(aport, "/governance")
        return True
    except OSError:
        return False
