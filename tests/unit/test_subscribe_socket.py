"""The subscribe API's UDS: a stale socket is replaced, anything else is refused."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest

from octoproxy._core.route import RouteTable
from octoproxy.listeners import ListenerError
from octoproxy.model import Labels
from octoproxy.subscribe import StaticDiscovery, SubscribeApi


def _start(path: str) -> None:
    async def main() -> None:
        api = SubscribeApi(StaticDiscovery(RouteTable(Labels())), uds=path)
        await api.start()
        await api.stop()

    asyncio.run(main())


def test_regular_file_at_the_socket_path_is_never_deleted() -> None:
    d = tempfile.mkdtemp(prefix="op", dir="/tmp")
    path = os.path.join(d, "sub.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ListenerError, match="not a socket"):
        _start(path)
    with open(path) as f:
        assert f.read() == "precious"


def test_stale_socket_file_is_replaced() -> None:
    d = tempfile.mkdtemp(prefix="op", dir="/tmp")
    path = os.path.join(d, "sub.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # nobody listens on it any more
    _start(path)
