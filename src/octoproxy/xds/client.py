"""The xDS client: one aggregated (ADS) gRPC stream carrying CDS and EDS, on demand.

State-of-the-world (StreamAggregatedResources) or incremental
(DeltaAggregatedResources), chosen by ``xds.delta``.  It runs on the current
event loop (uvloop in production) with grpc.aio.

- `subscribe(appkeys)` / `unsubscribe(appkeys)` change the resource names asked
  for: Cluster name = appkey and ClusterLoadAssignment cluster_name = appkey.
- Every response is validated as a whole: if any resource in it is bad, it is
  NACKed (error_detail says what is wrong) and nothing of it is applied.
- Accepted changes become `model.Service` objects pushed to the `RouteSink`
  (`update_service` / `remove_service`), one call per changed service.
- Losing the stream keeps the last good config; reconnecting uses jittered
  exponential backoff and re-subscribes everything (delta: with the resource
  versions held, so the server only sends what changed).
- A subscribed resource the server does not answer for within
  ``resource_timeout_s`` is declared missing (the service does not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from octoproxy import __version__, model
from octoproxy.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ClusterSettings,
    EndpointCache,
    ResourceError,
    cla_to_endpoints,
    cluster_to_settings,
    digest,
    make_service,
)
from octoproxy.xds.sink import RouteSink

if TYPE_CHECKING:
    from octoproxy.config import Config

log = logging.getLogger("octoproxy.xds")

TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE)
# a subscribed cluster absent from a SotW CDS response is declared missing this much later
SOTW_ABSENT_GRACE_S = 0.5
_SHORT = {CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS"}


class ResourceState(enum.Enum):
    PENDING = "pending"  # subscribed, nothing known yet
    READY = "ready"  # cluster and endpoints known (and pushed to the sink)
    MISSING = "missing"  # the control plane says it does not exist, or it timed out


@dataclass
class XdsStats:
    streams: int = 0  # streams opened
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    services_updated: int = 0
    services_removed: int = 0
    last_nack: str = ""
    last_error: str = ""
    connected_since: float = 0.0


@dataclass(slots=True)
class _Entry:
    settings: ClusterSettings | None = None
    cluster_raw: bytes | None = None  # digest of the accepted serialized Cluster
    cluster_version: str = ""
    endpoints: tuple[model.Endpoint, ...] | None = None
    cla_raw: bytes | None = None  # digest of the accepted serialized ClusterLoadAssignment
    cla_version: str = ""
    ep_cache: EndpointCache = field(default_factory=dict)
    state: ResourceState = ResourceState.PENDING
    pushed: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Plan:
    """What an accepted response changes (computed fully before anything is applied)."""

    clusters: dict[str, tuple[ClusterSettings, bytes, str]] = field(default_factory=dict)
    clas: dict[str, tuple[tuple[model.Endpoint, ...], bytes, str, EndpointCache]] = field(
        default_factory=dict
    )
    removed_clusters: list[str] = field(default_factory=list)
    removed_clas: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # SotW: not in a CDS response yet


def build_node(node_id: str, cluster: str, labels: model.Labels) -> base_pb2.Node:
    node = base_pb2.Node(
        id=node_id, cluster=cluster, user_agent_name="octo-proxy", user_agent_version=__version__
    )
    node.locality.region = labels.region
    node.locality.zone = labels.idc
    node.metadata.update(
        {"liteset": labels.liteset, "set": labels.set, "swimlane": labels.swimlane}
    )
    return node


def _status(message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message[:4096])


class XdsClient:
    """On-demand CDS+EDS over one ADS stream, feeding a `RouteSink`."""

    def __init__(
        self,
        server: str,
        sink: RouteSink,
        *,
        node_id: str,
        cluster: str = "octo-mesh",
        labels: model.Labels | None = None,
        delta: bool = False,
        connect_timeout_s: float = 5.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        resource_timeout_s: float = 15.0,
    ) -> None:
        self.server = server
        self.sink = sink
        self.delta = delta
        self.node = build_node(node_id, cluster, labels or model.Labels())
        self.connect_timeout_s = connect_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.resource_timeout_s = resource_timeout_s
        self.stats = XdsStats()
        self._subs: set[str] = set()
        self._entries: dict[str, _Entry] = {}
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._changed = asyncio.Event()
        self._dirty = asyncio.Event()
        # per stream
        self._call: Any = None
        self._write_lock = asyncio.Lock()
        self._node_sent = False
        self._sent_names: dict[str, set[str]] = {t: set() for t in TYPES}
        self._started_types: set[str] = set()
        self._nonce: dict[str, str] = dict.fromkeys(TYPES, "")
        # per type, across streams (SotW): the last accepted version_info
        self._version: dict[str, str] = dict.fromkeys(TYPES, "")
        self._slice_start = 0.0

    @classmethod
    def from_config(cls, cfg: Config, sink: RouteSink) -> XdsClient:
        if not cfg.xds.server:
            raise ValueError("xds.server is not set")
        return cls(
            cfg.xds.server,
            sink,
            node_id=cfg.node.id,
            cluster=cfg.node.cluster,
            labels=cfg.node.labels(),
            delta=cfg.xds.delta,
            connect_timeout_s=cfg.xds.connect_timeout_s,
            backoff_base_s=cfg.xds.backoff_base_s,
            backoff_max_s=cfg.xds.backoff_max_s,
            resource_timeout_s=cfg.xds.resource_timeout_s,
        )

    # --- public API ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while an ADS stream is established."""
        return self._connected

    @property
    def subscriptions(self) -> frozenset[str]:
        return frozenset(self._subs)

    def state(self, appkey: str) -> ResourceState | None:
        """None when not subscribed."""
        e = self._entries.get(appkey)
        return e.state if e is not None else None

    def service(self, appkey: str) -> model.Service | None:
        """The last service pushed to the sink for appkey (None if none)."""
        e = self._entries.get(appkey)
        if e is None or e.settings is None or e.endpoints is None:
            return None
        return make_service(e.settings, e.endpoints)

    def versions(self) -> dict[str, str]:
        """Last accepted version per type (SotW version_info; delta system_version_info)."""
        return {_SHORT[t]: self._version[t] for t in TYPES}

    def dump(self) -> dict[str, Any]:
        """JSON-able state for the admin config dump."""
        subs: dict[str, Any] = {}
        for name in sorted(self._entries):
            e = self._entries[name]
            subs[name] = {
                "state": e.state.value,
                "cluster_version": e.cluster_version,
                "endpoints_version": e.cla_version,
                "lb_policy": e.settings.lb_policy.value if e.settings else None,
                "endpoints": len(e.endpoints) if e.endpoints is not None else None,
            }
        return {
            "server": self.server,
            "mode": "delta" if self.delta else "sotw",
            "node": {"id": self.node.id, "cluster": self.node.cluster},
            "connected": self._connected,
            "versions": self.versions(),
            "stats": dataclasses.asdict(self.stats),
            "subscriptions": subs,
        }

    def start(self) -> None:
        """Start the stream task on the running loop (returns at once)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xds-client")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for e in self._entries.values():
            self._cancel_timer(e)

    def subscribe(self, appkeys: Iterable[str]) -> set[str]:
        """Ask for these services; returns the ones that were not subscribed yet."""
        added = {a for a in appkeys if a and a not in self._subs}
        for a in added:
            self._subs.add(a)
            self._entries[a] = _Entry()
        if added:
            self._dirty.set()
            self._notify()
        return added

    def unsubscribe(self, appkeys: Iterable[str]) -> set[str]:
        """Stop asking for these services; they are removed from the sink."""
        removed = {a for a in appkeys if a in self._subs}
        for a in removed:
            self._subs.discard(a)
            e = self._entries.pop(a)
            self._cancel_timer(e)
            if e.pushed:
                self._sink_remove(a)
        if removed:
            self._dirty.set()
            self._notify()
        return removed

    async def wait_for(
        self, appkeys: Iterable[str], timeout: float
    ) -> dict[str, ResourceState | None]:
        """Wait until none of appkeys is PENDING (or timeout); returns their states."""
        keys = list(appkeys)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._changed
            states = {k: self.state(k) for k in keys}
            if all(s is not ResourceState.PENDING for s in states.values()):
                return states
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return states
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._connected:
            ev = self._changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)
        return True

    # --- internals ----------------------------------------------------------

    def _notify(self) -> None:
        ev = self._changed
        self._changed = asyncio.Event()
        ev.set()

    def _set_connected(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            self.stats.connected_since = time.time() if up else 0.0
            self._notify()

    def _cancel_timer(self, e: _Entry) -> None:
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None

    def _sink_update(self, appkey: str, e: _Entry) -> None:
        assert e.settings is not None and e.endpoints is not None
        try:
            self.sink.update_service(make_service(e.settings, e.endpoints))
            e.pushed = True
            self.stats.services_updated += 1
        except Exception:
            log.exception("route sink rejected service %s", appkey)

    def _sink_remove(self, appkey: str) -> None:
        try:
            self.sink.remove_service(appkey)
            self.stats.services_removed += 1
        except Exception:
            log.exception("route sink failed to remove service %s", appkey)

    def _backoff(self, attempt: int) -> float:
        cap: float = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(attempt, 30)))
        return cap * random.uniform(0.5, 1.0)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            got_response = False
            try:
                got_response = await self._stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self.stats.last_error = f"{e.code().name}: {e.details()}"
                log.warning("xDS stream to %s failed: %s", self.server, self.stats.last_error)
            except Exception as e:
                self.stats.last_error = repr(e)
                log.warning("xDS stream to %s failed: %r", self.server, e)
            finally:
                self._set_connected(False)
                for entry in self._entries.values():
                    self._cancel_timer(entry)
            if got_response:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            log.info("reconnecting to xDS server %s in %.2fs", self.server, delay)
            await asyncio.sleep(delay)

    async def _stream(self) -> bool:
        """One stream, until it ends. True if a response was received on it."""
        got = False
        channel = grpc.aio.insecure_channel(
            self.server,
            options=[
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        writer: asyncio.Task[None] | None = None
        try:
            try:
                await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
            except TimeoutError:
                raise ConnectionError(f"cannot connect to {self.server}") from None
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = (
                stub.DeltaAggregatedResources() if self.delta else stub.StreamAggregatedResources()
            )
            self._call = call
            self._node_sent = False
            self._sent_names = {t: set() for t in TYPES}
            self._started_types = set()
            self._nonce = dict.fromkeys(TYPES, "")
            self.stats.streams += 1
            self._dirty.set()
            writer = asyncio.get_running_loop().create_task(self._writer(call))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    self.stats.last_error = "stream closed by server"
                    log.warning("xDS server %s closed the stream", self.server)
                    return got
                got = True
                self.stats.responses += 1
                req = await (self._on_delta(resp) if self.delta else self._on_sotw(resp))
                await self._write(call, req)
        finally:
            self._call = None
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            await channel.close(grace=None)

    async def _write(self, call: Any, req: Any) -> None:
        async with self._write_lock:
            await call.write(req)

    def _with_node(self, req: Any) -> Any:
        if not self._node_sent:
            req.node.CopyFrom(self.node)
            self._node_sent = True
        return req

    async def _writer(self, call: Any) -> None:
        """Sends subscription changes (coalesced) while the stream lives."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                # connected: the first request of the stream is going out now
                self._set_connected(True)
                for t in TYPES:  # CDS before EDS
                    req = self._sub_request(t)
                    if req is not None:
                        await self._write(call, req)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("xDS write failed: %r", e)
            call.cancel()

    def _sub_request(self, t: str) -> Any:
        """The request that brings the server to our subscription set for t (None: nothing to do)."""
        want = self._subs
        sent = self._sent_names[t]
        if want == sent and t in self._started_types:
            return None
        if t not in self._started_types and not want:
            return None  # never ask for nothing (an empty first request means wildcard)
        new = want - sent
        if self.delta:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
            if t not in self._started_types:
                req.resource_names_subscribe.extend(sorted(want))
                for name in want:
                    e = self._entries[name]
                    v = e.cluster_version if t == CLUSTER_TYPE else e.cla_version
                    if v:
                        req.initial_resource_versions[name] = v
            else:
                req.resource_names_subscribe.extend(sorted(new))
                req.resource_names_unsubscribe.extend(sorted(sent - want))
        else:
            req = self._sotw_request(t)
        self._started_types.add(t)
        self._sent_names[t] = set(want)
        if t == CLUSTER_TYPE:
            for name in new:
                self._arm_timer(name)
        return self._with_node(req)

    def _sotw_request(self, t: str, error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=self._version[t], response_nonce=self._nonce[t]
        )
        req.resource_names.extend(sorted(self._subs))
        if error is not None:
            req.error_detail.CopyFrom(_status(error))
        return req

    def _arm_timer(self, name: str) -> None:
        e = self._entries.get(name)
        if e is None or e.state is not ResourceState.PENDING:
            return
        self._cancel_timer(e)
        e.timer = asyncio.get_running_loop().call_later(
            self.resource_timeout_s, self._on_timeout, name
        )

    def _on_timeout(self, name: str) -> None:
        e = self._entries.get(name)
        if e is None:
            return
        e.timer = None
        if e.state is not ResourceState.PENDING:
            return
        if e.settings is None:
            log.warning("xDS: Cluster %r does not exist (not answered): declared missing", name)
            e.state = ResourceState.MISSING
        else:
            log.warning(
                "xDS: no endpoints for %r after %.1fs: serving it empty",
                name,
                self.resource_timeout_s,
            )
            e.endpoints = ()
            e.state = ResourceState.READY
            self._sink_update(name, e)
        self._notify()

    # --- responses ----------------------------------------------------------

    def _decode(self, t: str, type_url: str, raw: bytes, where: str) -> Any:
        if type_url != t:
            raise ResourceError(f"{where}: resource type {type_url} in a {t} response")
        cls = cluster_pb2.Cluster if t == CLUSTER_TYPE else endpoint_pb2.ClusterLoadAssignment
        try:
            return cls.FromString(raw)
        except DecodeError as e:
            raise ResourceError(f"{where}: cannot decode {cls.__name__}: {e}") from None

    async def _pace(self) -> None:
        """Let the loop serve traffic while a big response is being validated."""
        now = time.perf_counter()
        if now - self._slice_start > 0.002:
            await asyncio.sleep(0)
            self._slice_start = time.perf_counter()

    def _plan_cluster(self, plan: _Plan, name: str, body: bytes, version: str, msg: Any) -> None:
        e = self._entries[name]
        raw = digest(body)
        if raw == e.cluster_raw:
            if version != e.cluster_version:
                assert e.settings is not None
                plan.clusters[name] = (e.settings, raw, version)
            return
        c = msg if msg is not None else self._decode(CLUSTER_TYPE, CLUSTER_TYPE, body, name)
        if c.name != name:
            raise ResourceError(f"Cluster {c.name!r} delivered under the name {name!r}")
        plan.clusters[name] = (cluster_to_settings(c), raw, version)

    def _plan_cla(self, plan: _Plan, name: str, body: bytes, version: str, msg: Any) -> None:
        e = self._entries[name]
        if e.settings is None and name not in plan.clusters:
            raise ResourceError(
                f"ClusterLoadAssignment {name!r}: no Cluster {name!r} received (CDS must come first)"
            )
        raw = digest(body)
        if raw == e.cla_raw:
            if version != e.cla_version:
                assert e.endpoints is not None
                plan.clas[name] = (e.endpoints, raw, version, e.ep_cache)
            return
        cla = msg if msg is not None else self._decode(ENDPOINT_TYPE, ENDPOINT_TYPE, body, name)
        if cla.cluster_name != name:
            raise ResourceError(
                f"ClusterLoadAssignment {cla.cluster_name!r} delivered under the name {name!r}"
            )
        cache: EndpointCache = {}
        plan.clas[name] = (cla_to_endpoints(cla, e.ep_cache, cache), raw, version, cache)

    def _check_service_names(self, plan: _Plan) -> None:
        if not plan.clusters:
            return
        owner: dict[str, str] = {}
        removed = set(plan.removed_clusters)
        for name, e in self._entries.items():
            if name in removed:
                continue
            s = plan.clusters[name][0] if name in plan.clusters else e.settings
            if s is None:
                continue
            for sn in s.service_names:
                other = owner.setdefault(sn, name)
                if other != name:
                    a, b = sorted((other, name))
                    raise ResourceError(
                        f"service name {sn!r} is claimed by both Cluster {a!r} and Cluster {b!r}"
                    )

    async def _plan_sotw(self, resp: discovery_pb2.DiscoveryResponse) -> _Plan:
        t = resp.type_url
        plan = _Plan()
        seen: set[str] = set()
        for i, any_ in enumerate(resp.resources):
            await self._pace()
            msg = self._decode(t, any_.type_url, any_.value, f"resources[{i}]")
            name = msg.name if t == CLUSTER_TYPE else msg.cluster_name
            if not name:
                kind = "Cluster" if t == CLUSTER_TYPE else "ClusterLoadAssignment"
                raise ResourceError(f"resources[{i}]: {kind} without a name")
            if name in seen:
                raise ResourceError(f"resources[{i}]: {name!r} appears twice in the response")
            seen.add(name)
            if name not in self._entries:
                continue  # not (or no longer) subscribed
            if t == CLUSTER_TYPE:
                self._plan_cluster(plan, name, any_.value, "", msg)
            else:
                self._plan_cla(plan, name, any_.value, "", msg)
        if t == CLUSTER_TYPE:
            # SotW CDS carries every subscribed cluster: absent means gone / does not exist
            for name in self._sent_names[CLUSTER_TYPE]:
                e = self._entries.get(name)
                if e is None or name in seen:
                    continue
                if e.settings is not None:
                    plan.removed_clusters.append(name)
                elif e.state is ResourceState.PENDING:
                    plan.absent.append(name)
            self._check_service_names(plan)
        return plan

    async def _plan_delta(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> _Plan:
        t = resp.type_url
        plan = _Plan()
        seen: set[str] = set()
        for i, r in enumerate(resp.resources):
            await self._pace()
            where = f"resources[{i}] ({r.name!r})"
            if not r.name:
                raise ResourceError(f"resources[{i}]: Resource without a name")
            if r.name in seen:
                raise ResourceError(f"{where}: appears twice in the response")
            seen.add(r.name)
            if r.name not in self._entries:
                continue
            if not r.HasField("resource"):
                raise ResourceError(f"{where}: Resource without a resource body")
            if r.resource.type_url != t:
                raise ResourceError(
                    f"{where}: resource type {r.resource.type_url} in a {t} response"
                )
            if t == CLUSTER_TYPE:
                self._plan_cluster(plan, r.name, r.resource.value, r.version, None)
            else:
                self._plan_cla(plan, r.name, r.resource.value, r.version, None)
        for name in resp.removed_resources:
            if name in seen:
                raise ResourceError(f"{name!r} is both updated and removed in the response")
            e = self._entries.get(name)
            if e is None:
                continue
            if t == CLUSTER_TYPE:
                if e.settings is not None:
                    plan.removed_clusters.append(name)
                elif e.state is ResourceState.PENDING:
                    plan.missing.append(name)
            elif e.endpoints is not None or e.settings is not None:
                plan.removed_clas.append(name)
        if t == CLUSTER_TYPE:
            self._check_service_names(plan)
        return plan

    def _apply(self, plan: _Plan) -> None:
        changed: set[str] = set()
        # names unsubscribed while the plan was being made are skipped
        for name, (settings, raw, version) in plan.clusters.items():
            e = self._entries.get(name)
            if e is None:
                continue
            if e.settings != settings:
                changed.add(name)
            e.settings, e.cluster_raw, e.cluster_version = settings, raw, version
        for name, (eps, raw, version, cache) in plan.clas.items():
            e = self._entries.get(name)
            if e is None:
                continue
            if e.endpoints != eps:
                changed.add(name)
            e.endpoints, e.cla_raw, e.cla_version, e.ep_cache = eps, raw, version, cache
        for name in plan.removed_clas:
            e = self._entries.get(name)
            if e is None:
                continue
            if e.endpoints is None or e.endpoints:
                changed.add(name)
            e.endpoints, e.cla_raw, e.cla_version, e.ep_cache = (), None, "", {}
        for name in plan.removed_clusters:
            e = self._entries.get(name)
            if e is None:
                continue
            log.info("xDS: Cluster %r removed by the control plane", name)
            e.settings = e.endpoints = e.cluster_raw = e.cla_raw = None
            e.cluster_version = e.cla_version = ""
            e.ep_cache = {}
            e.state = ResourceState.MISSING
            self._cancel_timer(e)
            if e.pushed:
                e.pushed = False
                self._sink_remove(name)
        for name in plan.missing:
            e = self._entries.get(name)
            if e is None:
                continue
            log.info("xDS: Cluster %r does not exist", name)
            e.state = ResourceState.MISSING
            self._cancel_timer(e)
        for name in plan.absent:
            # Absent from a SotW CDS response: it does not exist, unless that response
            # was built before the server saw the request that added the name.  Its
            # answer to that request would follow at once, so wait a short grace.
            e = self._entries.get(name)
            if e is None or e.state is not ResourceState.PENDING:
                continue
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(SOTW_ABSENT_GRACE_S, self.resource_timeout_s)
            if e.timer is None or e.timer.when() > deadline:
                self._cancel_timer(e)
                e.timer = loop.call_at(deadline, self._on_timeout, name)
        for name in changed:
            e = self._entries[name]
            if e.settings is not None and e.endpoints is not None:
                e.state = ResourceState.READY
                self._cancel_timer(e)
                self._sink_update(name, e)
        if changed or plan.removed_clusters or plan.missing:
            self._notify()

    def _nack(self, t: str, nonce: str, err: str) -> None:
        self.stats.nacks += 1
        self.stats.last_nack = err
        log.error("xDS: rejecting %s response (nonce %s): %s", _SHORT.get(t, t), nonce, err)

    async def _on_sotw(
        self, resp: discovery_pb2.DiscoveryResponse
    ) -> discovery_pb2.DiscoveryRequest:
        t = resp.type_url
        if t not in TYPES:
            self._nack(t, resp.nonce, f"unsupported type {t}")
            req = discovery_pb2.DiscoveryRequest(type_url=t, response_nonce=resp.nonce)
            req.error_detail.CopyFrom(_status(f"unsupported type {t}"))
            return req
        self._nonce[t] = resp.nonce
        try:
            self._slice_start = time.perf_counter()
            plan = await self._plan_sotw(resp)
        except ResourceError as e:
            self._nack(t, resp.nonce, str(e))
            req = self._sotw_request(t, str(e))
        else:
            self._apply(plan)
            self._version[t] = resp.version_info
            self.stats.acks += 1
            req = self._sotw_request(t)
        # every SotW request carries the whole subscription: this one may add names
        new = self._subs - self._sent_names[t]
        self._sent_names[t] = set(self._subs)
        if t == CLUSTER_TYPE:
            for name in new:
                self._arm_timer(name)
        return self._with_node(req)

    async def _on_delta(
        self, resp: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        t = resp.type_url
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce)
        if t not in TYPES:
            self._nack(t, resp.nonce, f"unsupported type {t}")
            req.error_detail.CopyFrom(_status(f"unsupported type {t}"))
            return self._with_node(req)
        try:
            self._slice_start = time.perf_counter()
            plan = await self._plan_delta(resp)
        except ResourceError as e:
            self._nack(t, resp.nonce, str(e))
            req.error_detail.CopyFrom(_status(str(e)))
        else:
            self._apply(plan)
            self.stats.acks += 1
            if resp.system_version_info:
                self._version[t] = resp.system_version_info
        return self._with_node(req)
