"""Service authentication over xDS (docs/xds.md section 2, docs/auth.md): the
mapping of tokens to SDS secrets and of ACLs to RBAC policies, both ways.

- A token is an SDS ``Secret`` named after its appkey whose
  ``generic_secret.secret`` (inline bytes or string) is the current token; a
  rotation window adds the previous token as ``generic_secret.secrets["previous"]``.
- A provider's ACL is an ECDS ``TypedExtensionConfig`` named after the
  provider appkey whose ``typed_config`` is the network RBAC filter
  (``envoy.extensions.filters.network.rbac.v3.RBAC``, its ``rules``) or a bare
  ``envoy.config.rbac.v3.RBAC``: action ALLOW, each policy's principals are
  caller appkeys (``authenticated.principal_name.exact``) and its permissions
  the methods they may call (``url_path.path.exact`` = the method name, or
  ``any: true`` for every method).

Everything here is pure: a resource converts, or raises `ResourceError` naming
the resource and the field.  Messages never contain a token.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2
from google.protobuf import any_pb2, unknown_fields
from google.protobuf.message import DecodeError

from octoproxy.xds.resources import ResourceError, appkey_problem, run_steps

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# ACLs travel as extension configs (ECDS), the standard way to deliver a filter's config
RBAC_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
NETWORK_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
RBAC_RULES = "type.googleapis.com/envoy.config.rbac.v3.RBAC"
PREVIOUS = "previous"  # generic_secret.secrets key of the previous token (rotation window)
MAX_TOKEN_BYTES = 4096
# callers per ACL: each is a secret the proxy subscribes to (a SotW request
# carries every name, and gRPC servers refuse requests above 4 MiB)
MAX_ACL_CALLERS = 10_000
MAX_ACL_METHODS = 10_000  # methods per policy

# caller appkey -> None (every method) or the methods it may call
Acl = dict[str, frozenset[str] | None]


def _decode(cls: Any, raw: bytes, where: str) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        raise ResourceError(f"{where}: cannot decode {cls.__name__}: {e}") from None


def decode_secret(raw: bytes, where: str) -> secret_pb2.Secret:
    return _decode(secret_pb2.Secret, raw, where)


def decode_rbac(raw: bytes, where: str) -> extension_pb2.TypedExtensionConfig:
    return _decode(extension_pb2.TypedExtensionConfig, raw, where)


def _token(where: str, ds: base_pb2.DataSource) -> bytes:
    kind = ds.WhichOneof("specifier")
    if kind == "inline_bytes":
        value = bytes(ds.inline_bytes)
    elif kind == "inline_string":
        value = ds.inline_string.encode()
    elif kind is None:
        raise ResourceError(f"{where} is missing")
    else:
        raise ResourceError(
            f"{where}: {kind} is not supported (inline_bytes or inline_string: the proxy "
            "never reads a token from its own files or environment)"
        )
    if not value:
        raise ResourceError(f"{where} is empty")
    if len(value) > MAX_TOKEN_BYTES:
        raise ResourceError(f"{where} is longer than {MAX_TOKEN_BYTES} bytes")
    return value


def secret_to_tokens(name: str, s: secret_pb2.Secret) -> tuple[bytes, ...]:
    """(current,) or (current, previous) of the Secret named ``name``."""
    where = f"Secret {name!r}"
    if s.name != name:
        raise ResourceError(f"Secret {s.name!r} delivered under the name {name!r}")
    if s.WhichOneof("type") != "generic_secret":
        raise ResourceError(
            f"{where}: a token is a generic_secret, got {s.WhichOneof('type') or 'nothing'}"
        )
    g = s.generic_secret
    current = _token(f"{where}: generic_secret.secret", g.secret)
    extra = sorted(k for k in g.secrets if k != PREVIOUS)
    if extra:
        # the keys are not quoted: a token pasted as a key must not reach a NACK
        raise ResourceError(
            f"{where}: generic_secret.secrets may hold only {PREVIOUS!r} "
            f"({len(extra)} other key(s))"
        )
    if PREVIOUS in g.secrets:
        return current, _token(f'{where}: generic_secret.secrets["{PREVIOUS}"]', g.secrets[PREVIOUS])
    return (current,)


def tokens_to_secret(appkey: str, tokens: tuple[bytes, ...]) -> secret_pb2.Secret:
    """The Secret the bundled control plane serves for appkey."""
    s = secret_pb2.Secret(name=appkey)
    s.generic_secret.secret.inline_bytes = tokens[0]
    if len(tokens) > 1:
        s.generic_secret.secrets[PREVIOUS].inline_bytes = tokens[1]
    return s


def _exact(where: str, m: string_pb2.StringMatcher) -> str:
    if m.WhichOneof("match_pattern") != "exact" or m.ignore_case:
        raise ResourceError(f"{where} must be an exact match (case-sensitive)")
    return str(m.exact)


def unknown_field(msg: Any, where: str = "") -> str | None:
    """The path of the first field this proxy's protos do not know (set by a
    newer control plane) in msg and the messages it holds, or None.  Such a
    field may narrow what a resource says (a new condition, a new matcher):
    ignoring it could widen an ACL."""
    if len(unknown_fields.UnknownFieldSet(msg)):
        return where or "(top level)"
    for fd, value in msg.ListFields():
        if fd.type != fd.TYPE_MESSAGE:
            continue
        path = f"{where}.{fd.name}" if where else fd.name
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].type != fd.TYPE_MESSAGE:
                continue
            items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
        elif fd.is_repeated:
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(path, value)]
        for p, v in items:
            found = unknown_field(v, p)
            if found is not None:
                return found
    return None


def _known(msg: Any, where: str, shallow: bool = False) -> None:
    """Refuse a message with a field these protos do not know (shallow: in
    msg itself only, for one whose parts are checked one by one)."""
    if shallow:
        bad = where if len(unknown_fields.UnknownFieldSet(msg)) else None
    else:
        bad = unknown_field(msg, where)
    if bad is not None:
        raise ResourceError(
            f"{bad} has a field this proxy does not know (from a newer RBAC API?): refused "
            "rather than ignored, which could widen the ACL")


def _callers(where: str, principals: Any, out: list[str]) -> Iterator[None]:
    """Appends the callers to out, in steps (a yield every 256 principals);
    stops at MAX_ACL_CALLERS, before converting the rest of a huge list."""
    for i, p in enumerate(principals):
        if i % 256 == 255:
            yield
        w = f"{where}[{i}]"
        kind = p.WhichOneof("identifier")
        if kind == "or_ids":
            _known(p, w, shallow=True)
            _known(p.or_ids, f"{w}.or_ids", shallow=True)
            yield from _callers(f"{w}.or_ids.ids", p.or_ids.ids, out)
            continue
        _known(p, w)
        if kind != "authenticated":
            raise ResourceError(
                f"{w}: {kind or 'an empty principal'} is not supported (a caller appkey is "
                "authenticated.principal_name.exact; 'any' callers cannot be verified)"
            )
        caller = _exact(f"{w}.authenticated.principal_name", p.authenticated.principal_name)
        problem = appkey_problem(caller)
        if problem is not None:
            raise ResourceError(f"{w}.authenticated.principal_name.exact: {problem}")
        out.append(caller)
        if len(out) > MAX_ACL_CALLERS:
            raise ResourceError(f"{where}: more than {MAX_ACL_CALLERS} callers")


def _methods(where: str, permissions: Any, out: set[str]) -> Generator[None, None, bool]:
    """Adds the methods to out, in steps; True when every method is allowed."""
    every = False
    for i, p in enumerate(permissions):
        if i % 256 == 255:
            yield
        w = f"{where}[{i}]"
        kind = p.WhichOneof("rule")
        if kind == "or_rules":
            _known(p, w, shallow=True)
            _known(p.or_rules, f"{w}.or_rules", shallow=True)
        else:
            _known(p, w)
        if kind == "any":
            if not p.any:
                raise ResourceError(f"{w}.any must be true")
            every = True
        elif kind == "or_rules":
            every |= yield from _methods(f"{w}.or_rules.rules", p.or_rules.rules, out)
        elif kind == "url_path":
            if p.url_path.WhichOneof("rule") != "path":
                raise ResourceError(f"{w}.url_path.path is missing")
            m = _exact(f"{w}.url_path.path", p.url_path.path)
            if not m:
                raise ResourceError(f"{w}.url_path.path.exact is empty (a method name)")
            out.add(m)
            if len(out) > MAX_ACL_METHODS:
                raise ResourceError(f"{where}: more than {MAX_ACL_METHODS} methods")
        else:
            raise ResourceError(
                f"{w}: {kind or 'an empty permission'} is not supported (url_path.path.exact "
                "= a method name, or any: true)"
            )
    return every


def rules_to_acl(where: str, rules: rbac_pb2.RBAC) -> Acl:
    acl: Acl = run_steps(rules_to_acl_steps(where, rules))
    return acl


def rules_to_acl_steps(where: str, rules: rbac_pb2.RBAC) -> Generator[None, None, Acl]:
    """rules_to_acl in steps (the xDS client serves traffic between them)."""
    _known(rules, where, shallow=True)
    if rules.action != rbac_pb2.RBAC.ALLOW:
        raise ResourceError(
            f"{where}.action {rbac_pb2.RBAC.Action.Name(rules.action)} is not supported (ALLOW)"
        )
    acl: Acl = {}
    if len(rules.policies) > MAX_ACL_CALLERS:
        raise ResourceError(f"{where}: more than {MAX_ACL_CALLERS} policies")
    for pname in sorted(rules.policies):
        yield
        pol = rules.policies[pname]
        w = f"{where}.policies[{pname!r}]"
        _known(pol, w, shallow=True)
        if pol.HasField("condition") or pol.HasField("checked_condition"):
            raise ResourceError(f"{w}: conditions are not supported")
        if not pol.principals:
            raise ResourceError(f"{w}.principals is empty")
        if not pol.permissions:
            raise ResourceError(f"{w}.permissions is empty")
        methods: set[str] = set()
        every = yield from _methods(f"{w}.permissions", pol.permissions, methods)
        callers: list[str] = []
        yield from _callers(f"{w}.principals", pol.principals, callers)
        for c in callers:
            had = acl.get(c, frozenset())
            acl[c] = None if every or had is None else had | methods
        if len(acl) > MAX_ACL_CALLERS:
            raise ResourceError(f"{where}: more than {MAX_ACL_CALLERS} callers")
    return acl


def rbac_to_acl(name: str, tec: extension_pb2.TypedExtensionConfig) -> Acl:
    """The ACL of provider ``name`` from its TypedExtensionConfig."""
    acl: Acl = run_steps(rbac_to_acl_steps(name, tec))
    return acl


def rbac_to_acl_steps(name: str,
                      tec: extension_pb2.TypedExtensionConfig) -> Generator[None, None, Acl]:
    """rbac_to_acl in steps (a yield every policy and every 256 principals)."""
    where = f"TypedExtensionConfig {name!r}"
    if tec.name != name:
        raise ResourceError(f"TypedExtensionConfig {tec.name!r} delivered under the name {name!r}")
    tc = tec.typed_config
    if tc.type_url == NETWORK_RBAC:
        f = _decode(net_rbac_pb2.RBAC, tc.value, f"{where}: typed_config")
        if f.HasField("matcher"):
            raise ResourceError(f"{where}: typed_config.matcher is not supported (rules)")
        if not f.HasField("rules"):
            raise ResourceError(f"{where}: typed_config.rules is missing")
        return (yield from rules_to_acl_steps(f"{where}: typed_config.rules", f.rules))
    if tc.type_url == RBAC_RULES:
        return (yield from rules_to_acl_steps(
            f"{where}: typed_config", _decode(rbac_pb2.RBAC, tc.value, where)))
    raise ResourceError(
        f"{where}: typed_config: type {tc.type_url or '(none)'} is not an RBAC config "
        f"({NETWORK_RBAC} or {RBAC_RULES})"
    )


def acl_to_rbac(provider: str, acl: Acl) -> extension_pb2.TypedExtensionConfig:
    """The TypedExtensionConfig the bundled control plane serves for a
    provider: one policy per caller, ``caller:<appkey>``."""
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    for caller in sorted(acl):
        methods = acl[caller]
        pol = rules.policies[f"caller:{caller}"]
        pol.principals.add().authenticated.principal_name.CopyFrom(
            string_pb2.StringMatcher(exact=caller)
        )
        if methods is None:
            pol.permissions.add(any=True)
        for m in sorted(methods or ()):
            pol.permissions.add().url_path.CopyFrom(
                path_pb2.PathMatcher(path=string_pb2.StringMatcher(exact=m))
            )
    f = net_rbac_pb2.RBAC(stat_prefix="octo_acl", rules=rules)
    packed = any_pb2.Any(type_url=NETWORK_RBAC, value=f.SerializeToString(deterministic=True))
    return extension_pb2.TypedExtensionConfig(name=provider, typed_config=packed)
