"""Traffic-shunting rules over xDS: Envoy's Thrift route configuration
(``envoy.extensions.filters.network.thrift_proxy.v3.RouteConfiguration``,
"TRDS") <-> ``tuple[model.ShuntRule, ...]``, and the rules' dict form (the
control plane's file and the ``octo`` extension share it).

Standard fields are used where they say what a rule says; what they cannot
say (modulo, percentages by key, unit tables, the no-node policy, the rule
name) travels in ``RouteAction.metadata_match.filter_metadata["octo"]``, a
Struct any control plane can carry.  docs/xds.md section 2, "Shunting rules".
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.thrift_proxy.v3 import route_pb2
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from octoproxy import model
from octoproxy.shunting import MAX_CONDITIONS, MAX_RULES, MAX_UNIT_ENTRIES, validate_rules
from octoproxy.xds.authres import unknown_field
from octoproxy.xds.resources import (
    LB_NS,
    OCTO_NS,
    ResourceError,
    appkey_problem,
    digest,
    run_steps,
)
from octoproxy.xds.wire import BIG_BODY, TooManyFields, count_field, resource_name

log = logging.getLogger("octoproxy.xds")

THRIFT_ROUTE_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.RouteConfiguration"
)
# the resource name of the global ("public") rules: not a valid appkey, so it
# never collides with a provider's own rules
GLOBAL_RESOURCE = "octo/global"

# pseudo-headers (HeaderMatcher.name) that match something other than a context key
CALLER_HEADER = ":client-id"  # Envoy's name for the Twitter protocol's client id
METHOD_HEADER = ":octo-method"
SERVICE_HEADER = ":octo-service"
_PSEUDO = {
    CALLER_HEADER: model.SRC_CALLER,
    METHOD_HEADER: model.SRC_METHOD,
    SERVICE_HEADER: model.SRC_SERVICE,
}
_PSEUDO_OF = {v: k for k, v in _PSEUDO.items()}
# the destination header (Twitter protocol): a global rule routes within the
# request's own provider, whatever it is
DEST_HEADER = ":dest"

_EXT_KEYS = frozenset(
    {"name", "on_no_node", "conditions", "target", "value", "source_key", "unit_table", "hash_key"}
)
_COND_KEYS = frozenset(
    {"source", "key", "op", "value", "values", "lo", "hi", "modulus", "remainders", "percent"}
)
_RULE_KEYS = frozenset(
    {"name", "match", "group", "on_no_node", "target", "value", "source_key", "unit_table",
     "default"}
)
_MAX_EXACT = 2**53  # integers a Struct's double holds exactly
_ROUTES_FIELD = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name["routes"].number
# top-level fields a RouteConfiguration of MAX_RULES rules can need (its
# routes, name, validate_clusters, the repeats a merge of pieces may give)
_MAX_FIELDS = 4 * MAX_RULES + 64


def scope_of(resource_name: str) -> str:
    """The rule scope (a provider appkey or model.SHUNT_GLOBAL) of a resource name."""
    return model.SHUNT_GLOBAL if resource_name == GLOBAL_RESOURCE else resource_name


def resource_of(scope: str) -> str:
    return GLOBAL_RESOURCE if scope == model.SHUNT_GLOBAL else scope


def _validate(scope: str, rules: tuple[model.ShuntRule, ...]) -> None:
    """The core's own checks (the one gate: octoproxy.shunting.validate_rules), as ValueError."""
    validate_rules(scope, rules)


# --- the dict form (control plane file, octo.conditions) -----------------------


_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


def _int(where: str, v: Any, *, exact_only: bool = False) -> int:
    """An integer: a number, or its decimal text (how a Struct carries one
    beyond 2^53, which its doubles cannot hold exactly)."""
    if isinstance(v, str) and _INT_TEXT.fullmatch(v):
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where} must be an integer, not {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ValueError(f"{where} must be an integer, not {v!r}")
        if exact_only and abs(v) >= _MAX_EXACT:
            raise ValueError(
                f"{where}: {v:.0f} is 2^53 or more, which a Struct number cannot hold "
                "exactly: give it as a decimal string"
            )
        return int(v)
    return int(v)


def _num(v: int) -> int | str:
    """An integer for a Struct: its decimal text from 2^53 on."""
    return v if abs(v) < _MAX_EXACT else str(v)


def _s(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where} must be a string, not {v!r}")
    return v


def match_from_dict(d: Any, where: str, *, from_struct: bool = False) -> model.ShuntMatch:
    """One condition from its dict form: ``{source, op, key?, value|values?, lo?, hi?,
    modulus?, remainders?, percent?}``; ValueError naming ``where``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping")
    extra = set(d) - _COND_KEYS
    if extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
    source = _s(f"{where}.source", d.get("source", ""))
    op = _s(f"{where}.op", d.get("op", ""))
    if source == model.SRC_RANDOM and "op" not in d:
        op = model.OP_PERCENT
    if "value" in d and "values" in d:
        raise ValueError(f"{where}: give value or values, not both")
    if "value" in d:
        values: tuple[str, ...] = (_s(f"{where}.value", d["value"]),)
    else:
        vs = d.get("values", [])
        if not isinstance(vs, list | tuple):
            raise ValueError(f"{where}.values must be a list")
        values = tuple(_s(f"{where}.values[{i}]", v) for i, v in enumerate(vs))
    rems = d.get("remainders", [])
    if not isinstance(rems, list | tuple):
        raise ValueError(f"{where}.remainders must be a list")
    pct = d.get("percent", 0.0)
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not math.isfinite(pct):
        raise ValueError(f"{where}.percent must be a number, not {pct!r}")
    return model.ShuntMatch(
        source=source,
        op=op,
        key=_s(f"{where}.key", d.get("key", "")),
        values=values,
        lo=_int(f"{where}.lo", d.get("lo", 0), exact_only=from_struct),
        hi=_int(f"{where}.hi", d.get("hi", 0), exact_only=from_struct),
        modulus=_int(f"{where}.modulus", d.get("modulus", 0), exact_only=from_struct),
        remainders=tuple(
            _int(f"{where}.remainders[{i}]", r, exact_only=from_struct) for i, r in enumerate(rems)
        ),
        percent=float(pct),
    )


def match_to_dict(m: model.ShuntMatch) -> dict[str, Any]:
    d: dict[str, Any] = {"source": m.source, "op": m.op}
    if m.key:
        d["key"] = m.key
    if m.op in (model.OP_EQ, model.OP_PREFIX) and len(m.values) == 1:
        d["value"] = m.values[0]
    elif m.values:
        d["values"] = list(m.values)
    if m.op == model.OP_RANGE:
        d["lo"], d["hi"] = _num(m.lo), _num(m.hi)
    if m.op == model.OP_MOD:
        d["modulus"], d["remainders"] = _num(m.modulus), [_num(r) for r in m.remainders]
    if m.op == model.OP_PERCENT:
        d["percent"] = m.percent
    return d


def _unit_table(where: str, t: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(t, Mapping):
        raise ValueError(f"{where} must be a mapping of request value -> target value")
    if len(t) > MAX_UNIT_ENTRIES:  # before converting them all
        raise ValueError(f"{where}: more than {MAX_UNIT_ENTRIES} entries")
    out = []
    for k, v in t.items():
        # YAML reads `1001: set-bj` with an integer key
        key = str(k) if isinstance(k, int) and not isinstance(k, bool) else k
        out.append((_s(f"{where} key {k!r}", key), _s(f"{where}[{k!r}]", v)))
    return tuple(sorted(out))


def _action_fields(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The context-action and no-node fields shared by the file and the extension."""
    out: dict[str, Any] = {}
    if "on_no_node" in d:
        out["on_no_node"] = _s(f"{where}.on_no_node", d["on_no_node"])
    for k in ("target", "value", "source_key"):
        if k in d:
            out[k] = _s(f"{where}.{k}", d[k])
    if "unit_table" in d:
        out["unit_table"] = _unit_table(f"{where}.unit_table", d["unit_table"])
    return out


def rule_from_dict(d: Any, where: str) -> model.ShuntRule:
    """One rule from the control plane's file:
    ``{name, match: [...], group, on_no_node}`` or
    ``{name, match: [...], target, value | source_key + unit_table}``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping")
    name = d.get("name")
    if isinstance(name, str) and name:
        where = f"{where} (rule {name!r})"
    extra = set(d) - _RULE_KEYS
    if extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
    ms = d.get("match", [])
    if not isinstance(ms, list | tuple):
        raise ValueError(f"{where}.match must be a list of conditions")
    matches = tuple(match_from_dict(m, f"{where}.match[{i}]") for i, m in enumerate(ms))
    fields = _action_fields(d, where)
    group = _s(f"{where}.group", d.get("group", ""))
    if "default" in d:
        if d["default"] is not True or group or fields:
            raise ValueError(f"{where}: default: true (the default nodes) stands alone, "
                             "without group, target or on_no_node")
        return model.ShuntRule(name=_s(f"{where}.name", name if name is not None else ""),
                               matches=matches, action=model.ACT_DEFAULT)
    if group and "target" in fields:
        raise ValueError(f"{where}: a rule either routes to a group or sets a context value")
    if not group and "target" not in fields:
        raise ValueError(f"{where}: no action (give group, or target)")
    action = model.ACT_GROUP if group else model.ACT_CONTEXT
    return model.ShuntRule(
        name=_s(f"{where}.name", name if name is not None else ""),
        matches=matches,
        action=action,
        group=group,
        **fields,
    )


def rule_to_dict(r: model.ShuntRule) -> dict[str, Any]:
    d: dict[str, Any] = {"name": r.name}
    if r.matches:
        d["match"] = [match_to_dict(m) for m in r.matches]
    if r.action == model.ACT_GROUP:
        d["group"] = r.group
        if r.on_no_node != model.NO_NODE_FALLBACK:
            d["on_no_node"] = r.on_no_node
    elif r.action == model.ACT_DEFAULT:
        d["default"] = True
    else:
        d["target"] = r.target
        if r.source_key:
            d["source_key"] = r.source_key
            d["unit_table"] = dict(r.unit_table)
        else:
            d["value"] = r.value
    return d


def rules_from_list(scope: str, data: Any, where: str) -> tuple[model.ShuntRule, ...]:
    """A scope's rule list from the file, checked as the core checks it."""
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list of rules")
    rules = tuple(rule_from_dict(d, f"{where}[{i}]") for i, d in enumerate(data))
    _validate(scope, rules)
    return rules


# --- RouteConfiguration -> rules ---------------------------------------------------

_HM = route_components_pb2.HeaderMatcher


def _parse_alternation(regex: str) -> tuple[str, ...] | None:
    """The literal values of ``^(?:a|b|c)$`` (or ``^a$``), each escaped as
    re.escape does; None for any other regex.  The anchors are optional:
    Envoy matches a header's (and a StringMatcher's) safe_regex against the
    whole value, so ``a|b`` and ``(?:a|b)`` say the same set."""
    if regex.startswith("^(?:") and regex.endswith(")$"):
        body = regex[4:-2]
    elif regex.startswith("^") and regex.endswith("$") and len(regex) >= 2:
        body = regex[1:-1]
    elif regex.startswith("(?:") and regex.endswith(")"):
        body = regex[3:-1]
    else:
        body = regex
    values: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1].isalnum():
                return None  # \d, \w... are classes, not literals
            cur.append(body[i + 1])
            i += 2
            continue
        if c == "|":
            values.append("".join(cur))
            cur = []
        elif c in ".^$*+?()[]{}":
            return None
        else:
            cur.append(c)
        i += 1
    values.append("".join(cur))
    return tuple(values)


def _alternation(values: Iterable[str]) -> str:
    return "^(?:" + "|".join(re.escape(v) for v in values) + ")$"


def _header_match(h: Any, where: str) -> model.ShuntMatch:
    name = h.name
    if not name:
        raise ResourceError(f"{where}: name is empty")
    if name.startswith(":"):
        src = _PSEUDO.get(name)
        if src is None:
            raise ResourceError(
                f"{where}: unknown pseudo-header {name!r} (known: {', '.join(sorted(_PSEUDO))})"
            )
        key = ""
    else:
        src, key = model.SRC_CONTEXT, name
    if h.invert_match:
        raise ResourceError(f"{where}: invert_match is not supported (a rule cannot negate)")
    if h.treat_missing_header_as_empty:
        raise ResourceError(
            f"{where}: treat_missing_header_as_empty is not supported "
            "(a missing value never matches)"
        )
    kind = h.WhichOneof("header_match_specifier")
    values: tuple[str, ...] = ()
    lo = hi = 0
    if kind is None or (kind == "present_match" and h.present_match):
        op = model.OP_PRESENT
    elif kind == "present_match":
        raise ResourceError(f"{where}: present_match false (absent) is not supported")
    elif kind == "exact_match":
        op, values = model.OP_EQ, (h.exact_match,)
    elif kind == "prefix_match":
        op, values = model.OP_PREFIX, (h.prefix_match,)
    elif kind == "range_match":
        op, lo, hi = model.OP_RANGE, h.range_match.start, h.range_match.end
    elif kind in ("safe_regex_match", "string_match"):
        sm_kind = "safe_regex"
        regex = h.safe_regex_match.regex
        if kind == "string_match":
            sm = h.string_match
            if sm.ignore_case:
                raise ResourceError(f"{where}: string_match.ignore_case is not supported")
            sm_kind = sm.WhichOneof("match_pattern") or "none"
            regex = sm.safe_regex.regex
        if sm_kind == "exact":
            op, values = model.OP_EQ, (h.string_match.exact,)
        elif sm_kind == "prefix":
            op, values = model.OP_PREFIX, (h.string_match.prefix,)
        elif sm_kind == "safe_regex":
            alts = _parse_alternation(regex)
            if alts is None:
                raise ResourceError(
                    f"{where}: regex {regex[:80]!r} is not supported (only a set of literals, "
                    "'^(?:a|b|c)$', is: no regex on the data path)"
                )
            op, values = model.OP_IN, alts
        else:
            raise ResourceError(f"{where}: string_match {sm_kind} is not supported")
    else:
        raise ResourceError(f"{where}: {kind} is not supported")
    return model.ShuntMatch(source=src, op=op, key=key, values=values, lo=lo, hi=hi)


def _cluster_ok(scope: str, name: str, where: str) -> None:
    if scope == model.SHUNT_GLOBAL:
        raise ResourceError(
            f"{where}: a global rule routes within each request's own provider: "
            f"use cluster_header {DEST_HEADER!r}, not a cluster name"
        )
    if name != scope:
        raise ResourceError(f"{where}: routes to cluster {name!r}; shunting stays within {scope!r}")


def _lb_group(md: Any, where: str) -> str:
    """The group selected by metadata_match.filter_metadata["envoy.lb"] ("" = none)."""
    if LB_NS not in md.filter_metadata:
        return ""
    f = md.filter_metadata[LB_NS].fields
    extra = set(f) - {"group"}
    if extra:
        raise ResourceError(
            f'{where}.filter_metadata["{LB_NS}"]: only "group" selects nodes, '
            f"not {', '.join(sorted(extra))}"
        )
    v = f["group"]
    if v.WhichOneof("kind") != "string_value" or not v.string_value:
        raise ResourceError(f'{where}.filter_metadata["{LB_NS}"].group must be a non-empty string')
    return str(v.string_value)


def _route_rules(scope: str, i: int, route: Any, rc_name: str) -> list[model.ShuntRule]:
    act = route.route
    ext: dict[str, Any] = {}
    if OCTO_NS in act.metadata_match.filter_metadata:
        ext = json_format.MessageToDict(act.metadata_match.filter_metadata[OCTO_NS])
    name = ext.get("name", f"route-{i}")
    where = f"RouteConfiguration {rc_name!r}: routes[{i}]"
    if isinstance(name, str) and name:
        where += f" (rule {name!r})"
    ow = f'{where}: route.metadata_match.filter_metadata["{OCTO_NS}"]'
    try:
        extra = set(ext) - _EXT_KEYS
        if extra:
            raise ValueError(f"{ow}: unknown key(s) {', '.join(sorted(extra))}")
        name = _s(f"{ow}.name", name)
        m = route.match
        matches: list[model.ShuntMatch] = []
        if m.invert:
            raise ValueError(f"{where}: match.invert is not supported (a rule cannot negate)")
        spec = m.WhichOneof("match_specifier")
        if spec == "method_name" and m.method_name:
            matches.append(model.ShuntMatch(model.SRC_METHOD, model.OP_EQ, values=(m.method_name,)))
        elif spec == "service_name" and m.service_name:
            # Envoy matches "Service:" as a prefix of a multiplexed method name;
            # OCTO carries the service name on its own (RequestInfo.serviceName)
            sn = m.service_name[:-1] if m.service_name.endswith(":") else m.service_name
            matches.append(model.ShuntMatch(model.SRC_SERVICE, model.OP_EQ, values=(sn,)))
        for j, h in enumerate(m.headers):
            matches.append(_header_match(h, f"{where}: match.headers[{j}]"))
        conds = ext.get("conditions", [])
        if not isinstance(conds, list):
            raise ValueError(f"{ow}.conditions must be a list")
        for j, c in enumerate(conds):
            matches.append(match_from_dict(c, f"{ow}.conditions[{j}]", from_struct=True))
        fields = _action_fields(ext, ow)
        hash_key = _s(f"{ow}.hash_key", ext.get("hash_key", ""))
        cs = act.WhichOneof("cluster_specifier")
        group = _lb_group(act.metadata_match, f"{where}: route.metadata_match")
        if act.rate_limits:
            raise ValueError(
                f"{where}: route.rate_limits are not supported here (docs/governance.md)"
            )
        if act.request_mirror_policies:
            raise ValueError(f"{where}: route.request_mirror_policies are not supported")
        if cs == "cluster":
            _cluster_ok(scope, act.cluster, f"{where}: route.cluster")
        elif cs == "cluster_header":
            if act.cluster_header != DEST_HEADER:
                raise ValueError(
                    f"{where}: route.cluster_header must be {DEST_HEADER!r} (the request's "
                    f"own provider), not {act.cluster_header!r}"
                )
        elif cs == "weighted_clusters":
            if group or "target" in fields:
                raise ValueError(
                    f"{where}: with weighted_clusters the groups are in each cluster's "
                    "metadata_match, and there is no context action"
                )
            return _weighted(
                scope, name, tuple(matches), act.weighted_clusters, hash_key, fields, where
            )
        if hash_key:
            raise ValueError(f"{ow}.hash_key is only for weighted_clusters")
        if group and "target" in fields:
            raise ValueError(f"{where}: a rule either selects a group or sets a context value")
        if not group and "target" not in fields and cs in ("cluster", "cluster_header"):
            # Envoy routes these requests to the cluster itself and looks no
            # further: the default nodes, evaluation stops
            if "on_no_node" in fields:
                raise ValueError(f"{ow}.on_no_node is only for a route that selects a group")
            return [model.ShuntRule(name=name, matches=tuple(matches),
                                    action=model.ACT_DEFAULT)]
        if not group and "target" not in fields:
            raise ValueError(
                f'{where}: no action: select a group (metadata_match.filter_metadata["{LB_NS}"]'
                f'.group) or set a context value (filter_metadata["{OCTO_NS}"].target)'
            )
        return [
            model.ShuntRule(
                name=name,
                matches=tuple(matches),
                action=model.ACT_GROUP if group else model.ACT_CONTEXT,
                group=group,
                **fields,
            )
        ]
    except ValueError as e:
        raise ResourceError(str(e)) from None


def _weighted(
    scope: str,
    name: str,
    matches: tuple[model.ShuntMatch, ...],
    wc: Any,
    hash_key: str,
    fields: dict[str, Any],
    where: str,
) -> list[model.ShuntRule]:
    """weighted_clusters -> one percentage rule per group: the shares of the
    groups (in order) take consecutive slices of the hash buckets; the share
    of the entries without a group goes to the default nodes and stops there,
    as Envoy's route does (a default-action rule after the group rules).
    docs/xds.md."""
    groups: list[tuple[int, str, int]] = []  # (index, group, weight)
    rest = -1  # index of the first entry without a group that has a share
    total = 0
    for k, cw in enumerate(wc.clusters):
        w = f"{where}: route.weighted_clusters.clusters[{k}]"
        _cluster_ok(scope, cw.name, f"{w}.name")
        weight = cw.weight.value if cw.HasField("weight") else 0
        total += weight
        g = _lb_group(cw.metadata_match, f"{w}.metadata_match")
        if OCTO_NS in cw.metadata_match.filter_metadata:
            raise ValueError(f'{w}.metadata_match: the "{OCTO_NS}" extension goes on the route')
        if g:
            if any(g == x[1] for x in groups):
                raise ValueError(f"{w}: group {g!r} appears twice")
            groups.append((k, g, weight))
        elif weight > 0 and rest < 0:
            rest = k
    if total <= 0:
        raise ValueError(f"{where}: route.weighted_clusters: the weights add up to 0")
    if not groups:
        raise ValueError(f"{where}: route.weighted_clusters selects no group")
    if len(groups) > 1 and not hash_key:
        raise ValueError(
            f'{where}: several groups in weighted_clusters need filter_metadata["{OCTO_NS}"]'
            ".hash_key (the context key whose hash picks the slice)"
        )
    out = []
    cum = 0
    for k, g, weight in groups:
        cum += weight
        pct = round(cum * 10000 / total) / 100
        cond = (
            model.ShuntMatch(model.SRC_CONTEXT, model.OP_PERCENT, key=hash_key, percent=pct)
            if hash_key
            else model.ShuntMatch(model.SRC_RANDOM, model.OP_PERCENT, percent=pct)
        )
        out.append(
            model.ShuntRule(
                name=name if len(groups) == 1 else f"{name}[{k}]",
                matches=(*matches, cond),
                action=model.ACT_GROUP,
                group=g,
                **fields,
            )
        )
    if rest >= 0:
        out.append(model.ShuntRule(name=f"{name}[{rest}]", matches=matches,
                                   action=model.ACT_DEFAULT))
    return out


def route_config_to_rules(rc: route_pb2.RouteConfiguration) -> tuple[model.ShuntRule, ...]:
    """The rules of a RouteConfiguration named after its scope (an appkey, or
    GLOBAL_RESOURCE); ResourceError naming the route and the rule."""
    name = rc.name
    if name != GLOBAL_RESOURCE:
        problem = appkey_problem(name)
        if problem is not None:
            raise ResourceError(
                f"RouteConfiguration {name!r}: the name is an appkey or {GLOBAL_RESOURCE!r} "
                f"({problem})"
            )
    scope = scope_of(name)
    # bounds first: an oversized resource is refused before any conversion work
    if len(rc.routes) > MAX_RULES:
        raise ResourceError(
            f"RouteConfiguration {name!r}: {len(rc.routes)} routes, at most {MAX_RULES}"
        )
    for i, route in enumerate(rc.routes):
        if len(route.match.headers) > MAX_CONDITIONS:
            raise ResourceError(
                f"RouteConfiguration {name!r}: routes[{i}]: {len(route.match.headers)} headers, "
                f"at most {MAX_CONDITIONS} conditions per rule"
            )
        if len(route.route.weighted_clusters.clusters) > MAX_CONDITIONS:
            raise ResourceError(
                f"RouteConfiguration {name!r}: routes[{i}]: more than {MAX_CONDITIONS} "
                "weighted_clusters"
            )
    rules: list[model.ShuntRule] = []
    for i, route in enumerate(rc.routes):
        # a field a newer Thrift route API added (a new matcher...) would be
        # ignored by this mapping: the rule would match more than it says
        bad = unknown_field(route, f"routes[{i}]")
        if bad is not None:
            raise ResourceError(
                f"RouteConfiguration {name!r}: {bad} has a field this proxy does not know "
                "(from a newer Thrift route API?): refused rather than ignored")
        rules.extend(_route_rules(scope, i, route, name))
    out = tuple(rules)
    try:
        _validate(scope, out)
    except ValueError as e:
        raise ResourceError(f"RouteConfiguration {name!r}: {e}") from None
    return out


# --- rules -> RouteConfiguration (the bundled control plane, tests) -----------------


def _to_header(m: model.ShuntMatch) -> Any | None:
    """The HeaderMatcher of a condition, or None if only the extension says it."""
    if m.source == model.SRC_CONTEXT:
        if m.key.startswith(":"):
            return None
        hname = m.key
    elif m.source in _PSEUDO_OF:
        hname = _PSEUDO_OF[m.source]
    else:
        return None
    h = _HM(name=hname)
    if m.op == model.OP_EQ:
        h.string_match.exact = m.values[0]
    elif m.op == model.OP_PREFIX:
        h.string_match.prefix = m.values[0]
    elif m.op == model.OP_IN:
        h.string_match.safe_regex.regex = _alternation(m.values)
    elif m.op == model.OP_PRESENT:
        h.present_match = True
    elif m.op == model.OP_RANGE:
        h.range_match.start, h.range_match.end = m.lo, m.hi
    else:
        return None
    return h


def rules_to_route_config(
    scope: str, rules: Iterable[model.ShuntRule]
) -> route_pb2.RouteConfiguration:
    """The RouteConfiguration carrying `rules` for `scope` (standard fields
    first, the ``octo`` extension for the rest)."""
    rc = route_pb2.RouteConfiguration(name=resource_of(scope))
    for r in rules:
        route = rc.routes.add()
        route.match.SetInParent()
        ext: dict[str, Any] = {"name": r.name}
        conds: list[dict[str, Any]] = []
        rest = list(r.matches)
        first = rest[0] if rest else None
        # the standard specifiers read "" as "any" and drop a trailing ':' of
        # a service name: such values go as headers
        if first is not None and first.op == model.OP_EQ and first.values[0]:
            if first.source == model.SRC_METHOD:
                route.match.method_name = rest.pop(0).values[0]
            elif first.source == model.SRC_SERVICE and not first.values[0].endswith(":"):
                route.match.service_name = rest.pop(0).values[0]
        for m in rest:
            h = _to_header(m)
            if h is not None:
                route.match.headers.append(h)
            else:
                conds.append(match_to_dict(m))
        if conds:
            ext["conditions"] = conds
        act = route.route
        if scope == model.SHUNT_GLOBAL:
            act.cluster_header = DEST_HEADER
        else:
            act.cluster = scope
        if r.action == model.ACT_GROUP:
            act.metadata_match.filter_metadata[LB_NS].update({"group": r.group})
            if r.on_no_node != model.NO_NODE_FALLBACK:
                ext["on_no_node"] = r.on_no_node
        elif r.action == model.ACT_DEFAULT:
            pass  # the cluster alone: its default nodes
        else:
            ext["target"] = r.target
            if r.source_key:
                ext["source_key"] = r.source_key
                ext["unit_table"] = dict(r.unit_table)
            else:
                ext["value"] = r.value
        s = struct_pb2.Struct()
        s.update(ext)
        act.metadata_match.filter_metadata[OCTO_NS].CopyFrom(s)
    return rc


# --- the client side: the TRDS resources of one ADS stream -------------------------


@dataclass(slots=True)
class _Rules:
    raw: bytes | None = None  # digest of the accepted serialized RouteConfiguration
    version: str = ""
    rules: tuple[model.ShuntRule, ...] = ()
    error: str = ""  # why the last version was rejected
    pushed: bool = False  # the sink holds non-empty rules of ours for this scope


class RuleResources:
    """The RouteConfiguration resources an XdsClient asks for: one per
    subscribed appkey plus GLOBAL_RESOURCE while anything is subscribed.
    A `TypeHandler` of the client (``XdsClient.add_type``), which follows the
    subscriptions with `sync`.  Each is validated on its own; a valid one
    replaces its scope's rules in the sink (``update_shunting``), an invalid
    one is reported (NACK) and the previous rules stay.  Absent from a SotW
    response = unchanged (as for RDS); delta ``removed_resources``, an empty
    RouteConfiguration or an unsubscription = no rules."""

    type_url = THRIFT_ROUTE_TYPE
    short = "TRDS"

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.entries: dict[str, _Rules] = {}

    @staticmethod
    def wanted(subs: Iterable[str]) -> set[str]:
        names = set(subs)
        if names:
            names.add(GLOBAL_RESOURCE)
        return names

    def sync(self, subs: Iterable[str]) -> None:
        """Follow the subscriptions: new names get an entry, dropped ones lose their rules."""
        want = self.wanted(subs)
        for name in want - set(self.entries):
            self.entries[name] = _Rules()
        for name in set(self.entries) - want:
            e = self.entries.pop(name)
            if e.pushed:
                self._clear(name)

    # the TypeHandler protocol (xds/client.py)
    def names(self) -> set[str]:
        return set(self.entries)

    def versions(self) -> dict[str, str]:
        return {n: e.version for n, e in self.entries.items() if e.raw is not None and e.version}

    def on_response(
        self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool
    ) -> list[str]:
        """Apply a response's resources; returns the problems (NACK if any)."""
        errors: list[str] = run_steps(self._steps(resources, removed, sotw, offload=False))
        return errors

    def steps(
        self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool
    ) -> Generator[Any, None, list[str]]:
        """on_response for the xDS client: each changed RouteConfiguration is
        decoded and converted in a worker thread (a future the client awaits),
        so a big one (1024 rules of 32 conditions, a unit table of thousands
        of entries: seconds of Python) does not hold the event loop; the
        interpreter hands the loop the GIL every few ms meanwhile.  Only
        giving the rules to the core runs on the loop."""
        return self._steps(resources, removed, sotw, offload=True)

    def _steps(self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool,
               offload: bool) -> Generator[Any, None, list[str]]:
        if sotw:
            return (yield from self._on_sotw([any_ for _, _, any_ in resources], offload))
        return (yield from self._on_delta(resources, removed, offload))

    def _push(self, name: str, rules: tuple[model.ShuntRule, ...]) -> None:
        update = getattr(self.sink, "update_shunting", None)
        if update is None:
            return  # a sink without shunting (tests of discovery alone)
        update(scope_of(name), rules)

    def _clear(self, name: str) -> None:
        """No rules for this scope any more (a failure is logged: removing cannot be refused)."""
        try:
            self._push(name, ())
        except Exception:
            log.exception("route sink failed to drop the shunting rules of %s", name)

    @staticmethod
    def _convert(name: str, body: bytes) -> tuple[model.ShuntRule, ...]:
        """Decode and convert one RouteConfiguration (pure: runs in a worker thread)."""
        try:
            # the bound first, by walking the top-level fields: decoding
            # millions of routes holds the GIL (and so the loop) in one call
            routes = count_field(body, _ROUTES_FIELD, MAX_RULES)
            if routes > MAX_RULES:
                raise ResourceError(f"RouteConfiguration {name!r}: more than {MAX_RULES} "
                                    f"routes, at most {MAX_RULES} (refused undecoded)")
            if routes < 0:
                raise ResourceError(
                    f"RouteConfiguration {name!r}: more than {_MAX_FIELDS} top-level "
                    f"fields, for at most {MAX_RULES} routes (refused undecoded)")
            rc = route_pb2.RouteConfiguration.FromString(body)
        except DecodeError as bad:
            raise ResourceError(f"RouteConfiguration {name!r}: cannot decode: {bad}") from None
        if rc.name != name:
            raise ResourceError(
                f"RouteConfiguration {rc.name!r} delivered under the name {name!r}"
            )
        return route_config_to_rules(rc)

    def _one(self, name: str, body: bytes, version: str, errors: list[str],
             offload: bool) -> Generator[Any, None, None]:
        e = self.entries[name]
        if offload and len(body) >= BIG_BODY:
            # hashlib lets go of the GIL: a big body's digest is taken off the loop
            dfut = asyncio.get_running_loop().run_in_executor(None, digest, body)
            yield dfut
            d = dfut.result()
            now = self.entries.get(name)
            if now is None:
                return
            e = now
        else:
            d = digest(body)
        if d == e.raw:
            e.version = version
            return
        try:
            if offload:
                fut = asyncio.get_running_loop().run_in_executor(None, self._convert, name, body)
                yield fut
                rules = fut.result()
                now = self.entries.get(name)  # unsubscribed meanwhile: nothing to apply
                if now is None:
                    return
                e = now
            else:
                rules = self._convert(name, body)
            try:
                self._push(name, rules)
            except ValueError as bad:  # the core's own checks
                raise ResourceError(f"RouteConfiguration {name!r}: {bad}") from None
            except Exception as bad:  # never let a sink failure end the stream
                log.exception("route sink rejected the shunting rules of %s", name)
                raise ResourceError(f"RouteConfiguration {name!r}: not applied: {bad!r}") from None
        except ResourceError as bad:
            e.error = str(bad)
            errors.append(str(bad))
            return
        e.raw, e.version, e.rules, e.error = d, version, rules, ""
        e.pushed = bool(rules)

    def _remove(self, name: str) -> None:
        e = self.entries[name]
        if e.pushed:
            self._clear(name)
        self.entries[name] = _Rules()

    def _on_sotw(self, resources: list[Any], offload: bool) -> Generator[Any, None, list[str]]:
        t = self.type_url
        errors: list[str] = []
        seen: dict[str, bytes | None] = {}
        twice: set[str] = set()
        for i, any_ in enumerate(resources):
            yield None  # the loop is served between resources (every 2 ms of work)
            if any_.type_url != t:
                errors.append(f"resources[{i}]: resource type {any_.type_url} in a {t} response")
                continue
            body = any_.value
            try:
                # the name only: a resource nobody asked for is never decoded
                # (thousands of them, or a few of hundreds of MiB, cost what
                # skipping their fields costs); the wanted ones are decoded
                # off the loop (_one).  A big one with more fields than a
                # RouteConfiguration of MAX_RULES rules has is not walked to
                # its end: it cannot be taken, whatever its name
                name = resource_name(body, _MAX_FIELDS)
            except DecodeError as bad:
                errors.append(f"resources[{i}]: cannot decode RouteConfiguration: {bad}")
                continue
            except TooManyFields as big:
                if big.name in self.entries:
                    err = (f"RouteConfiguration {big.name!r}: {big}, for at most {MAX_RULES} "
                           "routes (refused undecoded)")
                    self.entries[big.name].error = err
                    errors.append(err)
                continue
            if not name:
                errors.append(f"resources[{i}]: RouteConfiguration without a name")
            elif name in seen:
                twice.add(name)
            else:
                # only the wanted ones' bodies are kept
                seen[name] = body if name in self.entries else None
        for name in sorted(twice):
            errors.append(f"RouteConfiguration {name!r}: appears twice in the response")
        for name, body in seen.items():
            if body is not None and name in self.entries and name not in twice:
                yield from self._one(name, body, "", errors, offload)
        return errors

    def _on_delta(self, resources: list[tuple[str, str, Any]], removed: list[str],
                  offload: bool) -> Generator[Any, None, list[str]]:
        t = self.type_url
        errors: list[str] = []
        seen: set[str] = set()
        for i, (name, version, any_) in enumerate(resources):
            if not name:
                errors.append(f"resources[{i}]: Resource without a name")
                continue
            if name in seen:
                errors.append(f"RouteConfiguration {name!r}: appears twice in the response")
                continue
            seen.add(name)
            if name not in self.entries:
                continue
            if any_ is None:
                errors.append(f"RouteConfiguration {name!r}: Resource without a resource body")
            elif any_.type_url != t:
                errors.append(
                    f"RouteConfiguration {name!r}: resource type {any_.type_url} "
                    f"in a {t} response"
                )
            else:
                yield from self._one(name, any_.value, version, errors, offload)
        for name in removed:
            if name in seen:
                errors.append(f"RouteConfiguration {name!r}: both updated and removed")
            elif name in self.entries:
                self._remove(name)
        return errors

    def dump(self) -> dict[str, Any]:
        return {
            name: {
                "version": e.version,
                "rules": [r.name for r in e.rules],
                "error": e.error,
            }
            for name, e in sorted(self.entries.items())
        }
