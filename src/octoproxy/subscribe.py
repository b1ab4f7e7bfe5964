"""The subscribe API local apps call, and the persisted subscription set.

HTTP (aiohttp) on ``subscribe.host:subscribe.port`` or on the UDS ``subscribe.uds``:

- ``POST /v1/subscribe {"appkeys": [...], "timeout_s": 5}`` answers only once
  every requested service has its endpoints: 200 with the services; 404
  ``unknown service X`` when the control plane says X does not exist (or its
  resource timeout ran out); 502 when the control plane sent X but it was
  rejected; 503 ``control plane unreachable`` when the xDS stream is down at
  the deadline; 504 when the stream is up but the endpoints did not come in
  time; 400 for a bad body or appkey; 429 beyond ``xds.max_subscriptions``.
  A call that does not answer 200 leaves nothing subscribed (the names it
  added are dropped again, unless another call still waits for them) and
  nothing persisted.  ``timeout_s`` is optional (default and cap:
  ``subscribe.timeout_s``; a finite number in (0, 600]).
- ``POST /v1/unsubscribe {"appkeys": [...]}``.
- ``GET /v1/subscriptions``.
- ``POST /v1/register {"appkey": ...}`` / ``POST /v1/unregister``: an app
  registers its own appkey, and the outbound listeners with
  ``sign_registered`` sign for it (docs/auth.md, "Apps that register
  themselves"); persisted with the subscriptions.

Subscriptions are written atomically (tmp + fsync + rename + fsync of the
directory) to ``subscribe.state_file`` and restored by `SubscribeApi.start`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from octoproxy import model
from octoproxy.listeners import replace_stale_uds
from octoproxy.process import AtomicFile
from octoproxy.xds.client import (
    DEFAULT_MAX_SUBSCRIPTIONS,
    ResourceState,
    SubscriptionError,
    XdsClient,
    new_subscriptions,
)
from octoproxy.xds.resources import appkey_problem
from octoproxy.xds.sink import RouteSink

if TYPE_CHECKING:
    from octoproxy.config import Subscribe
    from octoproxy.keyring import Keyring

log = logging.getLogger("octoproxy.subscribe")

STATE_VERSION = 1
MAX_APPKEYS = 10_000  # per request
MAX_TIMEOUT_S = 600.0  # a timeout_s above this is an error, not a wish
MAX_REGISTERED = 1024  # apps registered for signing (each may be a secret subscribed to)


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


def read_registered(path: str | os.PathLike[str]) -> list[str]:
    """The apps registered for signing in a state file ([] if none or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    keys = data.get("registered", []) if isinstance(data, dict) else []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        log.warning("ignoring malformed registered apps in %s", path)
        return []
    return keys


def write_state(path: str | os.PathLike[str], appkeys: Iterable[str],
                registered: Iterable[str] = ()) -> None:
    """Atomically replace the state file, never writing through a symlink or a
    file someone else prepared (process.AtomicFile: O_EXCL temp file, fsync,
    rename, fsync the directory)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"version": STATE_VERSION, "appkeys": sorted(appkeys)}
    reg = sorted(registered)
    if reg:
        state["registered"] = reg
    body = json.dumps(state, indent=1) + "\n"
    AtomicFile(str(p)).commit(body.encode())


class StaticDiscovery:
    """Stands in for the xDS client when there is no control plane (``xds.server``
    unset): a service is known if the route table has it (static config)."""

    connected = True

    def __init__(self, sink: RouteSink, max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS) -> None:
        self.sink = sink
        self.max_subscriptions = max_subscriptions
        self._subs: set[str] = set()

    @property
    def subscriptions(self) -> frozenset[str]:
        return frozenset(self._subs)

    def check(self, appkeys: Iterable[str]) -> list[str]:
        return new_subscriptions(self._subs, appkeys, self.max_subscriptions)

    def subscribe(self, appkeys: Iterable[str]) -> set[str]:
        added = set(self.check(appkeys))
        self._subs |= added
        return added

    def unsubscribe(self, appkeys: Iterable[str]) -> set[str]:
        removed = set(appkeys) & self._subs
        self._subs -= removed
        return removed

    def error(self, appkey: str) -> str:
        return ""

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
        keyring: Keyring | None = None,
    ) -> None:
        self.client = client
        # apps register here to be signed for (docs/auth.md): the proxy's keyring
        self.keyring = keyring
        self._registering: set[str] = set()  # registrations not confirmed yet
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
        # names added by calls still waiting (not persisted; dropped again if
        # every call waiting for them fails) -> how many calls wait for them
        self._tentative: dict[str, int] = {}

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
        registered: Iterable[str] = (),
    ) -> dict[str, ResourceState | None]:
        """Restore the persisted subscriptions (plus ``appkeys``, e.g. handed over
        by a hot restart), start listening, then wait (up to restore_timeout_s,
        default subscribe.timeout_s) for the restored services.

        Never fails because of the control plane: restored services that did not
        come stay subscribed and arrive when it is back.  Returns their states.
        """
        self._restore_registered(registered)
        restored = read_state(self.state_file) if self.state_file else []
        restored = sorted(set(restored) | set(appkeys))
        bad = [k for k in restored if appkey_problem(k) is not None]
        if bad:
            log.warning(
                "dropping %d restored subscriptions that are not valid appkeys: %s",
                len(bad),
                ", ".join(repr(k[:80]) for k in bad[:5]),
            )
            restored = [k for k in restored if appkey_problem(k) is None]
        if restored:
            log.info("restoring %d subscriptions from %s", len(restored), self.state_file)
            try:
                self.client.subscribe(restored)
            except SubscriptionError as e:
                # a state file written under a higher limit: keep what fits
                log.error("cannot restore every subscription (%s): restoring the first ones", e)
                keep: list[str] = []
                for k in restored:
                    try:
                        self.client.subscribe([k])
                    except SubscriptionError:
                        break
                    keep.append(k)
                restored = keep
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

    def _restore_registered(self, handed_over: Iterable[str]) -> None:
        """The apps registered for signing before (state file, hot restart)."""
        reg = set(handed_over)
        if self.state_file:
            reg |= set(read_registered(self.state_file))
        if not reg:
            return
        kr = self.keyring
        if kr is None or not kr.accepts_registrations:
            log.warning("dropping %d registered apps: no outbound listener has sign_registered",
                        len(reg))
            return
        for k in sorted(reg):
            if appkey_problem(k) is None:
                kr.register(k)
        log.info("restored %d apps registered for signing", len(kr.registered()))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/subscribe", self._h_subscribe)
        app.router.add_post("/v1/unsubscribe", self._h_unsubscribe)
        app.router.add_get("/v1/subscriptions", self._h_subscriptions)
        app.router.add_post("/v1/register", self._h_register)
        app.router.add_post("/v1/unregister", self._h_unregister)
        return app

    async def listen(self, sock: socket.socket) -> None:
        """Serve the API on `sock` again after stop() (a failed hot restart)."""
        await self._listen(sock)

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
            latest = self._want_gen
            keys = [k for k in self.subscriptions if k not in self._tentative]
            reg = [k for k in (self.keyring.registered() if self.keyring else [])
                   if k not in self._registering]
            try:
                await asyncio.to_thread(write_state, self.state_file, keys, reg)
            except OSError as e:
                log.error("cannot persist subscriptions to %s: %s", self.state_file, e)
                return
            self._written_gen = latest

    async def subscribe(
        self, appkeys: Iterable[str], timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Subscribe and wait for the endpoints; raises SubscribeError
        (400/404/429/502/503/504).  Unless it returns, the names this call
        added are dropped again (if no other call waits for them)."""
        keys = sorted(set(appkeys))
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        try:
            added = self.client.subscribe(keys)
        except SubscriptionError as e:
            raise SubscribeError(e.status, str(e)) from None
        held = [k for k in keys if k in added or k in self._tentative]
        for k in held:
            self._tentative[k] = self._tentative.get(k, 0) + 1
        ok = False
        try:
            result = await self._wait(keys, timeout)
            ok = True
            return result
        finally:
            drop = []
            for k in held:
                if k not in self._tentative:
                    continue  # another call got it confirmed
                if ok:
                    del self._tentative[k]
                    continue
                self._tentative[k] -= 1
                if self._tentative[k] == 0:
                    del self._tentative[k]
                    drop.append(k)
            if drop:
                self.client.unsubscribe(drop)
            if ok and held:
                await self.persist()

    async def _wait(self, keys: list[str], timeout: float) -> dict[str, Any]:
        states = await self.client.wait_for(keys, timeout)
        known = {k for k, s in states.items() if s is not ResourceState.READY and self._static(k)}
        missing = sorted(
            k for k, s in states.items() if s in (ResourceState.MISSING, None) and k not in known
        )
        invalid = sorted(
            k for k, s in states.items() if s is ResourceState.INVALID and k not in known
        )
        pending = sorted(
            k for k, s in states.items() if s is ResourceState.PENDING and k not in known
        )
        if missing:
            raise SubscribeError(404, f"unknown service {', '.join(missing)}", missing)
        if invalid:
            why = "; ".join(self.client.error(k) for k in invalid[:3])
            raise SubscribeError(
                502, f"the control plane sent {', '.join(invalid)} but it was rejected: {why}",
                invalid,
            )  # fmt: skip
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

    async def register(self, appkey: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Sign for an app from now on (on the sign_registered listeners), once
        this proxy has its token; raises SubscribeError (409: no listener
        takes registrations; 404: the token file has no token for it; 503/504:
        its token did not come from the control plane in time).  A call that
        fails leaves the app as it was."""
        kr = self.keyring
        if kr is None or not kr.accepts_registrations:
            raise SubscribeError(
                409, "this proxy signs only for the apps in its configuration "
                "(no outbound listener has sign_registered)", [appkey])
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        new = appkey not in kr.registered()
        if new and len(kr.registered()) >= MAX_REGISTERED:
            raise SubscribeError(429, f"at most {MAX_REGISTERED} apps may register", [appkey])
        if new:
            self._registering.add(appkey)
            kr.register(appkey)
        ok = False
        try:
            if not kr.has_token(appkey):
                if not kr.from_xds:
                    raise SubscribeError(404, f"no token for {appkey} in the token file",
                                         [appkey])
                if not await kr.wait_token(appkey, timeout):
                    if not self.client.connected:
                        raise SubscribeError(503, "control plane unreachable", [appkey])
                    raise SubscribeError(
                        504, f"timed out after {timeout:g}s waiting for the token of {appkey}",
                        [appkey])
            ok = True
        finally:
            if new:
                self._registering.discard(appkey)
                if not ok:
                    kr.unregister(appkey)
        if new:
            log.info("app %s registered: signed for from now on", appkey)
            await self.persist()
        return {"appkey": appkey, "registered": kr.registered()}

    async def unregister(self, appkey: str) -> bool:
        if self.keyring is None or not self.keyring.unregister(appkey):
            return False
        log.info("app %s unregistered: no longer signed for", appkey)
        await self.persist()
        return True

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

    async def _appkeys(
        self, request: web.Request, strict: bool = True
    ) -> tuple[list[str], float | None] | web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
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
        if strict:
            for k in keys:
                problem = appkey_problem(k)
                if problem is not None:
                    return _bad(problem)
        t = body.get("timeout_s")
        if t is None:
            return keys, None
        try:
            ok = not isinstance(t, bool) and isinstance(t, int | float) and math.isfinite(t)
            timeout = float(t)  # OverflowError for a huge integer
        except OverflowError:
            ok = False
        if not ok or not 0 < timeout <= MAX_TIMEOUT_S:
            return _bad(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
        return keys, timeout

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
        parsed = await self._appkeys(request, strict=False)
        if isinstance(parsed, web.Response):
            return parsed
        removed = await self.unsubscribe(parsed[0])
        return web.json_response({"appkeys": removed, "subscriptions": self.subscriptions})

    async def _h_subscriptions(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "connected": self.client.connected,
            "subscriptions": {k: self._describe(k) for k in self.subscriptions},
        }
        if self.keyring is not None and self.keyring.accepts_registrations:
            body["registered"] = self.keyring.registered()
        return web.json_response(body)

    async def _one_appkey(self, request: web.Request) -> tuple[str, float | None] | web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            return _bad("body must be JSON")
        if not isinstance(body, dict):
            return _bad('body must be a JSON object {"appkey": "..."}')
        k = body.get("appkey")
        if not isinstance(k, str) or not k or len(k) > 512:
            return _bad("appkey must be a non-empty string")
        problem = appkey_problem(k)
        if problem is not None:
            return _bad(problem)
        t = body.get("timeout_s")
        if t is None:
            return k, None
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) \
                or not 0 < t <= MAX_TIMEOUT_S:
            return _bad(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
        return k, float(t)

    async def _h_register(self, request: web.Request) -> web.Response:
        parsed = await self._one_appkey(request)
        if isinstance(parsed, web.Response):
            return parsed
        try:
            return web.json_response(await self.register(*parsed))
        except SubscribeError as e:
            return web.json_response(e.to_json(), status=e.status)

    async def _h_unregister(self, request: web.Request) -> web.Response:
        parsed = await self._one_appkey(request)
        if isinstance(parsed, web.Response):
            return parsed
        removed = await self.unregister(parsed[0])
        return web.json_response({"appkey": parsed[0], "removed": removed,
                                  "registered": self.keyring.registered() if self.keyring else []})
