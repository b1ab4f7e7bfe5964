"""The proxy's configuration: YAML (or JSON) validated into typed objects.

Unknown keys are errors.  `load_config` raises `ConfigError` carrying every
problem with its path inside the file (``listeners.inbound[0].port: ...``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from octoproxy import model
from octoproxy.services import ServiceSpec

MiB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NodeConfig(_Strict):
    """Who this proxy is: its identity towards xDS and its own routing labels."""

    id: str = Field(default_factory=lambda: os.uname().nodename)
    cluster: str = "octo-mesh"
    liteset: str = ""
    set: str = ""
    swimlane: str = ""
    idc: str = ""
    region: str = ""

    def labels(self) -> model.Labels:
        return model.Labels(self.liteset, self.set, self.swimlane, self.idc, self.region)


class OutboundListener(_Strict):
    """A UDS that local apps (the Mesh SDK) connect to."""

    path: str
    mode: int = Field(default=0o660, ge=0, le=0o777)
    backlog: int = Field(default=1024, ge=1, le=65535)
    # service authentication (docs/auth.md): the appkeys of the apps that use
    # this listener, which the proxy signs requests for; a request claiming any
    # other caller appkey is refused with status 7.  Empty: nothing is signed.
    sign_for: list[str] = []
    # also sign for the appkeys apps register themselves through the subscribe
    # API (POST /v1/register, docs/auth.md); off: only sign_for
    sign_registered: bool = False

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        # YAML 1.1 reads 0660 as octal already; accept "0660"/"0o660" strings too
        if isinstance(v, str):
            return int(v, 8)
        return v


class AllowRule(_Strict):
    """One caller appkey allowed to call a provider; `methods`: only these."""

    caller: str = Field(min_length=1)
    methods: list[str] | None = None  # None: every method


class ProviderAuth(_Strict):
    """How an inbound listener authenticates and authorizes its callers."""

    # enforce: refuse (status 7) what fails; log-only: count and log, forward
    # (migration); off: no check
    mode: Literal["enforce", "log-only", "off"] = "enforce"
    # the ACL; empty or unset: nobody.  Unset with auth.source xds: the
    # control plane's RBAC policy for the listener's appkey
    allow: list[AllowRule] | None = None

    @model_validator(mode="after")
    def _unique(self) -> ProviderAuth:
        seen = [r.caller for r in self.allow or ()]
        if len(seen) != len(set(seen)):
            raise ValueError("a caller appears twice in allow")
        return self


class Auth(_Strict):
    """Service authentication (docs/auth.md)."""

    # appkey -> token, YAML or JSON; must not be readable or writable by group
    # or others.  Its values never reach logs, /config_dump or handed-over state.
    token_file: str | None = None
    # file: tokens from token_file, ACLs from listeners.inbound[].auth.allow;
    # xds: tokens as SDS secrets and ACLs as RBAC policies from the control
    # plane (xds.server), on demand for this proxy's appkeys (docs/auth.md)
    source: Literal["file", "xds"] = "file"
    # a signature's timestamp may differ from this proxy's clock by this much
    max_skew_s: float = Field(default=300.0, gt=0, le=86400)


class InboundListener(_Strict):
    """The provider's registered TCP port; traffic is forwarded to its UDS."""

    host: str = "0.0.0.0"
    port: int = Field(ge=0, le=65535)
    upstream_uds: str
    backlog: int = Field(default=1024, ge=1, le=65535)
    # the service this port serves: its provider-side rate limits and cluster
    # quota apply here (docs/governance.md); None = no provider-side limits
    appkey: str | None = None
    # service authentication of the callers of `appkey` (docs/auth.md)
    auth: ProviderAuth | None = None

    @model_validator(mode="after")
    def _auth_needs_appkey(self) -> InboundListener:
        if self.auth is not None and not self.appkey:
            raise ValueError("auth needs the listener's appkey (the provider the callers sign for)")
        return self


class Listeners(_Strict):
    outbound: list[OutboundListener] = []
    inbound: list[InboundListener] = []


class Limits(_Strict):
    max_frame_bytes: int = Field(default=16 * MiB, ge=64, le=1024 * MiB)
    max_header_bytes: int = Field(default=64 * 1024, ge=64, le=16 * MiB)
    max_connections: int = Field(default=10_000, ge=1)
    max_inflight_per_connection: int = Field(default=10_000, ge=1)
    # write-buffer water marks of a destination, in bytes: above high the
    # source that feeds it stops being read; it resumes below low
    write_high_water: int = Field(default=4 * MiB, ge=1024)
    write_low_water: int = Field(default=1 * MiB, ge=0)
    read_buffer_bytes: int = Field(default=64 * 1024, ge=4096)
    # answers queued for a connection that does not read them: past this the
    # connection is closed (a stalled consumer must not grow the proxy)
    max_unread_bytes: int = Field(default=32 * MiB, ge=64 * 1024)
    # requests in flight in the whole process (both directions): past it a
    # new request is answered at once with status 6 (overload)
    max_inflight_total: int = Field(default=20_000, ge=1)
    # a frame that has begun to arrive must be complete within this (slowloris)
    frame_timeout_s: float = Field(default=30.0, gt=0)
    # an app or inbound connection with nothing owed that sends nothing for
    # this long is closed
    idle_timeout_s: float = Field(default=600.0, gt=0)
    # receive-buffer bytes the whole process may hold beyond read_buffer_bytes
    # per connection (frames larger than one read buffer)
    max_buffered_bytes: int = Field(default=256 * MiB, ge=64 * 1024)
    # context maps of a request from an app, in bytes of their encoding
    max_global_context_bytes: int = Field(default=512, ge=6)
    max_local_context_bytes: int = Field(default=2048, ge=6)

    @model_validator(mode="after")
    def _marks(self) -> Limits:
        if self.write_low_water >= self.write_high_water:
            raise ValueError("write_low_water must be lower than write_high_water")
        if self.max_unread_bytes <= self.write_high_water:
            raise ValueError("max_unread_bytes must be greater than write_high_water")
        if self.max_header_bytes > self.max_frame_bytes:
            raise ValueError("max_header_bytes cannot exceed max_frame_bytes")
        if self.max_buffered_bytes < self.max_frame_bytes:
            raise ValueError("max_buffered_bytes must hold at least one max_frame_bytes frame")
        return self


class Upstream(_Strict):
    connections_per_node: int = Field(default=2, ge=1, le=64)
    connect_timeout_ms: int = Field(default=1000, ge=1)
    idle_timeout_s: float = Field(default=300.0, gt=0)
    reconnect_backoff_base_ms: int = Field(default=100, ge=1)
    reconnect_backoff_max_ms: int = Field(default=5000, ge=1)
    # a connection the peer closes sooner than this after it was made (and
    # before any answer) counts as a failed connect: backoff, so a peer that
    # accepts and closes at once is not stormed
    min_connection_life_ms: int = Field(default=1000, ge=0)
    default_timeout_ms: int = Field(default=3000, ge=1)
    max_timeout_ms: int = Field(default=60_000, ge=1)

    @model_validator(mode="after")
    def _timeouts(self) -> Upstream:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError("default_timeout_ms cannot exceed max_timeout_ms")
        return self


class Static(_Strict):
    services: list[ServiceSpec] = []  # same format as the control plane's file

    @model_validator(mode="after")
    def _unique(self) -> Static:
        seen: set[str] = set()
        for s in self.services:
            if s.appkey in seen:
                raise ValueError(f"duplicate appkey {s.appkey!r}")
            seen.add(s.appkey)
        return self


class Shunting(_Strict):
    """Traffic-shunting rules given in the config (docs/shunting.md): the
    global ("public") rules and each provider appkey's, in the control
    plane file's rule format.  Checked whole at load: an error names the
    scope and the rule."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    global_rules: list[Any] = Field(default=[], alias="global")
    services: dict[str, list[Any]] = {}

    @model_validator(mode="after")
    def _rules_ok(self) -> Shunting:
        self.rules()
        return self

    def rules(self) -> dict[str, tuple[model.ShuntRule, ...]]:
        """scope (appkey or model.SHUNT_GLOBAL) -> its rules, checked."""
        from octoproxy.xds.shunting import rules_from_list

        out: dict[str, tuple[model.ShuntRule, ...]] = {}
        if self.global_rules:
            out[model.SHUNT_GLOBAL] = rules_from_list(
                model.SHUNT_GLOBAL, self.global_rules, "shunting.global"
            )
        for appkey, rules in self.services.items():
            if not appkey or appkey == model.SHUNT_GLOBAL:
                raise ValueError(f"shunting.services: {appkey!r} is not an appkey")
            if rules:
                out[appkey] = rules_from_list(appkey, rules, f"shunting.services[{appkey!r}]")
        return out


class Xds(_Strict):
    """The xDS control plane this proxy subscribes to (on demand)."""

    server: str | None = None  # host:port of an ADS server; None = static routes only
    delta: bool = False  # incremental (delta) ADS instead of state-of-the-world
    connect_timeout_s: float = Field(default=5.0, gt=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    # how long a subscribed resource may stay unanswered before it is declared missing
    resource_timeout_s: float = Field(default=15.0, gt=0)
    # at most this many subscribed appkeys (the subscribe API answers 429 beyond)
    max_subscriptions: int = Field(default=10_000, ge=1)
    # no request to the control plane is bigger (gRPC servers take 4 MiB by default)
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    # no response from the control plane is bigger: one that is resets the
    # stream (the last good config stays; docs/xds.md section 7)
    max_response_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024, le=2**31 - 1)


class Subscribe(_Strict):
    """The HTTP subscribe API apps call (on loopback or a UDS)."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    uds: str | None = None
    state_file: str | None = None  # where subscriptions are persisted (atomic writes)
    timeout_s: float = Field(default=10.0, gt=0)


class Redis(_Strict):
    """Where cluster-wide quotas are kept (docs/governance.md)."""

    url: str | None = None  # redis://host:port/db; None = cluster quotas use their local share
    timeout_s: float = Field(default=0.2, gt=0)  # one quota step
    retry_s: float = Field(default=1.0, gt=0)  # how often an unreachable Redis is tried again
    key_prefix: str = "octo:quota:"


class Admin(_Strict):
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    uds: str | None = None
    # open admin connections; past it a new one is closed at once
    max_connections: int = Field(default=32, ge=1)
    # a connection without a complete request for this long is closed
    timeout_s: float = Field(default=10.0, gt=0)


class HotRestart(_Strict):
    socket: str | None = None  # UDS the new generation connects to
    pid_file: str | None = None
    drain_s: float = Field(default=5.0, gt=0)
    shutdown_s: float = Field(default=15.0, gt=0)
    proxy_restart_spread_s: float = Field(default=0.5, ge=0)
    start_timeout_s: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _drain(self) -> HotRestart:
        if self.drain_s >= self.shutdown_s:
            raise ValueError("drain_s must be less than shutdown_s")
        return self


class Logging(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    access_log: bool = False
    access_log_sample: float = Field(default=1.0, ge=0, le=1)
    # at most repeat_burst lines of one message template per repeat_window_s
    # (0: no limit); the access log is never limited
    repeat_burst: int = Field(default=5, ge=0)
    repeat_window_s: float = Field(default=10.0, gt=0)


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    listeners: Listeners = Listeners()
    limits: Limits = Limits()
    upstream: Upstream = Upstream()
    static: Static = Static()
    shunting: Shunting = Shunting()
    xds: Xds = Xds()
    subscribe: Subscribe = Subscribe()
    admin: Admin = Admin()
    hot_restart: HotRestart = HotRestart()
    logging: Logging = Logging()
    redis: Redis = Redis()
    auth: Auth = Auth()

    @model_validator(mode="after")
    def _token_file(self) -> Config:
        for i, ob in enumerate(self.listeners.outbound):
            if ob.sign_registered and self.subscribe.port is None and not self.subscribe.uds:
                raise ValueError(f"listeners.outbound[{i}].sign_registered needs the subscribe "
                                 "API (subscribe.port or subscribe.uds), where apps register")
        uses = any(ob.sign_for or ob.sign_registered for ob in self.listeners.outbound) or any(
            ib.auth is not None and ib.auth.mode != "off" for ib in self.listeners.inbound)
        if self.auth.source == "xds":
            if not self.xds.server:
                raise ValueError("auth.source xds needs xds.server (the control plane)")
            if self.auth.token_file:
                raise ValueError("auth.token_file and auth.source xds exclude each other "
                                 "(tokens come from the control plane)")
            for i, ib in enumerate(self.listeners.inbound):
                if ib.auth is not None and ib.auth.allow is not None:
                    raise ValueError(f"listeners.inbound[{i}].auth.allow is set, but with "
                                     "auth.source xds the ACL comes from the control plane")
            return self
        if uses and not self.auth.token_file:
            raise ValueError("auth.token_file is needed: a listener signs or verifies requests")
        return self


class ConfigError(Exception):
    """Every problem found in a config file, each with its path inside the file."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping"])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # drop pydantic's union/validator-name noise from the path
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            problems.append(f"{_loc(loc)}: {err['msg']}")
        raise ConfigError(source, problems) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"]) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(str(p), [f"not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"]) from None
    return parse_config(data, str(p))
