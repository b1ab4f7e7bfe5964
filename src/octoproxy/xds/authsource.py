"""Tokens (SDS) and ACLs (RBAC over ECDS) on the proxy's ADS stream, feeding
a `Keyring` (docs/xds.md section 2, docs/auth.md).

Two `TypeHandler`s for `XdsClient.add_type`:

- `RbacSource` asks for the ACL of every provider appkey of the proxy's
  inbound listeners that verify (resource name = the provider appkey).
- `SecretSource` asks for the token of every appkey the proxy signs for and
  of every caller those ACLs name (resource name = the appkey), so a new
  caller in an ACL is fetched at once, and one that left every ACL is
  unsubscribed and its token dropped.

Each resource is validated on its own: a bad one is NACKed naming it and its
last good version stays in use.  In SotW the absence of a resource from a
response says nothing (these types are not "full state"); delta
``removed_resources`` removes a token (the caller becomes unknown) or an ACL
(nobody is allowed).  No token value reaches a log, a NACK or a dump.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any

from google.protobuf.message import DecodeError

from octoproxy.keyring import Keyring
from octoproxy.xds.authres import (
    RBAC_TYPE,
    SECRET_TYPE,
    Acl,
    decode_rbac,
    decode_secret,
    rbac_to_acl,
    rbac_to_acl_steps,
    secret_to_tokens,
)
from octoproxy.xds.resources import ResourceError, digest, run_steps
from octoproxy.xds.wire import resource_name

log = logging.getLogger("octoproxy.xds")


class ChangeLog:
    """Log lines about changes of named things (tokens, ACLs), at most one
    per name per `interval_s`: a name changed again within the interval
    after a line named it is counted, not logged, and the counts are
    written in one summary line when the interval is over (a timer on the
    running loop; without one, at the next change).  A secret that flaps
    thousands of times a second thus costs a line per interval, and the
    real change of another name in the meantime is still logged at once.
    Only names and counts are ever logged."""

    def __init__(self, what: str, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # e.g. "tokens"
        self.interval_s = interval_s
        self.clock = clock
        self.suppressed = 0  # changes counted instead of logged, in all
        self._logged: dict[str, float] = {}  # name -> when a line last named it
        self._held: dict[str, int] = {}  # name -> changes not logged since
        self._due = 0.0  # when the held counts are to be written
        self._timer: asyncio.TimerHandle | None = None

    def quiet(self, name: str) -> bool:
        """True if a change of `name` now would be logged (no line named it
        within the interval)."""
        t = self._logged.get(name)
        return t is None or self.clock() - t >= self.interval_s

    def fresh(self, names: Iterable[str]) -> list[str]:
        """The names to log now; the others are counted for the summary."""
        now = self.clock()
        if self._held and now >= self._due:
            self.flush()
        out: list[str] = []
        for n in names:
            t = self._logged.get(n)
            if t is not None and now - t < self.interval_s:
                if not self._held:
                    self._due = t + self.interval_s
                    self._arm(self._due - now)
                self._held[n] = self._held.get(n, 0) + 1
                self.suppressed += 1
            else:
                self._logged[n] = now
                out.append(n)
        if len(self._logged) > 4 * MAX_NAMES:  # names no longer changing
            for n in [n for n, t in self._logged.items() if now - t >= self.interval_s]:
                del self._logged[n]
        return out

    def _arm(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: written at the next change
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, delay), self.flush)

    def flush(self) -> None:
        """Write the held counts (one line), now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        held, self._held = self._held, {}
        now = self.clock()
        for n in held:
            self._logged[n] = now
        names = sorted(held)
        shown = [f"{n} ({held[n]}x)" for n in names[:10]]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        log.info("xDS: %s changed again within %g s of a line naming them, not logged "
                 "one by one: %s%s", self.what, self.interval_s, ", ".join(shown), more)


MAX_NAMES = 10_000


class _Source:
    type_url = ""
    short = ""
    kind = ""

    def __init__(self, keyring: Keyring, names_changed: Callable[[], None]) -> None:
        self.keyring = keyring
        self.names_changed = names_changed
        self._held: dict[str, tuple[bytes, str]] = {}  # name -> (digest, version)
        self.rejected: dict[str, str] = {}  # name -> why its last version was rejected

    # the type's own parts
    def _decode(self, raw: bytes, where: str) -> Any:
        raise NotImplementedError

    def _convert(self, name: str, msg: Any) -> Any:
        raise NotImplementedError

    def _convert_steps(self, name: str, msg: Any) -> Generator[None, None, Any]:
        """_convert in steps (a type whose one resource can be big)."""
        yield
        return self._convert(name, msg)

    def _apply(self, changes: dict[str, Any], versions: dict[str, str]) -> None:
        raise NotImplementedError

    def names(self) -> set[str]:
        raise NotImplementedError

    # the TypeHandler protocol (xds/client.py)
    def versions(self) -> dict[str, str]:
        return {n: v for n, (_, v) in self._held.items() if v}

    def dump(self) -> dict[str, Any]:
        return {"names": sorted(self.names()),
                "versions": dict(sorted(self.versions().items())),
                "rejected": dict(sorted(self.rejected.items()))}

    def on_response(
        self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool
    ) -> list[str]:
        errors: list[str] = run_steps(self.steps(resources, removed, sotw))
        return errors

    def steps(
        self, resources: list[tuple[str, str, Any]], removed: list[str], sotw: bool
    ) -> Generator[None, None, list[str]]:
        """on_response in steps: a yield after each resource and each chunk of
        changes applied (the client serves traffic between them)."""
        wanted = self.names()
        known = {d: n for n, (d, _) in self._held.items()}
        errors: list[str] = []
        changes: dict[str, Any] = {}
        versions: dict[str, str] = {}
        seen: set[str] = set()
        for i, (name, version, any_) in enumerate(resources):
            yield
            where = f"{self.kind} {name!r}" if name else f"resources[{i}]"
            if any_ is None:
                errors.append(f"{where}: Resource without a resource body")
                continue
            if any_.type_url != self.type_url:
                errors.append(f"{where}: resource type {any_.type_url} in a {self.type_url} response")
                continue
            d = digest(any_.value)
            msg = None
            if not name:
                name = known.get(d, "")
                if not name:
                    # the name only (field 1 of both types): a resource not
                    # asked for is never decoded
                    try:
                        name = resource_name(any_.value)
                    except DecodeError as e:
                        errors.append(f"{where}: cannot decode {self.kind}: {e}")
                        continue
                    if not name:
                        errors.append(f"{where}: {self.kind} without a name")
                        continue
            if name in seen:
                errors.append(f"{self.kind} {name!r}: appears twice in the response")
                changes.pop(name, None)
                continue
            seen.add(name)
            if name not in wanted:
                continue  # not asked for (any more): ignored
            held = self._held.get(name)
            if held is not None and held[0] == d:
                if version and version != held[1]:
                    self._held[name] = (d, version)
                continue
            try:
                if msg is None:
                    msg = self._decode(any_.value, f"{self.kind} {name!r}")
                value = yield from self._convert_steps(name, msg)
            except ResourceError as e:
                self.rejected[name] = str(e)
                errors.append(str(e))
                continue
            self.rejected.pop(name, None)
            changes[name] = (value, d, version)
        for name in removed:
            if name in seen:
                errors.append(f"{self.kind} {name!r}: both updated and removed in the response")
                changes.pop(name, None)
                continue
            if name in self._held:
                changes[name] = None
        applied: dict[str, Any] = {}
        for name, ch in changes.items():
            if ch is None:
                self._held.pop(name, None)
                applied[name] = None
                log.info("xDS: %s %r removed by the control plane", self.kind, name)
            else:
                value, d, version = ch
                self._held[name] = (d, version)
                applied[name] = value
                versions[name] = version or d.hex()[:16]
        if applied:
            yield from self._apply_steps(applied, versions)
        return errors

    def _apply_steps(self, changes: dict[str, Any],
                     versions: dict[str, str]) -> Generator[None, None, None]:
        self._apply(changes, versions)
        yield

    def forget_unwanted(self) -> None:
        wanted = self.names()
        for name in [n for n in self._held if n not in wanted]:
            del self._held[name]
            self.rejected.pop(name, None)


class SecretSource(_Source):
    """SDS: ``Secret`` named after an appkey -> its tokens."""

    type_url = SECRET_TYPE
    short = "SDS"
    kind = "Secret"

    def __init__(self, keyring: Keyring, names_changed: Callable[[], None]) -> None:
        super().__init__(keyring, names_changed)
        self.changelog = ChangeLog("tokens")

    def _decode(self, raw: bytes, where: str) -> Any:
        return decode_secret(raw, where)

    def _convert(self, name: str, msg: Any) -> tuple[bytes, ...]:
        return secret_to_tokens(name, msg)

    def names(self) -> set[str]:
        return self.keyring.needed_tokens()

    CHUNK = 500  # tokens applied between two turns of the loop

    def _apply(self, changes: dict[str, Any], versions: dict[str, str]) -> None:
        for _ in self._apply_steps(changes, versions):
            pass

    def _apply_steps(self, changes: dict[str, Any],
                     versions: dict[str, str]) -> Generator[None, None, None]:
        # each token is swapped whole (a request sees an appkey's old or new
        # tokens), so thousands can be applied in chunks with traffic between
        names = sorted(changes)
        for i in range(0, len(names), self.CHUNK):
            part = names[i:i + self.CHUNK]
            self.keyring.update(tokens={a: changes[a] for a in part},
                                versions={a: versions[a] for a in part if a in versions})
            yield
        # at most one line per response, whatever its size, and one per
        # appkey per interval (a flapping secret is counted, ChangeLog):
        # appkeys, never tokens
        fresh = self.changelog.fresh(names)
        if fresh:
            log.info("xDS: tokens updated for %s", _names(fresh))


class RbacSource(_Source):
    """RBAC over ECDS: ``TypedExtensionConfig`` named after a provider -> its ACL."""

    type_url = RBAC_TYPE
    short = "RBAC"
    kind = "TypedExtensionConfig"

    def __init__(self, keyring: Keyring, names_changed: Callable[[], None],
                 secrets: SecretSource) -> None:
        super().__init__(keyring, names_changed)
        self.secrets = secrets
        self.changelog = ChangeLog("ACLs")

    def _decode(self, raw: bytes, where: str) -> Any:
        return decode_rbac(raw, where)

    def _convert(self, name: str, msg: Any) -> Acl:
        return rbac_to_acl(name, msg)

    def _convert_steps(self, name: str, msg: Any) -> Generator[None, None, Any]:
        return (yield from rbac_to_acl_steps(name, msg))

    def names(self) -> set[str]:
        return self.keyring.providers()

    def _apply(self, changes: dict[str, Any], versions: dict[str, str]) -> None:
        before = self.keyring.needed_tokens()
        self.keyring.update(acls=changes, acl_versions=versions)
        fresh = set(self.changelog.fresh(sorted(changes)))  # a flapping ACL is counted
        for p, acl in sorted(changes.items()):
            if p in fresh:
                log.info("xDS: ACL of %s: %s", p, "removed (nobody allowed)" if acl is None
                         else f"{len(acl)} caller(s)")
        if self.keyring.needed_tokens() != before:
            self.secrets.forget_unwanted()
            self.names_changed()  # ask for the new callers' tokens, drop the others


def _names(names: list[str], show: int = 10) -> str:
    """A list of appkeys for a log line: the first `show`, then how many more."""
    if len(names) <= show:
        return ", ".join(names)
    return f"{', '.join(names[:show])} and {len(names) - show} more ({len(names)} in all)"


def attach(client: Any, keyring: Keyring) -> tuple[SecretSource, RbacSource]:
    """Carry the keyring's tokens and ACLs on the client's stream."""
    secrets = SecretSource(keyring, client.names_changed)
    rbac = RbacSource(keyring, client.names_changed, secrets)
    client.add_type(rbac)
    client.add_type(secrets)

    def needed_changed() -> None:
        # an app registered or left (subscribe API): ask for its token, or drop it
        secrets.forget_unwanted()
        client.names_changed()

    keyring.on_needed_changed = needed_changed
    return secrets, rbac
