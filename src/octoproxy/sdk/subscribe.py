"""Mesh SDK side of the subscribe API: ask the local octo-proxy for services.

`subscribe` blocks until the proxy says the services' endpoints are in
place, retrying while the proxy is still starting (connection refused, no
socket yet, 503).  Standard library only, so any app can vendor it.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit


class SubscribeError(Exception):
    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body or {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def _connection(url_or_uds: str, timeout: float) -> http.client.HTTPConnection:
    if url_or_uds.startswith("unix:"):
        return _UnixConnection(url_or_uds[5:].removeprefix("//"), timeout)
    if url_or_uds.startswith("/") or url_or_uds.startswith("./"):
        return _UnixConnection(url_or_uds, timeout)
    u = urlsplit(url_or_uds if "://" in url_or_uds else f"http://{url_or_uds}")
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"expected http://host:port, unix:/path or /path, got {url_or_uds!r}")
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)


def _post(url_or_uds: str, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    conn = _connection(url_or_uds, timeout)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw or b"{}")
    except ValueError:
        return resp.status, {"error": raw.decode(errors="replace")}


def _retrying(url_or_uds: str, path: str, body: dict[str, Any], timeout: float,
              retry_until: float) -> dict[str, Any]:
    """POST, retrying a proxy that is not there yet or answers 503."""
    deadline = time.monotonic() + retry_until
    delay = 0.05
    while True:
        last: SubscribeError
        try:
            status, answer = _post(url_or_uds, path, body, timeout + 5.0)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError) as e:
            last = SubscribeError(0, f"proxy not reachable: {e}")
        else:
            if status == 200:
                return answer if isinstance(answer, dict) else {"result": answer}
            msg = answer.get("error", "") if isinstance(answer, dict) else str(answer)
            err = SubscribeError(status, msg, answer if isinstance(answer, dict) else None)
            if status != 503:
                raise err
            last = err
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise last
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 1.0)


def register(url_or_uds: str, appkey: str, timeout: float = 10.0,
             retry_until: float = 30.0) -> dict[str, Any]:
    """Register this app's own appkey so that the proxy signs its requests
    (service authentication; the proxy's outbound listener needs
    ``sign_registered``).  Returns once the proxy holds the app's token;
    raises `SubscribeError` (409: the proxy takes no registrations, 404: no
    token for it, 504...).  Retries like `subscribe`."""
    return _retrying(url_or_uds, "/v1/register", {"appkey": appkey, "timeout_s": timeout},
                     timeout, retry_until)


def unregister(url_or_uds: str, appkey: str, timeout: float = 5.0) -> dict[str, Any]:
    status, body = _post(url_or_uds, "/v1/unregister", {"appkey": appkey}, timeout)
    if status != 200:
        raise SubscribeError(status, body.get("error", "") if isinstance(body, dict) else "")
    return body if isinstance(body, dict) else {}


def subscribe(
    url_or_uds: str,
    appkeys: Sequence[str],
    timeout: float = 10.0,
    retry_until: float = 30.0,
) -> dict[str, Any]:
    """Subscribe to appkeys; return the proxy's answer once their endpoints are in place.

    ``url_or_uds``: ``http://127.0.0.1:PORT``, ``unix:/path`` or ``/path`` (a UDS).
    ``timeout``: how long the proxy may wait for the endpoints on each attempt.
    ``retry_until``: seconds during which a proxy that is not there yet
    (connection refused, no socket) or answers 503 is retried.
    Raises `SubscribeError` (404 unknown service, 504, 503 after retry_until...).
    """
    return _retrying(url_or_uds, "/v1/subscribe", {"appkeys": list(appkeys), "timeout_s": timeout},
                     timeout, retry_until)


def unsubscribe(url_or_uds: str, appkeys: Sequence[str], timeout: float = 5.0) -> dict[str, Any]:
    status, body = _post(url_or_uds, "/v1/unsubscribe", {"appkeys": list(appkeys)}, timeout)
    if status != 200:
        raise SubscribeError(status, body.get("error", "") if isinstance(body, dict) else "")
    return body if isinstance(body, dict) else {}
