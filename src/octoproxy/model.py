"""Plain, typed descriptions of what the route table is built from.

This is the seam between the sources of routes (the static section of the
config, the xDS client) and the Cython route table: both produce `Service`
objects; the route table consumes them and never sees where they came from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    """A service (appkey) with its nodes and its settings."""

    appkey: str
    endpoints: tuple[Endpoint, ...] = ()
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    set_enabled: bool = False
    # serviceName values (RequestInfo.serviceName) that map to this appkey
    service_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Labels:
    """The proxy's own node labels; per-request context may override the first three."""

    liteset: str = ""
    set: str = ""
    swimlane: str = ""
    idc: str = ""
    region: str = ""


@dataclass(slots=True)
class ServiceSet:
    """A whole set of services (what a full snapshot is built from)."""

    services: dict[str, Service] = field(default_factory=dict)
