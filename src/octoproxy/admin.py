"""The admin endpoint: stats, clusters, config dump, health, drain.

Off the data path: it reads the core's counters on scrape; nothing is
counted here.  Endpoints (docs/operating.md):

    GET  /stats            Prometheus text format
    GET  /clusters         JSON: every service's nodes with labels, weights, health, active
    GET  /config_dump      JSON: effective config and the last accepted xDS resources
    GET  /governance       JSON: rate limits, quotas, breakers, ejections, retries per service
    GET  /ready            200 when serving and healthy, 503 otherwise
    POST /healthcheck/fail /healthcheck/ok
    POST /drain            stop accepting new connections, fail health; GET /drain: progress
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from octoproxy._core.constants import Status
from octoproxy._core.datapath import COUNTERS
from octoproxy.logs import repeat_limiter
from octoproxy.model import SHUNT_GLOBAL, STATUS_ALIVE

if TYPE_CHECKING:
    from octoproxy._core.datapath import Engine
    from octoproxy._core.route import RouteTable
    from octoproxy.config import Config
    from octoproxy.xds.client import XdsClient

log = logging.getLogger("octoproxy.admin")

class AdminTarget(Protocol):
    """What the admin endpoint reads from the proxy (server.Proxy satisfies it)."""

    cfg: Config
    config_path: str | None
    generation: int
    draining: bool  # handed over and draining (hot restart)
    ready: asyncio.Event
    table: RouteTable
    xds: XdsClient | None
    admin: AdminServer | None
    fd_limit_hits: int

    @property
    def engine(self) -> Engine: ...

    async def stop_accepting(self, keep_sockets: bool = False) -> None: ...


# metric labels: the core's status names, lower case ("transport"), defined once
# in _core/constants.pxd (docs/protocol.md section 5)
STATUS_NAMES = {int(v): k.removeprefix("STATUS_").lower() for k, v in Status.__members__.items()}


def status_label(s: int) -> str:
    return STATUS_NAMES.get(s, str(s))


class ProxyCollector:
    """Exports the core's counters as Prometheus metrics at scrape time."""

    def __init__(self, proxy: AdminTarget) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Any]:
        p = self.proxy
        eng = p.engine
        table = p.table
        c = eng.counters()
        # the core's counters table (COUNTERS: field, metric, help), each
        # counter as its metric or a labelled series of its family
        fams: dict[str, CounterMetricFamily] = {}
        for key, metric, doc in COUNTERS:
            name, _, label = metric.partition("{")
            lname, _, lvalue = label.rstrip("}").partition("=")
            fam = fams.get(name)
            if fam is None:
                fam = fams[name] = CounterMetricFamily(name, doc, labels=[lname] if lname else None)
            fam.add_metric([lvalue] if lname else [], c.get(key, 0))
        admin = getattr(p, "admin", None)
        fams["octo_proxy_connections_rejected"].add_metric(
            ["admin"], admin.rejected if admin is not None else 0)
        yield from fams.values()
        for name, doc, v in [
            ("octo_proxy_fd_limit_hits",
             "Seconds (1 s checks) in which the process was at its file descriptor limit",
             getattr(p, "fd_limit_hits", 0)),
            ("octo_proxy_log_lines_suppressed", "Repetitive log lines held back by the rate limit",
             repeat_limiter().suppressed),
        ]:
            m = CounterMetricFamily(name, doc)
            m.add_metric([], v)
            yield m
        errs = CounterMetricFamily("octo_proxy_errors", "Answers the proxy made itself, by status",
                                   labels=["status"])
        for s, v in sorted(c["errors"].items()):
            errs.add_metric([status_label(int(s))], v)
        yield errs

        req = CounterMetricFamily("octo_proxy_service_requests",
                                  "Requests routed, by service (one-way ones included; every "
                                  "other one is answered, by the provider or the proxy)",
                                  labels=["service"])
        ans = CounterMetricFamily("octo_proxy_service_answers",
                                  "Answers by service and status (the provider's or the proxy's)",
                                  labels=["service", "status"])
        node_req = CounterMetricFamily("octo_proxy_node_requests", "Requests routed, by node",
                                       labels=["service", "node"])
        node_active = GaugeMetricFamily("octo_proxy_node_active", "Requests in flight, by node",
                                        labels=["service", "node"])
        node_weight = GaugeMetricFamily("octo_proxy_node_effective_weight",
                                        "Weight after warm-up, by node", labels=["service", "node"])
        for appkey in sorted(table.appkeys()):
            sent = 0
            by_status: dict[int, int] = {}
            for n in table.nodes(appkey):
                sent += n.picks
                for s, v in n.answers_by_status().items():
                    by_status[s] = by_status.get(s, 0) + v
                node_req.add_metric([appkey, n.address], n.picks)
                node_active.add_metric([appkey, n.address], n.in_flight)
                node_weight.add_metric([appkey, n.address], n.effective_weight)
            req.add_metric([appkey], sent)
            for s, v in sorted(by_status.items()):
                ans.add_metric([appkey, status_label(s)], v)
        for (name, s), v in sorted(eng.route_error_counts().items()):
            ans.add_metric([name, status_label(s)], v)
        yield from (req, ans, node_req, node_active, node_weight)
        hits = CounterMetricFamily("octo_proxy_shunt_rule_hits",
                                   "Requests a traffic-shunting rule matched",
                                   labels=["scope", "rule", "outcome"])
        for s in table.shunting_stats():
            # outcome: routed (to its group or its context), fallback, rejected
            routed = s["hits"] - s["fallbacks"] - s["rejects"]
            for outcome, v in (("routed", routed), ("fallback", s["fallbacks"]),
                               ("rejected", s["rejects"])):
                hits.add_metric([s["scope"], s["name"], outcome], v)
        yield hits
        yield from auth_metrics(getattr(p, "verifiers", None) or {},
                                getattr(p, "signers", None) or {})

        buckets, total = eng.latency_histogram()
        h = HistogramMetricFamily("octo_proxy_request_duration_seconds",
                                  "Outbound request latency, app to answer")
        h.add_metric([], [(("+Inf" if b == float("inf") else repr(b)), n) for b, n in buckets],
                     total)
        yield h

        g = GaugeMetricFamily("octo_proxy_in_flight", "Requests owed an answer")
        g.add_metric([], eng.in_flight())
        yield g
        if hasattr(eng, "buffered_bytes"):
            g = GaugeMetricFamily("octo_proxy_buffered_bytes",
                                  "Receive-buffer bytes held beyond one read buffer per connection "
                                  "(limits.max_buffered_bytes)")
            g.add_metric([], eng.buffered_bytes)
            yield g
        g = GaugeMetricFamily("octo_proxy_connections", "Open connections by kind",
                              labels=["kind"])
        g.add_metric(["app"], len(eng.outbound_conns()))
        g.add_metric(["inbound"], len(eng.inbound_conns()))
        yield g
        up = GaugeMetricFamily("octo_proxy_upstream_connections",
                               "Pooled connections per remote node", labels=["upstream"])
        upf = CounterMetricFamily("octo_proxy_upstream_connect_failures",
                                  "Failed connects per remote node", labels=["upstream"])
        for addr, st in sorted(eng.pool_stats().items()):
            up.add_metric([addr], st["connections"])
            upf.add_metric([addr], st["connect_failures"])
        yield from (up, upf)
        gov = getattr(p, "gov", None)
        if gov is not None:
            yield from governance_metrics(gov)

        g = GaugeMetricFamily("octo_proxy_route_table_version", "Route table snapshot version")
        g.add_metric([], table.version)
        yield g
        g = GaugeMetricFamily("octo_proxy_hot_restart_generation", "Hot-restart generation")
        g.add_metric([], p.generation)
        yield g
        xds = getattr(p, "xds", None)
        if xds is not None:
            g = GaugeMetricFamily("octo_proxy_xds_connected", "1 while the xDS stream is up")
            g.add_metric([], 1 if xds.connected else 0)
            yield g
            g = GaugeMetricFamily("octo_proxy_xds_subscriptions", "Subscribed services")
            g.add_metric([], len(xds.subscriptions))
            yield g
            info = GaugeMetricFamily("octo_proxy_xds_version", "Last accepted version per type",
                                     labels=["type", "version"])
            for t, v in sorted(xds.versions().items()):
                info.add_metric([t, v], 1)
            yield info
            st = xds.stats
            for name, doc, value in (
                ("nacks", "Responses NACKed", st.nacks),
                ("rejected_resources", "Resources rejected in NACKed responses",
                 st.rejected_resources),
                ("resource_timeouts", "Names settled by the resource timeout",
                 st.resource_timeouts),
                ("oversized_responses",
                 "Streams reset by a response bigger than xds.max_response_bytes",
                 st.oversized_responses),
            ):  # fmt: skip
                xm = CounterMetricFamily(f"octo_proxy_xds_{name}", doc)
                xm.add_metric([], value)
                yield xm


def auth_metrics(verifiers: dict[str, Any], signers: dict[str, Any]) -> Iterator[Any]:
    """Service authentication's counters (docs/auth.md): per verifying
    inbound listener, each check's result, and the failures forwarded in
    log-only mode (the migration mode counts what it would refuse); per
    signing outbound listener, requests signed and refused."""
    if verifiers:
        checks = CounterMetricFamily(
            "octo_proxy_auth_checks",
            "Requests checked by an inbound listener's service authentication, by result "
            "(ok, or why it failed: unsigned, unknown_caller, bad_signature, expired, "
            "not_allowed, method_not_allowed)",
            labels=["listener", "provider", "result"])
        logged = CounterMetricFamily(
            "octo_proxy_auth_logged",
            "Requests that failed the check and were forwarded anyway (auth.mode log-only)",
            labels=["listener", "provider"])
        for key, v in sorted(verifiers.items()):
            provider = bytes(v.provider).decode(errors="replace")
            counts = dict(v.counters())
            logged.add_metric([key, provider], counts.pop("logged", 0))
            for result, n in counts.items():
                checks.add_metric([key, provider, result], n)
        yield from (checks, logged)
    if signers:
        signed = CounterMetricFamily(
            "octo_proxy_auth_signed", "Requests signed by an outbound listener",
            labels=["listener"])
        refused = CounterMetricFamily(
            "octo_proxy_auth_sign_refused",
            "Requests an outbound listener refused to sign (status 7: a caller appkey it does "
            "not sign for, or one it has no token for yet)", labels=["listener"])
        for path, s in sorted(signers.items()):
            signed.add_metric([path], s.n_signed)
            refused.add_metric([path], s.n_refused)
        yield from (signed, refused)


def governance_metrics(gov: Any) -> Iterator[Any]:
    """Per-service governance counters (docs/governance.md, "Operating it")."""
    from octoproxy.governance import QUOTA_MODE_NAMES

    st = gov.stats()
    limited = CounterMetricFamily("octo_proxy_rate_limited",
                                  "Requests refused by a rate-limit rule (status 6)",
                                  labels=["service", "rule", "side"])
    allowed = CounterMetricFamily("octo_proxy_rate_allowed", "Requests a rate-limit rule let through",
                                  labels=["service", "rule", "side"])
    quota = CounterMetricFamily("octo_proxy_quota_requests", "Requests checked against the cluster quota",
                                labels=["service", "result"])
    qmode = GaugeMetricFamily("octo_proxy_quota_mode", "1 for the cluster quota's current mode",
                              labels=["service", "mode"])
    qsteps = CounterMetricFamily("octo_proxy_quota_steps", "Quota steps taken from Redis",
                                 labels=["service"])
    brk = CounterMetricFamily("octo_proxy_breaker_refused", "Requests refused by a circuit breaker",
                              labels=["service", "breaker"])
    ejected = GaugeMetricFamily("octo_proxy_ejected_nodes", "Nodes ejected now", labels=["service"])
    ejections = CounterMetricFamily("octo_proxy_ejections", "Ejections so far", labels=["service"])
    retries = CounterMetricFamily("octo_proxy_retries", "Requests sent again",
                                  labels=["service", "kind"])
    budget = CounterMetricFamily("octo_proxy_retry_budget_exhausted",
                                 "Retries not made because of the retry budget", labels=["service"])
    conns = GaugeMetricFamily("octo_proxy_service_connections",
                              "Upstream connections open or connecting, opened for the service",
                              labels=["service"])
    node_ejected = GaugeMetricFamily("octo_proxy_node_ejected",
                                     "1 while the node is ejected (outlier detection)",
                                     labels=["service", "node"])
    node_ejections = CounterMetricFamily("octo_proxy_node_ejections",
                                         "Times the node was ejected", labels=["service", "node"])
    adaptive = GaugeMetricFamily("octo_proxy_adaptive_limit",
                                 "The adaptive concurrency limit (0 = off)", labels=["service"])
    for appkey, s in sorted(st.items()):
        for r in s["rate_limits"]:
            limited.add_metric([appkey, r["name"], r["side"]], r["limited"])
            allowed.add_metric([appkey, r["name"], r["side"]], r["allowed"])
        q = s["quota"]
        if q["mode"] != "off":
            quota.add_metric([appkey, "allowed"], q["allowed"])
            quota.add_metric([appkey, "limited"], q["limited"])
            for mode_name in QUOTA_MODE_NAMES.values():
                if mode_name != "off":
                    qmode.add_metric([appkey, mode_name], 1 if mode_name == q["mode"] else 0)
            qsteps.add_metric([appkey], q["steps"])
        for b, v in s["breakers"].items():
            brk.add_metric([appkey, b], v)
        ejected.add_metric([appkey], len(s["ejected"]))
        ejections.add_metric([appkey], s["ejections"])
        retries.add_metric([appkey, "unsent"], s["retries_unsent"])
        retries.add_metric([appkey, "idempotent"], s["retries"] - s["retries_unsent"])
        budget.add_metric([appkey], s["retry_budget_exhausted"])
        adaptive.add_metric([appkey], s["adaptive_limit"])
        conns.add_metric([appkey], s["connections"])
        for addr, ns in s["nodes"].items():
            node_ejected.add_metric([appkey, addr], 1 if ns["ejected"] else 0)
            node_ejections.add_metric([appkey, addr], ns["ejections"])
    yield from (limited, allowed, quota, qmode, qsteps, brk, ejected, ejections, retries, budget,
                adaptive, conns, node_ejected, node_ejections)
    r = gov.redis_stats()
    if r["configured"]:
        g = GaugeMetricFamily("octo_proxy_redis_up", "1 while the quota Redis answers")
        g.add_metric([], 1 if r["up"] else 0)
        yield g
        for mname, key, doc in (("octo_proxy_redis_failures", "failures", "Times Redis was lost"),
                               ("octo_proxy_redis_errors", "errors", "Failed Redis operations"),
                               ("octo_proxy_redis_ops", "ops", "Quota steps taken (one round trip each)")):
            m = CounterMetricFamily(mname, doc)
            m.add_metric([], r[key])
            yield m


class _Pace:
    """Turns of the loop for a long admin answer: every 2 ms of work."""

    SLICE_S = 0.002

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.start > self.SLICE_S

    async def turn(self) -> None:
        if self.due():
            await asyncio.sleep(0)
            self.start = time.perf_counter()


_SMALL = 16  # containers up to this many items are encoded in one piece


def _key(k: Any) -> str:
    """A dict key as json.dumps writes it."""
    if isinstance(k, str):
        return json.dumps(k)
    if k is True or k is False or k is None:
        return f'"{json.dumps(k)}"'
    if isinstance(k, int | float):
        return json.dumps(str(k) if isinstance(k, int) else json.dumps(k))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


def json_pieces(obj: Any) -> Iterator[str]:
    """The JSON text of obj (as json.dumps writes it) in pieces: containers
    of more than _SMALL items item by item, so a caller can stop between
    pieces; their concatenation is the whole text."""
    if isinstance(obj, dict) and (
        len(obj) > _SMALL or any(isinstance(v, dict | list | tuple) for v in obj.values())
    ):
        # a big dict, or a small one of containers (e.g. the dump's sections):
        # each value on its own
        sep = "{"
        for k, v in obj.items():
            yield f"{sep}{_key(k)}: "
            sep = ", "
            yield from json_pieces(v)
        yield "}"
    elif isinstance(obj, list | tuple) and len(obj) > _SMALL:
        sep = "["
        for v in obj:
            yield sep
            sep = ", "
            yield from json_pieces(v)
        yield "]"
    else:
        yield json.dumps(obj)


def shunting_json(table: Any) -> list[dict[str, Any]]:
    """Every shunting rule in evaluation order (per scope; the global ones
    last) with its hit counts (docs/shunting.md)."""
    from octoproxy.xds.shunting import rule_to_dict

    return [{"scope": s["scope"], "name": s["name"], "hits": s["hits"],
             "fallbacks": s["fallbacks"], "rejects": s["rejects"],
             "rule": rule_to_dict(s["rule"])} for s in table.shunting_stats()]


def _node_json(n: Any) -> dict[str, Any]:
    return {
        "address": n.address, "weight": n.weight, "effective_weight": n.effective_weight,
        "status": n.status, "healthy": n.status == STATUS_ALIVE and n.weight > 0, "role": n.role,
        "cell": n.cell, "swimlane": n.swimlane, "group": n.group, "idc": n.idc,
        "region": n.region, "warmup_s": n.warmup_s, "start_time": n.start_time, "active": n.in_flight,
        "requests": n.picks,
        "answers": {status_label(s): v for s, v in n.answers_by_status().items()},
    }


class _Refused(asyncio.Protocol):
    """An admin connection over admin.max_connections: told so, closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.close()


class AdminServer:
    """aiohttp behind a bounded listener: at most admin.max_connections open
    (one more is answered 503 and closed, counted and logged rate-limited),
    and a connection without a complete request for admin.timeout_s is
    closed (aiohttp's keep-alive timer runs from the connect), so admin
    clients cannot use up the process's file descriptors."""

    def __init__(self, proxy: AdminTarget) -> None:
        self.proxy = proxy
        adm = getattr(getattr(proxy, "cfg", None), "admin", None)
        self.max_connections: int = getattr(adm, "max_connections", 32)
        self.timeout_s: float = getattr(adm, "timeout_s", 10.0)
        self.rejected = 0
        self._server: asyncio.AbstractServer | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))
        self.health_failed = False
        self.draining = False  # POST /drain: for good (no undo)
        self.runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/clusters", self.clusters)
        app.router.add_get("/config_dump", self.config_dump)
        app.router.add_get("/governance", self.governance)
        app.router.add_get("/ready", self.ready)
        app.router.add_post("/healthcheck/fail", self.hc_fail)
        app.router.add_post("/healthcheck/ok", self.hc_ok)
        app.router.add_post("/drain", self.drain)
        app.router.add_get("/drain", self.drain_status)
        self.app = app

    async def start(self, sock: socket.socket) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    keepalive_timeout=self.timeout_s)
        await self.runner.setup()
        handlers = self.runner.server
        assert handlers is not None

        def factory() -> asyncio.BaseProtocol:
            if len(handlers.connections) >= self.max_connections:
                self.rejected += 1
                log.warning("admin connection limit (%d) reached: refusing a connection "
                            "(admin.max_connections)", self.max_connections)
                return _Refused()
            return handlers()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, sock=sock, backlog=128)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def stats(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def clusters(self, _: web.Request) -> web.Response:
        t = self.proxy.table
        gov = getattr(self.proxy, "gov", None)
        out = {}
        rules = shunting_json(t)
        pools = self.proxy.engine.pool_stats()
        for a in sorted(t.appkeys()):
            nodes = []
            for n in t.nodes(a):
                j = _node_json(n)
                # the node's pooled connections (shared by the services of its address)
                j["connections"] = pools.get(n.address, {}).get("connections", 0)
                st = gov.node_state(a, n.address) if gov is not None else None
                j.update(st or {"ejected": False, "ejected_until": None, "ejections": 0})
                nodes.append(j)
            out[a] = {"nodes": nodes, "groups": t.groups(a),
                      "shunting": [r for r in rules if r["scope"] in (a, SHUNT_GLOBAL)]}
            sst = gov.service_state(a) if gov is not None else None
            if sst is not None:
                out[a].update(sst)
        return web.json_response({"version": t.version, "services": out, "shunting": rules})

    async def governance(self, _: web.Request) -> web.Response:
        gov = getattr(self.proxy, "gov", None)
        if gov is None:
            return web.json_response({"services": {}, "redis": None})
        return web.json_response({"services": gov.stats(), "redis": gov.redis_stats()})

    async def config_dump(self, request: web.Request) -> web.StreamResponse:
        """Built a section at a time and written as JSON in pieces, the loop
        serving traffic in between: with 10,000 tokens and ACL callers the
        dump is 0.9 MB, and building and encoding it at once held the loop
        60 ms (docs/operating.md, "Admin endpoint")."""
        p = self.proxy
        xds = getattr(p, "xds", None)
        keyring = getattr(p, "keyring", None)
        pace = _Pace()
        out: dict[str, Any] = {
            "config": p.cfg.model_dump(mode="json", by_alias=True),
            "config_path": p.config_path,
            "generation": p.generation,
            "pid": os.getpid(),
        }
        await pace.turn()
        out["xds"] = xds.dump() if xds is not None else None
        await pace.turn()
        out["shunting"] = shunting_json(p.table)
        await pace.turn()
        # appkeys, versions and counts only, never a token
        out["auth"] = keyring.dump() if keyring is not None else None
        await pace.turn()
        # encoded whole before anything is sent (a value that cannot be
        # encoded is a 500, not a cut-off 200), in pieces
        chunks: list[bytes] = []
        buf: list[str] = []
        for i, piece in enumerate(json_pieces(out)):
            buf.append(piece)
            if i % 256 == 255 and pace.due():
                chunks.append("".join(buf).encode())
                buf = []
                await pace.turn()
        chunks.append("".join(buf).encode())
        resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        resp.content_length = sum(map(len, chunks))
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
        await resp.write_eof()
        return resp

    def _healthy(self) -> bool:
        p = self.proxy
        return (p.ready.is_set() and not self.health_failed and not self.draining
                and not p.draining)

    async def ready(self, _: web.Request) -> web.Response:
        if self._healthy():
            return web.Response(text="LIVE\n")
        why = "draining" if self.draining or self.proxy.draining else (
            "health check failed" if self.health_failed else "starting")
        return web.Response(status=503, text=f"NOT READY: {why}\n")

    async def hc_fail(self, _: web.Request) -> web.Response:
        self.health_failed = True
        log.info("admin: health check set to fail")
        return web.Response(text="OK\n")

    async def hc_ok(self, _: web.Request) -> web.Response:
        self.health_failed = False
        log.info("admin: health check set to ok")
        return web.Response(text="OK\n")

    async def drain(self, _: web.Request) -> web.Response:
        self.draining = True
        await self.proxy.stop_accepting()
        log.info("admin: draining (listeners closed, health failing)")
        return await self.drain_status(_)

    async def drain_status(self, _: web.Request) -> web.Response:
        return web.json_response({"draining": self.draining or bool(self.proxy.draining),
                                  "in_flight": self.proxy.engine.in_flight()})
