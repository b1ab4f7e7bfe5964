"""A slow, literal pure-Python router: docs/protocol.md section 8, steps 1-4.

It recomputes everything per call, straight from the model objects, so that
the Cython route table (which precomputes everything at build time) can be
checked against it.  Conventions it shares with the core (docs/routing.md):
duplicate addresses in one service -> the first endpoint wins; a serviceName
claimed by several services -> the smallest appkey wins; an empty appkey is
"absent"; a locality tier applies only when the proxy's own label is set.
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping
from dataclasses import dataclass, field

from octoproxy import model
from octoproxy.model import ROLE_PRIMARY, STATUS_ALIVE, Endpoint, Labels, Service, ShuntRule
from octoproxy.shunting import parse_int, percent_bucket, percent_threshold

RT_OK = 0
RT_UNKNOWN_SERVICE = 1
RT_SET_NO_NODE = 2
RT_NO_HEALTHY = 3
RT_NO_SERVICE_KEY = 4
RT_SHUNT_NO_NODE = 5


@dataclass
class RefError(Exception):
    code: int
    rule: str | None = None  # RT_SHUNT_NO_NODE: the rule that refused


def warm_weight(weight: int, start: float, warmup: float, now: float, floor: int = 1) -> int:
    """Linear warm-up: weight * elapsed / warmup, at least `floor`, at most weight."""
    if warmup <= 0 or weight <= 0:
        return weight
    elapsed = now - start
    if elapsed >= warmup:
        return weight
    return max(min(floor, weight), int(weight * elapsed / warmup + 1e-9))


@dataclass
class Request:
    """What shunting rules read from one request (None = absent)."""

    appkey: str | None = None
    service_name: str | None = None
    method: str | None = None
    caller: str | None = None
    gctx: Mapping[str, str] = field(default_factory=dict)
    lctx: Mapping[str, str] = field(default_factory=dict)

    def context(self, key: str) -> str | None:
        if key in self.lctx:
            return self.lctx[key]
        return self.gctx.get(key)


@dataclass
class Outcome:
    """The result of routing one request: candidates and the rule that matched."""

    candidates: list[Endpoint]
    rule: str | None = None  # the matched rule's name
    scope: str | None = None  # its scope (appkey or "*")
    fell_back: bool = False  # a group rule whose group had no node: default nodes


class ReferenceRouter:
    def __init__(
        self,
        labels: Labels,
        services: list[Service],
        shunting: Mapping[str, tuple[ShuntRule, ...]] | None = None,
        rng: _random.Random | None = None,
    ) -> None:
        self.labels = labels
        self.services = {s.appkey: s for s in services}
        self.shunting = dict(shunting or {})
        self.rng = rng or _random.Random(0)

    # -- traffic shunting (docs/shunting.md) --------------------------------

    def _value(self, m: model.ShuntMatch, rq: Request) -> str | None:
        if m.source == model.SRC_SERVICE:
            return rq.service_name
        if m.source == model.SRC_METHOD:
            return rq.method
        if m.source == model.SRC_CALLER:
            return rq.caller
        return rq.context(m.key)

    def cond(self, m: model.ShuntMatch, rq: Request) -> bool:
        if m.source == model.SRC_RANDOM:
            return self.rng.randrange(10000) < percent_threshold(m.percent)
        v = self._value(m, rq)
        if v is None:
            return False
        b = v.encode("utf-8")
        if m.op == model.OP_EQ:
            return v == m.values[0]
        if m.op == model.OP_IN:
            return v in m.values
        if m.op == model.OP_PREFIX:
            return b.startswith(m.values[0].encode("utf-8"))
        if m.op == model.OP_PRESENT:
            return v != ""
        if m.op == model.OP_PERCENT:
            return percent_bucket(b) < percent_threshold(m.percent)
        n = parse_int(b)
        if n is None:
            return False
        if m.op == model.OP_RANGE:
            return m.lo <= n < m.hi
        if m.op == model.OP_MOD:
            return n % m.modulus in m.remainders  # floored: -3 % 10 == 7
        raise AssertionError(m.op)

    def rules_for(self, appkey: str) -> list[tuple[str, ShuntRule]]:
        """Provider rules first, then the global ones."""
        out = [(appkey, r) for r in self.shunting.get(appkey, ())]
        out += [(model.SHUNT_GLOBAL, r) for r in self.shunting.get(model.SHUNT_GLOBAL, ())]
        return out

    def route_request(self, rq: Request) -> Outcome:
        """Rules, then steps 1-4 (RefError on failure)."""
        svc = self.service_for(rq.appkey, rq.service_name)
        for scope, r in self.rules_for(svc.appkey):
            if not all(self.cond(m, rq) for m in r.matches):
                continue
            if r.action == model.ACT_DEFAULT:
                return Outcome(self._named(r, svc, self._req_labels(rq), ""), r.name, scope)
            if r.action == model.ACT_CONTEXT:
                if r.source_key:
                    src = rq.context(r.source_key)
                    table = dict(r.unit_table)
                    if src is None or src not in table:
                        continue  # not in the unit table: the rule does not match
                    val = table[src]
                else:
                    val = r.value
                labels = self._req_labels(rq)
                labels[r.target] = val
                return Outcome(self._named(r, svc, labels, ""), r.name, scope)
            try:
                return Outcome(self._cands(svc, self._req_labels(rq), r.group), r.name, scope)
            except RefError:
                if r.on_no_node == model.NO_NODE_REJECT:
                    raise RefError(RT_SHUNT_NO_NODE, r.name) from None
                return Outcome(self._named(r, svc, self._req_labels(rq), ""), r.name, scope, True)
        return Outcome(self._cands(svc, self._req_labels(rq), ""))

    def _named(
        self, r: ShuntRule, svc: Service, lab: dict[str, str | None], group: str
    ) -> list[Endpoint]:
        """_cands; an error names the rule that matched (it still counts a hit)."""
        try:
            return self._cands(svc, lab, group)
        except RefError as e:
            e.rule = r.name
            raise

    @staticmethod
    def _req_labels(rq: Request) -> dict[str, str | None]:
        return {k: rq.gctx.get(k) for k in ("octo-liteset", "octo-set", "octo-swimlane")}

    def _cands(self, svc: Service, lab: dict[str, str | None], group: str) -> list[Endpoint]:
        return self._steps(svc, lab["octo-liteset"], lab["octo-set"], lab["octo-swimlane"], group)

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
        return self._steps(svc, liteset, set, swimlane, "")

    def _steps(
        self,
        svc: Service,
        liteset: str | None,
        set: str | None,
        swimlane: str | None,
        group: str,
    ) -> list[Endpoint]:
        """Steps 1-4 over the service's nodes of `group` ("" = the default,
        ungrouped nodes: grouped nodes are isolated from default routing)."""
        lite = self.labels.liteset if liteset is None else liteset
        cset = self.labels.set if set is None else set
        lane = self.labels.swimlane if swimlane is None else swimlane

        eps: list[Endpoint] = []
        seen: dict[str, None] = {}
        for ep in svc.endpoints:
            if ep.address not in seen:
                seen[ep.address] = None
                if ep.group == group:
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
