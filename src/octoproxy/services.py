"""The one description of a service and its endpoints that people write:
the `static.services` section of a proxy config and the bundled control
plane's endpoints file both use it (docs/configuration.md, docs/xds.md).
"""

from __future__ import annotations

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
            idc=self.idc,
            region=self.region,
            warmup_s=self.warmup_s,
            start_time=self.start_time,
        )


class ServiceSpec(_Strict):
    appkey: str = Field(min_length=1)
    lb_policy: str = "round_robin"
    set_enabled: bool = False
    service_names: list[str] = []
    endpoints: list[EndpointSpec] = []

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
        )
