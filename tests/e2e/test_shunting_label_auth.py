"""A shunting rule's label and the request's signature on the same request
(docs/shunting.md, docs/auth.md): the client-side proxy writes the label into
globalContext and signs the labelled copy; the server-side proxy verifies it
(enforce) and the provider reads both.  Real processes and sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from octoproxy._core import frame

from harness import Cluster, auth_mesh, cluster, free_port, stat_value, wait_for

PROVIDER = "com.demo.echo"
TOKENS = {"com.demo.web": "tok-web-4b1d9e0c7f3a"}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with cluster() as c:
        admin = free_port()
        big = {"max_local_context_bytes": 70000}   # headers near 65,535 bytes
        auth_mesh(c, TOKENS, PROVIDER, ["com.demo.web"],
                  [{"path": c.path("web.sock"), "sign_for": ["com.demo.web"]}],
                  server={"auth": {"max_skew_s": 60}, "limits": big},
                  client={"admin": {"port": admin}, "limits": big, "shunting": {"services": {
                      PROVIDER: [
                          {"name": "unit", "target": "octo-set", "source_key": "loc",
                           "unit_table": {"bj": "set-a"}},
                          {"name": "lane", "target": "octo-swimlane", "value": "lane-1",
                           "match": [{"source": "context", "key": "lane", "op": "eq",
                                      "value": "1"}]},
                      ]}}})
        c.admin = admin  # type: ignore[attr-defined]
        yield c


def gctx(c: Cluster, g: dict[str, str], loc: dict[str, str] | None = None
         ) -> tuple[int, list[list[str]]]:
    """Ask the provider, through both proxies as app com.demo.web, for the
    globalContext it received."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(c.path("web.sock"))
    s.settimeout(10)
    try:
        s.sendall(frame.encode_request(
            1, "com.demo.echo.Echo", b"gctx", trace_info={"clientAppkey": "com.demo.web"},
            global_context=g, local_context={"octo-remote-appkey": PROVIDER, **(loc or {})}))
        sc = frame.FrameScanner()
        got: list[Any] = []
        wait_for(lambda: got.extend(sc.feed(s.recv(65536))) or got, 10, "an answer")
    finally:
        s.close()
    f = got[0]
    assert f.status == 0, f.message
    return f.status, json.loads(f.body.partition(b"|")[2])


def test_label_and_signature_on_one_request(mesh: Cluster) -> None:
    # verified by the server-side proxy (enforce: an unsigned or badly signed
    # request would be status 7), and the provider sees the label
    assert gctx(mesh, {"uid": "1"}, {"loc": "bj"}) == (0, [["uid", "1"], ["octo-set", "set-a"]])
    assert gctx(mesh, {"lane": "1", "octo-swimlane": "x"}) \
        == (0, [["lane", "1"], ["octo-swimlane", "lane-1"]])
    assert gctx(mesh, {"lane": "0"}) == (0, [["lane", "0"]])


def test_label_that_does_not_fit_beside_the_signature_is_counted(mesh: Cluster) -> None:
    # the label is written only when the signed copy's header still fits in
    # 65,535 bytes: a header with room for the signature but not for both is
    # sent signed, without the label, and counted
    def unwritten() -> float:
        return stat_value(mesh.admin, "octo_proxy_shunt_label_unwritten_total")  # type: ignore[attr-defined]

    def header_len(pad: int) -> int:
        f = frame.encode_request(
            1, "com.demo.echo.Echo", b"gctx", trace_info={"clientAppkey": "com.demo.web"},
            global_context={"uid": "1"},
            local_context={"octo-remote-appkey": PROVIDER, "loc": "bj", "pad": "x" * pad})
        return int.from_bytes(f[8:10], "big")

    # the bytes the signature is given room for (octo-auth, caller, at most 12
    # timestamp digits, 22 signature characters) and the label's entry
    sign_room = 4 + 9 + 4 + len("com.demo.web") + 1 + 12 + 1 + 22
    label = 4 + len("octo-set") + 4 + len("set-a")
    base = header_len(0)
    before = unwritten()
    # both fit exactly: labelled and signed
    pad = 0xFFFF - sign_room - label - base
    assert gctx(mesh, {"uid": "1"}, {"loc": "bj", "pad": "x" * pad}) \
        == (0, [["uid", "1"], ["octo-set", "set-a"]])
    assert unwritten() == before
    # one byte more: signed (the server-side proxy enforces), not labelled
    assert gctx(mesh, {"uid": "1"}, {"loc": "bj", "pad": "x" * (pad + 1)}) \
        == (0, [["uid", "1"]])
    assert unwritten() == before + 1
