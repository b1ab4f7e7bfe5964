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


# --- the FrameInfo of the copy, derived (fr_gctx_put_fi) vs scanned ---------
# The outbound path writes the label straight into its output buffer and
# derives the copy's FrameInfo (what signing it reads) instead of scanning
# the copy again: the derived one must be what fr_scan finds, field by field.

_GKEYS = ["octo-liteset", "octo-set", "octo-swimlane", "uid", "octo-x"]
_LKEYS = ["octo-remote-appkey", "octo-hash-key", "octo-auth", "k"]
_LABELS = ["octo-liteset", "octo-set", "octo-swimlane", "uid"]


def _ctx_map(entries: list[tuple[str, str]]) -> tuple[int, Any]:
    return (ref.MAP, (ref.STRING, ref.STRING, [(k.encode(), v.encode()) for k, v in entries]))


def _frame(fields: list[tuple[int, int, Any]], body: bytes, checksum: bool) -> bytes:
    return ref.encode_frame(ref.enc_value(ref.STRUCT, fields), body, checksum=checksum)


def _check(frame: bytes, key: str, value: str) -> bytes:
    out, derived, scanned = F.gctx_put_info(frame, key, value)
    assert derived == scanned, {k: (derived[k], scanned[k])
                                for k in derived if derived[k] != scanned[k]}
    return out


def test_the_copys_frameinfo_is_derived_as_scanned() -> None:
    lctx = _ctx_map([("octo-auth", "com.demo.web:1796000000:" + "s" * 22),
                     ("octo-remote-appkey", "com.x"), ("octo-hash-key", "h")])
    for gctx in (None, [], [("uid", "7")], [("octo-set", "old"), ("uid", "7")],
                 [("uid", "7"), ("octo-set", "")], [("octo-liteset", "a" * 300)]):
        for lfirst in (False, True):
            for checksum in (False, True):
                fields: list[tuple[int, int, Any]] = [
                    (1, ref.BYTE, 0),
                    (2, ref.STRUCT, [(1, ref.STRING, b"com.x.Echo"), (2, ref.I64, 7)]),
                    (4, ref.STRUCT, [(1, ref.STRING, b"com.demo.web")])]
                maps = [(6, *lctx)]
                if gctx is not None:
                    maps.insert(0, (5, *_ctx_map(gctx)))
                fields += maps[::-1] if lfirst else maps
                f = _frame(fields, BODY, checksum)
                for key in _LABELS:
                    for value in ("", "set-a", "v" * 1000):
                        out = _check(f, key, value)
                        assert ref.decode_frame(out)["header"]["globalContext"][key] == value


def test_derived_with_repeated_maps_the_stop_byte_and_an_unreadable_body() -> None:
    base: list[tuple[int, int, Any]] = [
        (1, ref.BYTE, 0), (2, ref.STRUCT, [(1, ref.STRING, b"com.x.Echo"), (2, ref.I64, 7)])]
    # globalContext twice, the key only in the first: replaced where the scanner found it
    two = [*base, (5, *_ctx_map([("octo-set", "first")])), (6, *_ctx_map([("k", "v")])),
           (5, *_ctx_map([("uid", "7")]))]
    for body in (BODY, b"", b"\x00not thrift"):
        for key in _LABELS:
            _check(_frame(two, body, False), key, "lane")
            _check(_frame(two, body, True), key, "")
    # localContext ending right at the stop byte, no globalContext: the new map goes after it
    _check(_frame([*base, (6, *_ctx_map([]))], BODY, False), "octo-swimlane", "l1")
    # an empty map with type codes zero
    _check(_frame([*base, (5, ref.MAP, (0, 0, []))], BODY, True), "octo-liteset", "g")


def test_derived_for_random_requests() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
    ctx = st.lists(st.tuples(st.sampled_from(_GKEYS), text), max_size=4)
    lctx = st.lists(st.tuples(st.sampled_from(_LKEYS), text), max_size=4)

    @settings(max_examples=300, deadline=None)
    @given(g=st.lists(ctx, max_size=2), lc=st.lists(lctx, max_size=2), order=st.randoms(),
           trace=st.booleans(), checksum=st.booleans(), body=st.sampled_from([BODY, b"", b"xy"]),
           key=st.sampled_from(_LABELS), value=text)
    def check(g: list[list[tuple[str, str]]], lc: list[list[tuple[str, str]]], order: Any,
              trace: bool, checksum: bool, body: bytes, key: str, value: str) -> None:
        fields: list[tuple[int, int, Any]] = [
            (2, ref.STRUCT, [(1, ref.STRING, b"com.x.Echo"), (2, ref.I64, 7)])]
        if trace:
            fields.append((4, ref.STRUCT, [(1, ref.STRING, b"com.demo.web")]))
        fields += [(5, *_ctx_map(m)) for m in g] + [(6, *_ctx_map(m)) for m in lc]
        order.shuffle(fields)
        _check(_frame([(1, ref.BYTE, 0), *fields], body, checksum), key, value)

    check()
