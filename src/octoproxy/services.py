"""The one description of a service and its endpoints that people write:
the `static.services` section of a proxy config and the bundled control
plane's endpoints file both use it (docs/configuration.md, docs/xds.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from octoproxy import model

# the largest load_balancing_weight EDS can carry (uint32 in a signed-safe range)
MAX_WEIGHT = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_STATUS_NAMES = {
    "dead": model.STATUS_DEAD,
    "starting": model.STATUS_STARTING,
    "alive": model.STATUS_ALIVE,
    "stopping": model.STATUS_STOPPING,
    "stopped": model.STATUS_STOPPED,
    "warning": model.STATUS_WARNING,
}
_HEALTH_NAMES = {
    "healthy": model.STATUS_ALIVE,
    "unknown": model.STATUS_ALIVE,
    "unhealthy": model.STATUS_DEAD,
    "timeout": model.STATUS_DEAD,
    "draining": model.STATUS_STOPPING,
    "degraded": model.STATUS_WARNING,
}
_LB_NAMES = {p.value: p for p in model.LbPolicy} | {
    "ring_hash": model.LbPolicy.CONSISTENT_HASH,
    "maglev": model.LbPolicy.CONSISTENT_HASH,
}


class EndpointSpec(_Strict):
    address: str
    weight: int = Field(default=100, ge=0, le=MAX_WEIGHT)
    status: int | str | None = None  # 0..5 or dead/starting/alive/stopping/stopped/warning
    health: str | None = None  # healthy/unhealthy/draining/degraded/timeout/unknown
    role: int | str = 0  # 0/1 or primary/backup
    cell: str = ""
    swimlane: str = ""
    group: str = ""  # node group for traffic shunting ("" = the default nodes)
    idc: str = ""
    region: str = ""
    warmup_s: float = Field(default=0.0, ge=0)
    start_time: float = Field(default=0.0, ge=0)

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be host:port with port 1..65535, got {v!r}")
        return v

    @field_validator("status")
    @classmethod
    def _status(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and v.lower() not in _STATUS_NAMES:
            raise ValueError(f"status must be 0..5 or one of {sorted(_STATUS_NAMES)}, got {v!r}")
        if isinstance(v, int) and not 0 <= v <= 5:
            raise ValueError(f"status must be 0..5, got {v}")
        return v

    @field_validator("health")
    @classmethod
    def _health(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in _HEALTH_NAMES:
            raise ValueError(f"health must be one of {sorted(_HEALTH_NAMES)}, got {v!r}")
        return v

    @field_validator("role")
    @classmethod
    def _role(cls, v: int | str) -> int | str:
        if v not in (0, 1, "primary", "backup"):
            raise ValueError(f"role must be 0, 1, primary or backup, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_of_status_health(self) -> EndpointSpec:
        if self.status is not None and self.health is not None:
            raise ValueError("give status or health, not both")
        return self

    def to_model(self) -> model.Endpoint:
        status = model.STATUS_ALIVE
        if isinstance(self.status, str):
            status = _STATUS_NAMES[self.status.lower()]
        elif isinstance(self.status, int):
            status = self.status
        elif self.health is not None:
            status = _HEALTH_NAMES[self.health.lower()]
        host, _, port = self.address.rpartition(":")
        return model.Endpoint(
            host=host.strip("[]"),
            port=int(port),
            weight=self.weight,
            status=status,
            role=model.ROLE_BACKUP if self.role in (1, "backup") else model.ROLE_PRIMARY,
            cell=self.cell,
            swimlane=self.swimlane,
            group=self.group,
            idc=self.idc,
            region=self.region,
            warmup_s=self.warmup_s,
            start_time=self.start_time,
        )


class RateLimitSpec(_Strict):
    rate: float = Field(gt=0)  # requests per second
    burst: float = Field(default=0, ge=0)  # 0 = rate
    method: str | None = None
    caller: str | None = None  # an appkey, or "*" for a bucket per caller
    side: Literal["provider", "caller"] = "provider"
    name: str = ""

    def to_model(self) -> model.RateLimit:
        return model.RateLimit(self.rate, self.burst, self.method, self.caller, self.side,
                               self.name)


class ClusterQuotaSpec(_Strict):
    rate: float = Field(gt=0)
    on_redis_failure: Literal["local_share", "open", "closed"] = "local_share"
    local_share: float = Field(default=0.5, gt=0, le=1)

    def to_model(self) -> model.ClusterQuota:
        return model.ClusterQuota(self.rate, self.on_redis_failure, self.local_share)


class CircuitBreakersSpec(_Strict):
    max_requests: int = Field(default=0, ge=0)
    max_pending: int = Field(default=0, ge=0)
    max_requests_per_node: int = Field(default=0, ge=0)
    max_connections: int = Field(default=0, ge=0)
    max_connections_per_node: int = Field(default=0, ge=0)

    def to_model(self) -> model.CircuitBreakers:
        return model.CircuitBreakers(self.max_requests, self.max_pending,
                                     self.max_requests_per_node, self.max_connections,
                                     self.max_connections_per_node)


class OutlierDetectionSpec(_Strict):
    consecutive_transport_failures: int = Field(default=5, ge=0)
    consecutive_errors: int = Field(default=0, ge=0)
    error_statuses: list[int] = [2]
    failure_rate_threshold: float = Field(default=0, ge=0, le=1)
    failure_rate_min_requests: int = Field(default=20, ge=1)
    failure_rate_min_nodes: int = Field(default=1, ge=1)
    success_rate_stdev_factor: float = Field(default=0.0, ge=0)
    success_rate_min_requests: int = Field(default=100, ge=1)
    success_rate_min_nodes: int = Field(default=5, ge=1)
    ejection_jitter_s: float = Field(default=0.0, ge=0)
    interval_s: float = Field(default=10.0, gt=0)
    base_ejection_s: float = Field(default=30.0, gt=0)
    max_ejection_s: float = Field(default=300.0, gt=0)
    max_ejection_percent: float = Field(default=10.0, ge=0, le=100)

    @field_validator("error_statuses")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for st in v:
            if not 1 <= st <= 31 or st == 4:
                raise ValueError(f"error statuses are 1..31 except 4 (transport is counted "
                                 f"by consecutive_transport_failures), got {st}")
        return v

    def to_model(self) -> model.OutlierDetection:
        return model.OutlierDetection(
            self.consecutive_transport_failures, self.consecutive_errors,
            tuple(self.error_statuses), self.failure_rate_threshold,
            self.failure_rate_min_requests, self.interval_s, self.base_ejection_s,
            self.max_ejection_s, self.max_ejection_percent, self.failure_rate_min_nodes,
            self.success_rate_stdev_factor, self.success_rate_min_requests,
            self.success_rate_min_nodes, self.ejection_jitter_s)


class RetrySpec(_Strict):
    idempotent_methods: list[str] = []
    max_attempts: int = Field(default=2, ge=1, le=5)
    budget_percent: float = Field(default=20.0, ge=0, le=100)
    min_retries: int = Field(default=3, ge=0)

    def to_model(self) -> model.RetryPolicy:
        return model.RetryPolicy(tuple(self.idempotent_methods), self.max_attempts,
                                 self.budget_percent, self.min_retries)


class AdaptiveConcurrencySpec(_Strict):
    enabled: bool = False
    initial_limit: int = Field(default=20, ge=1)
    min_limit: int = Field(default=2, ge=1)
    max_limit: int = Field(default=1000, ge=1)
    sample_s: float = Field(default=0.1, gt=0)

    def to_model(self) -> model.AdaptiveConcurrency:
        return model.AdaptiveConcurrency(self.enabled, self.initial_limit, self.min_limit,
                                         self.max_limit, self.sample_s)


class ServiceSpec(_Strict):
    appkey: str = Field(min_length=1)
    lb_policy: str = "round_robin"
    set_enabled: bool = False
    service_names: list[str] = []
    endpoints: list[EndpointSpec] = []
    # governance (docs/governance.md)
    rate_limits: list[RateLimitSpec] = []
    cluster_quota: ClusterQuotaSpec | None = None
    circuit_breakers: CircuitBreakersSpec | None = None
    outlier_detection: OutlierDetectionSpec | None = None
    retry: RetrySpec | None = None
    adaptive_concurrency: AdaptiveConcurrencySpec | None = None

    def governance(self) -> model.Governance | None:
        g = model.Governance(
            rate_limits=tuple(r.to_model() for r in self.rate_limits),
            cluster_quota=self.cluster_quota.to_model() if self.cluster_quota else None,
            circuit_breakers=self.circuit_breakers.to_model() if self.circuit_breakers else None,
            outlier_detection=(self.outlier_detection.to_model()
                               if self.outlier_detection else None),
            retry=self.retry.to_model() if self.retry else None,
            adaptive_concurrency=(self.adaptive_concurrency.to_model()
                                  if self.adaptive_concurrency else None),
        )
        return None if g.empty() else g

    @field_validator("lb_policy")
    @classmethod
    def _lb(cls, v: str) -> str:
        if v.lower() not in _LB_NAMES:
            raise ValueError(f"lb_policy must be one of {sorted(_LB_NAMES)}, got {v!r}")
        return v

    def to_model(self) -> model.Service:
        return model.Service(
            appkey=self.appkey,
            endpoints=tuple(e.to_model() for e in self.endpoints),
            lb_policy=_LB_NAMES[self.lb_policy.lower()],
            set_enabled=self.set_enabled,
            service_names=tuple(self.service_names),
            governance=self.governance(),
        )
