"""The subscribe API's UDS: a stale socket is replaced, anything else is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from octoproxy._core.route import RouteTable
from octoproxy.listeners import ListenerError
from octoproxy.model import Labels
from octoproxy.subscribe import StaticDiscovery, SubscribeApi


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="op", dir="/tmp")  # UDS paths are length-limited
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _serve_once(path: str) -> bytes:
    """Start the API on `path`, ask it for its subscriptions over the UDS, stop."""

    async def main() -> bytes:
        api = SubscribeApi(StaticDiscovery(RouteTable(Labels())), uds=path)
        await api.start()
        try:
            r, w = await asyncio.open_unix_connection(path)
            w.write(b"GET /v1/subscriptions HTTP/1.0\r\n\r\n")
            data = await r.read()
            w.close()
            await w.wait_closed()
            return data
        finally:
            await api.stop()

    return asyncio.run(main())


def test_regular_file_at_the_socket_path_is_never_deleted(short_dir: str) -> None:
    path = os.path.join(short_dir, "sub.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ListenerError, match="not a socket"):
        _serve_once(path)
    with open(path) as f:
        assert f.read() == "precious"


def test_stale_socket_file_is_replaced(short_dir: str) -> None:
    path = os.path.join(short_dir, "sub.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # nobody listens on it any more
    # the API answers on that path: it removed the stale file and bound its own
    answer = _serve_once(path)
    assert answer.split(b"\r\n", 1)[0].endswith(b"200 OK"), answer[:200]
    assert answer.endswith(b'"subscriptions": {}}'), answer[-200:]


def test_live_socket_is_not_stolen(short_dir: str) -> None:
    path = os.path.join(short_dir, "sub.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(1)
        with pytest.raises(ListenerError, match="in use by a live process"):
            _serve_once(path)
        assert os.path.exists(path)
