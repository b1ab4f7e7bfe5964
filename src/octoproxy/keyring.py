"""The tokens and ACLs the data path checks with, changed at run time
(docs/auth.md): one `Keyring` per proxy generation owns the core's
TokenStore and its Signers and Verifiers (one per listener), and updates
them in place, so a change takes effect with the next request on every
connection, none dropped.

Sources: the token file and the static ACLs (``auth.source: file``), or SDS
secrets and RBAC policies over the xDS stream (``auth.source: xds``,
xds/authsource.py).  Token values live only in the core's TokenStore:
repr, `dump()` and every message show appkeys, counts and versions only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from octoproxy import auth
from octoproxy.auth import Tokens
from octoproxy.config import ConfigError
from octoproxy.waiting import wait_until

if TYPE_CHECKING:
    from octoproxy.config import Config, InboundListener, OutboundListener

log = logging.getLogger("octoproxy.auth")

# caller appkey -> None (every method) or the methods it may call
Acl = dict[str, frozenset[str] | None]


class Keyring:
    """See the module docstring."""

    def __init__(self, cfg: Config, tokens: Tokens | None) -> None:
        self.cfg = cfg
        self.from_xds = cfg.auth.source == "xds"
        # shared by every Signer and Verifier of the generation
        self.store: Any = auth.token_store(tokens)
        # appkey -> how many tokens it has (1, or 2 in a rotation window)
        self._tokens: dict[str, int] = (
            {a: len(tokens.accepted(a)) for a in tokens.appkeys()} if tokens is not None else {}
        )
        self._versions: dict[str, str] = {}  # appkey -> version of its token (xDS)
        # xDS: provider -> ACL (None: not received yet); static ACLs are per listener
        self._acls: dict[str, Acl | None] = {}
        self._acl_versions: dict[str, str] = {}
        self._sign_for: set[str] = set()
        for ob in cfg.listeners.outbound:
            self._sign_for.update(ob.sign_for)
        # apps registered through the subscribe API (POST /v1/register), signed
        # for on the listeners with sign_registered
        self._registered: set[str] = set()
        self.accepts_registrations = any(ob.sign_registered for ob in cfg.listeners.outbound)
        # called when the tokens needed change outside an ACL update (a
        # registration): the xDS source asks for the new names (authsource.attach)
        self.on_needed_changed: Any = None
        for ib in cfg.listeners.inbound:
            if self.from_xds and ib.auth is not None and ib.auth.mode != "off" and ib.appkey:
                self._acls.setdefault(ib.appkey, None)
        # listener path -> (sign_for, Signer, sign_registered)
        self._signers: dict[str, tuple[tuple[str, ...], Any, bool]] = {}
        self._verifiers: dict[str, tuple[str, Any]] = {}  # listener key -> (provider, Verifier)
        self._changed = asyncio.Event()
        self.updates = 0  # changes applied at run time
        self.last_update = 0.0
        # the token file (auth.source file), watched for changes
        self.token_file = cfg.auth.token_file if not self.from_xds else None
        self._file_stamp = _stamp(self.token_file) if self.token_file else None
        self.file_reloads = 0
        self.file_errors = 0

    def __repr__(self) -> str:
        return f"Keyring(<{len(self._tokens)} tokens>, {len(self._acls)} ACLs)"

    def __reduce__(self) -> Any:
        raise TypeError("a Keyring holds tokens: it is not serialised")

    # --- the data path's objects ------------------------------------------

    def signer(self, ob: OutboundListener) -> Any:
        """The core's Signer of an outbound listener (the same object for the
        generation's life), or None when it signs nothing."""
        if not (ob.sign_for or ob.sign_registered):
            return None
        held = self._signers.get(ob.path)
        if held is None:
            held = (tuple(ob.sign_for), auth.signer(ob, self.store), ob.sign_registered)
            self._signers[ob.path] = held
            if ob.sign_registered and self._registered:
                held[1].set_sign_for([*held[0], *sorted(self._registered)])
        return held[1]

    # --- apps registered through the subscribe API --------------------------------

    def registered(self) -> list[str]:
        return sorted(self._registered)

    def register(self, appkey: str) -> None:
        """Sign for appkey on every sign_registered listener from now on (with
        auth.source xds its token is asked for; see has_token)."""
        if appkey in self._registered:
            return
        self._registered.add(appkey)
        self._registrations_changed()

    def unregister(self, appkey: str) -> bool:
        if appkey not in self._registered:
            return False
        self._registered.discard(appkey)
        if self.from_xds and appkey not in self.needed_tokens() and appkey in self._tokens:
            self.store.remove(appkey)
            del self._tokens[appkey]
            self._versions.pop(appkey, None)
        self._registrations_changed()
        return True

    def has_token(self, appkey: str) -> bool:
        return appkey in self._tokens

    async def wait_token(self, appkey: str, timeout: float) -> bool:
        """Wait until appkey has a token (or timeout)."""
        return await wait_until(lambda: appkey in self._tokens, lambda: self._changed, timeout)

    def _registrations_changed(self) -> None:
        for static, signer, registered in self._signers.values():
            if registered:
                signer.set_sign_for([*static, *sorted(self._registered)])
        if self.on_needed_changed is not None:
            self.on_needed_changed()

    def verifier(self, ib: InboundListener) -> Any:
        """The core's Verifier of an inbound listener, or None (no check)."""
        if ib.auth is None or ib.auth.mode == "off" or not ib.appkey:
            return None
        key = f"{ib.host}:{ib.port}"
        held = self._verifiers.get(key)
        if held is None:
            from octoproxy._core.auth import Verifier

            acl = self._acls.get(ib.appkey) if self.from_xds else {
                r.caller: None if r.methods is None else frozenset(r.methods)
                for r in ib.auth.allow or ()}
            v = Verifier(ib.appkey.encode(), ib.auth.mode == "enforce",
                         int(self.cfg.auth.max_skew_s * 1000), self.store, self._core_acl(acl))
            held = (ib.appkey, v)
            self._verifiers[key] = held
        return held[1]

    @staticmethod
    def _core_acl(acl: Acl | None) -> dict[bytes, frozenset[bytes] | None]:
        return {c.encode(): None if m is None else frozenset(x.encode() for x in m)
                for c, m in (acl or {}).items()}

    # --- what is needed ------------------------------------------------------

    def providers(self) -> set[str]:
        """The provider appkeys whose ACL this proxy gets over xDS."""
        return set(self._acls)

    def needed_tokens(self) -> set[str]:
        """The appkeys whose token this proxy needs: those it signs for and the
        callers the ACLs of its providers name."""
        need = set(self._sign_for) | self._registered
        for acl in self._acls.values():
            need.update(acl or ())
        return need

    def missing(self) -> list[str]:
        """What has not been received yet (xDS): ACLs, then tokens."""
        out = [f"ACL of {p}" for p, a in sorted(self._acls.items()) if a is None]
        out += [f"token of {a}" for a in sorted(self.needed_tokens()) if a not in self._tokens]
        return out

    def changed(self) -> asyncio.Event:
        """The event set on the next change of tokens or ACLs (what the
        startup gate waits on, octoproxy.startup)."""
        return self._changed

    # --- changes -----------------------------------------------------------------

    def update(
        self,
        tokens: dict[str, tuple[bytes, ...] | None] | None = None,
        acls: dict[str, Acl | None] | None = None,
        versions: dict[str, str] | None = None,
        acl_versions: dict[str, str] | None = None,
    ) -> None:
        """Apply changed tokens ((current,) or (current, also accepted); None:
        removed) and ACLs (None: removed, which allows nobody): the TokenStore
        shared by every Signer and Verifier, and the Verifiers' ACLs."""
        tokens = tokens or {}
        acls = acls or {}
        for provider, acl in acls.items():
            if provider in self._acls:
                self._acls[provider] = acl if acl is not None else {}
        self._acl_versions.update(acl_versions or {})
        for a, t in tokens.items():
            if t is None:
                self.store.remove(a)
                self._tokens.pop(a, None)
                self._versions.pop(a, None)
            else:
                # without a second token, a replaced one stays accepted for the
                # store's rotation grace (requests signed before the change)
                self.store.set(a, t[0], t[1] if len(t) > 1 else None)
                self._tokens[a] = len(t)
        self._versions.update({a: v for a, v in (versions or {}).items() if a in self._tokens})
        if self.from_xds and acls:
            # tokens nobody needs any more (a caller left every ACL) are dropped
            need = self.needed_tokens()
            for a in [a for a in self._tokens if a not in need]:
                self.store.remove(a)
                del self._tokens[a]
                self._versions.pop(a, None)
        if tokens or acls:
            for provider, v in self._verifiers.values():
                if provider in acls:
                    v.set_acl(self._core_acl(self._acls[provider]))
            self.updates += 1
            self.last_update = time.time()
            ev = self._changed
            self._changed = asyncio.Event()
            ev.set()

    # --- the token file at run time ---------------------------------------------

    async def watch_file(self, poll_s: float = 0.1) -> None:
        """Poll the token file (lstat: a chmod or a symbolic link put in its
        place is a change too) and apply each change; runs until cancelled."""
        while self.token_file:
            await asyncio.sleep(poll_s)
            stamp = _stamp(self.token_file)
            if stamp != self._file_stamp:
                self._file_stamp = stamp
                self.reload_file()

    def reload_file(self) -> bool:
        """Read the token file again and hold exactly its tokens.  A file that
        is refused (mode, not a regular file, does not parse, lacks a sign_for
        token) is logged once, never quoted, and the previous tokens stay."""
        assert self.token_file is not None
        try:
            tokens = auth.load_tokens(self.token_file)
            problems = auth.check_tokens(self.cfg, tokens)
            if problems:
                raise ConfigError(self.token_file, problems)
        except ConfigError as e:
            self.file_errors += 1
            log.error("token file changed but refused, keeping the previous tokens: %s", e)
            return False
        self.store.replace({a: tokens.accepted(a) for a in tokens.appkeys()})
        self._tokens = {a: len(tokens.accepted(a)) for a in tokens.appkeys()}
        self.file_reloads += 1
        self.updates += 1
        self.last_update = time.time()
        log.info("token file reloaded: %d tokens", len(self._tokens))
        return True

    def dump(self) -> dict[str, Any]:
        """For /config_dump: appkeys, versions and counts, never a token."""
        return {
            "source": self.cfg.auth.source,
            "tokens": {a: {"version": self._versions.get(a, ""), "tokens": n}
                       for a, n in sorted(self._tokens.items())},
            "acls": {p: None if acl is None else {
                "version": self._acl_versions.get(p, ""),
                "callers": {c: None if m is None else sorted(m) for c, m in sorted(acl.items())}}
                for p, acl in sorted(self._acls.items())},
            "missing": self.missing(),
            "registered": self.registered(),
            "updates": self.updates,
            "token_file": None if not self.token_file else {
                "path": self.token_file, "reloads": self.file_reloads,
                "refused": self.file_errors},
        }


def _stamp(path: str) -> tuple[int, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)
