"""Service authentication (docs/auth.md): the token file and the data path's
signers and verifiers built from the configuration.

Token values are kept as bytes inside the compiled core and in `Tokens`,
whose repr shows appkeys only; no message raised here contains file content.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import yaml

from octoproxy.config import Config, ConfigError, InboundListener, OutboundListener


class Tokens:
    """appkey -> (current token, [previous token]) as bytes.  Never printed:
    repr names the appkeys only."""

    __slots__ = ("_t",)

    def __init__(self, tokens: dict[str, bytes | tuple[bytes, ...]]) -> None:
        self._t = {k: v if isinstance(v, tuple) else (v,) for k, v in tokens.items()}

    def get(self, appkey: str) -> bytes | None:
        """The current token (what is signed with)."""
        t = self._t.get(appkey)
        return t[0] if t else None

    def accepted(self, appkey: str) -> tuple[bytes, ...]:
        """What a signature is verified against: current, then previous."""
        return self._t.get(appkey, ())

    def appkeys(self) -> list[str]:
        return sorted(self._t)

    def __contains__(self, appkey: object) -> bool:
        return appkey in self._t

    def __repr__(self) -> str:
        return f"Tokens(<{len(self._t)} appkeys>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("tokens are not serialised")


def load_tokens(path: str) -> Tokens:
    """Read the token file: a mapping appkey -> token (YAML or JSON).  Refused
    when group or others may read or write it, when it is not a regular file,
    or when it does not parse; errors never quote its content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(path, [f"token file: cannot open: {e.strerror}"]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, ["token file: not a regular file"])
        if st.st_mode & 0o066:
            raise ConfigError(path, [f"token file: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                                     "others read or write it; chmod 600 (or 400) it"])
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(1 << 20)
    finally:
        os.close(fd)
    try:
        text = raw.decode()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError):
        # the parser's message may quote a line of the file: never shown
        raise ConfigError(path, ["token file: not a valid YAML/JSON mapping appkey -> token"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["token file: must be a mapping appkey -> token"])
    out: dict[str, bytes | tuple[bytes, ...]] = {}
    problems = []
    for k, v in data.items():
        if not isinstance(k, str) or not k:
            problems.append("token file: an appkey is not a non-empty string")
        elif isinstance(v, list) and 1 <= len(v) <= 2 and all(isinstance(x, str) and x for x in v):
            out[k] = tuple(x.encode() for x in v)  # [current, previous]: a rotation window
        elif not isinstance(v, str) or not v:
            problems.append(f"token file: the token of {k!r} is not a non-empty string "
                            "(or a list [current, previous])")
        else:
            out[k] = v.encode()
    if problems:
        raise ConfigError(path, problems)
    return Tokens(out)


def check_tokens(cfg: Config, tokens: Tokens) -> list[str]:
    """What the configuration needs from the token file and it lacks: the
    appkeys a listener signs for (a caller without a token is only unknown)."""
    problems = []
    for i, ob in enumerate(cfg.listeners.outbound):
        for a in ob.sign_for:
            if a not in tokens:
                problems.append(f"listeners.outbound[{i}].sign_for: no token for {a!r} in the token file")
    return problems


def load(cfg: Config) -> Tokens | None:
    """The token file of cfg, checked; None when nothing signs or verifies."""
    if not cfg.auth.token_file:
        return None
    tokens = load_tokens(cfg.auth.token_file)
    problems = check_tokens(cfg, tokens)
    if problems:
        raise ConfigError(cfg.auth.token_file, problems)
    return tokens


def uses_tokens(cfg: Config) -> bool:
    """Whether a proxy with this configuration holds tokens."""
    return bool(cfg.auth.token_file) or cfg.auth.source == "xds"


def no_core_dumps() -> bool:
    """A process that holds tokens writes no core dump (docs/auth.md,
    "Secrets"): its core file size limit, soft and hard, is 0, for it and the
    generations it starts.  False when the limit could not be set."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        return False
    return True


# A token replaced at run time stays accepted (never signed with) this long,
# for the requests signed just before the change reached their proxy.
ROTATION_GRACE_S = 60.0


def token_store(tokens: Tokens | None) -> Any:
    """The core's TokenStore of one generation (tokens from the token file,
    or empty), shared by its Signers and Verifiers; changed at run time by
    store.set/remove/replace (docs/auth.md, "Changes at run time")."""
    from octoproxy._core.auth import TokenStore

    return TokenStore({a: tokens.accepted(a) for a in tokens.appkeys()} if tokens else {},
                      ROTATION_GRACE_S)


def acl_of(ib: InboundListener) -> dict[bytes, frozenset[bytes] | None]:
    """An inbound listener's configured ACL, as Verifier.set_acl takes it."""
    assert ib.auth is not None
    return {r.caller.encode(): None if r.methods is None else frozenset(m.encode() for m in r.methods)
            for r in ib.auth.allow or ()}


def signer(ob: OutboundListener, store: Any) -> Any:
    """The core's Signer for an outbound listener, or None when it signs nothing."""
    if not (ob.sign_for or ob.sign_registered) or store is None:
        return None
    from octoproxy._core.auth import Signer

    return Signer(store, ob.sign_for)


def verifier(ib: InboundListener, cfg: Config, store: Any) -> Any:
    """The core's Verifier for an inbound listener, or None (no check)."""
    if ib.auth is None or ib.auth.mode == "off" or store is None or not ib.appkey:
        return None
    from octoproxy._core.auth import Verifier

    return Verifier(ib.appkey.encode(), ib.auth.mode == "enforce", int(cfg.auth.max_skew_s * 1000),
                    store, acl_of(ib))
