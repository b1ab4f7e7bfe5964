"""A slow, literal pure-Python router: docs/protocol.md section 8, steps 1-4.

It recomputes everything per call, straight from the model objects, so that
the Cython route table (which precomputes everything at build time) can be
checked against it.  Conventions it shares with the core (docs/routing.md):
duplicate addresses in one service -> the first endpoint wins; a serviceName
claimed by several services -> the smallest appkey wins; an empty appkey is
"absent"; a locality tier applies only when the proxy's own label is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from octoproxy.model import ROLE_PRIMARY, STATUS_ALIVE, Endpoint, Labels, Service

RT_OK = 0
RT_UNKNOWN_SERVICE = 1
RT_SET_NO_NODE = 2
RT_NO_HEALTHY = 3
RT_NO_SERVICE_KEY = 4


@dataclass
class RefError(Exception):
    code: int


def warm_weight(weight: int, start: float, warmup: float, now: float, floor: int = 1) -> int:
    """Linear warm-up: weight * elapsed / warmup, at least `floor`, at most weight."""
    if warmup <= 0 or weight <= 0:
        return weight
    elapsed = now - start
    if elapsed >= warmup:
        return weight
    return max(min(floor, weight), int(weight * elapsed / warmup + 1e-9))


class ReferenceRouter:
    def __init__(self, labels: Labels, services: list[Service]) -> None:
        self.labels = labels
        self.services = {s.appkey: s for s in services}

    def service_for(self, appkey: str | None, service_name: str | None) -> Service:
        if appkey:
            if appkey not in self.services:
                raise RefError(RT_UNKNOWN_SERVICE)
            return self.services[appkey]
        if service_name:
            owners = sorted(a for a, s in self.services.items() if service_name in s.service_names)
            if not owners:
                raise RefError(RT_UNKNOWN_SERVICE)
            return self.services[owners[0]]
        raise RefError(RT_NO_SERVICE_KEY)

    def candidates(
        self,
        appkey: str | None = None,
        service_name: str | None = None,
        liteset: str | None = None,
        set: str | None = None,
        swimlane: str | None = None,
    ) -> list[Endpoint]:
        svc = self.service_for(appkey, service_name)
        lite = self.labels.liteset if liteset is None else liteset
        cset = self.labels.set if set is None else set
        lane = self.labels.swimlane if swimlane is None else swimlane

        eps: list[Endpoint] = []
        seen: dict[str, None] = {}
        for ep in svc.endpoints:
            if ep.address not in seen:
                seen[ep.address] = None
                eps.append(ep)

        # 1. cell
        if lite:
            step = [e for e in eps if e.cell == lite]
            if not step:
                step = [e for e in eps if e.cell == ""]
        elif cset and svc.set_enabled:
            step = [e for e in eps if e.cell == cset]
            if not step:
                raise RefError(RT_SET_NO_NODE)
        else:
            step = [e for e in eps if e.cell == ""]

        # 2. swimlane
        if lane:
            in_lane = [e for e in step if e.swimlane == lane]
            step = in_lane or [e for e in step if e.swimlane == ""]
        else:
            step = [e for e in step if e.swimlane == ""]

        # 3. health
        healthy = [e for e in step if e.weight > 0 and e.status == STATUS_ALIVE]
        primaries = [e for e in healthy if e.role == ROLE_PRIMARY]
        step = primaries or healthy
        if not step:
            raise RefError(RT_NO_HEALTHY)

        # 4. locality, relative to the proxy's own labels
        if self.labels.idc:
            same = [e for e in step if e.idc == self.labels.idc]
            if same:
                return same
        if self.labels.region:
            same = [e for e in step if e.region == self.labels.region]
            if same:
                return same
        return step
