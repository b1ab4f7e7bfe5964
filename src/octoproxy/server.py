"""The proxy process: route table + data path engine + listeners + signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from octoproxy import hotrestart, model
from octoproxy.config import Config
from octoproxy.listeners import ListenerError, open_http_socket, open_inbound, open_outbound
from octoproxy.logs import setup_logging
from octoproxy.process import (
    HELD_SIGNALS,
    AtomicFile,
    UnsafePath,
    check_private_dir,
    check_writable_dir,
    hold_signals,
    remove_pid_file,
    runtime_dir,
    runtime_dir_path,
    sd_notify,
)
from octoproxy.startup import Dependency, StartupGate
from octoproxy.upstream import Connector

if TYPE_CHECKING:
    from octoproxy._core.datapath import Engine
    from octoproxy.admin import AdminServer
    from octoproxy.subscribe import StaticDiscovery, SubscribeApi
    from octoproxy.xds.client import XdsClient

log = logging.getLogger("octoproxy")


def listener_key_outbound(path: str) -> str:
    return f"uds:{os.path.abspath(path)}"


def listener_key_inbound(host: str, port: int) -> str:
    return f"tcp:{host}:{port}"


def instance_name(cfg: Config) -> str:
    """A name for this proxy that no other proxy on the host shares: its
    node id plus its first app socket (hashed) or its first inbound port."""
    if cfg.listeners.outbound:
        path = os.path.abspath(cfg.listeners.outbound[0].path)
        return f"{cfg.node.id}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    if cfg.listeners.inbound:
        return f"{cfg.node.id}-{cfg.listeners.inbound[0].port}"
    return cfg.node.id


def state_base(cfg: Config) -> str:
    """Base path of this proxy's local state files when they are not
    configured: in the private runtime directory (process.runtime_dir(),
    created 0700), named by instance_name().  Raises UnsafePath."""
    return os.path.join(runtime_dir(), instance_name(cfg))


def subscription_file(cfg: Config) -> str | None:
    """Where subscriptions persist: configured, or derived (state_base) when
    there is a control plane to subscribe to."""
    if cfg.subscribe.state_file:
        return cfg.subscribe.state_file
    if cfg.xds.server:
        return state_base(cfg) + ".subscriptions.json"
    return None


def services_to_json(services: list[model.Service]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in services]


def services_from_json(items: list[dict[str, Any]]) -> list[model.Service]:
    out = []
    for d in items:
        eps = tuple(model.Endpoint(**e) for e in d.get("endpoints", ()))
        out.append(model.Service(appkey=d["appkey"], endpoints=eps,
                                 lb_policy=model.LbPolicy(d.get("lb_policy", "round_robin")),
                                 set_enabled=bool(d.get("set_enabled", False)),
                                 service_names=tuple(d.get("service_names", ())),
                                 governance=model.Governance.from_dict(d.get("governance"))))
    return out


def _needs_governance(cfg: Config) -> bool:
    """Governance (docs/governance.md) is loaded when a policy can come: a
    static service has one, an inbound listener names its service, a Redis
    is configured, or a control plane may send one."""
    return bool(cfg.xds.server or cfg.redis.url
                or any(ib.appkey for ib in cfg.listeners.inbound)
                or any(s.governance() is not None for s in cfg.static.services))


def hot_restart_path(cfg: Config) -> str:
    """The hot-restart UDS: configured, or derived (state_base)."""
    if cfg.hot_restart.socket:
        return cfg.hot_restart.socket
    return state_base(cfg) + ".restart"


def check_paths(cfg: Config) -> list[str]:
    """What would make this config fail on this host before it serves: the
    directories of the sockets and files it writes (`octo-proxy validate`)."""
    problems: list[str] = []

    def check(key: str, path: str | None, private: bool = False) -> None:
        if not path:
            return
        d = os.path.dirname(os.path.abspath(path))
        try:
            (check_private_dir if private else check_writable_dir)(d)
        except UnsafePath as e:
            problems.append(f"{key}: {path}: {e}")

    if cfg.hot_restart.socket:
        check("hot_restart.socket", cfg.hot_restart.socket, private=True)
    else:  # the runtime directory: private if it exists, else creatable
        d = runtime_dir_path()
        try:
            if os.path.lexists(d):
                check_private_dir(d)
            else:
                parent = os.path.dirname(d)
                while not os.path.lexists(parent):
                    parent = os.path.dirname(parent)
                check_writable_dir(parent)
        except UnsafePath as e:
            problems.append(f"hot_restart.socket (derived, {d}): {e}")
    check("hot_restart.pid_file", cfg.hot_restart.pid_file)
    for i, ob in enumerate(cfg.listeners.outbound):
        check(f"listeners.outbound[{i}].path", ob.path)
    check("subscribe.uds", cfg.subscribe.uds)
    check("subscribe.state_file", cfg.subscribe.state_file)
    check("admin.uds", cfg.admin.uds)
    return problems


class Proxy:
    """One generation of the proxy inside one process."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        from octoproxy import auth
        from octoproxy._core.route import RouteTable
        from octoproxy.keyring import Keyring

        self.cfg = cfg
        self.config_path = config_path
        # service authentication (docs/auth.md): tokens stay in the core's
        # TokenStore and Signers/Verifiers, never in handed-over state or dumps
        self._tokens = auth.load(cfg)
        if auth.uses_tokens(cfg) and not auth.no_core_dumps():
            log.warning("auth: could not turn core dumps off (RLIMIT_CORE): a crash could "
                        "write tokens to disk")
        # the keyring owns them and applies run-time changes (SDS, RBAC: keyring.py)
        self.keyring = Keyring(cfg, self._tokens)
        self.startup = StartupGate()  # what a generation awaits before it accepts
        # the tokens as the core uses them, changed at run time (auth.py)
        self.auth_store: Any = self.keyring.store
        self.signers: dict[str, Any] = {}    # outbound listener path -> its Signer
        self.verifiers: dict[str, Any] = {}  # inbound listener key -> its Verifier
        self.table = RouteTable(cfg.node.labels())
        self.gov: Any = None
        if _needs_governance(cfg):
            from octoproxy.governance import Manager

            self.gov = Manager.from_config(cfg, self.table, asyncio.get_running_loop())
            self.table.gov_hook = self.gov.on_build
        self.table.replace_all([s.to_model() for s in cfg.static.services])
        for scope, rules in cfg.shunting.rules().items():
            # the config's rules; xDS may replace a scope's later (docs/shunting.md)
            self.table.update_shunting(scope, rules)
        self._engine: Engine | None = None
        self.sockets: dict[str, socket.socket] = {}  # kept open: servers listen on dups
        self.servers: list[asyncio.AbstractServer] = []
        self.connector: Connector | None = None
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.generation = 1
        self.xds: XdsClient | None = None
        self.discovery: XdsClient | StaticDiscovery | None = None
        self.subscribe_api: SubscribeApi | None = None
        self.admin: AdminServer | None = None
        self.draining = False
        self.handed_over = False  # sockets belong to a newer generation now
        self.inherited_state: dict[str, Any] = {}
        self.fd_limit_hits = 0  # 1 s checks at the fd limit (listeners.FdWatch)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the proxy has not started")
        return self._engine

    # -- hot restart hooks (hotrestart.py)

    def handover_state(self) -> dict[str, Any]:
        """What the next generation needs beyond the sockets: subscriptions,
        the last good routes (so it serves even with the control plane down),
        the counters (so stats continue) and governance's buckets, counters
        and ejections (docs/governance.md)."""
        eng = self._engine
        state: dict[str, Any] = {
            "counters": eng.counters() if eng is not None else {},
            "subscriptions": sorted(self.discovery.subscriptions) if self.discovery else [],
            # apps registered through the subscribe API for signing (names only)
            "registered": self.keyring.registered(),
        }
        if self.xds is not None:
            svcs = [self.xds.service(a) for a in self.xds.subscriptions]
            state["services"] = services_to_json([x for x in svcs if x is not None])
        if self.gov is not None:
            state["governance"] = self.gov.handover()
        # traffic-shunting rules from xDS (the config's own come from the
        # next generation's config) and every rule's counters (docs/shunting.md)
        from octoproxy.xds.shunting import rule_to_dict

        static_scopes = set(self.cfg.shunting.rules())
        state["shunting"] = {scope: [rule_to_dict(r) for r in self.table.shunting_rules(scope)]
                             for scope in self.table.shunting_scopes()
                             if scope not in static_scopes}
        state["shunt_counts"] = [[s["scope"], s["name"], s["hits"], s["fallbacks"], s["rejects"]]
                                 for s in self.table.shunting_stats()]
        if eng is not None:
            state["histogram"] = eng.histogram_state()
            state["nodes"] = [[a, n.address, n.picks, n.answers_by_status()]
                              for a in self.table.appkeys() for n in self.table.nodes(a)
                              if n.picks or n.answers_by_status()]
        return state

    def restore_counts(self, state: dict[str, Any]) -> None:
        """After start(): continue the previous generation's counters."""
        self.engine.restore_counters(state.get("counters", {}))
        self.engine.restore_histogram(state.get("histogram", {}))
        nodes = {(a, n.address): n for a in self.table.appkeys() for n in self.table.nodes(a)}
        for appkey, address, picks, answers in state.get("nodes", []):
            node = nodes.get((appkey, address))
            if node is not None:
                node.add_counts(picks, answers)
        if self.gov is not None:
            self.gov.restore(state.get("governance") or {})
        for scope, name, hits, fallbacks, rejects in state.get("shunt_counts", []):
            st = self.table.shunt_stat(scope, name)
            if st is not None:
                st.hits += hits
                st.fallbacks += fallbacks
                st.rejects += rejects

    def restore_state(self, state: dict[str, Any]) -> None:
        """Before start(): the previous generation's routes and subscriptions."""
        self.inherited_state = state
        static = {s.appkey for s in self.cfg.static.services}
        for svc in services_from_json(state.get("services", [])):
            if svc.appkey not in static:
                self.table.update_service(svc)
        from octoproxy.xds.shunting import rules_from_list

        static_rules = set(self.cfg.shunting.rules())
        for scope, rules in state.get("shunting", {}).items():
            if scope in static_rules:
                continue  # this generation's config has its own rules for it
            try:
                self.table.update_shunting(scope, rules_from_list(scope, rules, "handed over"))
            except ValueError as e:  # e.g. a check this version added
                log.warning("shunting rules of %s from the previous generation dropped: %s",
                            scope, e)

    def open_sockets(self, inherited: dict[str, socket.socket] | None = None) -> None:
        """Listening sockets: taken over from the previous generation when
        given, opened here otherwise."""
        given: dict[str, socket.socket | None] = dict(inherited or {})
        for ob in self.cfg.listeners.outbound:
            key = listener_key_outbound(ob.path)
            self.sockets[key] = given.pop(key, None) or open_outbound(ob)
        for ib in self.cfg.listeners.inbound:
            key = listener_key_inbound(ib.host, ib.port)
            self.sockets[key] = given.pop(key, None) or open_inbound(ib)
        sub = self.cfg.subscribe
        if sub.port is not None or sub.uds:
            key = f"sub:{sub.uds or f'{sub.host}:{sub.port}'}"
            self.sockets[key] = given.pop(key, None) or open_http_socket(sub.host, sub.port, sub.uds)
        adm = self.cfg.admin
        if adm.port is not None or adm.uds:
            key = f"admin:{adm.uds or f'{adm.host}:{adm.port}'}"
            self.sockets[key] = given.pop(key, None) or open_http_socket(adm.host, adm.port, adm.uds)
        for key, left in given.items():  # no longer in the config
            log.info("closing inherited listener %s (not in the config any more)", key)
            if left is not None:
                left.close()

    async def start(self, inherited: dict[str, socket.socket] | None = None) -> None:
        from octoproxy._core.datapath import Engine

        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.connector = Connector(loop, cfg.upstream.connect_timeout_ms / 1000)
        self._engine = Engine(
            self.table, loop, self.connector, logging.getLogger("octoproxy.datapath"),
            cfg.limits, cfg.upstream,
        )
        if not self.sockets:
            self.open_sockets(inherited)
        engine = self.engine
        self._register_startup()
        # a new generation with startup dependencies (what it cannot be
        # handed over, e.g. tokens from the control plane) accepts only once
        # every one is in: the listening sockets are shared with the running
        # generation, so accepting earlier took a share of the new
        # connections and failed them while it waited (with tokens: status 7,
        # unknown caller / not allowed, 396 of 2,100 calls).  A first start
        # has no one else to answer: it accepts at once
        hold = self.generation > 1 and bool(self.startup)
        if not hold:
            await self._serve()
        self._tasks.append(loop.create_task(self._idle_loop()))
        if self.keyring.token_file:
            # a changed token file applies at once (docs/auth.md)
            self._tasks.append(loop.create_task(self.keyring.watch_file()))
        if cfg.logging.access_log:
            access = logging.getLogger("octoproxy.access")
            engine.access_sample = cfg.logging.access_log_sample

            def access_line(svc: str, st: int, up: str, lat: float, rule: str) -> None:
                # rule: the shunting rule that routed it (docs/shunting.md), "-" for none
                access.info("service=%s status=%d upstream=%s latency_ms=%.3f rule=%s",
                            svc, st, up, lat * 1000, rule or "-",
                            extra={"fields": {"service": svc, "status": st, "upstream": up,
                                              "latency_ms": round(lat * 1000, 3),
                                              "rule": rule}})

            engine.access_log = access_line
        await self._start_discovery()
        await self._await_startup()
        if hold:
            await self._serve()
        await self._start_admin()
        self.ready.set()
        log.info(
            "ready: %d outbound, %d inbound listener(s), %d static service(s)",
            len(cfg.listeners.outbound), len(cfg.listeners.inbound), len(cfg.static.services),
        )

    async def _serve(self) -> None:
        """Accept on the data path's listeners.  The servers get duplicates:
        closing a server closes its socket, and this generation keeps the
        originals to hand over, or to serve again after a failed handover."""
        loop = asyncio.get_running_loop()
        engine = self.engine
        for ob in self.cfg.listeners.outbound:
            sock = self.sockets[listener_key_outbound(ob.path)].dup()
            signer = self.keyring.signer(ob)
            if signer is not None:
                self.signers[ob.path] = signer
            # the backlog again: create_*_server(sock=...) re-listens with its own (100)
            self.servers.append(await loop.create_unix_server(
                functools.partial(engine.outbound, signer), sock=sock, backlog=ob.backlog))
        for ib in self.cfg.listeners.inbound:
            sock = self.sockets[listener_key_inbound(ib.host, ib.port)].dup()
            gov = self.gov.service_gov(ib.appkey) if self.gov is not None and ib.appkey else None
            verifier = self.keyring.verifier(ib)
            if verifier is not None:
                self.verifiers[listener_key_inbound(ib.host, ib.port)] = verifier
            factory = functools.partial(engine.inbound, ib.upstream_uds, gov, verifier=verifier)
            self.servers.append(await loop.create_server(factory, sock=sock, backlog=ib.backlog))

    def _sock(self, prefix: str) -> socket.socket | None:
        for k, v in self.sockets.items():
            if k.startswith(prefix):
                return v.dup()
        return None

    async def _start_discovery(self) -> None:
        """Subscriptions and the subscribe API; with a control plane, restore
        (and wait for) the persisted and handed-over subscriptions first, so
        the proxy is ready only when it serves the same services as before.
        A proxy with static routes and no subscribe endpoint needs neither
        (nor their imports: a new generation starts faster)."""
        cfg = self.cfg
        sock = self._sock("sub:")
        if not cfg.xds.server and sock is None:
            return
        from octoproxy.subscribe import StaticDiscovery, SubscribeApi

        if cfg.xds.server:
            from octoproxy.xds.client import XdsClient

            self.xds = XdsClient.from_config(cfg, self.table)
            if cfg.auth.source == "xds":
                from octoproxy.xds.authsource import attach

                attach(self.xds, self.keyring)  # tokens (SDS) and ACLs (RBAC) on the stream
            self.xds.start()
            self.discovery = self.xds
        else:
            self.discovery = StaticDiscovery(self.table, cfg.xds.max_subscriptions)
        api = SubscribeApi(self.discovery, host=cfg.subscribe.host, port=cfg.subscribe.port,
                           uds=cfg.subscribe.uds, state_file=subscription_file(cfg),
                           timeout_s=cfg.subscribe.timeout_s, keyring=self.keyring)
        self.subscribe_api = api
        inherited = self.inherited_state.get("subscriptions", [])
        # routes handed over by the previous generation serve at once; do not
        # hold readiness for a control plane that may be down
        wait = 0.0 if self.inherited_state.get("services") else None
        await api.start(restore_timeout_s=wait, appkeys=inherited, sock=sock,
                        registered=self.inherited_state.get("registered", []))

    def _register_startup(self) -> None:
        """This generation's startup dependencies (docs/operating.md)."""
        if self.cfg.auth.source == "xds" and "auth" not in self.startup.names():
            # tokens and ACLs are never handed over: fetched again; sign and
            # verify from the first request when the control plane is up,
            # without them requests are refused (status 7) until they come
            self.startup.add(Dependency(
                "auth", "not received from the control plane", self.keyring.missing,
                self.keyring.changed, without="requests that need them are refused with status 7"))

    async def _await_startup(self) -> None:
        """Wait for every startup dependency, subscribe.timeout_s in all.  A
        new generation that has not got them all fails (the running one
        keeps serving, with what it holds); a first start serves and logs
        what is missing."""
        gate = self.startup
        if not gate:
            return
        t = self.cfg.subscribe.timeout_s
        missing = await gate.wait(t)
        if missing and self.generation > 1:
            raise TimeoutError(
                f"startup: not ready within {t:g} s (subscribe.timeout_s), so the running "
                f"generation keeps serving: {gate.describe(missing)}")
        if missing:
            log.warning("startup: not ready within %g s (subscribe.timeout_s), serving without: %s",
                        t, gate.describe(missing, consequences=True))

    async def _start_admin(self) -> None:
        sock = self._sock("admin:")
        if sock is None:
            return
        from octoproxy.admin import AdminServer

        self.admin = AdminServer(self)
        await self.admin.start(sock)

    async def _idle_loop(self) -> None:
        from octoproxy.listeners import FdWatch

        period = min(1.0, self.cfg.upstream.idle_timeout_s / 4)
        fd_watch = FdWatch()
        while True:
            await asyncio.sleep(period)
            self.engine.idle_sweep()
            self.engine.conn_sweep()
            fd_watch.check()
            self.fd_limit_hits = fd_watch.hits

    async def stop_accepting(self, keep_sockets: bool = False) -> None:
        """Stop accepting on the data path.  Unless keep_sockets (a hot
        restart that may still fail), close the listening sockets too, so
        that new connections are refused rather than queued."""
        for srv in self.servers:
            srv.close()
        self.servers.clear()
        if not keep_sockets:
            for key, s in self.sockets.items():
                if key.startswith(("uds:", "tcp:")):
                    s.close()

    async def release_listeners(self) -> None:
        """Hot restart: the new generation serves every listener now (data
        path, subscribe API, admin); this one stops accepting on all of them
        and keeps the sockets (resume_listeners)."""
        await self.stop_accepting(keep_sockets=True)
        if self.subscribe_api is not None:
            await self.subscribe_api.stop()
        if self.admin is not None:
            await self.admin.close()

    async def resume_listeners(self) -> None:
        """The new generation failed after release_listeners(): accept again."""
        await self._serve()
        if self.subscribe_api is not None:
            sock = self._sock("sub:")
            if sock is not None:
                await self.subscribe_api.listen(sock)
        if self.admin is not None:
            sock = self._sock("admin:")
            if sock is not None:
                await self.admin.start(sock)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight (True) or the timeout passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.engine.in_flight() > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def drain(self) -> None:
        """The old generation after a handover: make every client move to the
        new one, deliver what is still owed, then return (the process exits)."""
        cfg = self.cfg.hot_restart
        loop = asyncio.get_running_loop()
        self.draining = True
        self.engine.start_drain()
        deadline = loop.time() + cfg.drain_s
        # ProxyRestart to client-side proxies, spread so that a thousand peers
        # do not reconnect in the same millisecond
        peers = [c for c in self.engine.inbound_conns() if c.is_proxy]
        for i, c in enumerate(peers):
            loop.call_later(cfg.proxy_restart_spread_s * i / max(1, len(peers)), c.send_proxy_restart)
        spread_end = loop.time() + cfg.proxy_restart_spread_s
        while loop.time() < deadline:
            if loop.time() >= spread_end:
                self.engine.send_proxy_restarts()  # peers that announced themselves late
            if (self.engine.in_flight() == 0 and not self.engine.outbound_conns()
                    and not any(c.is_proxy for c in self.engine.inbound_conns())):
                # in the same step as the check: legacy clients left on the
                # inbound ports must not get a request read (and executed)
                # whose answer would be lost when this process exits
                self.engine.close_clients()
                break
            await asyncio.sleep(0.01)
        else:
            await self._drain_overtime()
            return
        log.info("drain: nothing left in flight; exiting")

    async def _drain_overtime(self) -> None:
        """drain_s has passed.  What is owed upstream is answered now (status
        4).  Requests read on inbound connections are being executed by the
        provider, and only it can answer them: ending their connections now
        would lose the answers of executed requests (a client that sends
        again executes them twice), so their answers are waited for, at
        most hot_restart.shutdown_s more (requests whose callers' deadlines
        have passed are not waited for)."""
        eng = self.engine
        cfg = self.cfg.hot_restart
        n = eng.fail_in_flight("octo-proxy restarted: no answer came within its drain time")
        if n:
            log.warning("drain: answered %d request(s) still in flight upstream after %.1f s "
                        "with status 4", n, cfg.drain_s)
        left = eng.in_flight()
        if left:
            log.warning("drain: %d inbound request(s) still at the provider after %.1f s; "
                        "waiting for their answers (at most %.1f s, hot_restart.shutdown_s)",
                        left, cfg.drain_s, cfg.shutdown_s)
            if await self.wait_idle(cfg.shutdown_s):
                eng.close_clients()  # in the same step as the check, as above
                log.info("drain: nothing left in flight; exiting")
                return
            log.warning("drain: %d request(s) still in flight after %.1f s more",
                        eng.in_flight(), cfg.shutdown_s)
        else:
            log.info("drain: nothing left in flight after %.1f s; exiting", cfg.drain_s)

    async def close(self) -> None:
        await self.stop_accepting()
        if self.admin is not None:
            await self.admin.close()
        if self.subscribe_api is not None:
            await self.subscribe_api.stop()
        if self.xds is not None:
            await self.xds.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._engine is not None:
            await self._finish_data_path()
            self._engine.close_all()
        if self.gov is not None:
            await self.gov.close()
        if self.connector is not None:
            await self.connector.close()
        for key, s in self.sockets.items():
            s.close()
            path = key.split(":", 1)[1]
            if os.path.isabs(path) and not self.handed_over:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.sockets.clear()

    async def _finish_data_path(self) -> None:
        """Nothing the proxy has read goes unanswered: what is still owed
        upstream is answered now (status 4), then every app and inbound
        connection ends once its answers are written (at most 1 s)."""
        eng = self.engine
        n = eng.fail_in_flight("octo-proxy is shutting down: no answer came before it stopped")
        if n:
            log.warning("stopping: answered %d request(s) still in flight with status 4", n)
        # read nothing more, end each connection (FIN) once its answers are
        # written, and give the clients a moment to see them and close
        if eng.close_clients():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while (eng.outbound_conns() or eng.inbound_conns()) and loop.time() < deadline:
                await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """Graceful stop: stop accepting, answer new requests with status 6
        (shutting down), let what is in flight finish, then answer what is
        left and close (docs/operating.md, signals)."""
        await self.stop_accepting()
        self.engine.start_shutdown()
        if await self.wait_idle(self.cfg.hot_restart.shutdown_s):
            # nothing owed: read no request more (its answer would be lost)
            self.engine.close_clients()
        else:
            log.warning("shutdown: %d request(s) still in flight after %.1f s",
                        self.engine.in_flight(), self.cfg.hot_restart.shutdown_s)
        await self.close()


async def _main(cfg: Config, config_path: str | None, hot_restart_from: str | None) -> int:
    """One generation, from start to exit.  Everything that can fail is done
    before a predecessor lets go (docs/protocol.md section 13.4)."""
    loop = asyncio.get_running_loop()
    hr = cfg.hot_restart
    proxy = Proxy(cfg, config_path)
    pred: hotrestart.HotRestartChild | None = None
    parent: hotrestart.HotRestartParent | None = None
    pid_file = AtomicFile(hr.pid_file) if hr.pid_file else None
    try:
        hr_path = hot_restart_path(cfg)
        if hot_restart_from:
            pred = await hotrestart.HotRestartChild.connect(hot_restart_from, hr.start_timeout_s)
        if stop_pending():
            # nothing served yet: a predecessor keeps its listeners
            log.info("stopped (SIGTERM or SIGINT) before serving; exiting")
            if pred is not None:
                pred.close()
            return 0
        if pred is not None:
            proxy.generation = pred.handover.generation + 1
            proxy.open_sockets(pred.handover.sockets)
            proxy.restore_state(pred.handover.state)
        await proxy.start()
        if pred is not None:
            proxy.restore_counts(pred.handover.state)
        parent = hotrestart.HotRestartParent(
            hr_path, proxy, hr, _argv_without_hot_restart(sys.argv[1:]), predecessor=pred,
            pid_file=hr.pid_file)
        parent.bind()
        if pid_file is not None:
            pid_file.prepare()
        if pred is not None:
            await pred.ready(hr.start_timeout_s)
        # the predecessor stopped accepting: only renames are left
        parent.publish()
        if pid_file is not None:
            pid_file.commit(f"{os.getpid()}\n".encode())
        if pred is not None:
            await pred.serving()
    except (ListenerError, hotrestart.HotRestartError, OSError, TimeoutError) as e:
        log.error("cannot start: %s", e)
        if parent is not None:
            parent.close()
        if pid_file is not None:
            pid_file.discard()
        if pred is not None:
            pred.close()  # the predecessor keeps (or takes back) its listeners
            proxy.handed_over = True  # never unlink the paths it serves on
        await proxy.close()
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, parent.request_restart)
    parent.start()
    sd_notify(f"MAINPID={os.getpid()}", "READY=1", f"STATUS=serving (generation {proxy.generation})")
    log.info("generation %d serving (pid %d); hot restart socket %s",
             proxy.generation, os.getpid(), parent.path)
    # the signals were blocked until their handlers were in place: one that
    # arrived while this generation started is delivered (and honoured) now:
    # a SIGTERM after the listeners opened is an orderly stop, not a death
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    handed = loop.create_task(parent.handed_over.wait())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([handed, stopped], return_when=asyncio.FIRST_COMPLETED)
    if parent.handed_over.is_set():
        proxy.handed_over = True
        log.info("generation %d handed over; draining", proxy.generation)
        await proxy.drain()
        await proxy.close()
        parent.close(unlink=False)
        if parent.successor is not None:
            parent.successor.close()  # tells the new generation we are gone
    else:
        log.info("stopping")
        sd_notify("STOPPING=1")
        parent.close()
        await proxy.shutdown()
        remove_pid_file(hr.pid_file)
    for t in (handed, stopped):
        t.cancel()
    return 0


def stop_pending() -> bool:
    """A SIGTERM or SIGINT arrived (and waits, blocked) since the start."""
    return bool(signal.sigpending() & {signal.SIGTERM, signal.SIGINT})


def _argv_without_hot_restart(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--hot-restart-from":
            skip = True
            continue
        if a.startswith("--hot-restart-from="):
            continue
        out.append(a)
    return out


def run_proxy(cfg: Config, *, config_path: str | None = None, hot_restart_from: str | None = None,
              log_level: str | None = None) -> int:
    import uvloop

    # the default action of SIGUSR2, SIGTERM and SIGINT kills the process:
    # keep them blocked (pending) until the event loop's handlers are in
    # place (_main unblocks them).  `octo-proxy run` blocks them as its first
    # step, and a generation spawned by SIGUSR2 starts with them blocked.
    hold_signals()

    setup_logging(log_level or cfg.logging.level, cfg.logging.format,
                  repeat_burst=cfg.logging.repeat_burst, repeat_window_s=cfg.logging.repeat_window_s)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(cfg, config_path, hot_restart_from))
