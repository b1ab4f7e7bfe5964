"""The OCTO frame codec, one protocol behaviour per test (docs/protocol.md)."""

import struct
import sys
import zlib
from pathlib import Path

import pytest

from octoproxy._core import frame as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import octo_codec as ref

STRING, STRUCT, MAP, LIST, SET = ref.STRING, ref.STRUCT, ref.MAP, ref.LIST, ref.SET


def one(buf, **kw):
    frames, used = F.scan(buf, **kw)
    assert len(frames) == 1 and used == len(buf)
    return frames[0]


def code_of(buf, **kw):
    with pytest.raises(F.FrameError) as ei:
        F.scan(buf, **kw)
    return ei.value.code


def octo(header_dict, body=b"", **kw):
    return ref.encode_frame(ref.encode_header(header_dict), body, **kw)


REQ = {"serviceName": "com.x.Echo", "sequenceId": 7, "callType": 0, "timeout": 100}


# ------------------------------------------------------------------ requests/responses

def test_request_fields_are_decoded():
    buf = F.encode_request(
        0x0102030405060708, "com.x.Echo", b"BODY", timeout=250, call_type=1,
        global_context={"octo-liteset": "gray", "octo-set": "s1", "octo-swimlane": "lane", "x": "y"},
        local_context={"octo-remote-appkey": "com.app", "octo-hash-key": "uid-1"})
    f = one(buf)
    assert (f.kind, f.msg_type, f.is_request, f.is_response) == (F.FK_OCTO, F.MT_NORMAL, True, False)
    assert f.seq_id == 0x0102030405060708
    assert buf[f.seq_off:f.seq_off + 8] == bytes(range(1, 9))
    assert (f.service_name, f.call_type, f.timeout) == ("com.x.Echo", 1, 250)
    assert (f.liteset, f.set, f.swimlane) == ("gray", "s1", "lane")
    assert (f.remote_appkey, f.hash_key) == ("com.app", "uid-1")
    assert f.body == b"BODY" and buf[f.body_off:f.body_off + f.body_len] == b"BODY"
    assert (f.version, f.protocol, f.checksum, f.compressed) == (1, 1, False, False)
    assert f.header_off == 10 and f.header_len == struct.unpack(">H", buf[8:10])[0]
    assert f.status == -1 and f.message is None


def test_absent_optional_fields_are_none_or_minus_one():
    f = one(octo({"requestInfo": {"sequenceId": 1}}))
    assert f.msg_type == -1 and f.timeout == -1 and f.call_type == 0
    assert f.service_name is None and f.remote_appkey is None and f.liteset is None
    assert f.set is None and f.swimlane is None and f.hash_key is None


def test_response_status_and_message():
    f = one(F.encode_response(99, b"r", status=F.STATUS_SERVICE, message="no such method"))
    assert f.is_response and not f.is_request
    assert (f.seq_id, f.status, f.message, f.body) == (99, 8, "no such method", b"r")


def test_status_constants():
    names = ["SUCCESS", "APPLICATION", "RUNTIME", "RPC", "TRANSPORT", "PROTOCOL", "DEGRADE",
             "SECURITY", "SERVICE", "REMOTE"]
    assert [getattr(F, "STATUS_" + n) for n in names] == list(range(10))


def test_negative_and_extreme_sequence_ids():
    for seq in (-1, -(2**63), 2**63 - 1, 0):
        assert one(F.encode_request(seq, "s")).seq_id == seq


def test_version_and_protocol_bytes_are_reported():
    f = one(F.encode_request(1, "s", version=7, protocol=2))
    assert (f.version, f.protocol) == (7, 2)


def test_unknown_fields_of_every_type_are_skipped():
    unknown = [
        (0, 100, ref.BOOL, True), (0, 101, ref.BYTE, -3), (1, 102, ref.I16, 300),
        (1, 103, ref.I32, -5), (2, 104, ref.I64, 2**40), (2, 105, ref.DOUBLE, 1.5),
        (3, 106, STRING, b"\x00\xff"), (3, 107, STRUCT, [(1, STRING, b"a"), (2, LIST, (STRUCT, [[]]))]),
        (4, 108, MAP, (STRING, MAP, [(b"k", (ref.I32, ref.I64, [(1, 2)]))])),
        (4, 109, SET, (ref.I64, [1, 2, 3])), (5, -2, LIST, (STRING, [b"x", b""])),
    ]
    h = {"messageType": 0, "requestInfo": {**REQ, "_unknown": [(1, 9, STRING, b"zz")]},
         "globalContext": {"octo-set": "s"}, "_unknown": unknown}
    buf = octo(h, b"b")
    f = one(buf)
    assert (f.seq_id, f.service_name, f.set, f.body) == (7, "com.x.Echo", "s", b"b")
    d = F.decode_frame(buf)["header"]
    assert d == {"messageType": 0, "requestInfo": REQ, "globalContext": {"octo-set": "s"}}


def test_empty_context_map_with_zero_types_is_accepted():
    hdr = ref.encode_header({"requestInfo": {"sequenceId": 3}})[:-1]
    hdr += bytes([MAP]) + struct.pack(">h", 6) + b"\x00\x00" + struct.pack(">i", 0) + b"\x00"
    assert one(ref.encode_frame(hdr)).seq_id == 3


def test_duplicate_field_last_one_wins():
    h = ref.encode_header({"requestInfo": {"sequenceId": 1}})[:-1]
    h += ref.encode_header({"requestInfo": {"sequenceId": 2}})
    assert one(ref.encode_frame(h)).seq_id == 2


# ------------------------------------------------------------------ mesh extensions

def test_proxy_restart_flag_only_for_value_1():
    assert one(F.encode_response(1, local_context={"octo-proxy-restart": "1"})).proxy_restart
    assert not one(F.encode_response(1, local_context={"octo-proxy-restart": "0"})).proxy_restart
    # the flag lives in localContext only
    assert not one(F.encode_response(1, global_context={"octo-proxy-restart": "1"})).proxy_restart


def test_each_context_key_is_read_from_its_own_map_only() -> None:
    # the scanner's key table (frame.pyx: CTX_KEYS): a key of localContext in
    # globalContext (and the reverse), or a near miss, is not picked
    spans = {"octo-remote-appkey": ("local", "remote_appkey"),
             "octo-hash-key": ("local", "hash_key"), "octo-liteset": ("global", "liteset"),
             "octo-set": ("global", "set"), "octo-swimlane": ("global", "swimlane")}
    for key, (where, attr) in spans.items():
        other = "global" if where == "local" else "local"
        got = one(F.encode_request(1, "s", **{f"{where}_context": {key: "v1", key + "x": "no",
                                                                   key[:-1]: "no"}}))
        assert getattr(got, attr) == "v1", key
        assert getattr(one(F.encode_request(1, "s", **{f"{other}_context": {key: "v1"}})),
                       attr) is None, key
    # a flag key and a longer key that starts with it are told apart
    both = one(F.encode_response(1, local_context={"octo-proxy": "1", "octo-proxy-restart": "0"}))
    assert both.proxy_announce and not both.proxy_restart


def test_proxy_announce_is_a_heartbeat_request_with_octo_proxy():
    buf = F.encode_proxy_announce(5)
    f = one(buf)
    assert (f.msg_type, f.is_request, f.seq_id, f.proxy_announce) == (F.MT_HEARTBEAT, True, 5, True)
    assert F.decode_frame(buf)["header"]["localContext"] == {"octo-proxy": "1"}
    assert not one(F.encode_request(5, "s", local_context={"octo-proxy": "11"})).proxy_announce


def test_proxy_restart_frame_is_message_type_3_only():
    buf = F.encode_proxy_restart()
    f = one(buf)
    assert (f.msg_type, f.flags, f.seq_off, f.body) == (F.MT_PROXY_RESTART, 0, -1, b"")
    assert F.decode_frame(buf)["header"] == {"messageType": 3}


def test_error_response_with_restart_flag():
    buf = F.encode_error_response(77, F.STATUS_RPC, "proxy restarting", restart=True, protocol=0x81)
    f = one(buf)
    assert (f.seq_id, f.status, f.message, f.proxy_restart) == (77, 3, "proxy restarting", True)
    # the request's checksum convention is kept; no method named: empty body
    assert f.protocol == 0x81 and f.checksum and not f.compressed and f.body == b""
    g = one(F.encode_error_response(77, F.STATUS_SERVICE, "no route"))
    assert not g.proxy_restart and g.message == "no route"


def test_heartbeats_may_have_neither_request_nor_response_info():
    for mt in (F.MT_HEARTBEAT, F.MT_SCANNER_HEARTBEAT, F.MT_PROXY_RESTART):
        f = one(octo({"messageType": mt, "heartbeatInfo": {"appkey": "a"}}))
        assert f.msg_type == mt and f.seq_off == -1 and not (f.is_request or f.is_response)


def test_normal_frame_needs_request_or_response_info():
    assert code_of(octo({"messageType": 0})) == F.FE_BAD_HEADER
    assert code_of(octo({})) == F.FE_BAD_HEADER


def test_request_and_response_info_need_a_sequence_id():
    assert code_of(octo({"requestInfo": {"serviceName": "s"}})) == F.FE_BAD_HEADER
    assert code_of(octo({"responseInfo": {"status": 0}})) == F.FE_BAD_HEADER


def test_heartbeat_request_and_response_share_the_sequence_id():
    req = one(F.encode_heartbeat(12, appkey="com.a", send_time_ms=1_700_000_000_000))
    resp = one(F.encode_heartbeat(12, response=True))
    assert req.is_request and resp.is_response and req.seq_id == resp.seq_id == 12
    assert resp.msg_type == req.msg_type == F.MT_HEARTBEAT
    hb = F.decode_frame(F.encode_heartbeat(12, appkey="com.a", send_time_ms=9))["header"]
    assert hb["heartbeatInfo"] == {"appkey": "com.a", "sendTime": 9, "status": 2}


def test_decode_frame_trace_and_load_info():
    h = {"messageType": 1, "requestInfo": {"sequenceId": 1},
         "traceInfo": {"clientAppkey": "c", "traceId": "t", "spanId": "0.1", "debug": True,
                       "sample": False, "clientIp": "10.0.0.1"},
         "heartbeatInfo": {"appkey": "a", "sendTime": 5, "status": 2,
                           "loadInfo": {"averageLoad": 0.5, "oldGC": 1, "threadNum": 8,
                                        "queueSize": 3, "methodQpsMap": {"echo": 1.25}}}}
    assert F.decode_frame(octo(h))["header"] == h


# ------------------------------------------------------------------ checksum

def test_checksum_is_verified_and_counted_in_total_length():
    buf = F.encode_request(1, "s", b"body", checksum=True)
    assert buf[3] & 0x80
    assert struct.unpack(">I", buf[4:8])[0] == len(buf) - 8
    assert struct.unpack(">I", buf[-4:])[0] == zlib.adler32(buf[:-4])
    f = one(buf)
    assert f.checksum and f.body == b"body"
    bad = bytearray(buf)
    bad[-5] ^= 1
    assert code_of(bytes(bad)) == F.FE_BAD_CHECKSUM


def test_adler32_matches_zlib():
    for data in (b"", b"a", b"hello world" * 1000, bytes(range(256)) * 300):
        assert F.adler32(data) == zlib.adler32(data)


# ------------------------------------------------------------------ seq id rewrite

def test_set_seq_id_rewrites_only_the_eight_bytes():
    buf = bytearray(b"junk" + F.encode_request(5, "svc", b"payload") + b"more")
    (f,), _ = F.scan(buf, 4, len(buf) - 4)
    before = bytes(buf)
    F.set_seq_id(buf, f, -2)
    off = f.offset + f.seq_off
    assert buf[off:off + 8] == struct.pack(">q", -2)
    assert buf[:off] == before[:off] and buf[off + 8:] == before[off + 8:]
    assert F.scan(buf, 4, len(buf) - 4)[0][0].seq_id == -2


def test_set_seq_id_recomputes_the_checksum():
    buf = bytearray(F.encode_response(5, b"x", checksum=True))
    f = one(bytes(buf))
    F.set_seq_id(buf, f, 123456789)
    g = one(bytes(buf))
    assert g.seq_id == 123456789 and g.checksum


def test_set_seq_id_native_thrift_is_i32():
    buf = bytearray(F.encode_thrift_message("echo", 1, 5, b"\x00"))
    f = one(bytes(buf))
    F.set_seq_id(buf, f, -7)
    assert one(bytes(buf)).seq_id == -7
    with pytest.raises(OverflowError):
        F.set_seq_id(buf, f, 2**31)


def test_set_seq_id_refuses_frames_without_one():
    buf = bytearray(F.encode_proxy_restart())
    with pytest.raises(ValueError):
        F.set_seq_id(buf, one(bytes(buf)), 1)


# ------------------------------------------------------------------ compression

@pytest.mark.parametrize("bit,flag", [(0x40, "FF_GZIP"), (0x20, "FF_SNAPPY")])
def test_compressed_frames_report_bounds_only(bit, flag):
    payload = b"\x0b\x00\x01garbage-that-is-not-thrift"
    buf = ref.encode_frame(b"", payload, protocol=1 | bit)
    buf = buf[:8] + struct.pack(">H", 4000) + buf[10:]  # uncompressed header size
    f = one(buf)
    assert f.flags & getattr(F, flag) and f.compressed
    assert (f.msg_type, f.seq_off, f.is_request, f.is_response) == (-1, -1, False, False)
    assert f.body == payload and f.length == len(buf)
    assert F.decode_frame(buf)["header"] is None
    with pytest.raises(ValueError):
        F.set_seq_id(bytearray(buf), f, 1)


def test_compressed_frame_with_checksum():
    buf = ref.encode_frame(b"", b"zzz", protocol=0x41, checksum=True)
    f = one(buf)
    assert f.checksum and f.compressed and f.body == b"zzz"


# ------------------------------------------------------------------ native thrift

@pytest.mark.parametrize("mtype,req,call_type", [(1, True, 0), (4, True, 1), (2, False, 0), (3, False, 0)])
def test_native_thrift_framed(mtype, req, call_type):
    buf = F.encode_thrift_message("getUser", mtype, 4242, b"\x0c\x00\x01\x00\x00")
    f = one(buf)
    assert f.kind == F.FK_THRIFT and f.service_name == "getUser" and f.seq_id == 4242
    assert (f.is_request, f.is_response, f.call_type) == (req, not req, call_type)
    assert buf[f.seq_off:f.seq_off + 4] == struct.pack(">i", 4242)
    assert f.body == buf[4:]


def test_native_thrift_bad_message_type():
    buf = bytearray(F.encode_thrift_message("m", 1, 1))
    buf[7] = 5
    assert code_of(bytes(buf)) == F.FE_BAD_THRIFT


def test_native_thrift_bad_name_length():
    buf = bytearray(F.encode_thrift_message("m", 1, 1))
    buf[8:12] = struct.pack(">i", 100)
    assert code_of(bytes(buf[:12])) == F.FE_BAD_THRIFT  # decided from 12 bytes
    buf[8:12] = struct.pack(">i", -1)
    assert code_of(bytes(buf)) == F.FE_BAD_THRIFT


def test_native_thrift_too_short_message():
    assert code_of(struct.pack(">i", 8) + b"\x80\x01\x00\x01" + b"\x00" * 4) == F.FE_BAD_THRIFT


def test_native_thrift_oversized_rejected_from_8_bytes():
    assert code_of(struct.pack(">i", 1 << 30) + b"\x80\x01\x00\x01") == F.FE_TOO_LARGE


# ------------------------------------------------------------------ framing errors

def test_garbage_is_bad_magic_within_8_bytes():
    assert code_of(b"GET / HTTP/1.1\r\n") == F.FE_BAD_MAGIC
    assert code_of(b"\xab\x00") == F.FE_BAD_MAGIC
    assert code_of(b"\x00\x00\x00\x00") == F.FE_BAD_MAGIC     # zero length
    assert code_of(b"\xff\xff\xff\xff") == F.FE_BAD_MAGIC     # negative length
    assert code_of(b"\x00\x00\x00\x10\x80\x02") == F.FE_BAD_MAGIC  # not strict binary
    assert F.scan(b"\x00\x00\x00\x10\x80\x01\x00") == ([], 0)  # still plausible: wait


def test_need_more_for_every_proper_prefix():
    buf = F.encode_request(1, "s", b"x" * 10, checksum=True)
    for i in range(len(buf)):
        assert F.scan(buf[:i]) == ([], 0)


def test_oversized_frame_rejected_from_its_8_byte_prefix():
    prefix = b"\xab\xba\x01\x01" + struct.pack(">I", 20 << 20)
    assert code_of(prefix) == F.FE_TOO_LARGE
    assert code_of(F.encode_request(1, "s", b"x" * 100), max_frame=64) == F.FE_TOO_LARGE
    buf = F.encode_request(1, "s", b"x" * 100)
    assert one(buf, max_frame=len(buf)).length == len(buf)


def test_header_too_large_rejected_from_10_bytes():
    prefix = b"\xab\xba\x01\x01" + struct.pack(">IH", 70000, 65535)
    assert code_of(prefix, max_header=4096) == F.FE_HEADER_TOO_LARGE
    buf = F.encode_request(1, "s" * 200)
    assert code_of(buf, max_header=100) == F.FE_HEADER_TOO_LARGE


def test_bad_lengths():
    assert code_of(b"\xab\xba\x01\x01" + struct.pack(">I", 1)) == F.FE_BAD_LENGTH
    assert code_of(b"\xab\xba\x01\x81" + struct.pack(">I", 5)) == F.FE_BAD_LENGTH
    assert code_of(b"\xab\xba\x01\x01" + struct.pack(">IH", 10, 9)) == F.FE_BAD_LENGTH
    assert code_of(b"\xab\xba\x01\x01" + struct.pack(">I", 0x80000000)) == F.FE_BAD_LENGTH


def _hdr_with(raw_fields: bytes) -> bytes:
    return ref.encode_frame(ref.encode_header({"requestInfo": {"sequenceId": 1}})[:-1] + raw_fields)


def _field(t, fid, value: bytes) -> bytes:
    return bytes([t]) + struct.pack(">h", fid) + value


@pytest.mark.parametrize("raw", [
    _field(STRING, 50, struct.pack(">i", -1)) + b"\x00",                # negative string length
    _field(STRING, 50, struct.pack(">i", 1000) + b"ab") + b"\x00",     # overlong string
    _field(ref.I64, 50, b"\x00\x01"),                                   # truncated i64
    _field(MAP, 50, bytes([STRING, STRING]) + struct.pack(">i", -1)) + b"\x00",
    _field(MAP, 50, bytes([STRING, STRING]) + struct.pack(">i", 1 << 28)) + b"\x00",
    _field(LIST, 50, bytes([ref.I64]) + struct.pack(">i", 1000)) + b"\x00",
    _field(SET, 50, bytes([STRUCT]) + struct.pack(">i", -5)) + b"\x00",
    _field(LIST, 50, bytes([99]) + struct.pack(">i", 1) + b"\x00") + b"\x00",  # bad elem type
    _field(17, 50, b"") + b"\x00",                                       # unknown type code
    _field(STRUCT, 50, b""),                                            # missing stop byte
    b"",                                                                # header without stop
    b"\x00\x00",                                                        # bytes after the stop
])
def test_malformed_header_thrift(raw):
    assert code_of(_hdr_with(raw)) == F.FE_BAD_HEADER


@pytest.mark.parametrize("raw", [
    _field(ref.I32, 1, b"\x00\x00\x00\x00"),                            # messageType as i32
    _field(STRING, 2, struct.pack(">i", 0)),                            # requestInfo as string
    _field(STRUCT, 3, _field(ref.I32, 1, b"\x00\x00\x00\x01") + b"\x00"),  # sequenceId as i32
    _field(STRUCT, 2, _field(ref.I32, 1, b"\x00\x00\x00\x01") + b"\x00"),  # serviceName as i32
    _field(MAP, 5, bytes([STRING, ref.I32]) + struct.pack(">i", 1) + struct.pack(">i", 0) + b"\x00" * 4),
    _field(LIST, 6, bytes([STRING]) + struct.pack(">i", 0)),            # localContext as list
    _field(STRING, 4, struct.pack(">i", 0)),                            # traceInfo as string
])
def test_known_field_with_wrong_type(raw):
    assert code_of(_hdr_with(raw + b"\x00")) == F.FE_BAD_FIELD_TYPE


def _nested_lists(depth: int) -> bytes:
    v = bytes([ref.I32]) + struct.pack(">i", 0)
    for _ in range(depth - 1):
        v = bytes([LIST]) + struct.pack(">i", 1) + v
    return _field(LIST, 60, v)


def test_nesting_limit_in_unknown_fields():
    assert one(_hdr_with(_nested_lists(F.MAX_DEPTH) + b"\x00")).seq_id == 1
    assert code_of(_hdr_with(_nested_lists(F.MAX_DEPTH + 1) + b"\x00")) == F.FE_TOO_DEEP
    assert code_of(_hdr_with(_nested_lists(5000) + b"\x00")) == F.FE_TOO_DEEP


def test_frame_error_is_a_value_error_with_code_and_text():
    with pytest.raises(ValueError) as ei:
        F.scan(b"\xab\xba\x01\x01\x00\x00\x00\x00")
    assert ei.value.code == F.FE_BAD_LENGTH
    assert str(ei.value) == F.strerror(F.FE_BAD_LENGTH)
    codes = [F.FE_BAD_MAGIC, F.FE_TOO_LARGE, F.FE_BAD_LENGTH, F.FE_HEADER_TOO_LARGE,
             F.FE_BAD_HEADER, F.FE_BAD_FIELD_TYPE, F.FE_TOO_DEEP, F.FE_BAD_CHECKSUM,
             F.FE_BAD_THRIFT]
    assert codes == list(range(-1, -10, -1)) and F.FE_NEED_MORE == 0
    assert len({F.strerror(c) for c in codes}) == len(codes)


# ------------------------------------------------------------------ buffers

FRAMES = [
    F.encode_request(1, "a", b"x" * 5, checksum=True),
    F.encode_response(2, b"yy", status=1, message="m"),
    F.encode_thrift_message("ping", 1, 3, b"\x00"),
    F.encode_proxy_restart(),
    F.encode_heartbeat(4, appkey="k"),
    ref.encode_frame(b"", b"compressed!", protocol=0x21),
]
STREAM = b"".join(FRAMES)


def _ids(frames):
    return [(f.kind, f.length, f.seq_id, f.msg_type) for f in frames]


def test_many_frames_in_one_buffer():
    frames, used = F.scan(STREAM)
    assert used == len(STREAM) and [f.bytes for f in frames] == FRAMES
    assert [f.offset for f in frames] == [sum(map(len, FRAMES[:i])) for i in range(len(FRAMES))]


def test_scan_start_end_and_partial_tail():
    frames, used = F.scan(b"??" + STREAM + b"\xab", 2, len(STREAM) + 3)
    assert len(frames) == len(FRAMES) and used == len(STREAM)
    assert frames[0].offset == 2


def test_frames_before_a_bad_one_are_returned_first():
    buf = FRAMES[0] + FRAMES[1] + b"GARBAGE!"
    frames, used = F.scan(buf)
    assert len(frames) == 2 and used == len(FRAMES[0]) + len(FRAMES[1])
    with pytest.raises(F.FrameError):
        F.scan(buf, used)


def test_every_split_point_through_the_scanner():
    want = _ids(F.scan(STREAM)[0])
    for cut in range(len(STREAM) + 1):
        s = F.FrameScanner()
        got = s.feed(STREAM[:cut]) + s.feed(STREAM[cut:])
        assert _ids(got) == want and s.buffered == 0


def test_one_byte_trickle():
    s = F.FrameScanner()
    got = []
    for i in range(len(STREAM)):
        got += s.feed(STREAM[i:i + 1])
    assert [f.bytes for f in got] == FRAMES


def test_scanner_raises_on_garbage_and_limits():
    with pytest.raises(F.FrameError):
        F.FrameScanner().feed(b"\x00\x00\x00\x00")
    s = F.FrameScanner(max_frame=100)
    with pytest.raises(F.FrameError) as ei:
        s.feed(F.encode_request(1, "s", b"x" * 200)[:8])
    assert ei.value.code == F.FE_TOO_LARGE


def test_bench_scan_counts_frames():
    buf = F.encode_request(1, "s", b"x" * 128) * 100
    assert F.bench_scan(buf) == 100
    assert F.bench_scan(b"") == 0
    with pytest.raises(F.FrameError):
        F.bench_scan(b"\x00\x00\x00\x00")


def test_decode_frame_requires_exactly_one_frame():
    with pytest.raises(F.FrameError):
        F.decode_frame(FRAMES[0][:-1])
    with pytest.raises(ValueError):
        F.decode_frame(FRAMES[0] + FRAMES[1])


def test_scan_header_of_a_frame_too_large_to_buffer():
    buf = F.encode_request(31, "svc", b"x" * 5000, local_context={"octo-remote-appkey": "a"},
                           checksum=True)
    with pytest.raises(F.FrameError):
        F.scan(buf[:100], max_frame=1000)
    hl = struct.unpack(">H", buf[8:10])[0]
    assert F.scan_header(buf[:10 + hl - 1]) is None
    f = F.scan_header(buf[:10 + hl + 3])
    assert (f.seq_id, f.service_name, f.remote_appkey, f.length) == (31, "svc", "a", len(buf))
    assert f.checksum and buf[f.seq_off:f.seq_off + 8] == struct.pack(">q", 31)
    with pytest.raises(F.FrameError):
        F.scan_header(b"\x00\x00\x00\x10")
    assert F.scan_header(ref.encode_frame(b"", b"zz", protocol=0x41)).compressed
