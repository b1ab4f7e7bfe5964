"""Governance end to end, the rest of issue 14 (docs/governance.md): the
per-service connection limit, governance state across a hot restart (limits
changed in the config file), and the caller taken from the signed appkey.
Real processes: provider apps, server-side and client-side proxies."""

from __future__ import annotations

import urllib.request

import uvloop
import yaml
from test_governance_e2e import Raw, _server_proc, admin_json, three_nodes

from harness import cluster, wait_for


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
