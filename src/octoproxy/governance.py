"""Service governance, the Python side: compiles each service's policy
(static config or xDS, `model.Governance`) into the core's objects
(`_core.limits.ServiceGov` / `NodeGov`), and runs what happens per step or
per event, never per request:

- the cluster quota: takes quota from Redis in adaptive steps and hands it to
  the core; falls back to a local share (or open/closed) when Redis is
  unreachable, logs once per state change, counts, and recovers by itself;
- outlier ejection: decides when the core reports a node over a consecutive
  failures threshold, sweeps failure rates per interval, returns ejected nodes
  after their time, and never ejects more than `max_ejection_percent`;
- the adaptive concurrency limit (gradient over measured latency).

docs/governance.md is the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from octoproxy import model
from octoproxy._core.limits import (
    QM_CLOSED,
    QM_LOCAL,
    QM_OFF,
    QM_OPEN,
    QM_REDIS,
    NodeGov,
    RateRule,
    ServiceGov,
)

log = logging.getLogger("octoproxy.governance")

_FALLBACK_MODE = {"local_share": QM_LOCAL, "open": QM_OPEN, "closed": QM_CLOSED}
QUOTA_MODE_NAMES = {QM_OFF: "off", QM_REDIS: "redis", QM_LOCAL: "local_share",
                    QM_OPEN: "open", QM_CLOSED: "closed"}


def _rules(appkey: str, limits: tuple[model.RateLimit, ...], side: str) -> list[RateRule]:
    out = []
    for rl in limits:
        if rl.side != side:
            continue
        per_caller = rl.caller == "*"
        out.append(RateRule(rl.label(appkey), rl.rate, rl.burst, rl.method,
                            None if per_caller else rl.caller, per_caller))
    return out


class RedisQuota:
    """The Redis side of cluster quotas: one client for the process, one
    state (up/down) shared by every service's quota."""

    def __init__(self, url: str | None, timeout_s: float, retry_s: float, prefix: str) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.prefix = prefix
        self.client: Any = None
        self.up = url is not None
        self.failures = 0  # state changes to "down"
        self.errors = 0  # failed operations
        self.ops = 0  # quota steps taken (one Redis round trip each)
        self.last_error = ""
        self.listeners: list[Callable[[bool], None]] = []
        self._probe: asyncio.Task[None] | None = None

    def _client(self) -> Any:
        if self.client is None:
            import redis.asyncio as aioredis

            assert self.url is not None

            # a new connection sends nothing before the first operation (RESP2:
            # no HELLO; no CLIENT SETINFO): a Redis that answers just under the
            # timeout can still be connected to (a handshake of 2-3 round
            # trips would not fit the operation's bound, docs/governance.md)
            kw: dict[str, Any] = {"protocol": 2}
            try:
                from redis import DriverInfo  # redis-py >= 7

                kw["driver_info"] = DriverInfo(name=None, lib_version=None)
            except ImportError:
                kw.update(lib_name=None, lib_version=None)
            self.client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry_on_timeout=False, **kw)
        return self.client

    async def take(self, appkey: str, window: int, step: int) -> int:
        """Add `step` to the window's count; returns the count after it."""
        used = await self._incrby(f"{self.prefix}{appkey}:{window}", step)
        self.ops += 1
        return used

    async def _incrby(self, key: str, step: int) -> int:
        pipe = self._client().pipeline(transaction=False)
        pipe.incrby(key, step)
        pipe.expire(key, 10)
        used, _ = await asyncio.wait_for(pipe.execute(), self.timeout_s * 2)
        return int(used)

    def _drop_client(self) -> None:
        # a fresh client (and pool) next time: no stale connection survives a
        # failure (a command timed out mid-way leaves its answer unread)
        old, self.client = self.client, None
        if old is not None:
            t = asyncio.get_running_loop().create_task(old.aclose())
            t.add_done_callback(lambda t: t.cancelled() or t.exception())

    def failed(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        self._drop_client()
        if self.up:
            self.up = False
            self.failures += 1
            log.warning("redis %s unreachable (%s): cluster quotas fall back to their "
                        "configured local behaviour until it is back", self.url, self.last_error)
            for cb in list(self.listeners):
                cb(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        while not self.up:
            await asyncio.sleep(self.retry_s)
            try:
                # the quota's own operation, not a PING: a Redis that answers
                # PING but refuses INCRBY (an ACL, a read-only replica, a key
                # of another type) is still down for the quotas, and taking
                # it for up would flap up/down (two warnings) at every retry
                await self._incrby(f"{self.prefix}probe", 0)
            except Exception as e:  # any failure: still down
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._drop_client()
                continue
            self.up = True
            log.warning("redis %s reachable again: cluster quotas are taken from it again",
                        self.url)
            for cb in list(self.listeners):
                cb(True)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


class ServiceQuota:
    """One service's cluster quota: fixed one-second windows (wall clock, so
    every proxy counts in the same window); the core spends tokens locally and
    asks (qwant) when it runs low; each ask is one Redis round trip for a step
    sized to about 50 ms of this proxy's rate (more when Redis answers slowly),
    shrunk as the window's quota runs out so that little is left unspent in
    any proxy at the window's end.  The next window's first step is taken
    PREFETCH_S before the window starts, so a new window starts with tokens."""

    PREFETCH_S = 0.1  # before a window starts, its first step is taken
    STEP_S = 0.05  # a step is this much of the demand (or 2 Redis round trips)

    def __init__(self, gov: ServiceGov, spec: model.ClusterQuota, redis: RedisQuota,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.gov = gov
        self.spec = spec
        self.redis = redis
        self.loop = loop
        self.window = int(time.time())
        self.remaining = spec.rate  # what Redis said is left in the window
        self.rate_est = 0.0  # requests per second this proxy is asked for
        self.rtt = 0.0  # Redis round trip (smoothed, seconds)
        self._t = time.monotonic()
        self._d = 0
        self._timer: asyncio.TimerHandle | None = None
        self._pre_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._pre_task: asyncio.Task[None] | None = None
        # the next window's first step, taken ahead: (window, step, tokens, count after it)
        self._pre: tuple[int, int, float, int] | None = None
        self.steps = 0
        self.prefetched = 0  # windows that started with their first step already there
        gov.qwant = self._want
        self.apply(spec)
        redis.listeners.append(self._redis_state)
        self._arm()

    def apply(self, spec: model.ClusterQuota) -> None:
        self.spec = spec
        self.gov.set_local_share(spec.rate * spec.local_share, spec.rate * spec.local_share)
        if self.redis.url is None or not self.redis.up:
            self.gov.qmode = _FALLBACK_MODE[spec.on_redis_failure]
        else:
            if self.gov.qmode != QM_REDIS:
                self.gov.qmode = QM_REDIS
                self.gov.qtokens = 0.0
                self.gov.qdebt = self._credit(1)
                self.gov.qasked = False
            self._want()

    def _redis_state(self, up: bool) -> None:
        if up:
            self.gov.qtokens = 0.0
            self.gov.qdebt = self._credit(1)
            self.gov.qasked = False
            self.gov.qmode = QM_REDIS
            self._want()
        else:
            self.gov.qmode = _FALLBACK_MODE[self.spec.on_redis_failure]

    def _arm(self) -> None:
        now = time.time()
        nxt = math.floor(now) + 1.0
        self._timer = self.loop.call_later(nxt - now + 0.0005, self._tick)
        if nxt - now > self.PREFETCH_S:
            self._pre_timer = self.loop.call_later(nxt - now - self.PREFETCH_S, self._prefetch)

    def _tick(self) -> None:
        """A new window (unless _fetch noticed it first); take its next step."""
        window = int(time.time())
        if window != self.window:
            self._roll(window)
        if self.gov.qmode == QM_REDIS:
            self._want()
        self._arm()

    def _roll(self, window: int) -> None:
        """Start `window`: what was not spent of the last one is gone (it was
        counted there), and so is a debt (the requests lent were counted in
        the step that was on its way, which Redis counted in the last window).
        The window starts with its prefetched first step when it is there,
        else with a credit of one step while the first step is on its way."""
        g = self.gov
        self.window = window
        self.remaining = self.spec.rate
        if g.qmode != QM_REDIS:
            return
        step = self._step()
        pre, self._pre = self._pre, None
        if pre is not None and pre[0] == window:
            self.prefetched += 1
            g.qtokens = pre[2]
            self.remaining = max(0.0, self.spec.rate - pre[3])
            self._after_grant(pre[2] < pre[1])
        else:
            g.qtokens = 0.0
            g.qdebt = self._credit(step)
            g.qlow = 0.0

    def _after_grant(self, short: bool) -> None:
        g = self.gov
        if short or self.remaining <= 0:
            # the window is used up: spend what is left, then refuse
            g.qdebt = 0.0
            g.qlow = -1e18
        else:
            nxt = self._step()
            # the next step is asked for with one step left, and while it is
            # on its way one more may be lent: 2 steps (~100 ms of demand)
            # cover a late answer (a proxy waiting for a CPU on a loaded host)
            g.qlow = float(nxt)
            g.qdebt = self._credit(nxt)

    def _credit(self, step: int) -> float:
        """What may be lent while a step is on its way: one step, and at
        least 1% of the quota's rate, so a proxy going from idle to a high
        rate at once (its steps still small) is not refused while they grow;
        only while Redis says more than 4 times that is left in the window
        (what is lent is counted in the step on its way)."""
        credit = max(float(step), self.spec.rate / 100.0)
        if self.remaining > 4 * credit:
            return credit
        return float(step) if self.remaining > 4 * step else 0.0

    def _step(self, remaining: float | None = None) -> int:
        # this proxy's demand (allowed + refused) per second, quick to rise
        g = self.gov
        now = time.monotonic()
        d = g.n_quota_allowed + g.n_quota_limited
        if now - self._t >= 0.02:
            inst = (d - self._d) / (now - self._t)
            self.rate_est = max(inst, 0.7 * self.rate_est + 0.3 * inst)
            self._t, self._d = now, d
        # the next step is asked for at one step left: that step must cover
        # a round trip, so a slow Redis makes the steps larger
        span = max(self.STEP_S, 1.5 * self.rtt)
        left = self.remaining if remaining is None else remaining
        step = max(1.0, min(self.rate_est * span, self.spec.rate / 10.0, left / 4.0))
        return int(step)

    async def _take(self, window: int, step: int) -> int:
        t0 = time.monotonic()
        used = await self.redis.take(self.gov.appkey, window, step)
        rtt = time.monotonic() - t0
        self.rtt = rtt if rtt > self.rtt else 0.8 * self.rtt + 0.2 * rtt
        self.steps += 1
        return used

    def _want(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._fetch())

    def _prefetch(self) -> None:
        if self.gov.qmode == QM_REDIS and (self._pre_task is None or self._pre_task.done()):
            self._pre_task = self.loop.create_task(self._fetch_next(int(time.time()) + 1))

    async def _fetch_next(self, window: int) -> None:
        """The first step of `window`, taken before it starts (at most one
        such round trip per window)."""
        step = self._step(self.spec.rate)
        try:
            used = await self._take(window, step)
        except Exception as e:  # every failure is a Redis failure
            self.redis.failed(e)
            return
        granted = max(0.0, min(float(step), self.spec.rate - (used - step)))
        now_w = int(time.time())
        if now_w < window:
            self._pre = (window, step, granted, used)
        elif now_w == window and self.window == window and self.gov.qmode == QM_REDIS:
            # the window began before the answer came: the tokens are its own
            self.gov.qtokens += granted
            self.remaining = max(0.0, min(self.remaining, self.spec.rate - used))

    async def _fetch(self) -> None:
        g = self.gov
        try:
            while g.qmode == QM_REDIS:
                window = int(time.time())
                if window != self.window:
                    self._roll(window)
                    if g.qtokens > g.qlow:
                        return
                step = self._step()
                try:
                    used = await self._take(window, step)
                except Exception as e:  # every failure is a Redis failure
                    self.redis.failed(e)
                    return
                if window != int(time.time()):
                    continue  # the window ended while we waited: that grant is void
                granted = max(0.0, min(float(step), self.spec.rate - (used - step)))
                self.remaining = max(0.0, self.spec.rate - used)
                g.qtokens += granted
                self._after_grant(granted < step)
                if g.qtokens > g.qlow:
                    return
        finally:
            g.qasked = False

    def close(self) -> None:
        for h in (self._timer, self._pre_timer):
            if h is not None:
                h.cancel()
        for t in (self._task, self._pre_task):
            if t is not None:
                t.cancel()
        with contextlib.suppress(ValueError):
            self.redis.listeners.remove(self._redis_state)
        self.gov.qwant = None
        self.gov.qmode = QM_OFF


class Adaptive:
    """A gradient concurrency limiter per service (Netflix concurrency-limits'
    Gradient, Envoy's adaptive concurrency): every sample period, the limit
    moves by min_rtt / sample_rtt (clamped to [0.5, 1]) plus a queue
    allowance of sqrt(limit); min_rtt is re-measured every 100 samples."""

    def __init__(self, gov: ServiceGov, spec: model.AdaptiveConcurrency,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.gov = gov
        self.spec = spec
        self.limit = float(spec.initial_limit)
        self.min_rtt = 0.0
        self.samples = 0
        gov.adaptive_limit = spec.initial_limit
        self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.spec.sample_s)
            total, n, lo = self.gov.take_latency()
            if n < 5:
                continue
            rtt = total / n
            self.samples += 1
            if self.min_rtt == 0.0 or lo < self.min_rtt or self.samples % 100 == 0:
                self.min_rtt = lo if self.min_rtt == 0.0 or self.samples % 100 != 0 \
                    else max(lo, self.min_rtt)
            gradient = max(0.5, min(1.0, 2.0 * self.min_rtt / rtt))
            new = self.limit * gradient + math.sqrt(self.limit)
            self.limit = max(float(self.spec.min_limit),
                             min(float(self.spec.max_limit), 0.8 * self.limit + 0.2 * new))
            self.gov.adaptive_limit = int(self.limit)

    def close(self) -> None:
        self.task.cancel()
        self.gov.adaptive_limit = 0


class Manager:
    """Every service's governance in this process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: Any, redis_url: str | None = None,
                 redis_timeout_s: float = 0.2, redis_retry_s: float = 1.0,
                 key_prefix: str = "octo:quota:") -> None:
        self.loop = loop
        self.table = table
        self.redis = RedisQuota(redis_url, redis_timeout_s, redis_retry_s, key_prefix)
        self.govs: dict[str, ServiceGov] = {}
        self.policies: dict[str, model.Governance | None] = {}
        self.node_govs: dict[str, dict[str, NodeGov]] = {}
        self.nodes: dict[str, list[Any]] = {}  # appkey -> route Nodes of the last build
        self.quotas: dict[str, ServiceQuota] = {}
        self.adaptive: dict[str, Adaptive] = {}
        self.sweeps: dict[str, asyncio.Task[None]] = {}
        self.returns: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.ejections_total = 0
        self.retry_budget_log: set[str] = set()

    @classmethod
    def from_config(cls, cfg: Any, table: Any, loop: asyncio.AbstractEventLoop) -> Manager:
        r = cfg.redis
        return cls(loop, table, r.url, r.timeout_s, r.retry_s, r.key_prefix)

    # -- wiring

    def service_gov(self, appkey: str) -> ServiceGov:
        """The one ServiceGov of `appkey` (made on first use, updated in place)."""
        g = self.govs.get(appkey)
        if g is None:
            g = ServiceGov(appkey)
            g.on_trip = self._on_trip
            self.govs[appkey] = g
        return g

    def on_build(self, svc: model.Service, nodes: list[Any]) -> None:
        """Route-table hook, called when a service is (re)built: compile its
        policy (only when it changed) and give each node its NodeGov."""
        try:
            self._apply(svc.appkey, svc.governance)
            self.nodes[svc.appkey] = list(nodes)
            gov = svc.governance
            active = gov is not None
            ngs = self.node_govs.setdefault(svc.appkey, {})
            seen = set()
            for n in nodes:
                seen.add(n.address)
                if not active:
                    n.gov = None
                    n.ejected = False
                    continue
                ng = ngs.get(n.address)
                if ng is None:
                    ng = NodeGov(self.service_gov(svc.appkey), n.address)
                    ngs[n.address] = ng
                n.gov = ng
                n.ejected = ng.ejected
            for addr in list(ngs):
                if addr not in seen:
                    del ngs[addr]
                    h = self.returns.pop((svc.appkey, addr), None)
                    if h is not None:
                        h.cancel()
        except Exception:
            log.exception("governance: cannot apply the policy of %s", svc.appkey)

    def on_remove(self, appkey: str) -> None:
        self._apply(appkey, None)
        self.nodes.pop(appkey, None)
        self.node_govs.pop(appkey, None)

    def _apply(self, appkey: str, gov: model.Governance | None) -> None:
        if appkey in self.policies and self.policies[appkey] == gov:
            return
        self.policies[appkey] = gov
        g = self.service_gov(appkey)
        gv = gov or model.Governance()
        g.set_rules(_rules(appkey, gv.rate_limits, "provider"),
                    _rules(appkey, gv.rate_limits, "caller"))
        cb = gv.circuit_breakers or model.CircuitBreakers()
        g.max_requests = cb.max_requests
        g.max_pending = cb.max_pending
        g.node_max_requests = cb.max_requests_per_node
        g.max_connections = cb.max_connections
        g.node_max_connections = cb.max_connections_per_node
        od = gv.outlier_detection
        g.consec_transport = od.consecutive_transport_failures if od else 0
        g.consec_status = od.consecutive_errors if od else 0
        mask = 0
        for s in od.error_statuses if od else ():
            mask |= 1 << s
        g.status_mask = mask
        task = self.sweeps.pop(appkey, None)
        if task is not None:
            task.cancel()
        if od is not None:
            self.sweeps[appkey] = self.loop.create_task(self._sweep(appkey, od.interval_s))
        elif appkey in self.node_govs:
            for ng in self.node_govs[appkey].values():
                if ng.ejected:
                    self._return(appkey, ng, rebuild=False)
        rp = gv.retry
        if rp is None:
            g.max_attempts = 1
            g.set_idempotent([])
            g.idempotent_all = False
        else:
            g.max_attempts = rp.max_attempts
            g.idempotent_all = "*" in rp.idempotent_methods
            g.set_idempotent([m for m in rp.idempotent_methods if m != "*"])
            g.budget_ratio = rp.budget_percent / 100.0
            g.min_retries = rp.min_retries
        q = self.quotas.get(appkey)
        if gv.cluster_quota is None:
            if q is not None:
                q.close()
                del self.quotas[appkey]
        elif q is None:
            self.quotas[appkey] = ServiceQuota(g, gv.cluster_quota, self.redis, self.loop)
        else:
            q.apply(gv.cluster_quota)
        ac = gv.adaptive_concurrency
        a = self.adaptive.pop(appkey, None)
        if a is not None and (ac is None or not ac.enabled or ac != a.spec):
            a.close()
            a = None
        if ac is not None and ac.enabled:
            self.adaptive[appkey] = a or Adaptive(g, ac, self.loop)

    # -- outlier ejection

    def _policy(self, appkey: str) -> model.OutlierDetection | None:
        gv = self.policies.get(appkey)
        return gv.outlier_detection if gv is not None else None

    def _on_trip(self, ng: NodeGov, reason: str) -> None:
        appkey = ng.svc.appkey
        od = self._policy(appkey)
        if od is None:
            return
        self._eject(appkey, ng, od, reason)

    def _eject(self, appkey: str, ng: NodeGov, od: model.OutlierDetection, reason: str) -> bool:
        ngs = self.node_govs.get(appkey, {})
        total = len(ngs)
        ejected = sum(1 for x in ngs.values() if x.ejected)
        cap = math.floor(total * od.max_ejection_percent / 100.0 + 1e-9)
        if od.max_ejection_percent > 0:
            cap = max(cap, 1)
        if ejected >= cap or total <= 1:
            # over the share (or the last node): stays in; tripped until the next sweep
            return False
        ng.ejections += 1
        ng.n_ejections += 1
        self.ejections_total += 1
        duration = min(od.base_ejection_s * ng.ejections, max(od.max_ejection_s,
                                                              od.base_ejection_s))
        if od.ejection_jitter_s > 0:  # Envoy's max_ejection_time_jitter: added after the cap
            duration += random.uniform(0.0, od.ejection_jitter_s)
        ng.ejected = True
        ng.ejected_until = time.time() + duration
        log.warning("ejecting %s of %s for %.1f s: %s (ejection #%d)", ng.address, appkey,
                    duration, reason, ng.ejections)
        self._set_node(appkey, ng.address, True)
        self.returns[(appkey, ng.address)] = self.loop.call_later(
            duration, self._return, appkey, ng, True)
        return True

    def _return(self, appkey: str, ng: NodeGov, rebuild: bool = True) -> None:
        self.returns.pop((appkey, ng.address), None)
        if not ng.ejected:
            return
        ng.ejected = False
        ng.tripped = False
        ng.ejected_until = 0.0
        # on probation: one more failure ejects it again (for longer)
        g = ng.svc
        ng.consec_tr = max(0, g.consec_transport - 1)
        ng.consec_st = max(0, g.consec_status - 1)
        log.info("returning %s of %s after ejection #%d", ng.address, appkey, ng.ejections)
        if rebuild:
            self._set_node(appkey, ng.address, False)

    def _set_node(self, appkey: str, address: str, ejected: bool) -> None:
        for n in self.nodes.get(appkey, ()):
            if n.address == address:
                n.ejected = ejected
        self.table.rebuild(appkey)

    async def _sweep(self, appkey: str, interval: float) -> None:
        """Every interval: the failure-rate and success-rate detectors, the
        ejection count's decay for nodes that stayed healthy, and a new
        chance to trip for nodes that were over the ejection share."""
        while True:
            await asyncio.sleep(interval)
            od = self._policy(appkey)
            if od is None:
                return
            windows = [(ng, *ng.take_window())
                       for ng in list(self.node_govs.get(appkey, {}).values())]
            # the failure rate is checked only when enough nodes had enough
            # answers to compare (Envoy's failure_percentage_minimum_hosts)
            rated = od.failure_rate_threshold > 0 and sum(
                1 for _, total, _ in windows
                if total >= od.failure_rate_min_requests) >= od.failure_rate_min_nodes
            for ng, total, failed in windows:
                if ng.ejected:
                    continue
                if (rated and total >= od.failure_rate_min_requests
                        and failed / total >= od.failure_rate_threshold):
                    self._eject(appkey, ng, od, f"failure rate {failed}/{total} over "
                                f"{interval:g} s >= {od.failure_rate_threshold:g}")
                    continue
                ng.tripped = False
                if failed == 0 and ng.ejections > 0:
                    ng.ejections -= 1
            if od.success_rate_stdev_factor > 0:
                self._success_rate(appkey, od, windows, interval)

    def _success_rate(self, appkey: str, od: model.OutlierDetection,
                      windows: list[tuple[NodeGov, int, int]], interval: float) -> None:
        """Envoy's success-rate detector: among the nodes with at least
        success_rate_min_requests answers in the interval (at least
        success_rate_min_nodes of them), eject those whose success rate is
        below mean - stdev_factor * stdev (population standard deviation)."""
        rated = [(ng, 1.0 - failed / total) for ng, total, failed in windows
                 if total >= od.success_rate_min_requests and not ng.ejected]
        if not rated or len(rated) < od.success_rate_min_nodes:
            return
        mean = sum(r for _, r in rated) / len(rated)
        stdev = math.sqrt(sum((r - mean) ** 2 for _, r in rated) / len(rated))
        limit = mean - od.success_rate_stdev_factor * stdev
        for ng, r in rated:
            if r < limit and not ng.ejected:
                self._eject(appkey, ng, od, f"success rate {r:.3f} over {interval:g} s below "
                            f"{limit:.3f} (mean {mean:.3f} - {od.success_rate_stdev_factor:g} "
                            f"x stdev {stdev:.3f} of {len(rated)} nodes)")

    # -- hot restart (docs/governance.md, "Across a hot restart")

    def handover(self) -> dict[str, Any]:
        """What the next generation continues: every counter, each rate
        rule's bucket (by its key), nodes' ejection state, the adaptive
        limit.  Appkeys, caller appkeys and numbers only: no secrets.  A
        failure here never stops a hot restart (the state is left out)."""
        try:
            return self._handover()
        except Exception:
            log.exception("governance: cannot hand its state over; the next generation "
                          "starts it afresh")
            return {}

    def _handover(self) -> dict[str, Any]:
        services: dict[str, Any] = {}
        for appkey, g in self.govs.items():
            rules = []
            for side, rs in (("provider", g.inbound_rules), ("caller", g.outbound_rules)):
                for r in rs:
                    tokens, last, callers = r.bucket_state()
                    rules.append({"side": side, "key": list(r.key), "allowed": r.n_allowed,
                                  "limited": r.n_limited, "tokens": tokens, "last": last,
                                  "callers": callers})
            nodes = {a: {"ejections": ng.ejections, "total": ng.n_ejections,
                         "ejected_until": ng.ejected_until if ng.ejected else 0.0}
                     for a, ng in self.node_govs.get(appkey, {}).items()
                     if ng.ejections or ng.n_ejections or ng.ejected}
            q = self.quotas.get(appkey)
            a = self.adaptive.get(appkey)
            services[appkey] = {"counts": g.counts(), "rules": rules, "nodes": nodes,
                                "quota_steps": q.steps if q else 0,
                                "adaptive_limit": a.limit if a else 0.0}
        rq = self.redis
        return {"services": services, "ejections_total": self.ejections_total,
                "redis": {"failures": rq.failures, "errors": rq.errors, "ops": rq.ops}}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the previous generation's handover() under this
        generation's policies: a rule with the same key (side, method,
        caller) keeps its tokens (capped by its burst now) and counts; a
        node still ejected stays out for the rest of its time."""
        try:
            self._restore(state)
        except Exception:  # an old or odd state never stops a generation from serving
            log.exception("governance: cannot continue the previous generation's state")

    def _restore(self, state: dict[str, Any]) -> None:
        now = time.time()
        self.ejections_total += int(state.get("ejections_total", 0))
        rs = state.get("redis") or {}
        self.redis.failures += int(rs.get("failures", 0))
        self.redis.errors += int(rs.get("errors", 0))
        self.redis.ops += int(rs.get("ops", 0))
        for appkey, st in (state.get("services") or {}).items():
            g = self.govs.get(appkey)
            if g is None:
                continue
            g.add_counts(st.get("counts") or {})
            rules = {("provider", r.key): r for r in g.inbound_rules}
            rules.update({("caller", r.key): r for r in g.outbound_rules})
            for old in st.get("rules", ()):
                r = rules.get((old["side"], tuple(old["key"])))
                if r is None:
                    continue  # the rule is gone: its counts go with it
                r.n_allowed += int(old["allowed"])
                r.n_limited += int(old["limited"])
                r.restore_bucket(float(old["tokens"]), float(old["last"]),
                                 {k: (float(v[0]), float(v[1]))
                                  for k, v in (old.get("callers") or {}).items()})
            q = self.quotas.get(appkey)
            if q is not None:
                q.steps += int(st.get("quota_steps", 0))
            a = self.adaptive.get(appkey)
            if a is not None and st.get("adaptive_limit"):
                a.limit = max(float(a.spec.min_limit),
                              min(float(a.spec.max_limit), float(st["adaptive_limit"])))
                g.adaptive_limit = int(a.limit)
            od = self._policy(appkey)
            ngs = self.node_govs.get(appkey, {})
            for address, ns in (st.get("nodes") or {}).items():
                ng = ngs.get(address)
                if ng is None:
                    continue
                ng.n_ejections += int(ns.get("total", 0))
                ng.ejections = max(ng.ejections, int(ns.get("ejections", 0)))
                left = float(ns.get("ejected_until", 0.0)) - now
                if od is not None and left > 0 and not ng.ejected:
                    ng.ejected = True
                    ng.ejected_until = now + left
                    self._set_node(appkey, address, True)
                    self.returns[(appkey, address)] = self.loop.call_later(
                        left, self._return, appkey, ng, True)

    # -- inspection

    def service_state(self, appkey: str) -> dict[str, Any] | None:
        """What /clusters shows of a service's governance."""
        g = self.govs.get(appkey)
        if g is None:
            return None
        return {"connections": g.connections, "max_connections": g.max_connections,
                "max_connections_per_node": g.node_max_connections}

    def node_state(self, appkey: str, address: str) -> dict[str, Any] | None:
        ng = self.node_govs.get(appkey, {}).get(address)
        if ng is None:
            return None
        return {"ejected": ng.ejected,
                "ejected_until": ng.ejected_until if ng.ejected else None,
                "ejections": ng.n_ejections}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for appkey, g in self.govs.items():
            q = self.quotas.get(appkey)
            ngs = self.node_govs.get(appkey, {})
            out[appkey] = {
                "rate_limits": [{"name": r.name, "side": side, "rate": r.rate,
                                 "burst": r.burst, "allowed": r.n_allowed,
                                 "limited": r.n_limited}
                                for side, rules in (("provider", g.inbound_rules),
                                                    ("caller", g.outbound_rules))
                                for r in rules],
                "quota": {"mode": QUOTA_MODE_NAMES.get(g.qmode, str(g.qmode)),
                          "allowed": g.n_quota_allowed, "limited": g.n_quota_limited,
                          "steps": q.steps if q else 0,
                          "prefetched_windows": q.prefetched if q else 0,
                          "redis_rtt_ms": round(q.rtt * 1000, 2) if q else 0.0},
                "breakers": g.breaker_counts(),
                "in_flight": g.inflight,
                "connections": g.connections, "max_connections": g.max_connections,
                "max_connections_per_node": g.node_max_connections,
                "ejected": sorted(a for a, ng in ngs.items() if ng.ejected),
                "ejections": sum(ng.n_ejections for ng in ngs.values()),
                "nodes": {a: {"ejected": ng.ejected,
                              "ejected_until": ng.ejected_until if ng.ejected else None,
                              "ejections": ng.n_ejections} for a, ng in sorted(ngs.items())},
                "retries": g.n_retries, "retries_unsent": g.n_retries_unsent,
                "retry_budget_exhausted": g.n_budget_exhausted,
                "adaptive_limit": g.adaptive_limit,
            }
        return out

    def redis_stats(self) -> dict[str, Any]:
        r = self.redis
        return {"configured": r.url is not None, "up": r.up, "failures": r.failures,
                "errors": r.errors, "ops": r.ops, "last_error": r.last_error}

    async def close(self) -> None:
        for q in self.quotas.values():
            q.close()
        for a in self.adaptive.values():
            a.close()
        for t in self.sweeps.values():
            t.cancel()
        for h in self.returns.values():
            h.cancel()
        await self.redis.close()
