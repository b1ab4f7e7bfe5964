"""A scriptable ADS control plane for tests: a real grpc.aio server whose
behaviour can be set to that of the control planes met in production.

Behaviours (all off by default = a well-behaved server that answers every
request at once and resends newly requested resources):

- ``eds_first``: answers a request for new EDS names before the CDS request
  that names the same clusters (CDS answers are held ``cds_hold_s``).
- ``resend_after_nack``: resend the last response of a type after a NACK
  (off: like the bundled control plane, Istio and go-control-plane's delta
  server, a NACKed resource is sent again only when it changes).
- ``ignore_stale_nonce``: SotW requests whose ``response_nonce`` is not the
  last nonce sent for that type are recorded and otherwise ignored, as the
  xDS protocol document allows.
- ``only_changed``: an assignment already sent on the stream is never sent
  again unless its content changes, even when its name is unsubscribed and
  subscribed again.
- ``extra_clusters``: unrelated clusters (any type) added to every CDS
  response, as a wildcard-minded server might send.
- ``delay_s``: per type URL, every answer of that type is delayed.
- ``stale_cds_first``: before answering a CDS request that adds names, send
  a CDS response built for the previous name set (a push that crossed the
  request), then the real answer ``stale_gap_s`` later.
- ``routes_first``: shunting rules (Thrift RouteConfiguration, ``TRDS``) are
  pushed before clusters and assignments, and CDS/EDS answers to new names
  are held ``cds_hold_s`` while TRDS ones go at once (as a go-control-plane
  snapshot with no ordering guarantee across types may).
- ``resend_same_routes``: SotW: every TRDS answer carries every requested
  RouteConfiguration, changed or not, under the same version_info when
  nothing changed (go-control-plane's SotW cache resends a whole type).
- ``resend_all``: every push answers every type, and every answer of a type
  other than CDS (and TRDS) carries every subscribed resource of that type,
  changed or not, under a new version (as go-control-plane's SotW server does
  when a new snapshot version is set).

TRDS resources are set with ``put_routes`` / ``remove_routes``; delta
streams get ``removed_resources`` for names without a RouteConfiguration.
Other types (SDS secrets, RBAC extension configs...) are served from
``other`` (type URL -> name -> message, the name being the message's
``name``) with ``put_other`` / ``remove_other``, like EDS: SotW responses
carry what changed (absence says nothing), delta ``removed_resources``.
``push_order`` sets the order in which types are pushed after a change
(e.g. SDS before CDS).

The double checks the client while it serves, into ``violations``:

- an EDS name requested before any CDS request named it (on that stream);
- SotW: the first request carrying a response's nonce is neither its ACK
  (version_info = that response's version) nor a NACK (error_detail): the
  client wrote a request between receiving a response and answering it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.filters.network.thrift_proxy.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from octoproxy import model
from octoproxy.xds import CLUSTER_TYPE, ENDPOINT_TYPE, service_to_cla, service_to_cluster
from octoproxy.xds.shunting import THRIFT_ROUTE_TYPE, resource_of, rules_to_route_config

CDS, EDS, TRDS = CLUSTER_TYPE, ENDPOINT_TYPE, THRIFT_ROUTE_TYPE
TYPES = (CDS, EDS, TRDS)


def _version(msg: Any) -> str:
    return hashlib.blake2b(msg.SerializeToString(deterministic=True), digest_size=6).hexdigest()


def _name(t: str, msg: Any) -> str:
    return str(msg.cluster_name if t == EDS else msg.name)


@dataclass
class Behaviour:
    eds_first: bool = False
    cds_hold_s: float = 0.2
    resend_after_nack: bool = False
    ignore_stale_nonce: bool = False
    only_changed: bool = False
    extra_clusters: list[cluster_pb2.Cluster] = field(default_factory=list)
    delay_s: dict[str, float] = field(default_factory=dict)
    stale_cds_first: bool = False
    stale_gap_s: float = 0.1
    routes_first: bool = False
    resend_same_routes: bool = False
    resend_all: bool = False
    push_order: list[str] = field(default_factory=list)


@dataclass
class Received:
    stream: int
    delta: bool
    msg: Any


class _Stream:
    def __init__(self, sid: int, delta: bool) -> None:
        self.id = sid
        self.delta = delta
        self.names: dict[str, set[str]] = collections.defaultdict(set)
        self.started: set[str] = set()
        # type -> name -> version sent (None: told "does not exist" (delta))
        self.sent: dict[str, dict[str, str | None]] = collections.defaultdict(dict)
        self.cds_named: set[str] = set()  # every name any CDS request carried
        self.last_nonce: dict[str, str] = collections.defaultdict(str)
        self.responses: dict[str, Any] = {}  # nonce -> response
        self.answered: set[str] = set()  # nonces that got their first request
        self.last_response: dict[str, Any] = {}
        self.out: asyncio.Queue[Any] = asyncio.Queue()


class AdsDouble(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """See the module docstring.  ``await start()`` then use ``target``."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.b = behaviour or Behaviour()
        self.clusters: dict[str, cluster_pb2.Cluster] = {}
        self.assignments: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
        self.routes: dict[str, route_pb2.RouteConfiguration] = {}
        self._routes_version = 0
        self.other: dict[str, dict[str, Any]] = {}  # type URL -> name -> message
        self.requests: list[Received] = []
        self.responses: list[tuple[int, Any]] = []
        self.nacks: list[tuple[str, str]] = []  # (type_url, message)
        self.ignored: list[Received] = []  # stale-nonce requests dropped
        self.violations: list[str] = []
        self.streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    # --- the world ---------------------------------------------------------

    def put(self, *services: model.Service, cluster_only: bool = False) -> None:
        """Add or change services (Cluster + assignment) and push to every stream."""
        for s in services:
            self.clusters[s.appkey] = service_to_cluster(s)
            if not cluster_only:
                self.assignments[s.appkey] = service_to_cla(s)
        self.push()

    def put_raw(self, t: str, *msgs: Any) -> None:
        for m in msgs:
            self._world(t)[_name(t, m)] = m
        if t == TRDS:
            self._routes_version += 1
        self.push()

    def put_routes(self, scope: str, rules: Iterable[model.ShuntRule]) -> None:
        """Set the shunting rules of a scope (an appkey or model.SHUNT_GLOBAL) and push."""
        self.put_raw(TRDS, rules_to_route_config(scope, tuple(rules)))

    def remove_routes(self, *scopes: str) -> None:
        for sc in scopes:
            self.routes.pop(resource_of(sc), None)
        self._routes_version += 1
        self.push()

    def remove(self, *appkeys: str) -> None:
        for a in appkeys:
            self.clusters.pop(a, None)
            self.assignments.pop(a, None)
        self.push()

    def put_other(self, t: str, *msgs: Any) -> None:
        """Add or change resources of another type (named by their ``name``)."""
        for m in msgs:
            self.other.setdefault(t, {})[m.name] = m
        self.push()

    def remove_other(self, t: str, *names: str) -> None:
        for n in names:
            self.other.get(t, {}).pop(n, None)
        self.push()

    def push(self) -> None:
        order: tuple[str, ...] = (EDS, CDS, TRDS) if self.b.eds_first else TYPES
        if self.b.routes_first:
            order = (TRDS, *[t for t in order if t != TRDS])
        order = (*order, *self.other)
        if self.b.push_order:
            order = (*self.b.push_order, *(t for t in order if t not in self.b.push_order))
        for s in list(self.streams.values()):
            for t in order:
                if t in s.started:
                    self._answer(s, t, set())

    def send_raw(self, response: Any) -> None:
        """Send this response (its nonce is set here) on every stream."""
        for s in self.streams.values():
            r = type(response)()
            r.CopyFrom(response)
            self._emit(s, r, 0.0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests_of(self, t: str) -> list[Any]:
        return [r.msg for r in self.requests if r.msg.type_url == t]

    # --- serving -------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    def _emit(self, s: _Stream, resp: Any, delay: float) -> None:
        resp.nonce = f"n{next(self._nonces)}"
        t = resp.type_url
        s.responses[resp.nonce] = resp

        def go() -> None:
            s.last_nonce[t] = resp.nonce
            s.last_response[t] = resp
            self.responses.append((s.id, resp))
            s.out.put_nowait(resp)

        delay = max(delay, self.b.delay_s.get(t, 0.0))
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, go)
        else:
            go()

    def _world(self, t: str) -> dict[str, Any]:
        return {CDS: self.clusters, EDS: self.assignments, TRDS: self.routes}[t]

    def _resources(self, t: str) -> dict[str, Any]:
        if t not in TYPES:
            return dict(self.other.get(t, {}))
        return dict(self._world(t))

    def _answer(self, s: _Stream, t: str, added: set[str], delay: float = 0.0) -> None:
        """Send what changed for type t (``added``: names just subscribed)."""
        world = self._resources(t)
        names = s.names[t]
        sent = s.sent[t]
        if s.delta:
            r = discovery_pb2.DeltaDiscoveryResponse(type_url=t, system_version_info="d")
            for n in sorted(names):
                m = world.get(n)
                if m is not None:
                    v = _version(m)
                    resend = n in added and not self.b.only_changed
                    if resend or sent.get(n) != v:
                        sent[n] = v
                        res = r.resources.add(name=n, version=v)
                        res.resource.CopyFrom(any_pb2.Any(type_url=t, value=m.SerializeToString()))
                elif n not in sent or sent[n] is not None:
                    sent[n] = None
                    r.removed_resources.append(n)
            if r.resources or r.removed_resources:
                self._emit(s, r, delay)
            return
        present = {n: world[n] for n in names if n in world}
        if t == CDS:
            state = {n: _version(m) for n, m in present.items()}
            if not added and state == {n: v for n, v in sent.items() if v is not None}:
                return
            s.sent[t] = dict(state)
            msgs = [present[n] for n in sorted(present)] + list(self.b.extra_clusters)
        elif t == TRDS and self.b.resend_same_routes:
            # the whole type, under a version that changes only with the routes
            for n in present:
                sent[n] = _version(present[n])
            msgs = [present[n] for n in sorted(present)]
            r = discovery_pb2.DiscoveryResponse(
                type_url=t,
                version_info=f"r{self._routes_version}",
                resources=[any_pb2.Any(type_url=t, value=m.SerializeToString()) for m in msgs],
            )
            self._emit(s, r, delay)
            return
        else:
            msgs = []
            for n in sorted(present):
                v = _version(present[n])
                resend = n in added and not self.b.only_changed
                if resend or sent.get(n) != v or self.b.resend_all:
                    sent[n] = v
                    msgs.append(present[n])
            if not msgs:
                return
        r = discovery_pb2.DiscoveryResponse(
            type_url=t,
            version_info=f"v{next(self._nonces)}",
            resources=[any_pb2.Any(type_url=t, value=m.SerializeToString()) for m in msgs],
        )
        self._emit(s, r, delay)

    def _check(self, s: _Stream, req: Any) -> None:
        t = req.type_url
        new = set(req.resource_names_subscribe) if s.delta else set(req.resource_names)
        if t == CDS:
            s.cds_named |= new
        elif t == EDS:
            early = sorted(new - s.cds_named)
            if early:
                self.violations.append(f"stream {s.id}: EDS request for {early} before CDS")
        nonce = req.response_nonce
        if not s.delta and nonce and nonce not in s.answered:
            s.answered.add(nonce)
            resp = s.responses.get(nonce)
            if (
                resp is not None
                and not req.HasField("error_detail")
                and req.version_info != resp.version_info
            ):
                self.violations.append(
                    f"stream {s.id}: first request after response {nonce} ({t}) is neither "
                    f"its ACK nor a NACK (version {req.version_info!r})"
                )

    def _on_request(self, s: _Stream, req: Any) -> None:
        t = req.type_url
        self.requests.append(Received(s.id, s.delta, req))
        self._check(s, req)
        if req.HasField("error_detail"):
            self.nacks.append((t, req.error_detail.message))
        if (
            not s.delta
            and self.b.ignore_stale_nonce
            and t in s.started
            and req.response_nonce != s.last_nonce[t]
        ):
            self.ignored.append(Received(s.id, s.delta, req))
            return
        first = t not in s.started
        s.started.add(t)
        old = set(s.names[t])
        if s.delta:
            s.names[t] |= set(req.resource_names_subscribe)
            s.names[t] -= set(req.resource_names_unsubscribe)
            if first:
                for n, v in req.initial_resource_versions.items():
                    s.sent[t][n] = v
        else:
            s.names[t] = set(req.resource_names)
        added = s.names[t] - old
        for n in old - s.names[t]:
            if not self.b.only_changed:
                s.sent[t].pop(n, None)
        if req.HasField("error_detail"):
            if self.b.resend_after_nack and t in s.last_response:
                r = type(s.last_response[t])()
                r.CopyFrom(s.last_response[t])
                self._emit(s, r, 0.0)
            if not added and s.names[t] == old:
                return
        if not first and not added and s.names[t] == old:
            return
        if t == CDS and self.b.stale_cds_first and added and not s.delta:
            stale = {n: self.clusters[n] for n in old if n in self.clusters}
            r = discovery_pb2.DiscoveryResponse(
                type_url=CDS,
                version_info=f"v{next(self._nonces)}",
                resources=[
                    any_pb2.Any(type_url=CDS, value=m.SerializeToString()) for m in stale.values()
                ],
            )
            self._emit(s, r, 0.0)
            self._answer(s, t, added, delay=self.b.stale_gap_s)
            return
        hold = self.b.cds_hold_s if (t == CDS and self.b.eds_first and added) else 0.0
        if self.b.routes_first and added and t in (CDS, EDS):
            hold = self.b.cds_hold_s
        self._answer(s, t, added, delay=hold)

    async def _serve(self, it: AsyncIterator[Any], delta: bool) -> AsyncIterator[Any]:
        s = _Stream(next(self._ids), delta)
        self.streams[s.id] = s

        async def reader() -> None:
            try:
                async for req in it:
                    self._on_request(s, req)
            finally:
                s.out.put_nowait(None)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                r = await s.out.get()
                if r is None:
                    break
                yield r
        finally:
            self.streams.pop(s.id, None)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(request_iterator, False):
            yield r

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(request_iterator, True):
            yield r


def services(prefix: str, n: int, nodes: int = 2) -> list[model.Service]:
    return [
        model.Service(
            f"{prefix}{i:03d}",
            tuple(model.Endpoint(f"10.{i // 250}.{i % 250}.{k + 1}", 9000) for k in range(nodes)),
        )
        for i in range(n)
    ]


def names(svcs: Iterable[model.Service]) -> list[str]:
    return [s.appkey for s in svcs]
