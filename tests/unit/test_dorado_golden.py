"""Golden frames made by the official OCTO RPC implementation (Dorado).

How they were made: tests/data/dorado/README.md.  Each is decoded by the
compiled codec and by the independent reference codec, and the project's own
encoders are checked against them: these are facts about the official wire
format, not about this project's reading of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.reference import octo_codec as ref

from octoproxy._core import frame as F

DATA = Path(__file__).resolve().parents[1] / "data" / "dorado"
SVC = "com.meituan.dorado.test.thrift.api.Echo"


def golden(name: str) -> bytes:
    return (DATA / f"{name}.bin").read_bytes()


ALL = sorted(p.stem for p in DATA.glob("*.bin"))


def one(b: bytes) -> F.Frame:
    frames, used = F.scan(b)
    assert used == len(b) and len(frames) == 1
    return frames[0]


def test_there_are_golden_frames():
    assert len(ALL) >= 12


@pytest.mark.parametrize("name", ALL)
def test_project_and_reference_agree_on_every_golden_frame(name):
    b = golden(name)
    f = one(b)
    n, info = ref.scan_one(b)
    assert n == f.length == len(b)
    assert info["flags"] == f.flags
    assert f.version == 0  # Dorado writes version 0
    mine = F.decode_frame(b)
    theirs = ref.decode_frame(b)
    assert mine["header"] == theirs["header"] and mine["body"] == theirs["body"]
    if f.compressed:
        plain = ref.uncompress_frame(b)
        assert F.decode_frame(plain)["header"] == ref.decode_frame(plain)["header"]


def test_dorado_request_fields_and_its_thrift_body():
    f = one(golden("request_seq0"))
    assert (f.seq_id, f.call_type, f.timeout, f.service_name) == (0, 0, 1000, SVC)
    assert f.protocol == 0x01 and f.is_request and f.swimlane == "blue"
    assert f.remote_appkey == "com.example.dorado.server"
    assert (f.method, f.body_seq_id) == ("echo", 0)
    h = F.decode_frame(golden("request_seq0"))["header"]
    assert h["traceInfo"] == {"clientAppkey": "com.example.dorado.client", "clientIp": "10.0.0.7"}
    assert ref.decode_thrift_message(f.body) == {"type": 1, "name": "echo", "seq_id": 0}


def test_dorado_one_way_request_is_call_type_1_with_a_thrift_call_body():
    f = one(golden("request_oneway_seq7"))
    assert (f.seq_id, f.call_type, f.method, f.body_seq_id) == (7, 1, "echo", 7)
    assert f.body[3] == 1  # a CALL message: Dorado does not use Thrift ONEWAY


def test_dorado_truncates_the_body_seqid_to_i32():
    f = one(golden("request_checksum_seq2p31"))
    assert f.checksum and f.protocol == 0x81
    assert f.seq_id == 2**31 and f.body_seq_id == -(2**31)


def test_project_request_encoder_is_byte_equal_to_dorado_but_for_the_version():
    b = golden("request_seq0")
    f = one(b)
    mine = F.encode_request(
        0, SVC, f.body, timeout=1000, version=0,
        trace_info={"clientAppkey": "com.example.dorado.client", "clientIp": "10.0.0.7"},
        global_context={"octo-swimlane": "blue"},
        local_context={"octo-remote-appkey": "com.example.dorado.server"})
    assert mine == b


@pytest.mark.parametrize("name,seq,method", [("request_gzip_seq3", 3, "echo"),
                                             ("request_snappy_seq4", 4, "echo")])
def test_compressed_requests_are_read_by_prefix(name, seq, method):
    b = golden(name)
    f = one(b)
    assert f.compressed and f.seq_off == -1  # the scanner never guesses inside
    got = F.read_compressed_request(b)
    assert got is not None
    assert (got["seq_id"], got["is_request"], got["method"], got["body_seq_id"]) == (
        seq, True, method.encode(), seq)
    plain = ref.uncompress_frame(b)
    assert one(plain).seq_id == seq


def test_snappy_codec_round_trips_dorado_snappy():
    b = golden("request_snappy_seq4")
    payload = b[10:-4]
    plain = F.snappy_decompress(payload)
    assert plain == ref.snappy_uncompress(payload)
    assert F.snappy_decompress(F.snappy_compress(plain)) == plain
    assert ref.snappy_uncompress(F.snappy_compress(plain)) == plain
    assert F.snappy_decompress(payload, 10) == plain[:10]
    with pytest.raises(ValueError):
        F.snappy_decompress(payload[:-5])


def test_dorado_error_answer_is_status_message_and_a_thrift_exception_body():
    f = one(golden("response_service_exception_seq0"))
    assert (f.seq_id, f.status) == (0, F.STATUS_SERVICE)
    assert f.message == f"Not find serviceImpl by serviceName={SVC}"
    exc = F.decode_thrift_exception(f.body)
    assert (exc["name"], exc["seq_id"], exc["type"]) == ("echo", 0, F.TAPP_UNKNOWN)
    assert f.message in exc["message"]
    r = ref.decode_thrift_message(f.body)
    assert (r["type"], r["name"], r["seq_id"], r["message"], r["exc_type"]) == (
        3, "echo", 0, exc["message"], 0)


def test_project_error_answer_is_byte_equal_to_dorado_but_for_the_version():
    b = golden("response_service_exception_seq0")
    f = one(b)
    text = F.decode_thrift_exception(f.body)["message"]
    mine = F.encode_error_response(0, F.STATUS_SERVICE, f.message, method="echo", body_seq_id=0)
    # Dorado puts a longer text (with exception class names) in the body than
    # in ResponseInfo.message; the proxy uses one message for both
    want = F.encode_frame(F.encode_header({"messageType": 0, "responseInfo": {
        "sequenceId": 0, "status": F.STATUS_SERVICE, "message": f.message}}),
        F.encode_thrift_exception("echo", 0, f.message))
    assert mine == want
    assert F.encode_thrift_exception("echo", 0, text) == f.body
    m = one(mine)
    assert mine[m.header_off:m.body_off] == b[f.header_off:f.body_off]  # same header bytes


def test_error_answer_keeps_checksum_and_i32_body_seqid():
    b = golden("response_rpc_exception_checksum_seq2p31")
    f = one(b)
    assert f.checksum and (f.seq_id, f.status, f.message) == (2**31, F.STATUS_RPC, "boom")
    assert F.decode_thrift_exception(f.body)["seq_id"] == -(2**31)
    req = one(golden("request_checksum_seq2p31"))
    mine = one(F.encode_error_response(req.seq_id, F.STATUS_RPC, "boom", protocol=req.protocol,
                                       method=req.method, body_seq_id=req.body_seq_id))
    assert mine.checksum and mine.seq_id == 2**31
    assert F.decode_thrift_exception(mine.body)["seq_id"] == -(2**31)


@pytest.mark.parametrize("protocol", [0x41, 0x21, 0xC1, 0xA1])
def test_error_answer_to_a_compressed_request_is_compressed_the_same_way(protocol):
    b = F.encode_error_response(9, F.STATUS_PROTOCOL, "no", protocol=protocol, method="echo")
    f = one(b)
    assert f.compressed and f.protocol == protocol
    plain = ref.uncompress_frame(b)
    h = ref.decode_frame(plain)
    assert h["header"]["responseInfo"] == {"sequenceId": 9, "status": 5, "message": "no"}
    assert ref.decode_thrift_message(h["body"])["message"] == "no"


def test_dorado_provider_answers_one_way_calls():
    f = one(golden("provider_answer_oneway_seq7"))
    assert f.is_response and (f.seq_id, f.status) == (7, 0)
    assert ref.decode_thrift_message(f.body)["type"] == 2  # REPLY


def test_dorado_provider_answers_normal_heartbeat_with_status_3():
    f = one(golden("provider_answer_normal_heartbeat_seq9"))
    assert (f.msg_type, f.seq_id, f.status) == (F.MT_HEARTBEAT, 9, F.STATUS_RPC)


def test_dorado_scanner_heartbeat_answer_and_the_project_encoder():
    b = golden("provider_answer_scanner_heartbeat_seq11")
    h = F.decode_frame(b)["header"]
    assert h["messageType"] == F.MT_SCANNER_HEARTBEAT
    assert h["responseInfo"] == {"sequenceId": 11, "status": 0}
    hb = h["heartbeatInfo"]
    assert hb["status"] == F.HB_ALIVE and hb["appkey"] == "com.example.dorado.server"
    assert 1_500_000_000_000 < hb["sendTime"] < 10_000_000_000_000  # milliseconds
    mine = F.encode_scanner_heartbeat_response(11, appkey=hb["appkey"], send_time_ms=hb["sendTime"])
    assert mine[3:] == b[3:]  # byte-equal but for the version byte


def test_heartbeat_info_always_carries_its_required_status():
    for b in (F.encode_heartbeat(1, appkey="a"), F.encode_heartbeat(1, send_time_ms=5),
              F.encode_heartbeat(1, response=True, status=F.HB_STOPPED)):
        hb = F.decode_frame(b)["header"]["heartbeatInfo"]
        assert "status" in hb
        assert ref.decode_frame(b)["header"]["heartbeatInfo"]["status"] == hb["status"]


def test_trace_info_always_carries_client_appkey():
    b = F.encode_request(1, SVC, trace_info={"traceId": "t"})
    assert F.decode_frame(b)["header"]["traceInfo"] == {"clientAppkey": "", "traceId": "t"}
    b = F.encode_request(1, SVC, trace_info={"clientAppkey": "me"})
    assert F.decode_frame(b)["header"]["traceInfo"] == {"clientAppkey": "me"}


@pytest.mark.parametrize("protocol", [0x01, 0x81])
def test_pre_encoded_local_answer_equals_the_encoder_for_a_dorado_request(protocol):
    """The data path's template answers (answer.pxi) carry the same bytes as
    encode_error_response: the request's checksum bit, the Thrift EXCEPTION body."""
    from octoproxy._core import datapath

    kind = (protocol & 3) | (4 if protocol & 0x80 else 0) | 8
    got = datapath._answer_for_test(F.STATUS_SERVICE, "no route", False, kind, 2**31,
                                    b"echo", -(2**31))
    want = F.encode_error_response(2**31, F.STATUS_SERVICE, "no route", protocol=protocol,
                                   method="echo", body_seq_id=-(2**31))
    assert got == want
    assert F.decode_thrift_exception(one(got).body)["seq_id"] == -(2**31)
