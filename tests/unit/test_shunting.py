"""Traffic shunting (issue 16): rule-set validation, the shared hash and
integer parsing, and the route table's rule storage.  docs/shunting.md."""

from __future__ import annotations

import pytest

from octoproxy import model
from octoproxy._core.route import RouteTable
from octoproxy.model import ShuntMatch as M
from octoproxy.model import ShuntRule as R
from octoproxy.shunting import fnv1a64, parse_int, percent_bucket, validate_rules


def ok(*rules: R, scope: str = "svc.a") -> None:
    validate_rules(scope, rules)


def bad(match: str, *rules: R, scope: str = "svc.a") -> None:
    with pytest.raises(ValueError, match=match):
        validate_rules(scope, rules)


def test_valid_rule_sets() -> None:
    ok()
    ok(R("gray", (M("context", "mod", key="userId", modulus=100, remainders=(1,)),), group="g"))
    ok(
        R("p", (M("caller", "percent", percent=12.5),), group="g", on_no_node="reject"),
        R("r", (M("random", "percent", percent=100),), group="g"),
        R(
            "in",
            (M("method", "in", values=("a", "b")), M("service", "prefix", values=("x",))),
            group="g",
        ),
        R("rng", (M("context", "range", key="loc", lo=-5, hi=5),), group="h"),
        R("any", (M("caller", "present"),), group="h"),
        R(
            "unit",
            action="context",
            target="octo-set",
            source_key="loc",
            unit_table=(("1", "set-a"), ("2", "set-b")),
        ),
        R("const", action="context", target="octo-swimlane", value="gray"),
        scope=model.SHUNT_GLOBAL,
    )


@pytest.mark.parametrize(
    ("match", "rule"),
    [
        ("empty name", R("", group="g")),
        ("unknown source 'header'", R("x", (M("header", "eq", values=("1",)),), group="g")),
        ("unknown op 'regex'", R("x", (M("caller", "regex", values=("1",)),), group="g")),
        ("context key is empty", R("x", (M("context", "eq", values=("1",)),), group="g")),
        (
            "modulus must be a positive",
            R("x", (M("context", "mod", key="k", remainders=(0,)),), group="g"),
        ),
        (
            "modulus must be a positive",
            R("x", (M("context", "mod", key="k", modulus=-3, remainders=(0,)),), group="g"),
        ),
        (
            "remainder 7 is not in 0..4",
            R("x", (M("context", "mod", key="k", modulus=5, remainders=(7,)),), group="g"),
        ),
        (
            "percent must be a number in 0..100",
            R("x", (M("caller", "percent", percent=100.5),), group="g"),
        ),
        (
            "percent must be a number in 0..100",
            R("x", (M("caller", "percent", percent=-1),), group="g"),
        ),
        (
            r"lo \(5\) must be below hi \(5\)",
            R("x", (M("context", "range", key="k", lo=5, hi=5),), group="g"),
        ),
        ("unknown no-node policy 'drop'", R("x", group="g", on_no_node="drop")),
        ("group of a group action is empty", R("x")),
        ("unknown action 'mirror'", R("x", action="mirror")),
        ("target of a context action is empty", R("x", action="context", value="s")),
        ("not a routing label", R("x", action="context", target="user-tag", value="s")),
        ("without a unit_table", R("x", action="context", target="octo-set", source_key="loc")),
        (
            "appears twice",
            R(
                "x",
                action="context",
                target="octo-set",
                source_key="loc",
                unit_table=(("1", "a"), ("1", "b")),
            ),
        ),
        ("takes exactly one value", R("x", (M("caller", "eq", values=("a", "b")),), group="g")),
        ("needs at least one value", R("x", (M("caller", "in"),), group="g")),
        ("goes only with op 'percent'", R("x", (M("random", "eq", values=("1",)),), group="g")),
    ],
)
def test_invalid_rule_named(match: str, rule: R) -> None:
    # the message names the scope and (when it has one) the rule
    with pytest.raises(ValueError, match=match) as ei:
        validate_rules("svc.a", (R("fine", group="g"), rule))
    assert "'svc.a'" in str(ei.value)
    if rule.name:
        assert f"rule {rule.name!r}" in str(ei.value)


def test_duplicate_names_and_global_scope_named() -> None:
    bad("rule 'a': the name is used twice", R("a", group="g"), R("a", group="h"))
    with pytest.raises(ValueError, match="global rules: rule 'x'"):
        validate_rules(model.SHUNT_GLOBAL, (R("x", group="g", on_no_node="?"),))


def test_fnv1a64_known_values() -> None:
    # the published FNV-1a 64 test vectors
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    assert percent_bucket(b"foobar") == 0x85944171F73967E8 % 10000


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b"0", 0),
        (b"17", 17),
        (b"-3", -3),
        (b"007", 7),
        (b"9223372036854775807", 2**63 - 1),
        (b"-9223372036854775808", -(2**63)),
        (b"9223372036854775808", None),
        (b"", None),
        (b"-", None),
        (b"+1", 1),
        (b"+0", 0),
        (b"+", None),
        (b"+-1", None),
        (b"-+1", None),
        (b"++1", None),
        (b" 1", None),
        (b"1_0", None),
        (b"1.5", None),
        ("٣".encode(), None),
        (b"12345678901234567890", None),
    ],
)
def test_parse_int(raw: bytes, want: int | None) -> None:
    assert parse_int(raw) == want


def test_route_table_stores_validated_rules() -> None:
    t = RouteTable(model.Labels())
    rules = (R("gray", (M("caller", "eq", values=("c",)),), group="g"),)
    t.update_shunting("svc.a", rules)
    assert t.shunting_rules("svc.a") == rules
    assert t.shunting_scopes() == ["svc.a"]
    with pytest.raises(ValueError, match="rule 'bad'"):
        t.update_shunting("svc.a", (R("bad", group="g", on_no_node="nope"),))
    assert t.shunting_rules("svc.a") == rules  # the old set stays
    t.update_shunting("svc.a", ())
    assert t.shunting_rules("svc.a") == ()
    assert t.shunting_scopes() == []


def test_static_config_section() -> None:
    from octoproxy.config import ConfigError, parse_config

    rule = {"name": "g", "match": [{"source": "caller", "op": "eq", "value": "c"}], "group": "x"}
    cfg = parse_config({"shunting": {"global": [rule], "services": {"svc.a": [rule]}}})
    got = cfg.shunting.rules()
    assert set(got) == {model.SHUNT_GLOBAL, "svc.a"} and got["svc.a"][0].group == "x"
    bad_rule = {**rule, "name": "broken", "on_no_node": "explode"}
    with pytest.raises(ConfigError, match=r"rule 'broken'.*no-node policy 'explode'"):
        parse_config({"shunting": {"services": {"svc.a": [rule, bad_rule]}}})
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({"shunting": {"global": [rule, rule]}})
    with pytest.raises(ConfigError, match="not an appkey"):
        parse_config({"shunting": {"services": {"*": [rule]}}})
