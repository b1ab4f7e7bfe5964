"""The control plane's endpoints file: format, validation, snapshots and watching.

The file (YAML, or JSON when it ends in .json) lists services (and their
traffic-shunting rules, plus the global ones under a top-level ``shunting``); see
docs/xds.md and examples/endpoints.yaml.  Each load builds a `Snapshot` of
Envoy resources with a version per resource (a hash of its content, so it is
stable across control-plane restarts); services whose text did not change are
not rebuilt.  A file that does not load or validate is logged and ignored: the
last good snapshot stays in service.  An empty file is such a file: serving no
services must be said explicitly (``services: []``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import any_pb2
from pydantic import ValidationError

from octoproxy import model
from octoproxy.config import AllowRule, ConfigError
from octoproxy.services import ServiceSpec
from octoproxy.xds.authres import RBAC_TYPE, SECRET_TYPE, acl_to_rbac, tokens_to_secret
from octoproxy.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    appkey_problem,
    service_to_cla,
    service_to_cluster,
    service_to_listener,
    service_to_route,
)
from octoproxy.xds.shunting import (
    GLOBAL_RESOURCE,
    THRIFT_ROUTE_TYPE,
    rules_from_list,
    rules_to_route_config,
)

# what the store serves, in the order a change is pushed (make before break)
# (the per-service ones first: build() zips a service's resources with it)
SERVED = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, THRIFT_ROUTE_TYPE, SECRET_TYPE,
          RBAC_TYPE)
# a Secret's version must not be a plain hash of its token (it is sent to
# proxies and shown in their dumps): keyed with a key of this process
_SECRET_KEY = secrets.token_bytes(16)

log = logging.getLogger("octoproxy.controlplane")


class FileError(Exception):
    """The endpoints file cannot be used; the message lists every problem."""


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    version: str
    raw: bytes  # serialized Cluster / ClusterLoadAssignment
    type_url: str

    def to_any(self) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.type_url, value=self.raw)


def _resource(name: str, type_url: str, msg: Any) -> Resource:
    raw = msg.SerializeToString(deterministic=True)
    key = _SECRET_KEY if type_url == SECRET_TYPE else b""
    return Resource(name, hashlib.blake2b(raw, digest_size=8, key=key).hexdigest(), raw, type_url)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    resources: dict[str, dict[str, Resource]]  # type_url -> name -> resource


@dataclass
class _Cache:
    raw: dict[str, Any] = field(default_factory=dict)  # appkey -> the service's parsed text
    global_rules: Any = None  # the top-level `shunting` list's parsed text
    global_built: Resource | None = None
    built: dict[str, tuple[Resource, ...]] = field(default_factory=dict)  # one per SERVED type


def _read(path: Path) -> Any:
    text = path.read_bytes()
    if path.suffix == ".json":
        return json.loads(text)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)


def build(path: Path, prev: _Cache) -> tuple[_Cache, dict[str, dict[str, Resource]]]:
    """Load and validate the file; rebuild only services whose text changed."""
    try:
        data = _read(path)
    except OSError as e:
        raise FileError(f"{path}: cannot read: {e.strerror}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise FileError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if data is None:
        # an empty (or truncated to nothing) file is a write in progress or a
        # mistake far more often than "no services"; that must be said explicitly
        raise FileError(f"{path}: the file is empty (write 'services: []' to serve no services)")
    if (not isinstance(data, dict) or "services" not in data
            or set(data) - {"services", "shunting", "acls"}):
        raise FileError(
            f"{path}: the top level must be a mapping with the key 'services' "
            "(and optionally 'shunting', the global rules, and 'acls')"
        )
    services = data["services"]
    if not isinstance(services, list):
        raise FileError(f"{path}: services must be a list ('services: []' for none)")
    problems: list[str] = []
    cache = _Cache()
    # the global ("public") traffic-shunting rules: always served (empty when
    # none), so a proxy never waits for them
    global_rules = data.get("shunting", [])
    if global_rules == prev.global_rules and prev.global_built is not None:
        cache.global_rules, cache.global_built = prev.global_rules, prev.global_built
    else:
        try:
            rules = rules_from_list(model.SHUNT_GLOBAL, global_rules, "shunting")
            cache.global_rules = global_rules
            cache.global_built = _resource(
                GLOBAL_RESOURCE, THRIFT_ROUTE_TYPE, rules_to_route_config(model.SHUNT_GLOBAL, rules)
            )
        except ValueError as e:
            problems.append(str(e))
    for i, raw in enumerate(services):
        appkey = raw.get("appkey") if isinstance(raw, dict) else None
        if isinstance(appkey, str) and appkey in cache.raw:
            problems.append(f"services[{i}]: duplicate appkey {appkey!r}")
            continue
        if isinstance(appkey, str) and prev.raw.get(appkey) == raw:
            cache.raw[appkey] = raw
            cache.built[appkey] = prev.built[appkey]
            continue
        problem = appkey_problem(appkey) if isinstance(appkey, str) else None
        if problem is not None:
            problems.append(f"services[{i}].appkey: {problem}")
            continue
        try:
            spec = {k: v for k, v in raw.items() if k != "shunting"}
            svc = ServiceSpec.model_validate(spec).to_model()
            rules = rules_from_list(svc.appkey, raw.get("shunting", []), f"services[{i}].shunting")
        except ValidationError as e:
            for err in e.errors():
                loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                problems.append(f"services[{i}]{loc}: {err['msg']}")
            continue
        except ValueError as e:
            problems.append(f"services[{i}]: {e}")
            continue
        cache.raw[svc.appkey] = raw
        cache.built[svc.appkey] = (
            _resource(svc.appkey, CLUSTER_TYPE, service_to_cluster(svc)),
            _resource(svc.appkey, ENDPOINT_TYPE, service_to_cla(svc)),
            _resource(svc.appkey, LISTENER_TYPE, service_to_listener(svc.appkey)),
            _resource(svc.appkey, ROUTE_TYPE, service_to_route(svc.appkey)),
            # the service's shunting rules: served even when there are none
            # (an empty RouteConfiguration says "no rules" in SotW too)
            _resource(
                svc.appkey, THRIFT_ROUTE_TYPE, rules_to_route_config(svc.appkey, rules)
            ),
        )
    acls = _acls(data.get("acls"), problems)
    if problems:
        raise FileError(f"{path}: " + "; ".join(problems[:20]))
    resources: dict[str, dict[str, Resource]] = {t: {} for t in SERVED}
    for appkey, built in cache.built.items():
        for t, r in zip(SERVED, built, strict=False):
            resources[t][appkey] = r
    assert cache.global_built is not None
    resources[THRIFT_ROUTE_TYPE][GLOBAL_RESOURCE] = cache.global_built
    resources[RBAC_TYPE] = acls
    return cache, resources


def _acls(data: Any, problems: list[str]) -> dict[str, Resource]:
    """``acls: {provider appkey: [{caller, methods}...]}`` -> RBAC resources
    (docs/xds.md section 3)."""
    out: dict[str, Resource] = {}
    if data is None:
        return out
    if not isinstance(data, dict):
        problems.append("acls: must be a mapping provider appkey -> list of {caller, methods}")
        return out
    for provider, rules in data.items():
        where = f"acls[{provider!r}]"
        problem = appkey_problem(provider)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        if not isinstance(rules, list):
            problems.append(f"{where}: must be a list of {{caller, methods}} ([] allows nobody)")
            continue
        acl: dict[str, frozenset[str] | None] = {}
        for i, raw in enumerate(rules):
            try:
                rule = AllowRule.model_validate(raw)
            except ValidationError as e:
                for err in e.errors():
                    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                    problems.append(f"{where}[{i}]{loc}: {err['msg']}")
                continue
            caller_problem = appkey_problem(rule.caller)
            if caller_problem is not None:
                problems.append(f"{where}[{i}].caller: {caller_problem}")
            elif rule.caller in acl:
                problems.append(f"{where}[{i}].caller: {rule.caller!r} appears twice")
            elif rule.methods is not None and not all(rule.methods):
                problems.append(f"{where}[{i}].methods: a method name is empty")
            else:
                acl[rule.caller] = None if rule.methods is None else frozenset(rule.methods)
        out[provider] = _resource(provider, RBAC_TYPE, acl_to_rbac(provider, acl))
    return out


def build_tokens(path: Path) -> dict[str, Resource]:
    """The token file (the proxy's format, docs/auth.md: appkey -> token or
    [current, previous]) -> SDS Secrets.  Refused when group or others may
    read or write it or it is not a regular file; errors never quote it."""
    from octoproxy.auth import load_tokens

    try:
        tokens = load_tokens(str(path))
    except ConfigError as e:
        raise FileError(str(e)) from None
    out: dict[str, Resource] = {}
    problems = []
    for appkey in tokens.appkeys():
        problem = appkey_problem(appkey)
        if problem is not None:
            problems.append(f"token file: {problem}")
            continue
        out[appkey] = _resource(appkey, SECRET_TYPE, tokens_to_secret(appkey, tokens.accepted(appkey)))
    if problems:
        raise FileError(f"{path}: " + "; ".join(problems[:20]))
    return out


class Store:
    """The current snapshot, reloaded when the file changes; notifies listeners."""

    def __init__(self, path: str | os.PathLike[str], poll_s: float = 0.1,
                 tokens_path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.tokens_path = Path(tokens_path) if tokens_path is not None else None
        self._cache = _Cache()
        self._stamp: tuple[int, int, int] | None = None
        self._tokens_stamp: tuple[int, ...] | None = None
        self._files: dict[str, dict[str, Resource]] = {}  # the endpoints file's resources
        self._secrets: dict[str, Resource] = {}  # the token file's
        self.snapshot = Snapshot(0, {t: {} for t in SERVED})
        self._listeners: set[Callable[[], None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.errors = 0
        self.last_error = ""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _tokens_stat(self) -> tuple[int, ...] | None:
        """lstat: a chmod or a symlink put in its place is a change too."""
        assert self.tokens_path is not None
        try:
            st = os.lstat(self.tokens_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)

    def load(self) -> None:
        """First load (synchronous); raises FileError."""
        self._stamp = self._stat()
        if self.tokens_path is not None:
            self._tokens_stamp = self._tokens_stat()
            self._secrets = build_tokens(self.tokens_path)
        self._cache, res = build(self.path, self._cache)
        self._set(res)

    def _set(self, res: dict[str, dict[str, Resource]]) -> None:
        self._files = res
        res = dict(res)
        res[SECRET_TYPE] = self._secrets
        self.snapshot = Snapshot(self.snapshot.version + 1, res)
        self.reloads += 1
        for cb in list(self._listeners):
            cb()

    def listen(self, cb: Callable[[], None]) -> Callable[[], None]:
        self._listeners.add(cb)
        return lambda: self._listeners.discard(cb)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="cp-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch_tokens(self) -> None:
        stamp = self._tokens_stat()
        if stamp is None or stamp == self._tokens_stamp:
            return
        self._tokens_stamp = stamp
        assert self.tokens_path is not None
        try:
            secrets_ = await asyncio.to_thread(build_tokens, self.tokens_path)
        except FileError as e:
            # logged once per change of the file; the message never quotes it
            self.errors += 1
            self.last_error = str(e)
            log.error("token file rejected, keeping the previous tokens: %s", e)
            return
        if secrets_ != self._secrets:
            self._secrets = secrets_
            self._set(self._files)
            log.info("token file loaded: %d tokens (snapshot %d)", len(secrets_),
                     self.snapshot.version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.tokens_path is not None:
                await self._watch_tokens()
            stamp = self._stat()
            if stamp is None or stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                cache, res = await asyncio.to_thread(build, self.path, self._cache)
            except FileError as e:
                self.errors += 1
                self.last_error = str(e)
                log.error("endpoints file rejected, keeping the previous content: %s", e)
                continue
            except Exception as e:
                self.errors += 1
                self.last_error = repr(e)
                log.exception("endpoints file rejected, keeping the previous content")
                continue
            self._cache = cache
            self._set(res)
            log.info(
                "endpoints file loaded: %d services (snapshot %d)",
                len(res[CLUSTER_TYPE]),
                self.snapshot.version,
            )
