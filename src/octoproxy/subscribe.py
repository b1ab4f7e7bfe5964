"""The subscribe API local apps call, and the persisted subscription set.

HTTP (aiohttp) on ``subscribe.host:subscribe.port`` or on the UDS ``subscribe.uds``:

- ``POST /v1/subscribe {"appkeys": [...], "timeout_s": 5}`` answers only once
  every requested service has its endpoints: 200 with the services; 404
  ``unknown service X`` when the control plane says X does not exist (or it
  timed out; those new subscriptions are dropped again); 503 ``control plane
  unreachable`` when the xDS stream is down at the deadline; 504 when the
  stream is up but the endpoints did not come in time.  ``timeout_s`` is
  optional (default and cap: ``subscribe.timeout_s``).
- ``POST /v1/unsubscribe {"appkeys": [...]}``.
- ``GET /v1/subscriptions``.

Subscriptions are written atomically (tmp + fsync + rename + fsync of the
directory) to ``subscribe.state_file`` and restored by `SubscribeApi.start`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from octoproxy import model
from octoproxy.listeners import replace_stale_uds
from octoproxy.xds.client import ResourceState, XdsClient
from octoproxy.xds.sink import RouteSink

if TYPE_CHECKING:
    from octoproxy.config import Subscribe

log = logging.getLogger("octoproxy.subscribe")

STATE_VERSION = 1
MAX_APPKEYS = 10_000


class SubscribeError(Exception):
    """A subscribe request that cannot be satisfied; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, appkeys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.appkeys = sorted(appkeys)

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "appkeys": self.appkeys}


def read_state(path: str | os.PathLike[str]) -> list[str]:
    """The appkeys in a state file ([] if there is none; a corrupt file is logged and ignored)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable subscription state %s: %s", path, e)
        return []
    keys = data.get("appkeys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        log.warning("ignoring malformed subscription state %s", path)
        return []
    return keys


def write_state(path: str | os.PathLike[str], appkeys: Iterable[str]) -> None:
    """Atomically replace the state file: write a temp file, fsync, rename, fsync the directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    body = json.dumps({"version": STATE_VERSION, "appkeys": sorted(appkeys)}, indent=1) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StaticDiscovery:
    """Stands in for the xDS client when there is no control plane (``xds.server``
    unset): a service is known if the route table has it (static config)."""

    connected = True

    def __init__(self, sink: RouteSink) -> None:
        self.sink = sink
        self._subs: set[str] = set()

    @property
    def subscriptions(self) -> frozenset[str]:
        return frozenset(self._subs)

    def subscribe(self, appkeys: Iterable[str]) -> set[str]:
        added = set(appkeys) - self._subs
        self._subs |= added
        return added

    def unsubscribe(self, appkeys: Iterable[str]) -> set[str]:
        removed = set(appkeys) & self._subs
        self._subs -= removed
        return removed

    def state(self, appkey: str) -> ResourceState | None:
        if appkey not in self._subs:
            return None
        return ResourceState.READY if self.sink.has_service(appkey) else ResourceState.MISSING

    def service(self, appkey: str) -> model.Service | None:
        return None

    async def wait_for(
        self, appkeys: Iterable[str], timeout: float
    ) -> dict[str, ResourceState | None]:
        return {k: self.state(k) for k in appkeys}


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


class SubscribeApi:
    """Subscriptions on top of an `XdsClient`, with persistence and the HTTP API."""

    def __init__(
        self,
        client: XdsClient | StaticDiscovery,
        *,
        sink: RouteSink | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        uds: str | None = None,
        state_file: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.client = client
        # services another source (static config) put in the route table count as known
        self.sink = sink if sink is not None else client.sink
        self.host = host
        self.port = port
        self.uds = uds
        self.state_file = state_file
        self.timeout_s = timeout_s
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()
        self._want_gen = 0
        self._written_gen = 0

    @classmethod
    def from_config(cls, cfg: Subscribe, client: XdsClient | StaticDiscovery) -> SubscribeApi:
        return cls(
            client,
            host=cfg.host,
            port=cfg.port,
            uds=cfg.uds,
            state_file=cfg.state_file,
            timeout_s=cfg.timeout_s,
        )

    # --- lifecycle ------------------------------------------------------------

    async def start(
        self,
        restore_timeout_s: float | None = None,
        listen: bool = True,
        appkeys: Iterable[str] = (),
        sock: socket.socket | None = None,
    ) -> dict[str, ResourceState | None]:
        """Restore the persisted subscriptions (plus ``appkeys``, e.g. handed over
        by a hot restart), start listening, then wait (up to restore_timeout_s,
        default subscribe.timeout_s) for the restored services.

        Never fails because of the control plane: restored services that did not
        come stay subscribed and arrive when it is back.  Returns their states.
        """
        restored = read_state(self.state_file) if self.state_file else []
        restored = sorted(set(restored) | set(appkeys))
        if restored:
            log.info("restoring %d subscriptions from %s", len(restored), self.state_file)
            self.client.subscribe(restored)
        if listen and (sock is not None or self.port is not None or self.uds):
            await self._listen(sock)
        if not restored:
            return {}
        timeout = self.timeout_s if restore_timeout_s is None else restore_timeout_s
        if timeout <= 0:  # routes are already in place (hot restart hand-over)
            return {k: self.client.state(k) for k in restored}
        states = await self.client.wait_for(restored, timeout)
        late = sorted(k for k, s in states.items() if s is not ResourceState.READY)
        if late:
            log.warning(
                "%d restored services not ready after %.1fs (still subscribed): %s",
                len(late),
                timeout,
                ", ".join(late[:10]),
            )
        return states

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/subscribe", self._h_subscribe)
        app.router.add_post("/v1/unsubscribe", self._h_unsubscribe)
        app.router.add_get("/v1/subscriptions", self._h_subscriptions)
        return app

    async def _listen(self, sock: socket.socket | None = None) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site: web.BaseSite
        if sock is not None:  # opened by the proxy (and handed over on hot restart)
            site = web.SockSite(runner, sock)
        elif self.uds:
            replace_stale_uds(self.uds)
            site = web.UnixSite(runner, self.uds)
        else:
            site = web.TCPSite(runner, self.host, self.port or 0)
        await site.start()
        if sock is not None and sock.family != socket.AF_UNIX:
            self.port = sock.getsockname()[1]
        elif not self.uds:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
        self._runner = runner
        log.info("subscribe API on %s", self.uds or f"{self.host}:{self.port}")

    # --- operations -------------------------------------------------------------

    @property
    def subscriptions(self) -> list[str]:
        return sorted(self.client.subscriptions)

    async def persist(self) -> None:
        """Write the current subscription set (coalesced; returns once it is on disk)."""
        if not self.state_file:
            return
        self._want_gen += 1
        gen = self._want_gen
        async with self._lock:
            if self._written_gen >= gen:
                return
            latest, keys = self._want_gen, self.subscriptions
            try:
                await asyncio.to_thread(write_state, self.state_file, keys)
            except OSError as e:
                log.error("cannot persist subscriptions to %s: %s", self.state_file, e)
                return
            self._written_gen = latest

    async def subscribe(
        self, appkeys: Iterable[str], timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Subscribe and wait for the endpoints; raises SubscribeError (404/503/504)."""
        keys = sorted(set(appkeys))
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        added = self.client.subscribe(keys)
        if added:
            await self.persist()
        states = await self.client.wait_for(keys, timeout)
        known = {k for k, s in states.items() if s is not ResourceState.READY and self._static(k)}
        missing = sorted(
            k for k, s in states.items() if s in (ResourceState.MISSING, None) and k not in known
        )
        pending = sorted(
            k for k, s in states.items() if s is ResourceState.PENDING and k not in known
        )
        if missing:
            dropped = self.client.unsubscribe(added & set(missing))
            if dropped:
                await self.persist()
            raise SubscribeError(404, f"unknown service {', '.join(missing)}", missing)
        if pending:
            if not self.client.connected:
                raise SubscribeError(503, "control plane unreachable", pending)
            raise SubscribeError(
                504, f"timed out after {timeout:g}s waiting for {', '.join(pending)}", pending
            )
        return {"appkeys": keys, "services": {k: self._describe(k) for k in keys}}

    async def unsubscribe(self, appkeys: Iterable[str]) -> list[str]:
        removed = self.client.unsubscribe(appkeys)
        if removed:
            await self.persist()
        return sorted(removed)

    def _static(self, appkey: str) -> bool:
        try:
            return bool(self.sink.has_service(appkey))
        except Exception:
            log.exception("route table has_service(%r) failed", appkey)
            return False

    def _describe(self, appkey: str) -> dict[str, Any]:
        st = self.client.state(appkey)
        svc = self.client.service(appkey)
        if svc is not None:
            return {"state": st.value if st is not None else "unsubscribed",
                    "endpoints": len(svc.endpoints)}  # fmt: skip
        if st is not ResourceState.READY and self._static(appkey):
            return {"state": "static", "endpoints": None}
        return {"state": st.value if st is not None else "unsubscribed", "endpoints": None}

    # --- HTTP -------------------------------------------------------------------

    async def _appkeys(self, request: web.Request) -> tuple[list[str], float | None] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("body must be JSON")
        if not isinstance(body, dict):
            return _bad('body must be a JSON object {"appkeys": [...]}')
        keys = body.get("appkeys")
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and k and len(k) <= 512 for k in keys)
        ):
            return _bad("appkeys must be a non-empty list of non-empty strings")
        if len(keys) > MAX_APPKEYS:
            return _bad(f"at most {MAX_APPKEYS} appkeys per request")
        t = body.get("timeout_s")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or t <= 0):
            return _bad("timeout_s must be a positive number")
        return keys, (float(t) if t is not None else None)

    async def _h_subscribe(self, request: web.Request) -> web.Response:
        parsed = await self._appkeys(request)
        if isinstance(parsed, web.Response):
            return parsed
        keys, timeout = parsed
        t0 = time.monotonic()
        try:
            result = await self.subscribe(keys, timeout)
        except SubscribeError as e:
            return web.json_response(e.to_json(), status=e.status)
        result["elapsed_ms"] = round((time.monotonic() - t0) * 1000, 1)
        return web.json_response(result)

    async def _h_unsubscribe(self, request: web.Request) -> web.Response:
        parsed = await self._appkeys(request)
        if isinstance(parsed, web.Response):
            return parsed
        removed = await self.unsubscribe(parsed[0])
        return web.json_response({"appkeys": removed, "subscriptions": self.subscriptions})

    async def _h_subscriptions(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "connected": self.client.connected,
                "subscriptions": {k: self._describe(k) for k in self.subscriptions},
            }
        )
