"""Traffic shunting (issue 16): the checks a rule set must pass, and the
pieces of its semantics both the core and the reference router share.

`validate_rules` is the one gate: the static config, the xDS route
configuration and `RouteTable.update_shunting` all call it, so a rule set
the core compiles is always one that passed here.  docs/shunting.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from octoproxy import model

SOURCES = (
    model.SRC_SERVICE,
    model.SRC_METHOD,
    model.SRC_CALLER,
    model.SRC_CONTEXT,
    model.SRC_RANDOM,
)
OPS = (
    model.OP_EQ,
    model.OP_IN,
    model.OP_PREFIX,
    model.OP_PRESENT,
    model.OP_RANGE,
    model.OP_MOD,
    model.OP_PERCENT,
)
ACTIONS = (model.ACT_GROUP, model.ACT_CONTEXT, model.ACT_DEFAULT)
NO_NODE = (model.NO_NODE_FALLBACK, model.NO_NODE_REJECT)
# The context rewrite steers routing (docs/shunting.md, "the context
# rewrite"): only the routing labels are targets.
TARGETS = ("octo-liteset", "octo-set", "octo-swimlane")

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# what the core's length fields hold comfortably; longer is a config mistake
MAX_VALUE_BYTES = 4096
MAX_RULES = 1024  # per scope
MAX_CONDITIONS = 32  # per rule
MAX_SET_VALUES = 10_000  # values of an 'in' condition, remainders of a 'mod'
MAX_UNIT_ENTRIES = 100_000  # entries of a unit table

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: the percentage rules' stable hash (docs/shunting.md)."""
    h = FNV64_OFFSET
    for b in data:
        h = ((h ^ b) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def percent_threshold(percent: float) -> int:
    """Buckets (of 10000) a percentage rule takes: round(percent * 100)."""
    return round(percent * 100)


def percent_bucket(value: bytes) -> int:
    """The bucket (0..9999) of a value: FNV-1a 64 of its UTF-8 bytes mod 10000."""
    return fnv1a64(value) % 10000


def parse_int(value: bytes) -> int | None:
    """A request value as an integer for range/mod: an optional '-' or '+'
    then ASCII digits (Envoy's range_match: "an optional plus or minus sign
    followed by a sequence of digits"), within int64; anything else (spaces,
    '_', empty, overflow) is not an integer and the condition is false."""
    s = value[1:] if value[:1] in (b"-", b"+") else value
    if not s or not s.isdigit() or not s.isascii() or len(s) > 19:
        return None
    v = int(value)
    if v < INT64_MIN or v > INT64_MAX:
        return None
    return v


def _ident(where: str, what: str, v: object, *, empty_ok: bool = False) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where}: {what} must be a string, not {type(v).__name__}")
    if not v and not empty_ok:
        raise ValueError(f"{where}: {what} is empty")
    if len(v.encode("utf-8")) > MAX_VALUE_BYTES:
        raise ValueError(f"{where}: {what} is longer than {MAX_VALUE_BYTES} bytes")
    return v


def _check_match(where: str, m: model.ShuntMatch) -> None:
    if not isinstance(m, model.ShuntMatch):
        raise ValueError(f"{where}: not a ShuntMatch")
    if m.source not in SOURCES:
        raise ValueError(f"{where}: unknown source {m.source!r} (one of {', '.join(SOURCES)})")
    if m.op not in OPS:
        raise ValueError(f"{where}: unknown op {m.op!r} (one of {', '.join(OPS)})")
    if m.source == model.SRC_CONTEXT:
        _ident(where, "the context key", m.key)
    elif m.key:
        raise ValueError(f"{where}: a key is only for source {model.SRC_CONTEXT!r}")
    if m.source == model.SRC_RANDOM and m.op != model.OP_PERCENT:
        raise ValueError(f"{where}: source {model.SRC_RANDOM!r} goes only with op 'percent'")
    if len(m.values) > MAX_SET_VALUES or len(m.remainders) > MAX_SET_VALUES:
        raise ValueError(f"{where}: more than {MAX_SET_VALUES} values")
    for v in m.values:
        _ident(where, "a value", v, empty_ok=True)
    if m.op in (model.OP_EQ, model.OP_PREFIX):
        if len(m.values) != 1:
            raise ValueError(f"{where}: op {m.op!r} takes exactly one value, not {len(m.values)}")
    elif m.op == model.OP_IN:
        if not m.values:
            raise ValueError(f"{where}: op 'in' needs at least one value")
    elif m.values:
        raise ValueError(f"{where}: op {m.op!r} takes no values")
    if m.op == model.OP_RANGE:
        for what, bound in (("lo", m.lo), ("hi", m.hi)):
            if (
                isinstance(bound, bool)
                or not isinstance(bound, int)
                or not INT64_MIN <= bound <= INT64_MAX
            ):
                raise ValueError(f"{where}: range {what} must be a 64-bit integer")
        if m.lo >= m.hi:
            raise ValueError(f"{where}: range lo ({m.lo}) must be below hi ({m.hi}): [lo, hi)")
    if m.op == model.OP_MOD:
        if isinstance(m.modulus, bool) or not isinstance(m.modulus, int) or m.modulus <= 0:
            raise ValueError(f"{where}: modulus must be a positive integer, not {m.modulus!r}")
        if m.modulus > INT64_MAX:
            raise ValueError(f"{where}: modulus must fit in 64 bits")
        if not m.remainders:
            raise ValueError(f"{where}: op 'mod' needs at least one remainder")
        for r in m.remainders:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < m.modulus:
                raise ValueError(
                    f"{where}: remainder {r!r} is not in 0..{m.modulus - 1} (modulus {m.modulus})"
                )
    elif m.remainders or m.modulus:
        raise ValueError(f"{where}: modulus/remainders are only for op 'mod'")
    if m.op == model.OP_PERCENT:
        p = m.percent
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 100:
            raise ValueError(f"{where}: percent must be a number in 0..100, not {p!r}")
    elif m.percent:
        raise ValueError(f"{where}: percent is only for op 'percent'")


def _check_rule(where: str, r: model.ShuntRule) -> None:
    if len(r.matches) > MAX_CONDITIONS:
        raise ValueError(f"{where}: more than {MAX_CONDITIONS} conditions")
    for i, m in enumerate(r.matches):
        _check_match(f"{where}, condition {i}", m)
    if r.action not in ACTIONS:
        raise ValueError(f"{where}: unknown action {r.action!r} (one of {', '.join(ACTIONS)})")
    if r.on_no_node not in NO_NODE:
        raise ValueError(
            f"{where}: unknown no-node policy {r.on_no_node!r} (one of {', '.join(NO_NODE)})"
        )
    if r.action == model.ACT_DEFAULT:
        if r.group or r.target or r.value or r.source_key or r.unit_table:
            raise ValueError(f"{where}: a default action takes no group, target or value")
        if r.on_no_node != model.NO_NODE_FALLBACK:
            raise ValueError(f"{where}: a default action has no on_no_node")
        return
    if r.action == model.ACT_GROUP:
        _ident(where, "the group of a group action", r.group)
        if r.target or r.value or r.source_key or r.unit_table:
            raise ValueError(f"{where}: target/value/source_key/unit_table are for context actions")
        return
    # ACT_CONTEXT
    if r.group:
        raise ValueError(f"{where}: a context action takes no group")
    _ident(where, "the target of a context action", r.target)
    if r.target not in TARGETS:
        raise ValueError(
            f"{where}: target {r.target!r} is not a routing label ({', '.join(TARGETS)}); "
            "the rewrite steers routing only (docs/shunting.md)"
        )
    if r.source_key:
        _ident(where, "source_key", r.source_key)
        if r.value:
            raise ValueError(f"{where}: give either a constant value or source_key + unit_table")
        if not r.unit_table:
            raise ValueError(f"{where}: source_key {r.source_key!r} without a unit_table")
        if len(r.unit_table) > MAX_UNIT_ENTRIES:
            raise ValueError(f"{where}: a unit_table of more than {MAX_UNIT_ENTRIES} entries")
        seen: set[str] = set()
        for pair in r.unit_table:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"{where}: unit_table entries are (value, target value) pairs")
            k = _ident(where, "a unit_table key", pair[0], empty_ok=True)
            _ident(where, f"the unit_table value of {k!r}", pair[1], empty_ok=True)
            if k in seen:
                raise ValueError(f"{where}: unit_table key {k!r} appears twice")
            seen.add(k)
    else:
        if r.unit_table:
            raise ValueError(f"{where}: a unit_table needs a source_key")
        _ident(where, "value", r.value, empty_ok=True)


# scope -> the rule tuple last found valid for it (the tuple itself: rules are
# immutable).  The xDS client validates a big rule set in a worker thread;
# the core's update_shunting then checks the same tuple again on the event
# loop (the one gate), which this makes free instead of up to a second.
_valid: dict[str, tuple[model.ShuntRule, ...]] = {}


def validate_rules(scope: str, rules: Iterable[model.ShuntRule]) -> None:
    """Raise ValueError naming the scope and the rule when `rules` is not a
    valid ordered rule set for `scope` (a provider appkey or SHUNT_GLOBAL)."""
    if isinstance(rules, tuple) and _valid.get(scope) is rules:
        return
    _ident("shunting", "the scope", scope)
    given = rules
    rules = tuple(rules)
    sc = "global rules" if scope == model.SHUNT_GLOBAL else f"rules of {scope!r}"
    if len(rules) > MAX_RULES:
        raise ValueError(f"shunting {sc}: more than {MAX_RULES} rules")
    names: set[str] = set()
    for i, r in enumerate(rules):
        if not isinstance(r, model.ShuntRule):
            raise ValueError(f"shunting {sc}: entry {i} is not a ShuntRule")
        if not isinstance(r.name, str) or not r.name:
            raise ValueError(f"shunting {sc}: rule {i} has an empty name")
        where = f"shunting {sc}: rule {r.name!r}"
        _ident(where, "the name", r.name)
        if r.name in names:
            raise ValueError(f"{where}: the name is used twice")
        names.add(r.name)
        _check_rule(where, r)
    if not rules:
        _valid.pop(scope, None)  # a scope's rules removed: nothing kept for it
    elif isinstance(given, tuple):
        _valid[scope] = given
