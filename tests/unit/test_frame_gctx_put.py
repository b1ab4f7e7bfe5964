"""Writing a shunting rule's label into a request's globalContext
(frame.gctx_put, the edit the outbound path makes; docs/shunting.md), each
result decoded by the reference codec."""

import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from octoproxy._core import auth
from octoproxy._core import frame as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import octo_codec as ref

REQ = {"serviceName": "com.x.Echo", "sequenceId": 7, "callType": 0, "timeout": 100}
BODY = F.thrift_call("echo", 3, b"args")


def request(gctx: dict[str, str] | None, lctx: dict[str, str] | None = None, *,
            checksum: bool = False) -> bytes:
    h: dict[str, Any] = {"messageType": 0, "requestInfo": REQ,
                         "traceInfo": {"clientAppkey": "com.demo.web"}}
    if gctx is not None:
        h["globalContext"] = gctx
    if lctx is not None:
        h["localContext"] = lctx
    return ref.encode_frame(ref.encode_header(h), BODY, checksum=checksum)


def raw_gctx(frame: bytes) -> list[tuple[bytes, bytes]]:
    """globalContext's entries as encoded (duplicates kept), by the reference reader."""
    hl = struct.unpack(">H", frame[8:10])[0]
    fields = ref.Reader(frame, 10, 10 + hl).value(ref.STRUCT, 0)
    maps = [v for fid, t, v in fields if fid == 5 and t == ref.MAP]
    return maps[-1][2] if maps else []


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("gctx", [None, {}, {"uid": "7"}, {"octo-set": "set-old", "uid": "7"},
                                  {"uid": "7", "octo-set": "s"},
                                  {"octo-set": "a-much-longer-old-value-than-the-new-one"}])
@pytest.mark.parametrize("lctx", [None, {"octo-remote-appkey": "com.x"}])
def test_label_is_written_and_the_rest_kept(gctx: dict[str, str] | None,
                                            lctx: dict[str, str] | None, checksum: bool) -> None:
    f = request(gctx, lctx, checksum=checksum)
    out = F.gctx_put(f, "octo-set", "set-a")
    d = ref.decode_frame(out)           # checks lengths and checksum
    assert d["checksum"] is checksum
    assert d["body"] == BODY
    h = d["header"]
    assert h["globalContext"] == {**(gctx or {}), "octo-set": "set-a"}
    assert h.get("localContext") == lctx
    assert h["requestInfo"] == ref.decode_frame(f)["header"]["requestInfo"]
    # one entry for the key: replaced where it was, else appended at the end
    entries = raw_gctx(out)
    assert [k for k, _ in entries].count(b"octo-set") == 1
    if gctx is not None and "octo-set" in gctx:
        assert [k for k, _ in entries] == [k.encode() for k in gctx]
    else:
        assert entries[-1] == (b"octo-set", b"set-a")
    fr = F.scan(out)[0][0]               # the core's own scanner agrees
    assert fr.set == "set-a" and fr.length == len(out)


def test_an_earlier_duplicate_stays_and_the_last_entry_is_replaced() -> None:
    # a map with the key twice: readers take the last; that one is rewritten
    hdr = ref.enc_value(ref.STRUCT, [
        (1, ref.BYTE, 0),
        (2, ref.STRUCT, [(1, ref.STRING, b"com.x.Echo"), (2, ref.I64, 7)]),
        (5, ref.MAP, (ref.STRING, ref.STRING, [(b"octo-set", b"first"), (b"octo-set", b"second")])),
    ])
    out = F.gctx_put(ref.encode_frame(hdr, BODY), "octo-set", "set-b")
    assert raw_gctx(out) == [(b"octo-set", b"first"), (b"octo-set", b"set-b")]
    assert ref.decode_frame(out)["header"]["globalContext"]["octo-set"] == "set-b"
    assert F.scan(out)[0][0].set == "set-b"


def test_an_empty_map_with_type_codes_zero_gets_string_types() -> None:
    hdr = ref.enc_value(ref.STRUCT, [
        (1, ref.BYTE, 0),
        (2, ref.STRUCT, [(1, ref.STRING, b"com.x.Echo"), (2, ref.I64, 7)]),
        (5, ref.MAP, (0, 0, [])),
    ])
    out = F.gctx_put(ref.encode_frame(hdr, BODY), "octo-liteset", "gray")
    assert ref.decode_frame(out)["header"]["globalContext"] == {"octo-liteset": "gray"}


def test_label_then_signature_both_kept() -> None:
    f = F.gctx_put(request({"octo-set": "x"}, {"k": "v"}, checksum=True), "octo-swimlane", "lane1")
    out = auth.sign_frame(f, b"tok", b"com.x", 1796000000)
    h = ref.decode_frame(out)["header"]
    assert h["globalContext"] == {"octo-set": "x", "octo-swimlane": "lane1"}
    assert h["localContext"]["k"] == "v" and h["localContext"]["octo-auth"].startswith("com.demo.web:")


def test_a_header_that_would_pass_65535_bytes_is_refused() -> None:
    f = request({"pad": "x" * 65400})
    with pytest.raises(ValueError):
        F.gctx_put(f, "octo-set", "y" * 200)
