"""The method name of a request (fr_method) and the caller's appkey
(traceInfo.clientAppkey), read by the scanner without Python objects."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from octoproxy._core import frame as F


def one(data: bytes) -> F.Frame:
    frames, used = F.scan(data)
    assert used == len(data) and len(frames) == 1
    return frames[0]


def octo(body: bytes, **kw: object) -> F.Frame:
    return one(F.encode_request(7, "com.x.S", body, **kw))  # type: ignore[arg-type]


def test_strict_binary_method_name() -> None:
    body = F.thrift_call("getUser", 5, b"\x08\x00\x01\x00\x00\x00\x2a\x00")
    assert body[:4] == b"\x80\x01\x00\x01"
    assert F.thrift_method(body) == "getUser"
    assert octo(body).method == "getUser"


def test_oneway_reply_and_exception_types_are_read_too() -> None:
    for t in (1, 2, 3, 4):
        assert F.thrift_method(F.thrift_call("m", 1, message_type=t)) == "m"
    assert F.thrift_method(F.thrift_call("m", 1, message_type=5)) is None
    assert F.thrift_method(F.thrift_call("m", 1, message_type=0)) is None


def test_old_non_strict_binary() -> None:
    body = struct.pack(">i", 6) + b"setKey" + b"\x01" + struct.pack(">i", 9) + b"\x00"
    assert F.thrift_method(body) == "setKey"
    # a type byte that is no message type: not a Thrift message
    bad = struct.pack(">i", 6) + b"setKey" + b"\x09" + struct.pack(">i", 9) + b"\x00"
    assert F.thrift_method(bad) is None


def test_compact_protocol() -> None:
    body = F.thrift_call("listOrders", 300, compact=True)
    assert body[0] == 0x82 and body[1] == (1 << 5) | 1
    assert F.thrift_method(body) == "listOrders"
    assert octo(body).method == "listOrders"


def test_empty_name_and_utf8() -> None:
    assert F.thrift_method(F.thrift_call("", 1)) == ""
    assert F.thrift_method(F.thrift_call("查询", 1)) == "查询"


def test_unreadable_bodies_give_none() -> None:
    assert octo(b"").method is None
    assert octo(b"echo:hello").method is None
    assert F.thrift_method(b"\x80\x01\x00\x01\x00\x00\x00\x10get") is None  # name cut short
    assert F.thrift_method(b"\x80\x01\x00\x01\xff\xff\xff\xff") is None  # negative length
    assert F.thrift_method(b"\x82\x21\xff\xff\xff\xff\xff\xff") is None  # overlong varint
    assert F.thrift_method(b"\x82\x21\x01\x7f") is None  # name longer than the body
    assert F.thrift_method(b"\x80\x02\x00\x01" + b"\x00" * 8) is None  # unknown version


def test_name_must_be_followed_by_the_sequence_id() -> None:
    # strict: name then i32 seqid; a body that ends right after the name is cut
    body = b"\x80\x01\x00\x01" + struct.pack(">i", 3) + b"get"
    assert F.thrift_method(body) is None
    assert F.thrift_method(body + b"\x00\x00\x00\x01") == "get"


def test_native_thrift_frames_report_their_message_name() -> None:
    f = one(F.encode_thrift_message("ping", 1, 3, b"\x00"))
    assert f.method == "ping"


def test_compressed_frames_have_no_method() -> None:
    body = F.thrift_call("m", 1)
    data = bytearray(F.encode_request(1, "s", body))
    data[3] |= 0x40  # gzip bit: the header is not read
    assert one(bytes(data)).method is None


def test_caller_appkey_from_trace_info() -> None:
    f = octo(b"", trace_info={"clientAppkey": "com.caller", "traceId": "t"})
    assert f.caller_appkey == "com.caller"
    assert octo(b"").caller_appkey is None


def test_trace_info_clientappkey_of_another_type_is_ignored() -> None:
    # traceInfo{1: i32} is well-formed; it only names no caller
    trace = b"\x08\x00\x01\x00\x00\x00\x05\x00"
    hdr = (b"\x03\x00\x01\x00"
           + b"\x0c\x00\x02" + b"\x0b\x00\x01" + struct.pack(">i", 1) + b"s"
           + b"\x0a\x00\x02" + struct.pack(">q", 4) + b"\x00"
           + b"\x0c\x00\x04" + trace + b"\x00")
    f = one(F.encode_frame(hdr, b""))
    assert f.caller_appkey is None and f.seq_id == 4


def test_heartbeat_appkey_is_the_caller_unless_trace_info_says_otherwise() -> None:
    hb = one(F.encode_heartbeat(1, appkey="com.legacy"))
    assert hb.caller_appkey == "com.legacy"


@given(st.binary(max_size=64))
def test_random_bodies_never_crash_and_names_lie_inside(body: bytes) -> None:
    name = F.thrift_method(body)
    if name is not None:
        assert len(name.encode("utf-8", "surrogateescape")) <= len(body)


@given(st.text(max_size=40), st.integers(0, 2**31 - 1), st.booleans())
def test_round_trip(name: str, seq: int, compact: bool) -> None:
    assert F.thrift_method(F.thrift_call(name, seq, compact=compact)) == name


def test_every_truncation_of_a_strict_header_is_rejected() -> None:
    body = F.thrift_call("abcd", 1, b"\x00")
    for cut in range(8 + 4 + 4):  # up to the end of the sequence id
        assert F.thrift_method(body[:cut]) is None, cut
    assert F.thrift_method(body[:16]) == "abcd"
