"""The mapping between Envoy v3 xDS resources and octo-proxy's model.

Cluster (CDS) -> service settings; ClusterLoadAssignment (EDS) -> endpoints.
Everything here is pure and synchronous: a resource either converts or raises
`ResourceError` with a message that names the resource and the bad field.
The same module builds resources for the bundled control plane, so both sides
of the mapping live in one place (see docs/xds.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, struct_pb2

from octoproxy import model

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# served by the bundled control plane to proxyless gRPC clients (xds:///<appkey>)
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

OCTO_NS = "octo"  # Cluster and LbEndpoint metadata namespace for octo-only fields
LB_NS = "envoy.lb"  # LbEndpoint metadata namespace for routing labels
DEFAULT_WEIGHT = 100  # LbEndpoint without load_balancing_weight
from octoproxy.services import MAX_WEIGHT  # noqa: E402  (one definition)

_C = cluster_pb2.Cluster
_LB_FROM_XDS: dict[int, model.LbPolicy] = {
    _C.ROUND_ROBIN: model.LbPolicy.ROUND_ROBIN,
    _C.LEAST_REQUEST: model.LbPolicy.LEAST_REQUEST,
    _C.RANDOM: model.LbPolicy.RANDOM,
    _C.RING_HASH: model.LbPolicy.CONSISTENT_HASH,
    _C.MAGLEV: model.LbPolicy.CONSISTENT_HASH,
}
_LB_TO_XDS: dict[model.LbPolicy, int] = {
    model.LbPolicy.ROUND_ROBIN: _C.ROUND_ROBIN,
    model.LbPolicy.LEAST_REQUEST: _C.LEAST_REQUEST,
    model.LbPolicy.RANDOM: _C.RANDOM,
    model.LbPolicy.CONSISTENT_HASH: _C.RING_HASH,
}

_HS = health_check_pb2
# health_status -> OCTO status (only ALIVE serves)
_STATUS_FROM_HEALTH: dict[int, int] = {
    _HS.UNKNOWN: model.STATUS_ALIVE,
    _HS.HEALTHY: model.STATUS_ALIVE,
    _HS.UNHEALTHY: model.STATUS_DEAD,
    _HS.DRAINING: model.STATUS_STOPPING,
    _HS.TIMEOUT: model.STATUS_DEAD,
    _HS.DEGRADED: model.STATUS_WARNING,
}
_HEALTH_FROM_STATUS: dict[int, int] = {
    model.STATUS_DEAD: _HS.UNHEALTHY,
    model.STATUS_STARTING: _HS.UNHEALTHY,
    model.STATUS_ALIVE: _HS.HEALTHY,
    model.STATUS_STOPPING: _HS.DRAINING,
    model.STATUS_STOPPED: _HS.UNHEALTHY,
    model.STATUS_WARNING: _HS.DEGRADED,
}


# (region, idc, role from priority, digest of the serialized LbEndpoint) -> Endpoint
EndpointCache = dict[tuple[str, str, int, bytes], model.Endpoint]


def run_steps(steps: Generator[Any, None, Any]) -> Any:
    """The return value of a generator run to its end at once (a handler's
    steps, when nothing waits between them)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


class ResourceError(ValueError):
    """A resource that cannot be applied; the message is sent back in the NACK."""


# What a subscribable appkey (= xDS resource name) looks like.  Never "*" (the
# wildcard) and nothing a control plane could read as an xdstp:// name.
APPKEY_MAX_LEN = 255
_APPKEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def appkey_problem(appkey: object) -> str | None:
    """Why ``appkey`` cannot be subscribed to (None: it can)."""
    if not isinstance(appkey, str) or not appkey:
        return "an appkey must be a non-empty string"
    if len(appkey) > APPKEY_MAX_LEN:
        return f"appkey {appkey[:40]!r}... is longer than {APPKEY_MAX_LEN} characters"
    if not _APPKEY_RE.fullmatch(appkey):
        return (
            f"appkey {appkey[:80]!r} has a character outside A-Z a-z 0-9 . _ - "
            "(or does not start with a letter or digit)"
        )
    return None


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """What a Cluster contributes to a `model.Service`."""

    appkey: str
    lb_policy: model.LbPolicy
    set_enabled: bool
    service_names: tuple[str, ...]
    # STATIC cluster: its inline load_assignment (no EDS); None for an EDS cluster
    static_endpoints: tuple[model.Endpoint, ...] | None = None
    governance: model.Governance | None = None


def _field(struct: struct_pb2.Struct, key: str) -> struct_pb2.Value | None:
    return struct.fields[key] if key in struct.fields else None


def _str(where: str, v: struct_pb2.Value | None) -> str:
    if v is None:
        return ""
    if v.WhichOneof("kind") != "string_value":
        raise ResourceError(f"{where} must be a string, got {v.WhichOneof('kind')}")
    return str(v.string_value)


def _num(where: str, v: struct_pb2.Value | None, default: float = 0.0) -> float:
    if v is None:
        return default
    if v.WhichOneof("kind") != "number_value":
        raise ResourceError(f"{where} must be a number, got {v.WhichOneof('kind')}")
    x = float(v.number_value)
    if not math.isfinite(x) or x < 0:
        raise ResourceError(f"{where} must be a finite number >= 0, got {x}")
    return x


def cluster_to_settings(c: cluster_pb2.Cluster) -> ClusterSettings:
    name = c.name
    if not name:
        raise ResourceError("Cluster without a name")
    where = f"Cluster {name!r}"
    lb = _LB_FROM_XDS.get(c.lb_policy)
    if lb is None:
        pol = _C.LbPolicy.Name(c.lb_policy) if c.lb_policy in _C.LbPolicy.values() else c.lb_policy
        raise ResourceError(
            f"{where}: lb_policy {pol} is not supported "
            "(ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)"
        )
    static = _static_endpoints(c, where)
    svc = c.eds_cluster_config.service_name
    if static is None and svc and svc != name:
        raise ResourceError(
            f"{where}: eds_cluster_config.service_name {svc!r} must be empty or the cluster name"
        )
    set_enabled = False
    service_names: tuple[str, ...] = ()
    if OCTO_NS in c.metadata.filter_metadata:
        md = c.metadata.filter_metadata[OCTO_NS]
        v = _field(md, "set_enabled")
        if v is not None:
            if v.WhichOneof("kind") != "bool_value":
                raise ResourceError(
                    f'{where}: metadata.filter_metadata["octo"].set_enabled must be a bool, '
                    f"got {v.WhichOneof('kind')}"
                )
            set_enabled = v.bool_value
        v = _field(md, "service_names")
        if v is not None:
            if v.WhichOneof("kind") != "list_value":
                raise ResourceError(
                    f'{where}: metadata.filter_metadata["octo"].service_names must be a list '
                    f"of strings, got {v.WhichOneof('kind')}"
                )
            names = []
            for i, item in enumerate(v.list_value.values):
                s = _str(f'{where}: metadata.filter_metadata["octo"].service_names[{i}]', item)
                if not s:
                    raise ResourceError(
                        f'{where}: metadata.filter_metadata["octo"].service_names[{i}] is empty'
                    )
                names.append(s)
            service_names = tuple(names)
    return ClusterSettings(name, lb, set_enabled, service_names, static,
                           cluster_governance(c, where))


def _static_endpoints(c: cluster_pb2.Cluster, where: str) -> tuple[model.Endpoint, ...] | None:
    """EDS cluster: None.  STATIC (also ``type`` unset: the proto default): the
    endpoints of its inline load_assignment.  Other discovery types: rejected."""
    kind = c.WhichOneof("cluster_discovery_type")
    if kind == "cluster_type":
        raise ResourceError(
            f"{where}: cluster_type {c.cluster_type.name!r} (a custom cluster) is not supported; "
            "use type EDS, or STATIC with an inline load_assignment"
        )
    if c.type == _C.EDS:
        return None
    if c.type != _C.STATIC:
        raise ResourceError(
            f"{where}: type {_C.DiscoveryType.Name(c.type)} is not supported "
            "(EDS, or STATIC with an inline load_assignment)"
        )
    unset = "" if kind == "type" else " (type unset)"
    if not c.HasField("load_assignment"):
        if c.HasField("eds_cluster_config"):
            raise ResourceError(
                f"{where}: a STATIC cluster{unset} with eds_cluster_config and no "
                "load_assignment: set type: EDS for endpoints over EDS"
            )
        return ()
    la = c.load_assignment
    if la.cluster_name and la.cluster_name != c.name:
        raise ResourceError(
            f"{where}: load_assignment.cluster_name {la.cluster_name!r} must be empty or "
            "the cluster name"
        )
    return cla_to_endpoints(la, label=f"{where}: load_assignment")


# --- governance (docs/governance.md, docs/xds.md "Governance") ----------------

_GOV_KEYS = ("rate_limits", "cluster_quota", "retry", "adaptive_concurrency",
             "outlier_error_statuses")


def _gov_spec(where: str, cls: Any, data: Any) -> Any:
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise ResourceError(f"{where}{loc}: {err['msg']}") from None


def _dur(d: Any) -> float:
    return float(d.seconds) + float(d.nanos) * 1e-9


def _enforced(od: Any, field: str, default: int, where: str) -> bool:
    """An enforcing_* percentage: 100 (on) or 0 (off); octo-proxy does not
    enforce a detection by chance, so another value is refused."""
    v = getattr(od, field).value if od.HasField(field) else default
    if v not in (0, 100):
        raise ResourceError(f"{where}.{field}: {v} is not supported: 0 (off) or 100 (on); "
                            "octo-proxy does not eject by chance")
    return v == 100


def _outlier(od: Any, md: dict[str, Any], where: str) -> model.OutlierDetection:
    """Cluster.outlier_detection -> the detector (docs/xds.md "Governance")."""
    from octoproxy import services as S

    if _enforced(od, "enforcing_consecutive_gateway_failure", 0, where):
        raise ResourceError(f"{where}.enforcing_consecutive_gateway_failure: gateway failures "
                            "(HTTP 502/503/504) do not exist in OCTO: use consecutive_5xx with "
                            'metadata.filter_metadata["octo"].outlier_error_statuses, and '
                            "consecutive_local_origin_failure for transport failures")
    kw: dict[str, Any] = {}
    n5xx = od.consecutive_5xx.value if od.HasField("consecutive_5xx") else 5
    on5xx = _enforced(od, "enforcing_consecutive_5xx", 100, where)
    kw["consecutive_errors"] = n5xx if on5xx else 0
    if od.HasField("consecutive_local_origin_failure"):
        ntr = od.consecutive_local_origin_failure.value
    elif not od.split_external_local_origin_errors:
        # not split: Envoy counts local-origin failures in consecutive_5xx
        ntr = n5xx if on5xx else 0
    else:
        ntr = 5
    on_tr = _enforced(od, "enforcing_consecutive_local_origin_failure", 100, where)
    kw["consecutive_transport_failures"] = ntr if on_tr else 0
    if "outlier_error_statuses" in md:
        kw["error_statuses"] = md["outlier_error_statuses"]
    # the failure rate counts error statuses and transport failures together:
    # either enforcing field turns it on
    if (_enforced(od, "enforcing_failure_percentage", 0, where)
            | _enforced(od, "enforcing_failure_percentage_local_origin", 0, where)):
        kw["failure_rate_threshold"] = (od.failure_percentage_threshold.value / 100.0
                                        if od.HasField("failure_percentage_threshold") else 0.85)
        kw["failure_rate_min_requests"] = (max(1, od.failure_percentage_request_volume.value)
                                           if od.HasField("failure_percentage_request_volume")
                                           else 50)
        kw["failure_rate_min_nodes"] = (od.failure_percentage_minimum_hosts.value
                                        if od.HasField("failure_percentage_minimum_hosts") else 5)
    # the success rate, like the failure rate, counts error statuses and
    # transport failures together: with split errors either enforcing field
    # turns it on (both default to 100, as in Envoy)
    on_sr = _enforced(od, "enforcing_success_rate", 100, where)
    on_lsr = _enforced(od, "enforcing_local_origin_success_rate", 100, where)
    if on_sr or (on_lsr and od.split_external_local_origin_errors):
        kw["success_rate_stdev_factor"] = (od.success_rate_stdev_factor.value / 1000.0
                                           if od.HasField("success_rate_stdev_factor") else 1.9)
    if od.HasField("success_rate_request_volume"):
        kw["success_rate_min_requests"] = max(1, od.success_rate_request_volume.value)
    if od.HasField("success_rate_minimum_hosts"):
        kw["success_rate_min_nodes"] = max(1, od.success_rate_minimum_hosts.value)
    if od.HasField("interval"):
        kw["interval_s"] = _dur(od.interval)
    if od.HasField("base_ejection_time"):
        kw["base_ejection_s"] = _dur(od.base_ejection_time)
    if od.HasField("max_ejection_time"):
        kw["max_ejection_s"] = _dur(od.max_ejection_time)
    if od.HasField("max_ejection_percent"):
        kw["max_ejection_percent"] = od.max_ejection_percent.value
    if od.HasField("max_ejection_time_jitter"):
        kw["ejection_jitter_s"] = _dur(od.max_ejection_time_jitter)
    out: model.OutlierDetection = _gov_spec(where, S.OutlierDetectionSpec, kw).to_model()
    return out


def cluster_governance(c: cluster_pb2.Cluster, where: str) -> model.Governance | None:
    """Cluster.circuit_breakers, Cluster.outlier_detection and the "octo"
    metadata extensions -> the service's governance (None when it has none)."""
    from google.protobuf import json_format

    from octoproxy import services as S

    md: dict[str, Any] = {}
    if OCTO_NS in c.metadata.filter_metadata:
        md = json_format.MessageToDict(c.metadata.filter_metadata[OCTO_NS])
    mw = f'{where}: metadata.filter_metadata["octo"]'
    rate_limits: tuple[model.RateLimit, ...] = ()
    if "rate_limits" in md:
        if not isinstance(md["rate_limits"], list):
            raise ResourceError(f"{mw}.rate_limits must be a list")
        rate_limits = tuple(_gov_spec(f"{mw}.rate_limits[{i}]", S.RateLimitSpec, r).to_model()
                            for i, r in enumerate(md["rate_limits"]))
    quota = None
    if "cluster_quota" in md:
        quota = _gov_spec(f"{mw}.cluster_quota", S.ClusterQuotaSpec, md["cluster_quota"]).to_model()
    adaptive = None
    if "adaptive_concurrency" in md:
        adaptive = _gov_spec(f"{mw}.adaptive_concurrency", S.AdaptiveConcurrencySpec,
                             md["adaptive_concurrency"]).to_model()
    from octoproxy.xds.authres import unknown_field

    for part in ("circuit_breakers", "outlier_detection"):
        bad = unknown_field(getattr(c, part), part) if c.HasField(part) else None
        if bad is not None:
            # a newer Envoy field (a detector, a threshold) would change when
            # requests are refused or nodes ejected: refused, never ignored
            raise ResourceError(f"{where}: {bad} has a field this proxy does not know (from a "
                                "newer Envoy API?): refused rather than ignored")
    breakers = None
    retry_extra: dict[str, Any] = {}
    cb = c.circuit_breakers
    if c.HasField("circuit_breakers"):
        # the first Thresholds of priority DEFAULT, as in Envoy; OCTO has no
        # request priorities, so HIGH thresholds are ignored (docs/xds.md)
        t = next((x for x in cb.thresholds if x.priority == 0), None)
        ph = next((x for x in cb.per_host_thresholds if x.priority == 0), None)
        breakers = model.CircuitBreakers(
            max_requests=t.max_requests.value if t is not None and t.HasField("max_requests") else 0,
            max_pending=(t.max_pending_requests.value
                         if t is not None and t.HasField("max_pending_requests") else 0),
            max_requests_per_node=(ph.max_requests.value
                                   if ph is not None and ph.HasField("max_requests") else 0),
            max_connections=(t.max_connections.value
                             if t is not None and t.HasField("max_connections") else 0),
            max_connections_per_node=(ph.max_connections.value
                                      if ph is not None and ph.HasField("max_connections")
                                      else 0),
        )
        if t is not None and t.HasField("retry_budget"):
            rb = t.retry_budget
            if rb.HasField("budget_percent"):
                retry_extra["budget_percent"] = rb.budget_percent.value
            if rb.HasField("min_retry_concurrency"):
                retry_extra["min_retries"] = rb.min_retry_concurrency.value
        elif t is not None and t.HasField("max_retries"):
            # no budget: at most max_retries retries in flight (Envoy's meaning)
            retry_extra["budget_percent"] = 0.0
            retry_extra["min_retries"] = t.max_retries.value
    retry = None
    if "retry" in md or retry_extra:
        retry = _gov_spec(f"{mw}.retry", S.RetrySpec,
                          {**(md.get("retry") or {}), **retry_extra}).to_model()
    outlier = None
    if c.HasField("outlier_detection"):
        outlier = _outlier(c.outlier_detection, md, f"{where}: outlier_detection")
    g = model.Governance(rate_limits, quota, breakers, outlier, retry, adaptive)
    return None if g.empty() else g


def governance_to_cluster(g: model.Governance, c: cluster_pb2.Cluster) -> None:
    """The other direction (the bundled control plane)."""
    import dataclasses

    md: dict[str, Any] = {}
    if g.rate_limits:
        md["rate_limits"] = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                             for r in g.rate_limits]
    if g.cluster_quota is not None:
        md["cluster_quota"] = dataclasses.asdict(g.cluster_quota)
    if g.adaptive_concurrency is not None:
        md["adaptive_concurrency"] = dataclasses.asdict(g.adaptive_concurrency)
    if g.retry is not None:
        md["retry"] = {"idempotent_methods": list(g.retry.idempotent_methods),
                       "max_attempts": g.retry.max_attempts}
    cb = g.circuit_breakers
    if cb is not None or g.retry is not None:
        t = c.circuit_breakers.thresholds.add()
        if cb is not None and cb.max_requests:
            t.max_requests.value = cb.max_requests
        if cb is not None and cb.max_pending:
            t.max_pending_requests.value = cb.max_pending
        if cb is not None and cb.max_connections:
            t.max_connections.value = cb.max_connections
        if cb is not None and (cb.max_requests_per_node or cb.max_connections_per_node):
            ph = c.circuit_breakers.per_host_thresholds.add()
            if cb.max_requests_per_node:
                ph.max_requests.value = cb.max_requests_per_node
            if cb.max_connections_per_node:
                ph.max_connections.value = cb.max_connections_per_node
        if g.retry is not None:
            t.retry_budget.budget_percent.value = g.retry.budget_percent
            t.retry_budget.min_retry_concurrency.value = g.retry.min_retries
    od = g.outlier_detection
    if od is not None:
        o = c.outlier_detection
        o.consecutive_local_origin_failure.value = od.consecutive_transport_failures
        o.consecutive_5xx.value = od.consecutive_errors
        o.split_external_local_origin_errors = True
        sr = 100 if od.success_rate_stdev_factor > 0 else 0
        o.enforcing_success_rate.value = sr
        o.enforcing_local_origin_success_rate.value = sr
        if sr:
            o.success_rate_stdev_factor.value = round(od.success_rate_stdev_factor * 1000)
        o.success_rate_request_volume.value = od.success_rate_min_requests
        o.success_rate_minimum_hosts.value = od.success_rate_min_nodes
        md["outlier_error_statuses"] = list(od.error_statuses)
        if od.failure_rate_threshold > 0:
            o.enforcing_failure_percentage.value = 100
            o.failure_percentage_threshold.value = round(od.failure_rate_threshold * 100)
            o.failure_percentage_request_volume.value = od.failure_rate_min_requests
            o.failure_percentage_minimum_hosts.value = od.failure_rate_min_nodes
        for name, secs in (("interval", od.interval_s), ("base_ejection_time", od.base_ejection_s),
                           ("max_ejection_time", od.max_ejection_s)):
            getattr(o, name).FromNanoseconds(round(secs * 1e9))
        o.max_ejection_percent.value = round(od.max_ejection_percent)
        if od.ejection_jitter_s:
            o.max_ejection_time_jitter.FromNanoseconds(round(od.ejection_jitter_s * 1e9))
    if md:
        c.metadata.filter_metadata[OCTO_NS].update(md)


# LbEndpoint metadata -> (cell, swimlane, role, warmup_s, start_time, weight, status,
# group), None = not set.  Nodes of a service mostly share their metadata: parsed once
# per distinct serialized form (bounded; cleared when full).
_Meta = tuple[str, str, int | None, float, float, int | None, int | None, str]
_META_CACHE: dict[bytes, _Meta] = {}
_META_CACHE_MAX = 65_536


def _endpoint_metadata(md: Any, where: str) -> _Meta:
    fm = md.filter_metadata
    cell = swimlane = group = ""
    role: int | None = None
    weight: int | None = None
    status: int | None = None
    warmup_s = start_time = 0.0
    if LB_NS in fm:
        f = fm[LB_NS].fields
        mw = f'{where}: metadata.filter_metadata["{LB_NS}"]'
        cell = _str(f"{mw}.cell", f.get("cell"))
        swimlane = _str(f"{mw}.swimlane", f.get("swimlane"))
        group = _str(f"{mw}.group", f.get("group"))
        rv = f.get("role")
        if rv is not None:
            r = _num(f"{mw}.role", rv)
            if r not in (0.0, 1.0):
                raise ResourceError(f"{mw}.role must be 0 (primary) or 1 (backup), got {r}")
            role = int(r)
        warmup_s = _num(f"{mw}.warmup_s", f.get("warmup_s"))
        start_time = _num(f"{mw}.start_time", f.get("start_time"))
    if OCTO_NS in fm:
        f = fm[OCTO_NS].fields
        mo = f'{where}: metadata.filter_metadata["octo"]'
        wv = f.get("weight")
        if wv is not None:
            w = _num(f"{mo}.weight", wv)
            if w != int(w) or w > MAX_WEIGHT:
                raise ResourceError(f"{mo}.weight must be an integer 0..{MAX_WEIGHT}, got {w}")
            weight = int(w)
        sv = f.get("status")
        if sv is not None:
            st = _num(f"{mo}.status", sv)
            if st not in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0):
                raise ResourceError(f"{mo}.status must be 0..5, got {st}")
            status = int(st)
    return (cell, swimlane, role, warmup_s, start_time, weight, status, group)


def cla_to_endpoints(
    cla: endpoint_pb2.ClusterLoadAssignment,
    cache: EndpointCache | None = None,
    new_cache: EndpointCache | None = None,
    label: str | None = None,
) -> tuple[model.Endpoint, ...]:
    """The endpoints of an assignment (ResourceError if any is malformed).

    With ``new_cache`` every converted LbEndpoint is recorded there; with
    ``cache`` (the previous ``new_cache`` of the same cluster) unchanged
    LbEndpoints are not converted again and keep their Endpoint object.
    """
    name = cla.cluster_name
    if label is None:
        if not name:
            raise ResourceError("ClusterLoadAssignment without a cluster_name")
        label = f"ClusterLoadAssignment {name!r}"
    out: list[model.Endpoint] = []
    seen: set[tuple[str, int]] = set()
    for li, lle in enumerate(cla.endpoints):
        region = lle.locality.region
        idc = lle.locality.zone
        prio_role = model.ROLE_BACKUP if lle.priority > 0 else model.ROLE_PRIMARY
        for ei, lbe in enumerate(lle.lb_endpoints):
            where = f"{label}: endpoints[{li}].lb_endpoints[{ei}]"
            key = None
            if new_cache is not None:
                key = (region, idc, prio_role, digest(lbe.SerializeToString(deterministic=True)))
                hit = cache.get(key) if cache is not None else None
                if hit is not None:
                    if (hit.host, hit.port) in seen:
                        raise ResourceError(f"{where}: duplicate endpoint {hit.host}:{hit.port}")
                    seen.add((hit.host, hit.port))
                    new_cache[key] = hit
                    out.append(hit)
                    continue
            if not lbe.HasField("endpoint"):
                raise ResourceError(f"{where}: no endpoint (named endpoints are not supported)")
            addr = lbe.endpoint.address
            if not addr.HasField("socket_address"):
                raise ResourceError(f"{where}: endpoint.address.socket_address is missing")
            sa = addr.socket_address
            if not sa.address:
                raise ResourceError(f"{where}: endpoint.address.socket_address.address is empty")
            if sa.WhichOneof("port_specifier") != "port_value" or not 0 < sa.port_value < 65536:
                raise ResourceError(
                    f"{where}: endpoint.address.socket_address.port_value must be 1..65535, "
                    f"got {sa.port_value if sa.WhichOneof('port_specifier') else 'none'}"
                )
            if sa.protocol != address_pb2.SocketAddress.TCP:
                raise ResourceError(f"{where}: only TCP socket addresses are supported")
            hp = (sa.address, sa.port_value)
            if hp in seen:
                raise ResourceError(f"{where}: duplicate endpoint {sa.address}:{sa.port_value}")
            seen.add(hp)
            weight = (
                lbe.load_balancing_weight.value
                if lbe.HasField("load_balancing_weight")
                else DEFAULT_WEIGHT
            )
            if weight > MAX_WEIGHT:
                raise ResourceError(f"{where}: load_balancing_weight {weight} exceeds {MAX_WEIGHT}")
            status = _STATUS_FROM_HEALTH.get(lbe.health_status)
            if status is None:
                raise ResourceError(f"{where}: unknown health_status {lbe.health_status}")
            md = lbe.metadata
            if md.filter_metadata:
                mkey = md.SerializeToString(deterministic=True)
                meta = _META_CACHE.get(mkey)
                if meta is None:
                    meta = _endpoint_metadata(md, where)
                    if len(_META_CACHE) >= _META_CACHE_MAX:
                        _META_CACHE.clear()
                    _META_CACHE[mkey] = meta
                cell, swimlane, m_role, warmup_s, start_time, m_weight, m_status, group = meta
                role = prio_role if m_role is None else m_role
                if m_weight is not None:
                    weight = m_weight
                if m_status is not None:
                    status = m_status
            else:
                cell = swimlane = group = ""
                role = prio_role
                warmup_s = start_time = 0.0
            ep = model.Endpoint(
                host=sa.address,
                port=sa.port_value,
                weight=weight,
                status=status,
                role=role,
                cell=cell,
                swimlane=swimlane,
                group=group,
                idc=idc,
                region=region,
                warmup_s=warmup_s,
                start_time=start_time,
            )
            if key is not None and new_cache is not None:
                new_cache[key] = ep
            out.append(ep)
    return tuple(out)


def make_service(settings: ClusterSettings, endpoints: tuple[model.Endpoint, ...]) -> model.Service:
    """``endpoints`` is the assignment (EDS); a STATIC cluster brings its own."""
    if settings.static_endpoints is not None:
        endpoints = settings.static_endpoints
    return model.Service(
        appkey=settings.appkey,
        endpoints=endpoints,
        lb_policy=settings.lb_policy,
        set_enabled=settings.set_enabled,
        service_names=settings.service_names,
        governance=settings.governance,
    )


# --- the other direction (used by the bundled control plane) -----------------


def service_to_cluster(svc: model.Service) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=svc.appkey, type=_C.EDS, lb_policy=_LB_TO_XDS[svc.lb_policy])
    c.eds_cluster_config.eds_config.ads.SetInParent()
    md: dict[str, Any] = {"set_enabled": svc.set_enabled, "service_names": list(svc.service_names)}
    c.metadata.filter_metadata[OCTO_NS].update(md)
    if svc.governance is not None:
        governance_to_cluster(svc.governance, c)
    return c


def service_to_cla(svc: model.Service) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=svc.appkey)
    groups: dict[tuple[str, str], endpoint_components_pb2.LocalityLbEndpoints] = {}
    weights: dict[tuple[str, str], int] = {}
    for e in svc.endpoints:
        lle = groups.get((e.region, e.idc))
        if lle is None:
            lle = cla.endpoints.add()
            lle.locality.region = e.region
            lle.locality.zone = e.idc
            groups[(e.region, e.idc)] = lle
        if e.status == model.STATUS_ALIVE and e.weight > 0:
            weights[(e.region, e.idc)] = weights.get((e.region, e.idc), 0) + e.weight
        lbe = lle.lb_endpoints.add()
        sa = lbe.endpoint.address.socket_address
        sa.address = e.host
        sa.port_value = e.port
        lbe.load_balancing_weight.value = e.weight
        lbe.health_status = _HEALTH_FROM_STATUS.get(e.status, _HS.UNHEALTHY)
        octo: dict[str, Any] = {"status": e.status}
        if e.weight == 0:
            # gRPC rejects a zero load_balancing_weight: never picked there by
            # being unhealthy; octo-proxy reads the exact weight and status below
            lbe.load_balancing_weight.value = 1
            lbe.health_status = _HS.UNHEALTHY
            octo["weight"] = 0
        lb = lbe.metadata.filter_metadata[LB_NS]
        lbmd: dict[str, Any] = {
            "cell": e.cell,
            "swimlane": e.swimlane,
            "role": e.role,
            "warmup_s": e.warmup_s,
            "start_time": e.start_time,
        }
        if e.group:
            lbmd["group"] = e.group  # only when set: the default nodes carry no group
        lb.update(lbmd)
        lbe.metadata.filter_metadata[OCTO_NS].update(octo)
    # gRPC clients drop a locality without a weight: the sum of the weights of
    # its serving endpoints (at least 1, at most what a uint32 holds)
    for key, lle in groups.items():
        lle.load_balancing_weight.value = min(max(weights.get(key, 0), 1), 2**32 - 1)
    return cla


def _packed(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def service_to_listener(appkey: str) -> listener_pb2.Listener:
    """What a gRPC client resolving ``xds:///<appkey>`` asks for first: an API
    listener whose HttpConnectionManager takes its routes over RDS (ADS) and
    ends with the router filter."""
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=appkey)
    hcm.rds.route_config_name = appkey
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = config_source_pb2.V3
    hcm.http_filters.add(
        name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())
    )
    return listener_pb2.Listener(
        name=appkey, api_listener=api_listener_pb2.ApiListener(api_listener=_packed(hcm))
    )


def service_to_route(appkey: str) -> route_pb2.RouteConfiguration:
    """Every call to the listener's authority goes to the cluster of the same name."""
    rc = route_pb2.RouteConfiguration(name=appkey)
    vh = rc.virtual_hosts.add(name=appkey, domains=["*"])
    vh.routes.add(
        match=route_components_pb2.RouteMatch(prefix=""),
        route=route_components_pb2.RouteAction(cluster=appkey),
    )
    return rc
