"""The xDS client: one aggregated (ADS) gRPC stream carrying CDS and EDS, on demand.

State-of-the-world (StreamAggregatedResources) or incremental
(DeltaAggregatedResources), chosen by ``xds.delta``.  It runs on the current
event loop (uvloop in production) with grpc.aio.  The rules it follows are
those of the xDS protocol document (docs/xds.md section 1 lists them):

- `subscribe(appkeys)` / `unsubscribe(appkeys)` change the resource names asked
  for: Cluster name = appkey and ClusterLoadAssignment cluster_name = appkey.
  Every request goes through one FIFO, computed when it is queued: the CDS
  request naming an appkey is always queued before (never after) the EDS
  request naming it, and nothing is queued while a response is being
  handled, so its ACK/NACK is the next request of the stream.
- Each resource of a response is validated on its own: valid ones are
  applied, invalid ones are NACKed (every one named in ``error_detail``).
- An assignment that arrives before its cluster is kept and used when the
  cluster arrives; a service is READY once it has its cluster and (EDS) its
  assignment, or once the resource timeout ran out (served empty, counted).
- Does not exist: delta ``removed_resources``; a cluster seen before and
  absent from a SotW CDS response; or no answer within ``resource_timeout_s``
  (15 s by default, as the document recommends).
- Accepted changes become `model.Service` objects pushed to the `RouteSink`
  (`update_service` / `remove_service`), one call per changed service.
- Traffic-shunting rules: a Thrift RouteConfiguration (TRDS) per subscribed
  appkey plus ``octo/global``, handled by `xds.shunting.RuleResources` (a
  `TypeHandler`, added like SDS and RBAC) and pushed with
  ``update_shunting``; each is NACKed whole when invalid.
- Every type other than CDS and EDS goes through one path (`add_type`): the
  same nonce, version, ACK and NACK handling, SotW and delta.
- Losing the stream keeps the last good config; reconnecting uses jittered
  exponential backoff and re-subscribes everything (delta: with the resource
  versions held, so the server only sends what changed).
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
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from octoproxy import __version__, model
from octoproxy.waiting import wait_until
from octoproxy.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ClusterSettings,
    EndpointCache,
    ResourceError,
    appkey_problem,
    cla_to_endpoints,
    cluster_to_settings,
    digest,
    make_service,
)
from octoproxy.xds.shunting import RuleResources
from octoproxy.xds.sink import RouteSink
from octoproxy.xds.wire import BIG_BODY, resource_name, split_response

if TYPE_CHECKING:
    from octoproxy.config import Config

log = logging.getLogger("octoproxy.xds")

# the client's own types; the others (shunting rules, tokens, ACLs) are TypeHandlers
TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE)
_SHORT = {CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS"}
_KIND = {CLUSTER_TYPE: "Cluster", ENDPOINT_TYPE: "ClusterLoadAssignment"}
# gRPC servers refuse messages above 4 MiB unless told otherwise
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SUBSCRIPTIONS = 10_000
_REQUEST_OVERHEAD = 16 * 1024  # node, type URL, version, nonce, error detail
_NAME_OVERHEAD = 4  # protobuf tag + length of a repeated string
_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


class TypeHandler(Protocol):
    """Another resource type on the same ADS stream (the shunting rules,
    xds/shunting.py; SDS secrets and RBAC ACLs, xds/authsource.py), added
    with `XdsClient.add_type`.  The client
    asks for `names()` (never a wildcard: nothing until there is a name),
    hands every response of the type to `on_response`, and ACKs it, or NACKs
    it with the problems returned (the handler keeps the last good version of
    a rejected resource).  Call `XdsClient.names_changed` when `names()` changes.
    A handler may also have ``steps(resources, removed, sotw)``: a generator
    doing on_response's work in steps and returning its problems; the client
    then lets the loop serve traffic between steps (every 2 ms of work), and
    waits for what a step yields when it is not None (a future, e.g. a
    worker thread's; the handler reads its result)."""

    type_url: str
    short: str  # for logs and versions(), e.g. "SDS"

    def names(self) -> set[str]: ...

    def versions(self) -> dict[str, str]:
        """Delta: the version held per name (initial_resource_versions)."""
        ...

    def on_response(
        self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool
    ) -> list[str]:
        """resources: (name, version, Any) ("" for SotW: the name is inside the
        resource); removed: delta removed_resources.  Returns the problems."""
        ...

    def dump(self) -> dict[str, Any]:
        """JSON-able state for the admin config dump (never a secret value)."""
        ...


class ResourceState(enum.Enum):
    PENDING = "pending"  # subscribed, not settled yet
    READY = "ready"  # cluster and endpoints known (and pushed to the sink)
    MISSING = "missing"  # the control plane says it does not exist, or it timed out
    INVALID = "invalid"  # the control plane sent it, it was rejected (NACKed), nothing usable


class SubscriptionError(ValueError):
    """A subscription that is refused; nothing of the call was subscribed."""

    status = 400


class BadAppkey(SubscriptionError):
    status = 400


class TooManySubscriptions(SubscriptionError):
    status = 429


def new_subscriptions(subs: set[str] | frozenset[str], appkeys: Iterable[str],
                      max_subscriptions: int) -> list[str]:
    """The appkeys not in `subs` yet, in order; raises BadAppkey or
    TooManySubscriptions if subscribing them would be refused.  The one rule
    for the xDS client and static discovery."""
    added = [a for a in dict.fromkeys(appkeys) if a not in subs]
    for a in added:
        problem = appkey_problem(a)
        if problem is not None:
            raise BadAppkey(problem)
    if len(subs) + len(added) > max_subscriptions:
        raise TooManySubscriptions(
            f"subscription limit reached: {len(subs)} subscribed, {len(added)} more "
            f"asked for, at most {max_subscriptions} (xds.max_subscriptions)"
        )
    return added


@dataclass
class XdsStats:
    streams: int = 0  # streams opened
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    rejected_resources: int = 0  # resources NACKed (a NACK names one or more)
    resource_timeouts: int = 0  # names settled by the resource timeout
    oversized_responses: int = 0  # streams reset by a response over max_response_bytes
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
    # the accepted assignment: kept without a cluster (it may come first, and
    # a removed cluster may come back); None = none yet
    cla: tuple[model.Endpoint, ...] | None = None
    cla_raw: bytes | None = None  # digest of the accepted serialized ClusterLoadAssignment
    cla_version: str = ""
    ep_cache: EndpointCache = field(default_factory=dict)
    state: ResourceState = ResourceState.PENDING
    timed_out: bool = False  # served without an assignment after the resource timeout
    removed: bool = False  # the cluster was removed by the control plane (not yet back)
    error: str = ""  # why the last version of this resource was rejected
    pushed: model.Service | None = None  # what the sink has from us
    timer: asyncio.TimerHandle | None = None
    asked_at: float = 0.0  # loop time of the request the timer runs for


@dataclass
class _Plan:
    """What a response changes (computed fully before anything is applied)."""

    clusters: dict[str, tuple[ClusterSettings, bytes, str]] = field(default_factory=dict)
    clas: dict[str, tuple[tuple[model.Endpoint, ...], bytes, str, EndpointCache]] = field(
        default_factory=dict
    )
    removed_clusters: list[str] = field(default_factory=list)
    removed_clas: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why
    errors: list[str] = field(default_factory=list)  # every problem, for error_detail


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


def handler_args(resp: Any, delta: bool) -> tuple[list[tuple[str, str, Any]], list[str], bool]:
    """A response as `TypeHandler.on_response` takes it: (resources, removed, sotw)."""
    if delta:
        resources = [(r.name, r.version, r.resource if r.HasField("resource") else None)
                     for r in resp.resources]
        return resources, list(resp.removed_resources), False
    return [("", "", r) for r in resp.resources], [], True


def _status(errors: list[str]) -> status_pb2.Status:
    message = "; ".join(errors)
    if len(message) > 4096:
        message = message[:4000] + f"... ({len(errors)} problems in all)"
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)


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
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.server = server
        self.sink = sink
        self.delta = delta
        self.node = build_node(node_id, cluster, labels or model.Labels())
        self.connect_timeout_s = connect_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.resource_timeout_s = resource_timeout_s
        self.max_subscriptions = max_subscriptions
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.stats = XdsStats()
        self._subs: set[str] = set()
        self._names_bytes = 0  # what the names take in a SotW request
        self._entries: dict[str, _Entry] = {}
        # the shunting rules (per appkey + the global ones): a TypeHandler, added below
        self._rules = RuleResources(sink)
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._changed = asyncio.Event()
        # per stream
        self._out: asyncio.Queue[Any] | None = None  # requests, in wire order
        self._busy = False  # a response is being handled: its ACK/NACK goes first
        self._flush_soon: asyncio.Handle | None = None
        self._node_sent = False
        self._sent_names: dict[str, set[str]] = {t: set() for t in TYPES}
        self._started_types: set[str] = set()
        self._nonce: dict[str, str] = dict.fromkeys(TYPES, "")
        self._eds_refresh: set[str] = set()  # EDS names to drop and ask for again
        # per type, across streams (SotW): the last accepted version_info
        self._version: dict[str, str] = dict.fromkeys(TYPES, "")
        self._slice_start = 0.0
        self._got_response = False  # on the current stream
        self._extra: dict[str, TypeHandler] = {}  # type URL -> handler (add_type)
        self.add_type(self._rules)  # first: its requests go right after CDS and EDS

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
            max_subscriptions=cfg.xds.max_subscriptions,
            max_request_bytes=cfg.xds.max_request_bytes,
            max_response_bytes=cfg.xds.max_response_bytes,
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

    def error(self, appkey: str) -> str:
        """Why the control plane's last version of appkey was rejected ("" if it was not)."""
        e = self._entries.get(appkey)
        return e.error if e is not None else ""

    def service(self, appkey: str) -> model.Service | None:
        """The last service pushed to the sink for appkey (None if none)."""
        e = self._entries.get(appkey)
        return e.pushed if e is not None else None

    def versions(self) -> dict[str, str]:
        """Last accepted version per type (SotW version_info; delta system_version_info)."""
        out = {_SHORT[t]: self._version[t] for t in TYPES}
        out.update({h.short: self._version[t] for t, h in self._extra.items()})
        return out

    def add_type(self, handler: TypeHandler) -> None:
        """Carry another resource type on the stream (before start())."""
        t = handler.type_url
        self._extra[t] = handler
        self._sent_names[t] = set()
        self._nonce[t] = ""
        self._version[t] = ""

    def names_changed(self) -> None:
        """An added type's names() changed: ask for the new set soon."""
        self._schedule_flush()

    def _types(self) -> tuple[str, ...]:
        return TYPES + tuple(self._extra)

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
                "static": bool(e.settings and e.settings.static_endpoints is not None),
                "endpoints": len(e.pushed.endpoints) if e.pushed is not None else None,
                "error": e.error,
            }
        return {
            "server": self.server,
            "mode": "delta" if self.delta else "sotw",
            "node": {"id": self.node.id, "cluster": self.node.cluster},
            "connected": self._connected,
            "versions": self.versions(),
            "stats": dataclasses.asdict(self.stats),
            "subscriptions": subs,
            "shunting": self._rules.dump(),
            **{h.short: h.dump() for h in self._extra.values() if h is not self._rules},
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

    def check(self, appkeys: Iterable[str]) -> list[str]:
        """The appkeys not subscribed yet; raises SubscriptionError (BadAppkey,
        TooManySubscriptions) if subscribing them would be refused."""
        added = new_subscriptions(self._subs, appkeys, self.max_subscriptions)
        more = sum(len(a.encode()) + _NAME_OVERHEAD for a in added)
        # a SotW request carries every name (delta requests are split instead)
        if not self.delta and self._names_bytes + more + _REQUEST_OVERHEAD > self.max_request_bytes:
            raise TooManySubscriptions(
                f"subscription limit reached: the names would not fit a request of "
                f"{self.max_request_bytes} bytes (xds.max_request_bytes)"
            )
        return added

    def subscribe(self, appkeys: Iterable[str]) -> set[str]:
        """Ask for these services; returns the ones that were not subscribed yet.
        Raises SubscriptionError (and subscribes none of them) if one is refused."""
        added = self.check(appkeys)
        for a in added:
            self._subs.add(a)
            self._names_bytes += len(a.encode()) + _NAME_OVERHEAD
            self._entries[a] = _Entry()
        if added:
            self._rules.sync(self._subs)
            self._schedule_flush()
            self._notify()
        return set(added)

    def unsubscribe(self, appkeys: Iterable[str]) -> set[str]:
        """Stop asking for these services; they are removed from the sink."""
        removed = {a for a in appkeys if a in self._subs}
        for a in removed:
            self._subs.discard(a)
            self._names_bytes -= len(a.encode()) + _NAME_OVERHEAD
            e = self._entries.pop(a)
            self._eds_refresh.discard(a)
            self._cancel_timer(e)
            if e.pushed is not None:
                self._sink_remove(a)
        if removed:
            self._rules.sync(self._subs)
            self._schedule_flush()
            self._notify()
        return removed

    async def wait_for(
        self, appkeys: Iterable[str], timeout: float
    ) -> dict[str, ResourceState | None]:
        """Wait until none of appkeys is PENDING (or timeout); returns their states."""
        keys = list(appkeys)
        await wait_until(lambda: all(self.state(k) is not ResourceState.PENDING for k in keys),
                         lambda: self._changed, timeout)
        return {k: self.state(k) for k in keys}

    async def wait_connected(self, timeout: float) -> bool:
        return await wait_until(lambda: self._connected, lambda: self._changed, timeout)

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

    def _push(self, appkey: str, e: _Entry) -> None:
        """Make the sink hold the entry's service (if it is complete and changed)."""
        assert e.settings is not None
        eps = e.cla if e.cla is not None else ()
        svc = make_service(e.settings, eps)
        if svc == e.pushed:
            return
        try:
            self.sink.update_service(svc)
            e.pushed = svc
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
            self._got_response = False
            try:
                await self._stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self.stats.last_error = f"{e.code().name}: {e.details()}"
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # gRPC refused a response over the limit before anything of
                    # it was read (no nonce to NACK): the stream is reset, and
                    # a server that sends it again each time is met with a
                    # growing backoff, not a reconnect every half second
                    self.stats.oversized_responses += 1
                    self._got_response = False
                    log.error(
                        "xDS: a response from %s is bigger than xds.max_response_bytes "
                        "(%d bytes; %s): the stream is reset and the last good config "
                        "stays in use",
                        self.server, self.max_response_bytes, e.details(),
                    )
                else:
                    log.warning("xDS stream to %s failed: %s", self.server,
                                self.stats.last_error)
            except Exception as e:
                # e.g. a response that is not one: sent again at each reconnect,
                # it must meet a growing backoff too
                self._got_response = False
                self.stats.last_error = repr(e)
                log.warning("xDS stream to %s failed: %r", self.server, e)
            finally:
                self._set_connected(False)
                for entry in self._entries.values():
                    self._cancel_timer(entry)
            if self._got_response:
                # the stream worked: the next failure starts the backoff over
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            log.info("reconnecting to xDS server %s in %.2fs", self.server, delay)
            await asyncio.sleep(delay)

    async def _stream(self) -> None:
        """One stream, until it ends (self._got_response: a response was read on it)."""
        channel = grpc.aio.insecure_channel(
            self.server,
            options=[
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.max_receive_message_length", self.max_response_bytes),
                ("grpc.max_send_message_length", self.max_request_bytes),
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
            # responses arrive as wire data and are decoded a piece at a time
            # (_read), not by gRPC in one call on the loop
            req_cls = (
                discovery_pb2.DeltaDiscoveryRequest if self.delta
                else discovery_pb2.DiscoveryRequest
            )
            call: Any = channel.stream_stream(
                _ADS_METHOD + ("DeltaAggregatedResources" if self.delta
                               else "StreamAggregatedResources"),
                request_serializer=req_cls.SerializeToString,
                response_deserializer=None,
            )()
            self._node_sent = False
            self._sent_names = {t: set() for t in self._types()}
            self._started_types = set()
            self._nonce = dict.fromkeys(self._types(), "")
            self._eds_refresh = set()
            self._busy = False
            self._out = asyncio.Queue()
            self.stats.streams += 1
            writer = asyncio.get_running_loop().create_task(self._writer(call, self._out))
            self._flush()
            self._set_connected(True)
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    self.stats.last_error = "stream closed by server"
                    log.warning("xDS server %s closed the stream", self.server)
                    return
                assert isinstance(raw, bytes)
                resp = await self._read(raw)
                del raw
                self._got_response = True
                self.stats.responses += 1
                # nothing else is queued until this response is ACKed or NACKed
                self._busy = True
                try:
                    req = await (self._on_delta(resp) if self.delta else self._on_sotw(resp))
                    self._out.put_nowait(self._with_node(req))
                finally:
                    self._busy = False
                self._flush()
        finally:
            self._out = None
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            await channel.close(grace=None)

    async def _writer(self, call: Any, out: asyncio.Queue[Any]) -> None:
        """Writes the queued requests, in order, while the stream lives."""
        try:
            while True:
                await call.write(await out.get())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("xDS write failed: %r", e)
            call.cancel()

    def _with_node(self, req: Any) -> Any:
        if not self._node_sent:
            req.node.CopyFrom(self.node)
            self._node_sent = True
        return req

    def _schedule_flush(self) -> None:
        """Coalesce the subscription changes of this loop iteration into one flush."""
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Queue the requests that bring the server to our subscription set:
        CDS first, then EDS for names CDS asked for.  Not while a response is
        being handled (its ACK/NACK must be the next request); called again then."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if self._out is None or self._busy:
            return
        self._sub_requests(CLUSTER_TYPE, set(self._subs))
        # EDS names are always a subset of what CDS requests already carried
        self._sub_requests(ENDPOINT_TYPE, self._subs & self._sent_names[CLUSTER_TYPE])
        for t, h in self._extra.items():
            self._sub_requests(t, h.names())

    def _sub_requests(self, t: str, want: set[str]) -> None:
        assert self._out is not None
        sent = self._sent_names[t]
        started = t in self._started_types
        refresh: set[str] = set()
        if t == ENDPOINT_TYPE:
            # names not asked for yet get their assignment with their first request
            refresh = self._eds_refresh & want & sent
            self._eds_refresh.clear()
        if not started and not want:
            return  # never ask for nothing (an empty first request means wildcard)
        if started and want == sent and not refresh:
            return
        if refresh:
            # asked for again, the server must send it again (a re-added cluster's
            # assignment that a server sending only changes would not resend)
            for req in self._requests(t, want - refresh, sent):
                self._out.put_nowait(self._with_node(req))
            sent = want - refresh
        for req in self._requests(t, want, sent):
            self._out.put_nowait(self._with_node(req))
        self._started_types.add(t)
        self._sent_names[t] = set(want)
        if t == CLUSTER_TYPE:
            for name in want - sent:
                self._arm_timer(name)
        else:
            for name in refresh:
                self._arm_timer(name)

    def _requests(self, t: str, want: set[str], sent: set[str]) -> list[Any]:
        """The request(s) from subscription ``sent`` to ``want`` for type t.
        Delta requests are split so none exceeds max_request_bytes."""
        if not self.delta:
            req = self._sotw_request(t)
            del req.resource_names[:]
            req.resource_names.extend(sorted(want))
            return [req]
        first = t not in self._started_types
        sub = sorted(want if first else want - sent)
        unsub = sorted(sent - want)
        out: list[Any] = []
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
        size = _REQUEST_OVERHEAD
        for kind, names in (("sub", sub), ("unsub", unsub)):
            for name in names:
                version = ""
                if kind == "sub" and first and t in self._extra:
                    version = self._extra[t].versions().get(name, "")
                elif kind == "sub" and first:
                    e = self._entries.get(name)
                    if e is not None:
                        version = e.cluster_version if t == CLUSTER_TYPE else e.cla_version
                        if t == ENDPOINT_TYPE and e.cla is None:
                            version = ""
                n = len(name.encode()) * (2 if version else 1) + len(version) + 3 * _NAME_OVERHEAD
                if size + n > self.max_request_bytes and (
                    req.resource_names_subscribe or req.resource_names_unsubscribe
                ):
                    out.append(req)
                    req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
                    size = _REQUEST_OVERHEAD
                size += n
                if kind == "unsub":
                    req.resource_names_unsubscribe.append(name)
                else:
                    req.resource_names_subscribe.append(name)
                    if version:
                        req.initial_resource_versions[name] = version
        out.append(req)
        return out

    def _sotw_request(
        self, t: str, errors: list[str] | None = None
    ) -> discovery_pb2.DiscoveryRequest:
        """A SotW request for t carrying the names last asked for (an ACK, or a NACK)."""
        req = discovery_pb2.DiscoveryRequest(
            type_url=t, version_info=self._version[t], response_nonce=self._nonce[t]
        )
        req.resource_names.extend(sorted(self._sent_names[t]))
        if errors:
            req.error_detail.CopyFrom(_status(errors))
        return req

    def _arm_timer(self, name: str) -> None:
        """Start the resource timeout for a name just asked for (if it is not settled)."""
        e = self._entries.get(name)
        if e is None or e.state is not ResourceState.PENDING:
            return
        self._cancel_timer(e)
        loop = asyncio.get_running_loop()
        e.asked_at = loop.time()
        e.timer = loop.call_later(self.resource_timeout_s, self._on_timeout, name)

    def _on_timeout(self, name: str) -> None:
        e = self._entries.get(name)
        if e is None:
            return
        e.timer = None
        if e.state is not ResourceState.PENDING:
            return
        loop = asyncio.get_running_loop()
        if self._busy:
            # a response is being validated and may carry it: it was received
            # in time; decide once that response is applied
            e.timer = loop.call_later(0.05, self._on_timeout, name)
            return
        waited = loop.time() - e.asked_at
        self.stats.resource_timeouts += 1
        if e.settings is None:
            log.warning(
                "xDS: Cluster %r not received %.1fs after it was requested: "
                "it does not exist (it is still used if it comes later)",
                name,
                waited,
            )
            e.state = ResourceState.MISSING
        else:
            log.warning(
                "xDS: no ClusterLoadAssignment for %r %.1fs after it was requested: "
                "serving it with no endpoints until one comes",
                name,
                waited,
            )
            e.timed_out = True
            e.state = ResourceState.READY
            self._push(name, e)
        self._notify()

    # --- responses ----------------------------------------------------------

    async def _read(self, raw: bytes) -> Any:
        """A response from its wire data, decoded a run of resources (about
        1 MiB) at a time with the loop served in between: a response of
        hundreds of MiB decoded at once holds the loop for as long
        (docs/xds.md section 7).  Wire data that is not a response raises
        DecodeError (the stream is reset, as gRPC's own decoding would)."""
        cls = discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        self._slice_start = time.perf_counter()
        steps = split_response(raw)
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    rest, runs = stop.value
                    break
                await self._pace()
        except DecodeError:
            return cls.FromString(raw)  # protobuf's own verdict (it raises)
        resp = cls.FromString(rest)
        view = memoryview(raw)
        big = False
        try:
            for a, b in runs:
                if b - a >= BIG_BODY:
                    # a big resource: its copy is a piece of its own, not one
                    # more step of gRPC's receiving or of the handling after
                    big = True
                    await asyncio.sleep(0)
                else:
                    await self._pace()
                resp.MergeFromString(view[a:b])
        finally:
            view.release()
        if big:
            await asyncio.sleep(0)
        return resp

    async def _digest(self, body: bytes) -> bytes:
        """digest(body); a big body's in a worker thread (hashlib lets go of
        the GIL), not on the loop."""
        if len(body) < BIG_BODY:
            return digest(body)
        d = await asyncio.get_running_loop().run_in_executor(None, digest, body)
        self._slice_start = time.perf_counter()
        return d

    def _decode(self, t: str, raw: bytes, where: str) -> Any:
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

    def _plan_one(
        self,
        plan: _Plan,
        t: str,
        name: str,
        body: bytes,
        version: str,
        msg: Any,
        raw: bytes | None = None,
    ) -> None:
        e = self._entries[name]
        if raw is None:
            raw = digest(body)
        try:
            if t == CLUSTER_TYPE:
                if raw == e.cluster_raw:
                    if version != e.cluster_version:
                        assert e.settings is not None
                        plan.clusters[name] = (e.settings, raw, version)
                    return
                c = msg if msg is not None else self._decode(t, body, f"Cluster {name!r}")
                if c.name != name:
                    raise ResourceError(f"Cluster {c.name!r} delivered under the name {name!r}")
                plan.clusters[name] = (cluster_to_settings(c), raw, version)
            else:
                if raw == e.cla_raw:
                    if version != e.cla_version:
                        assert e.cla is not None
                        plan.clas[name] = (e.cla, raw, version, e.ep_cache)
                    return
                where = f"ClusterLoadAssignment {name!r}"
                cla = msg if msg is not None else self._decode(t, body, where)
                if cla.cluster_name != name:
                    raise ResourceError(
                        f"ClusterLoadAssignment {cla.cluster_name!r} delivered under the name {name!r}"
                    )
                # the first assignment of a name is converted plainly (most are
                # never updated); from the second on, unchanged LbEndpoints are
                # remembered by digest and reused
                cache: EndpointCache = {}
                new_cache = cache if e.cla is not None else None
                eps = cla_to_endpoints(cla, e.ep_cache, new_cache)
                plan.clas[name] = (eps, raw, version, cache)
        except ResourceError as bad:
            plan.rejected[name] = str(bad)
            plan.errors.append(str(bad))

    def _check_service_names(self, plan: _Plan) -> None:
        """A RequestInfo.serviceName routes to one appkey: a cluster of this
        response claiming a name another cluster holds is rejected."""
        if not plan.clusters:
            return
        owner: dict[str, str] = {}
        gone = set(plan.removed_clusters) | set(plan.clusters)
        for name, e in self._entries.items():
            if name not in gone and e.settings is not None:
                for sn in e.settings.service_names:
                    owner.setdefault(sn, name)
        for name in list(plan.clusters):
            settings = plan.clusters[name][0]
            clash = next((sn for sn in settings.service_names if owner.get(sn, name) != name), None)
            if clash is not None:
                a, b = sorted((owner[clash], name))
                err = (
                    f"Cluster {name!r}: service name {clash!r} is claimed by both "
                    f"Cluster {a!r} and Cluster {b!r}"
                )
                del plan.clusters[name]
                plan.rejected[name] = err
                plan.errors.append(err)
                continue
            for sn in settings.service_names:
                owner[sn] = name

    async def _plan_sotw(self, resp: discovery_pb2.DiscoveryResponse) -> _Plan:
        t = resp.type_url
        plan = _Plan()
        named: dict[str, bytes | None] = {}  # name -> body (None: not asked for)
        twice: set[str] = set()
        unnamed = False  # a resource whose name is unknown: it might be any of ours
        for i, any_ in enumerate(resp.resources):
            await self._pace()
            if any_.type_url != t:
                plan.errors.append(
                    f"resources[{i}]: resource type {any_.type_url} in a {t} response"
                )
                unnamed = True
                continue
            body = any_.value
            # its name only (field 1 of both types): one not asked for is never
            # decoded; a wanted one is, by _plan_one, unless its digest shows
            # it unchanged (SotW servers resend: CDS always, EDS often)
            try:
                name = resource_name(body)
            except DecodeError as bad:
                plan.errors.append(f"resources[{i}]: cannot decode {_KIND[t]}: {bad}")
                unnamed = True
                continue
            if not name:
                plan.errors.append(f"resources[{i}]: {_KIND[t]} without a name")
                unnamed = True
                continue
            if name in named:
                twice.add(name)
                continue
            named[name] = body if name in self._entries else None
        for name in sorted(twice):
            err = f"{_KIND[t]} {name!r}: appears twice in the response"
            plan.errors.append(err)
            if name in self._entries:
                plan.rejected[name] = err
        for name, body in named.items():
            if body is not None and name in self._entries and name not in twice:
                await self._pace()
                self._plan_one(plan, t, name, body, "", None, await self._digest(body))
        if t == CLUSTER_TYPE:
            # SotW CDS responses carry every subscribed cluster that exists: one
            # seen before and absent now was removed.  One never seen may just
            # not be known to the server yet (the response may predate the
            # request naming it): only the resource timeout settles it.
            if not unnamed:
                for name in self._sent_names[CLUSTER_TYPE]:
                    e = self._entries.get(name)
                    if e is not None and name not in named and e.settings is not None:
                        plan.removed_clusters.append(name)
            self._check_service_names(plan)
        return plan

    async def _plan_delta(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> _Plan:
        t = resp.type_url
        plan = _Plan()
        seen: set[str] = set()
        for i, r in enumerate(resp.resources):
            await self._pace()
            if not r.name:
                plan.errors.append(f"resources[{i}]: Resource without a name")
                continue
            if r.name in seen:
                err = f"{_KIND[t]} {r.name!r}: appears twice in the response"
                plan.errors.append(err)
                plan.clusters.pop(r.name, None)
                plan.clas.pop(r.name, None)
                if r.name in self._entries:
                    plan.rejected[r.name] = err
                continue
            seen.add(r.name)
            if r.name not in self._entries:
                continue
            err = ""
            if not r.HasField("resource"):
                err = f"{_KIND[t]} {r.name!r}: Resource without a resource body"
            elif r.resource.type_url != t:
                err = (
                    f"{_KIND[t]} {r.name!r}: resource type {r.resource.type_url} in a {t} response"
                )
            if err:
                plan.rejected[r.name] = err
                plan.errors.append(err)
                continue
            body = r.resource.value
            self._plan_one(plan, t, r.name, body, r.version, None, await self._digest(body))
        for name in resp.removed_resources:
            if name in seen:
                err = f"{_KIND[t]} {name!r}: both updated and removed in the response"
                plan.errors.append(err)
                plan.clusters.pop(name, None)
                plan.clas.pop(name, None)
                continue
            e = self._entries.get(name)
            if e is None:
                continue
            if t == CLUSTER_TYPE:
                if e.settings is not None:
                    plan.removed_clusters.append(name)
                elif e.state is not ResourceState.MISSING:
                    plan.missing.append(name)
            elif e.cla is not None or e.settings is not None:
                plan.removed_clas.append(name)
        if t == CLUSTER_TYPE:
            self._check_service_names(plan)
        return plan

    def _apply(self, plan: _Plan) -> None:
        touched: set[str] = set()
        # names unsubscribed while the plan was being made are skipped
        for name, (settings, raw, version) in plan.clusters.items():
            e = self._entries.get(name)
            if e is None:
                continue
            was_eds = e.settings is not None and e.settings.static_endpoints is None
            if settings.static_endpoints is None and (e.removed or (e.settings and not was_eds)):
                # a cluster back after a removal (or now EDS): ask for its assignment
                # again, a server sending only changes would not resend it
                self._eds_refresh.add(name)
            e.settings, e.cluster_raw, e.cluster_version = settings, raw, version
            e.removed = False
            touched.add(name)
        for name, (eps, raw, version, cache) in plan.clas.items():
            e = self._entries.get(name)
            if e is None:
                continue
            e.cla, e.cla_raw, e.cla_version, e.ep_cache = eps, raw, version, cache
            touched.add(name)
        for name in plan.removed_clas:
            e = self._entries.get(name)
            if e is None:
                continue
            # the cluster (if any) stays, with no endpoints
            e.cla = () if e.settings is not None else None
            e.cla_raw, e.cla_version, e.ep_cache = None, "", {}
            touched.add(name)
        for name in plan.removed_clusters:
            e = self._entries.get(name)
            if e is None:
                continue
            log.info("xDS: Cluster %r removed by the control plane", name)
            e.settings, e.cluster_raw, e.cluster_version = None, None, ""
            e.removed, e.timed_out = True, False
            if e.cla_raw is None:
                e.cla = None  # keep a received assignment only, for when it comes back
            e.state = ResourceState.MISSING
            e.error = ""
            self._cancel_timer(e)
            if e.pushed is not None:
                e.pushed = None
                self._sink_remove(name)
            touched.discard(name)
        for name in plan.missing:
            e = self._entries.get(name)
            if e is None:
                continue
            log.info("xDS: Cluster %r does not exist", name)
            e.state = ResourceState.MISSING
            self._cancel_timer(e)
        for name, err in plan.rejected.items():
            e = self._entries.get(name)
            if e is None:
                continue
            self.stats.rejected_resources += 1
            e.error = err
            if e.state is ResourceState.PENDING and name not in touched:
                # nothing usable: settle it now rather than at the timeout
                e.state = ResourceState.INVALID
                self._cancel_timer(e)
        for name in touched:
            e = self._entries[name]
            if name not in plan.rejected:
                e.error = ""
            if e.settings is None:
                continue  # an assignment waiting for its cluster
            if e.settings.static_endpoints is None and e.cla is None and not e.timed_out:
                # a cluster waiting for its assignment (again: after a removal,
                # a timeout or a rejection it gets a resource timeout of its own)
                if e.state is not ResourceState.PENDING:
                    e.state = ResourceState.PENDING
                    self._arm_timer(name)
                continue
            e.state = ResourceState.READY
            self._cancel_timer(e)
            self._push(name, e)
        if touched or plan.removed_clusters or plan.missing or plan.rejected:
            self._notify()

    async def _handle(self, t: str, resp: Any) -> list[str]:
        """Validate and apply a response of a known type; the problems found (NACK if any)."""
        self._slice_start = time.perf_counter()
        if t in self._extra:
            return await self._extra_errors(t, resp)
        plan = await (self._plan_delta(resp) if self.delta else self._plan_sotw(resp))
        self._apply(plan)
        return plan.errors

    def _nack(self, t: str, nonce: str, errors: list[str]) -> None:
        self.stats.nacks += 1
        self.stats.last_nack = "; ".join(errors)[:4096]
        log.error(
            "xDS: rejecting %s response (nonce %s), %d problem(s): %s",
            _SHORT.get(t) or (self._extra[t].short if t in self._extra else t),
            nonce,
            len(errors),
            self.stats.last_nack,
        )

    async def _on_sotw(
        self, resp: discovery_pb2.DiscoveryResponse
    ) -> discovery_pb2.DiscoveryRequest:
        t = resp.type_url
        if t not in TYPES and t not in self._extra:
            errors = [f"unsupported type {t}"]
            self._nack(t, resp.nonce, errors)
            req = discovery_pb2.DiscoveryRequest(type_url=t, response_nonce=resp.nonce)
            req.error_detail.CopyFrom(_status(errors))
            return req
        self._nonce[t] = resp.nonce
        errors = await self._handle(t, resp)
        if errors:
            # the valid resources are applied; the version stays the last fully accepted one
            self._nack(t, resp.nonce, errors)
            return self._sotw_request(t, errors)
        self._version[t] = resp.version_info
        self.stats.acks += 1
        return self._sotw_request(t)

    async def _on_delta(
        self, resp: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        t = resp.type_url
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce)
        if t not in TYPES and t not in self._extra:
            errors = [f"unsupported type {t}"]
            self._nack(t, resp.nonce, errors)
            req.error_detail.CopyFrom(_status(errors))
            return req
        errors = await self._handle(t, resp)
        if errors:
            self._nack(t, resp.nonce, errors)
            req.error_detail.CopyFrom(_status(errors))
        else:
            self.stats.acks += 1
            if resp.system_version_info:
                self._version[t] = resp.system_version_info
        return req

    # --- added types (add_type) ---------------------------------------------

    async def _extra_errors(self, t: str, resp: Any) -> list[str]:
        """Hand a response to its TypeHandler; the problems it found."""
        h = self._extra[t]
        try:
            steps = getattr(h, "steps", None)
            if steps is None:
                errors = h.on_response(*handler_args(resp, self.delta))
            else:
                # a handler that works in steps (a generator whose return value
                # is on_response's): the loop serves traffic between them, so
                # thousands of secrets do not hold the data path at once
                gen = steps(*handler_args(resp, self.delta))
                while True:
                    try:
                        wait = next(gen)
                    except StopIteration as stop:
                        errors = stop.value
                        break
                    if wait is not None:
                        # work the handler runs elsewhere (a thread); its outcome,
                        # an error included, is the handler's to read
                        await asyncio.wait([wait])
                        self._slice_start = time.perf_counter()
                    else:
                        await self._pace()
        except Exception as e:  # a handler's bug must not end the stream
            log.exception("xDS: %s handler failed", h.short)
            errors = [f"internal error: {type(e).__name__}"]
        self.stats.rejected_resources += len(errors)
        self._notify()
        return errors
