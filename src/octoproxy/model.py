"""Plain, typed descriptions of what the route table is built from.

This is the seam between the sources of routes (the static section of the
config, the xDS client) and the Cython route table: both produce `Service`
objects; the route table consumes them and never sees where they came from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

# Endpoint status values (OCTO registry): only ALIVE serves.
STATUS_DEAD = 0
STATUS_STARTING = 1
STATUS_ALIVE = 2
STATUS_STOPPING = 3
STATUS_STOPPED = 4
STATUS_WARNING = 5

ROLE_PRIMARY = 0
ROLE_BACKUP = 1


class LbPolicy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"
    CONSISTENT_HASH = "consistent_hash"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One provider node of a service, as discovery knows it."""

    host: str
    port: int
    weight: int = 100
    status: int = STATUS_ALIVE
    role: int = ROLE_PRIMARY
    cell: str = ""  # "" = the center
    swimlane: str = ""  # "" = the trunk
    idc: str = ""
    region: str = ""
    warmup_s: float = 0.0  # seconds over which the weight ramps up linearly
    start_time: float = 0.0  # unix seconds when the node started (for warm-up)
    group: str = ""  # node group for traffic shunting ("" = the service's default nodes)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `rate` requests per second with `burst` (0 = rate)."""

    rate: float
    burst: float = 0.0
    method: str | None = None  # only requests calling this method (None = any)
    caller: str | None = None  # only this caller appkey; "*" = a bucket per caller
    side: str = "provider"  # provider (inbound proxy) | caller (outbound proxy)
    name: str = ""  # named in the answer's message (default: derived)

    def label(self, appkey: str) -> str:
        if self.name:
            return self.name
        what = f"service {appkey!r}"
        if self.method is not None:
            what += f" method {self.method!r}"
        if self.caller == "*":
            what += " per caller"
        elif self.caller is not None:
            what += f" caller {self.caller!r}"
        return f"{self.side} limit of {what}"


@dataclass(frozen=True, slots=True)
class ClusterQuota:
    """Requests per second for every proxy of the service together (Redis)."""

    rate: float
    on_redis_failure: str = "local_share"  # local_share | open | closed
    local_share: float = 0.5  # fraction of `rate` one proxy allows alone while Redis is down


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Caller-side thresholds (0 = no limit)."""

    max_requests: int = 0  # requests in flight to the service
    max_pending: int = 0  # requests waiting for a connection to be made
    max_requests_per_node: int = 0  # requests in flight to one node
    max_connections: int = 0  # upstream connections this proxy opens for the service
    # connections to one node used by the service (0 = upstream.connections_per_node)
    max_connections_per_node: int = 0


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_transport_failures: int = 5  # 0 = off
    consecutive_errors: int = 0  # consecutive error statuses (error_statuses); 0 = off
    error_statuses: tuple[int, ...] = (2,)  # RuntimeException by default
    failure_rate_threshold: float = 0.0  # 0 = off; e.g. 0.5 = eject above 50% failures
    failure_rate_min_requests: int = 20
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 10.0
    # nodes with failure_rate_min_requests answers in the interval needed for
    # the failure rate to be checked at all (Envoy's failure_percentage_minimum_hosts)
    failure_rate_min_nodes: int = 1
    # Envoy's success-rate detector: a node whose success rate in an interval is
    # below mean - factor * stdev of the rated nodes' rates (0 = off; Envoy: 1.9)
    success_rate_stdev_factor: float = 0.0
    success_rate_min_requests: int = 100  # answers in the interval for a node to be rated
    success_rate_min_nodes: int = 5  # rated nodes needed for the detector to run
    ejection_jitter_s: float = 0.0  # a random 0..this added to each ejection (Envoy's jitter)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    idempotent_methods: tuple[str, ...] = ()  # "*" = every method
    max_attempts: int = 2
    budget_percent: float = 20.0
    min_retries: int = 3


@dataclass(frozen=True, slots=True)
class AdaptiveConcurrency:
    enabled: bool = False
    initial_limit: int = 20
    min_limit: int = 2
    max_limit: int = 1000
    sample_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Governance:
    """A service's rate limits, breakers, ejection and retry rules (docs/governance.md)."""

    rate_limits: tuple[RateLimit, ...] = ()
    cluster_quota: ClusterQuota | None = None
    circuit_breakers: CircuitBreakers | None = None
    outlier_detection: OutlierDetection | None = None
    retry: RetryPolicy | None = None
    adaptive_concurrency: AdaptiveConcurrency | None = None

    def empty(self) -> bool:
        return self == Governance()

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> Governance | None:
        """The inverse of dataclasses.asdict (hot restart hands services over as JSON)."""
        if not d:
            return None

        def opt(cls: Any, key: str, tuples: tuple[str, ...] = ()) -> Any:
            v = d.get(key)
            if not v:
                return None
            return cls(**{k: tuple(x) if k in tuples else x for k, x in v.items()})

        return Governance(
            rate_limits=tuple(RateLimit(**r) for r in d.get("rate_limits") or ()),
            cluster_quota=opt(ClusterQuota, "cluster_quota"),
            circuit_breakers=opt(CircuitBreakers, "circuit_breakers"),
            outlier_detection=opt(OutlierDetection, "outlier_detection", ("error_statuses",)),
            retry=opt(RetryPolicy, "retry", ("idempotent_methods",)),
            adaptive_concurrency=opt(AdaptiveConcurrency, "adaptive_concurrency"),
        )


@dataclass(frozen=True, slots=True)
class Service:
    """A service (appkey) with its nodes and its settings."""

    appkey: str
    endpoints: tuple[Endpoint, ...] = ()
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    set_enabled: bool = False
    # serviceName values (RequestInfo.serviceName) that map to this appkey
    service_names: tuple[str, ...] = ()
    governance: Governance | None = None


@dataclass(frozen=True, slots=True)
class Labels:
    """The proxy's own node labels; per-request context may override the first three."""

    liteset: str = ""
    set: str = ""
    swimlane: str = ""
    idc: str = ""
    region: str = ""


# --- Traffic shunting (issue 16; docs/shunting.md) ---------------------------
#
# A rule set is an ordered tuple of ShuntRule. For a request to provider P the
# caller's proxy evaluates P's own rules, then the global ("public") rules;
# the first rule whose every condition holds applies its action; no match
# leaves the request as it was.

SHUNT_GLOBAL = "*"  # the scope name of the global rules (never a valid appkey)

# ShuntMatch.source
SRC_SERVICE = "service"  # RequestInfo.serviceName
SRC_METHOD = "method"  # the Thrift message name in the body
SRC_CALLER = "caller"  # the caller appkey (traceInfo.clientAppkey)
SRC_CONTEXT = "context"  # a context value: localContext[key], else globalContext[key]
SRC_RANDOM = "random"  # only with OP_PERCENT: a fresh random draw per request

# ShuntMatch.op
OP_EQ = "eq"  # value == values[0]
OP_IN = "in"  # value in values
OP_PREFIX = "prefix"  # value.startswith(values[0])
OP_PRESENT = "present"  # the value exists (context key present / non-empty)
OP_RANGE = "range"  # int(value) in [lo, hi)  (Envoy's Int64Range is half-open)
OP_MOD = "mod"  # int(value) % modulus in remainders
OP_PERCENT = "percent"  # hash(value) % 10000 < round(percent * 100)  (sticky per value)

# ShuntRule action kinds
ACT_GROUP = "group"  # route to the nodes of `group`
ACT_CONTEXT = "context"  # set context `target` (e.g. octo-set) before cell routing
# route as if no rule had matched (the service's default nodes), and stop:
# Envoy's route to the cluster itself (no metadata_match), e.g. the share of a
# weighted_clusters route that selects no group
ACT_DEFAULT = "default"

# ShuntRule.on_no_node when the group has no serving node for this request
NO_NODE_FALLBACK = "fallback"  # use the service's default (ungrouped) nodes
NO_NODE_REJECT = "reject"  # answer status 8 naming the rule


@dataclass(frozen=True, slots=True)
class ShuntMatch:
    """One condition of a rule. A value that is missing, or not an integer
    for range/mod, makes the condition false (never an error per request)."""

    source: str
    op: str
    key: str = ""  # the context key for SRC_CONTEXT (and the hash key's source)
    values: tuple[str, ...] = ()  # eq / prefix: one value; in: the set
    lo: int = 0  # range: lo <= v < hi
    hi: int = 0
    modulus: int = 0  # mod: v % modulus in remainders (modulus > 0)
    remainders: tuple[int, ...] = ()
    percent: float = 0.0  # percent: 0..100, two decimals honoured


@dataclass(frozen=True, slots=True)
class ShuntRule:
    """One ordered rule: every condition must hold (an empty tuple matches all)."""

    name: str  # unique within its scope; named in answers, logs and /clusters
    matches: tuple[ShuntMatch, ...] = ()
    action: str = ACT_GROUP
    # ACT_GROUP
    group: str = ""
    on_no_node: str = NO_NODE_FALLBACK
    # ACT_CONTEXT: target = value, where value = unit_table[context source_key]
    # if source_key is set (a value missing from the table: the rule does not
    # match and evaluation goes on), else the constant `value`.
    target: str = ""  # "octo-set" | "octo-liteset" | "octo-swimlane" | another context key
    value: str = ""
    source_key: str = ""
    unit_table: tuple[tuple[str, str], ...] = ()  # (request value, target value) pairs
