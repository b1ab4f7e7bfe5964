"""The proxy process: route table + data path engine + listeners + signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

from octoproxy.config import Config
from octoproxy.listeners import ListenerError, open_inbound, open_outbound
from octoproxy.logs import setup_logging
from octoproxy.upstream import Connector

log = logging.getLogger("octoproxy")


def listener_key_outbound(path: str) -> str:
    return f"uds:{os.path.abspath(path)}"


def listener_key_inbound(host: str, port: int) -> str:
    return f"tcp:{host}:{port}"


class Proxy:
    """One generation of the proxy inside one process."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        from octoproxy._core.route import RouteTable

        self.cfg = cfg
        self.config_path = config_path
        self.table = RouteTable(cfg.node.labels())
        self.table.replace_all([s.to_model() for s in cfg.static.services])
        self.engine: Any = None
        self.sockets: dict[str, socket.socket] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.connector: Connector | None = None
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def open_sockets(self, inherited: dict[str, socket.socket] | None = None) -> None:
        """Listening sockets: taken over from the previous generation when
        given, opened here otherwise."""
        inherited = dict(inherited or {})
        for ob in self.cfg.listeners.outbound:
            key = listener_key_outbound(ob.path)
            self.sockets[key] = inherited.pop(key, None) or open_outbound(ob)
        for ib in self.cfg.listeners.inbound:
            key = listener_key_inbound(ib.host, ib.port)
            self.sockets[key] = inherited.pop(key, None) or open_inbound(ib)
        for key, s in inherited.items():  # no longer in the config
            log.info("closing inherited listener %s (not in the config any more)", key)
            s.close()

    async def start(self, inherited: dict[str, socket.socket] | None = None) -> None:
        from octoproxy._core.datapath import Engine

        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.connector = Connector(loop, cfg.upstream.connect_timeout_ms / 1000)
        self.engine = Engine(
            self.table, loop, self.connector, logging.getLogger("octoproxy.datapath"),
            max_frame=cfg.limits.max_frame_bytes,
            max_header=cfg.limits.max_header_bytes,
            max_inflight=cfg.limits.max_inflight_per_connection,
            max_connections=cfg.limits.max_connections,
            read_buffer=cfg.limits.read_buffer_bytes,
            high_water=cfg.limits.write_high_water,
            low_water=cfg.limits.write_low_water,
            max_unread=cfg.limits.max_unread_bytes,
            default_timeout=cfg.upstream.default_timeout_ms / 1000,
            max_timeout=cfg.upstream.max_timeout_ms / 1000,
            conns_per_node=cfg.upstream.connections_per_node,
            backoff_base=cfg.upstream.reconnect_backoff_base_ms / 1000,
            backoff_max=cfg.upstream.reconnect_backoff_max_ms / 1000,
            idle_timeout=cfg.upstream.idle_timeout_s,
            connect_timeout=cfg.upstream.connect_timeout_ms / 1000,
        )
        if not self.sockets:
            self.open_sockets(inherited)
        engine = self.engine
        for ob in cfg.listeners.outbound:
            sock = self.sockets[listener_key_outbound(ob.path)]
            self.servers.append(await loop.create_unix_server(engine.downstream, sock=sock))
        for ib in cfg.listeners.inbound:
            sock = self.sockets[listener_key_inbound(ib.host, ib.port)]
            path = ib.upstream_uds
            self.servers.append(
                await loop.create_server(lambda p=path: engine.inbound(p), sock=sock)
            )
        self._tasks.append(loop.create_task(self._idle_loop()))
        self.ready.set()
        log.info(
            "ready: %d outbound, %d inbound listener(s), %d static service(s)",
            len(cfg.listeners.outbound), len(cfg.listeners.inbound), len(cfg.static.services),
        )

    async def _idle_loop(self) -> None:
        period = min(1.0, self.cfg.upstream.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.engine.idle_sweep()

    async def stop_accepting(self) -> None:
        for srv in self.servers:
            srv.close()
        self.servers.clear()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight (True) or the timeout passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.engine.in_flight() > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        await self.stop_accepting()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine is not None:
            self.engine.close_all()
        if self.connector is not None:
            await self.connector.close()
        for key, s in self.sockets.items():
            s.close()
            if key.startswith("uds:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(key[4:])
        self.sockets.clear()

    async def shutdown(self) -> None:
        """Graceful stop: stop accepting, let what is in flight finish, close."""
        await self.stop_accepting()
        if not await self.wait_idle(self.cfg.hot_restart.shutdown_s):
            log.warning("shutdown: %d request(s) still in flight after %.1f s",
                        self.engine.in_flight(), self.cfg.hot_restart.shutdown_s)
        await self.close()


async def _main(cfg: Config, config_path: str | None, hot_restart_from: str | None) -> int:
    loop = asyncio.get_running_loop()
    proxy = Proxy(cfg, config_path)
    try:
        await proxy.start()
    except ListenerError as e:
        log.error("%s", e)
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await proxy.shutdown()
    return 0


def run_proxy(cfg: Config, *, config_path: str | None = None, hot_restart_from: str | None = None,
              log_level: str | None = None) -> int:
    import uvloop

    setup_logging(log_level or cfg.logging.level, cfg.logging.format)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(cfg, config_path, hot_restart_from))
