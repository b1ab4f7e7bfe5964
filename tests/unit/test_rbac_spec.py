"""RBAC policies as an outside control plane writes them (Envoy's
``envoy.config.rbac.v3.RBAC`` in its JSON form), against docs/xds.md section
2 ("TypedExtensionConfig (ECDS) -> a provider's ACL").

Envoy's rules: a policy matches when ANY of its permissions and ANY of its
principals match; with action ALLOW a request is allowed when some policy
matches, and an ALLOW config with no policies allows nothing.  What the
mapping cannot say (DENY/LOG, negations, conjunctions, wildcards, other
identities or permissions, conditions) must be rejected with a message
naming the field: applying part of a policy would widen or narrow an ACL
silently, and a widened ACL is a security hole."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from google.protobuf import any_pb2, json_format

from octoproxy.xds.authres import NETWORK_RBAC, RBAC_RULES, rbac_to_acl
from octoproxy.xds.resources import ResourceError

P = "com.demo.echo"
WEB, BATCH, OPS = "com.demo.web", "com.demo.batch", "com.demo.ops"


def caller(appkey: str) -> dict[str, Any]:
    return {"authenticated": {"principal_name": {"exact": appkey}}}


def method(name: str) -> dict[str, Any]:
    return {"url_path": {"path": {"exact": name}}}


def tec(rules: dict[str, Any], *, network: bool = True, extra: dict[str, Any] | None = None
        ) -> extension_pb2.TypedExtensionConfig:
    """The resource as a control plane sends it: the network RBAC filter (or
    a bare RBAC) packed in a TypedExtensionConfig named after the provider."""
    if network:
        msg = json_format.ParseDict({"stat_prefix": "acl", "rules": rules, **(extra or {})},
                                    net_rbac_pb2.RBAC())
        packed = any_pb2.Any(type_url=NETWORK_RBAC, value=msg.SerializeToString())
    else:
        msg = json_format.ParseDict(rules, rbac_pb2.RBAC())
        packed = any_pb2.Any(type_url=RBAC_RULES, value=msg.SerializeToString())
    return extension_pb2.TypedExtensionConfig(name=P, typed_config=packed)


@pytest.mark.parametrize("network", [True, False], ids=["network-filter", "bare-rbac"])
def test_any_principal_times_any_permission_and_union_over_policies(network: bool) -> None:
    rules = {"action": "ALLOW", "policies": {
        # two principals x two permissions: each caller may call both methods
        "readers": {"principals": [caller(WEB), caller(BATCH)],
                    "permissions": [method("get"), method("list")]},
        # or_ids / or_rules nest; a second policy adds to the first
        "writers": {"principals": [{"or_ids": {"ids": [caller(BATCH)]}}],
                    "permissions": [{"or_rules": {"rules": [method("put")]}}]},
        # any: true in an or_rules means every method
        "ops": {"principals": [{"or_ids": {"ids": [{"or_ids": {"ids": [caller(OPS)]}}]}}],
                "permissions": [{"or_rules": {"rules": [method("get"), {"any": True}]}}]},
    }}
    assert rbac_to_acl(P, tec(rules, network=network)) == {
        WEB: frozenset({"get", "list"}),
        BATCH: frozenset({"get", "list", "put"}),
        OPS: None,
    }


def test_allow_with_no_policies_allows_nobody_and_shadow_rules_are_not_enforced() -> None:
    assert rbac_to_acl(P, tec({"action": "ALLOW"})) == {}
    assert rbac_to_acl(P, tec({})) == {}  # action defaults to ALLOW
    # shadow rules are only evaluated for stats in Envoy: they grant nothing
    # and their unsupported constructs do not matter
    shadow = {"shadow_rules": {"action": "DENY", "policies": {
        "all": {"principals": [{"any": True}], "permissions": [{"any": True}]}}}}
    rules = {"policies": {"w": {"principals": [caller(WEB)], "permissions": [method("get")]}}}
    assert rbac_to_acl(P, tec(rules, extra=shadow)) == {WEB: frozenset({"get"})}


def _one(principal: dict[str, Any] | None = None, permission: dict[str, Any] | None = None,
         **policy: Any) -> dict[str, Any]:
    pol = {"principals": [principal or caller(WEB)], "permissions": [permission or {"any": True}],
           **policy}
    return {"action": "ALLOW", "policies": {"p": pol}}


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("deny", {"action": "DENY", "policies": {}}, "action DENY is not supported"),
    ("log", {"action": "LOG"}, "action LOG is not supported"),
    ("any-principal", _one({"any": True}), "principals[0]: any is not supported"),
    ("not_id", _one({"not_id": caller(WEB)}), "principals[0]: not_id is not supported"),
    ("and_ids", _one({"and_ids": {"ids": [caller(WEB)]}}),
     "principals[0]: and_ids is not supported"),
    ("not_id-in-or_ids", _one({"or_ids": {"ids": [caller(BATCH), {"not_id": caller(WEB)}]}}),
     "principals[0].or_ids.ids[1]: not_id is not supported"),
    ("authenticated-anyone", _one({"authenticated": {}}),
     "principal_name must be an exact match"),
    ("principal-prefix", _one({"authenticated": {"principal_name": {"prefix": "com.demo."}}}),
     "principal_name must be an exact match"),
    ("principal-regex",
     _one({"authenticated": {"principal_name": {"safe_regex": {"regex": "com\\..*"}}}}),
     "principal_name must be an exact match"),
    ("principal-ignore-case",
     _one({"authenticated": {"principal_name": {"exact": WEB, "ignore_case": True}}}),
     "principal_name must be an exact match"),
    ("remote-ip", _one({"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}),
     "principals[0]: remote_ip is not supported"),
    ("direct-remote-ip", _one({"direct_remote_ip": {"address_prefix": "10.0.0.1"}}),
     "principals[0]: direct_remote_ip is not supported"),
    ("principal-header", _one({"header": {"name": "x-caller", "exact_match": WEB}}),
     "principals[0]: header is not supported"),
    ("not_rule", _one(permission={"not_rule": method("put")}),
     "permissions[0]: not_rule is not supported"),
    ("and_rules", _one(permission={"and_rules": {"rules": [method("get")]}}),
     "permissions[0]: and_rules is not supported"),
    ("not_rule-in-or_rules",
     _one(permission={"or_rules": {"rules": [method("get"), {"not_rule": method("put")}]}}),
     "permissions[0].or_rules.rules[1]: not_rule is not supported"),
    ("any-false", _one(permission={"any": False}), "permissions[0].any must be true"),
    ("path-prefix", _one(permission={"url_path": {"path": {"prefix": "get"}}}),
     "url_path.path must be an exact match"),
    ("path-ignore-case",
     _one(permission={"url_path": {"path": {"exact": "get", "ignore_case": True}}}),
     "url_path.path must be an exact match"),
    ("path-empty", _one(permission={"url_path": {"path": {"exact": ""}}}),
     "url_path.path.exact is empty"),
    ("permission-header", _one(permission={"header": {"name": ":method", "exact_match": "get"}}),
     "permissions[0]: header is not supported"),
    ("destination-port", _one(permission={"destination_port": 9001}),
     "permissions[0]: destination_port is not supported"),
    ("condition", _one(condition={"const_expr": {"bool_value": True}}),
     "conditions are not supported"),
    ("no-principals", {"policies": {"p": {"principals": [], "permissions": [{"any": True}]}}},
     "principals is empty"),
    ("no-permissions", {"policies": {"p": {"principals": [caller(WEB)], "permissions": []}}},
     "permissions is empty"),
]


@pytest.mark.parametrize(("rules", "why"), [(r, w) for _, r, w in REFUSED],
                         ids=[i for i, _, _ in REFUSED])
def test_what_the_mapping_cannot_say_is_refused_naming_the_field(rules: dict[str, Any],
                                                                 why: str) -> None:
    with pytest.raises(ResourceError) as e:
        rbac_to_acl(P, tec(rules))
    assert f"TypedExtensionConfig {P!r}" in str(e.value)
    assert why in str(e.value), str(e.value)


def test_a_refused_policy_refuses_the_whole_acl() -> None:
    """One bad policy among good ones: nothing of the resource is applied
    (the last good version stays, docs/xds.md), never the good part alone."""
    rules = {"policies": {
        "a-good": {"principals": [caller(WEB)], "permissions": [{"any": True}]},
        "b-bad": {"principals": [{"not_id": caller(WEB)}], "permissions": [{"any": True}]},
    }}
    with pytest.raises(ResourceError, match="policies\\['b-bad'\\]"):
        rbac_to_acl(P, tec(rules))


def test_the_network_filter_without_rules_or_of_another_type_is_refused() -> None:
    # Envoy enforces nothing without rules (everyone allowed): not what an ACL means here
    empty = any_pb2.Any(type_url=NETWORK_RBAC,
                        value=net_rbac_pb2.RBAC(stat_prefix="acl").SerializeToString())
    with pytest.raises(ResourceError, match=r"typed_config\.rules is missing"):
        rbac_to_acl(P, extension_pb2.TypedExtensionConfig(name=P, typed_config=empty))
    http = any_pb2.Any(type_url="type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC")
    with pytest.raises(ResourceError, match="is not an RBAC config"):
        rbac_to_acl(P, extension_pb2.TypedExtensionConfig(name=P, typed_config=http))


def test_a_field_this_proxy_does_not_know_is_refused_not_ignored() -> None:
    """A newer control plane may set a field (say, a new narrowing matcher)
    that these protos do not know: the policy is refused, never applied
    without it."""
    good = rbac_pb2.RBAC()
    pol = good.policies["p"]
    pol.principals.add().authenticated.principal_name.exact = WEB
    pol.permissions.add().any = True
    assert rbac_to_acl(P, tec(json_format.MessageToDict(good))) == {WEB: None}
    # the same policy with an unknown field (number 99, varint 1) in its first principal
    pol.principals[0].MergeFromString(b"\x98\x06\x01")
    packed = any_pb2.Any(type_url=RBAC_RULES, value=good.SerializeToString())
    with pytest.raises(ResourceError, match=r"policies\['p'\]\.principals\[0\] has a field"):
        rbac_to_acl(P, extension_pb2.TypedExtensionConfig(name=P, typed_config=packed))
