"""A hostile control plane in a process of its own: the xDS double
(xds_double.AdsDouble, real grpc.aio) plus crafted responses, driven by one
JSON command per line on stdin, answering one JSON line per command on
stdout.  Its own process so that building and serializing a big response
does not hold the GIL of the client being measured.

    {"op": "put", "appkey": A}                      a service (Cluster + assignment)
    {"op": "routes", "appkey": A, "rule": NAME}     A's rules: one method rule named NAME
    {"op": "flood", "wanted": A, "rule": NAME,      one SotW TRDS response: A's rules
     "unwanted": N, "size": BYTES,                  plus N RouteConfigurations nobody
     "wanted_size": BYTES?}                         asked for, each about BYTES long
                                                    (wanted_size: A's is BYTES of routes)
    {"op": "pad", "size": BYTES}                    every CDS response from now on (one
                                                    is sent at once) about BYTES long
    {"op": "stats"}                                 streams opened, NACK messages

The first line written is {"port": P}."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.thrift_proxy.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from octoproxy import model
from octoproxy.xds import service_to_cluster
from octoproxy.xds.shunting import THRIFT_ROUTE_TYPE, rules_to_route_config

from xds_double import CDS, AdsDouble


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, body: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(body)) + body


def route_config(name: str, size: int) -> bytes:
    """A serialized RouteConfiguration named `name` of about `size` bytes:
    routes of one method match each (many small nested messages, the
    costliest kind to decode), built as bytes, not as messages."""
    route = route_pb2.Route()
    route.match.method_name = "method-0000"
    route.route.cluster = "c"
    one = _field(2, route.SerializeToString())  # RouteConfiguration.routes = 2
    head = _field(1, name.encode())
    n = max(0, (size - len(head)) // len(one))
    return head + one * n


def rules(name: str) -> tuple[model.ShuntRule, ...]:
    return (model.ShuntRule(name, (model.ShuntMatch(model.SRC_METHOD, model.OP_EQ,
                                                    values=("echo",)),), group="g"),)


def _response(t: str, bodies: list[bytes]) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        type_url=t, version_info="hostile",
        resources=[any_pb2.Any(type_url=t, value=b) for b in bodies])


def handle(d: AdsDouble, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    if op == "put":
        d.put(model.Service(cmd["appkey"], (model.Endpoint("10.0.0.1", 9000),)))
    elif op == "routes":
        d.put_routes(cmd["appkey"], rules(cmd["rule"]))
    elif op == "flood":
        wanted = rules_to_route_config(cmd["wanted"], rules(cmd["rule"])).SerializeToString()
        if cmd.get("wanted_size"):  # the one asked for is huge too (too many routes)
            wanted = route_config(cmd["wanted"], int(cmd["wanted_size"]))
        size, n = int(cmd["size"]), int(cmd["unwanted"])
        one = route_config("x", size)[len(_field(1, b"x")):]  # the routes, shared
        bodies = [_field(1, f"unwanted-{i:06d}".encode()) + one for i in range(n)]
        bodies.append(wanted)
        d.send_raw(_response(THRIFT_ROUTE_TYPE, bodies))
        return {"bytes": sum(map(len, bodies))}
    elif op == "pad":
        # from now on every CDS response carries, besides the clusters asked
        # for, a cluster nobody asked for padded (an unknown field, which any
        # decoder skips) so that the response is about `size` bytes; sent now
        # and again on every new stream, as a control plane would
        head = [service_to_cluster(model.Service(a, (model.Endpoint("10.0.0.1", 9000),)))
                for a in sorted(d.clusters)]
        used = len(_response(CDS, [c.SerializeToString() for c in head]).SerializeToString())
        pad = cluster_pb2.Cluster(name="padding").SerializeToString()
        pad += _field(9999, b"\0" * max(0, int(cmd["size"]) - used - len(pad) - 16))
        padding = cluster_pb2.Cluster.FromString(pad)
        d.b.extra_clusters = [padding]
        r = _response(CDS, [c.SerializeToString() for c in head] + [pad])
        d.send_raw(r)
        return {"bytes": r.ByteSize()}
    elif op == "stats":
        return {"streams": max((r.stream for r in d.requests), default=0),
                "nacks": [m for _, m in d.nacks]}
    return {}


async def main() -> None:
    d = AdsDouble()
    await d.start()
    print(json.dumps({"port": d.port}), flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read, daemon=True).start()
    while line := await lines.get():
        out = handle(d, json.loads(line))
        await asyncio.sleep(0)
        print(json.dumps(out), flush=True)
    await d.stop()


if __name__ == "__main__":
    asyncio.run(main())
