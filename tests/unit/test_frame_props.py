"""Property tests: the compiled codec against the pure-Python reference and
against thriftpy2 (random headers with unknown fields of every type)."""

import os
import struct
import sys
from pathlib import Path

import pytest
import thriftpy2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.utils import deserialize, serialize

from octoproxy._core import frame as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import octo_codec as ref

IDL = Path(__file__).resolve().parents[2] / "protos" / "octo_header.thrift"
idl = thriftpy2.load(str(IDL), module_name="octo_header_thrift")

# OCTOPROXY_PROP_EXAMPLES=5000 for a longer local run
EXAMPLES = int(os.environ.get("OCTOPROXY_PROP_EXAMPLES", "200"))
PROPS = settings(max_examples=EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SPLITS = settings(PROPS, max_examples=max(EXAMPLES // 4, 10))

i8 = st.integers(-128, 127)
i16 = st.integers(-(2**15), 2**15 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
dbl = st.floats(allow_nan=False)
text = st.text(max_size=12)
ctx_keys = st.sampled_from(["octo-remote-appkey", "octo-hash-key", "octo-proxy-restart",
                            "octo-proxy", "octo-liteset", "octo-set", "octo-swimlane",
                            "octo-", "octo-setx", "x"]) | text
ctx = st.dictionaries(ctx_keys, st.sampled_from(["1", "0", ""]) | text, max_size=5)


def _opt(d):
    """A strategy for a dict whose every key is optional."""
    return st.fixed_dictionaries({}, optional=d)


# --- generic Thrift values for unknown fields: (type, value) trees
SCALARS = {ref.BOOL: st.booleans(), ref.BYTE: i8, ref.I16: i16, ref.I32: i32, ref.I64: i64,
           ref.DOUBLE: dbl, ref.STRING: st.binary(max_size=8)}


def _typed_value(depth=3):
    scal = st.sampled_from(sorted(SCALARS)).flatmap(lambda t: st.tuples(st.just(t), SCALARS[t]))
    if depth == 0:
        return scal
    sub = _typed_value(depth - 1)

    struct_ = st.lists(st.tuples(i16, sub), max_size=3).map(
        lambda fs: (ref.STRUCT, [(fid, t, v) for fid, (t, v) in fs]))
    list_ = st.sampled_from([ref.LIST, ref.SET]).flatmap(
        lambda lt: st.lists(sub, max_size=3).map(
            lambda items: (lt, (items[0][0] if items else ref.I32,
                                [v for t, v in items if t == items[0][0]]))))
    map_ = st.lists(st.tuples(scal, sub), max_size=3).map(
        lambda kvs: (ref.MAP, (kvs[0][0][0] if kvs else ref.STRING,
                               kvs[0][1][0] if kvs else ref.STRING,
                               [(k[1], v[1]) for k, v in kvs
                                if k[0] == kvs[0][0][0] and v[0] == kvs[0][1][0]])))
    return st.one_of(scal, struct_, list_, map_)


def unknown_fields(known_ids):
    fid = i16.filter(lambda x: x not in known_ids)
    return st.lists(st.tuples(st.integers(0, 8), fid, _typed_value()).map(
        lambda u: (u[0], u[1], u[2][0], u[2][1])), max_size=3)


def _with_unknown(strategy, known_ids, unknown):
    if not unknown:
        return strategy
    return st.tuples(strategy, unknown_fields(known_ids)).map(
        lambda t: {**t[0], "_unknown": t[1]} if t[1] else t[0])


def headers(unknown=True):
    req = _opt({"serviceName": text, "callType": st.integers(0, 1), "timeout": i32})
    req = st.tuples(req, i64).map(lambda t: {**t[0], "sequenceId": t[1]})
    resp = _opt({"status": st.integers(0, 9), "message": text})
    resp = st.tuples(resp, i64).map(lambda t: {**t[0], "sequenceId": t[1]})
    trace = _opt({"clientAppkey": text, "traceId": text, "spanId": text, "rootMessageId": text,
                  "currentMessageId": text, "serverMessageId": text, "debug": st.booleans(),
                  "sample": st.booleans(), "clientIp": text})
    load = _opt({"averageLoad": dbl, "oldGC": i32, "threadNum": i32, "queueSize": i32,
                 "methodQpsMap": st.dictionaries(text, dbl, max_size=3)})
    hb = _opt({"appkey": text, "sendTime": i64, "loadInfo": load, "status": i32})
    h = _opt({
        "messageType": st.integers(0, 3),
        "requestInfo": _with_unknown(req, {1, 2, 3, 4}, unknown),
        "responseInfo": _with_unknown(resp, {1, 2, 3}, unknown),
        "traceInfo": _with_unknown(trace, set(range(1, 10)), unknown),
        "globalContext": ctx, "localContext": ctx,
        "heartbeatInfo": _with_unknown(hb, {1, 2, 3, 4}, unknown),
    })
    h = _with_unknown(h, set(range(1, 8)), unknown)
    return h.filter(lambda d: "requestInfo" in d or "responseInfo" in d
                    or d.get("messageType", 0) > 0)


def strip_unknown(v):
    if isinstance(v, dict):
        return {k: strip_unknown(x) for k, x in v.items() if k != "_unknown"}
    return v


def frames_args():
    return st.fixed_dictionaries({"body": st.binary(max_size=64), "checksum": st.booleans(),
                                  "version": st.integers(0, 255), "protocol": st.integers(0, 3)})


def check_scan_matches(f, h, buf):
    """The fields fr_scan reports agree with the header they were made from."""
    req, resp = h.get("requestInfo"), h.get("responseInfo")
    assert f.msg_type == h.get("messageType", -1)
    assert f.is_request == (req is not None) and f.is_response == (resp is not None)
    if resp is not None:
        assert f.seq_id == resp["sequenceId"] and f.status == resp.get("status", -1)
        assert f.message == resp.get("message")
    if req is not None:
        if resp is None:
            assert f.seq_id == req["sequenceId"]
        assert f.service_name == req.get("serviceName")
        assert f.timeout == req.get("timeout", -1) and f.call_type == req.get("callType", 0)
    if req is None and resp is None:
        assert f.seq_off == -1
    else:
        assert struct.unpack(">q", buf[f.seq_off:f.seq_off + 8])[0] == f.seq_id
    g, loc = h.get("globalContext") or {}, h.get("localContext") or {}
    assert (f.liteset, f.set, f.swimlane) == (g.get("octo-liteset"), g.get("octo-set"),
                                              g.get("octo-swimlane"))
    assert (f.remote_appkey, f.hash_key) == (loc.get("octo-remote-appkey"), loc.get("octo-hash-key"))
    assert f.proxy_restart == (loc.get("octo-proxy-restart") == "1")
    assert f.proxy_announce == (loc.get("octo-proxy") == "1")


@PROPS
@given(headers(), frames_args())
def test_reference_encoded_frames_decode_in_the_core(h, fa):
    buf = ref.encode_frame(ref.encode_header(h), fa["body"], protocol=fa["protocol"],
                           checksum=fa["checksum"], version=fa["version"])
    clean = strip_unknown(h)
    d = F.decode_frame(buf)
    assert d["header"] == clean and d["body"] == fa["body"]
    assert (d["version"], d["checksum"]) == (fa["version"], fa["checksum"])
    assert d == ref.decode_frame(buf)
    (f,), used = F.scan(buf)
    assert used == len(buf)
    check_scan_matches(f, clean, buf)


@PROPS
@given(headers(unknown=False), frames_args())
def test_core_encoded_frames_decode_in_the_reference(h, fa):
    hdr = F.encode_header(h)
    assert hdr == ref.encode_header(h)
    buf = F.encode_frame(hdr, fa["body"], protocol=fa["protocol"], checksum=fa["checksum"],
                         version=fa["version"])
    assert buf == ref.encode_frame(hdr, fa["body"], protocol=fa["protocol"],
                                   checksum=fa["checksum"], version=fa["version"])
    d = ref.decode_frame(buf)
    assert d["header"] == h and d["body"] == fa["body"]
    assert F.decode_header(hdr) == h


@PROPS
@given(headers(), frames_args(), i64)
def test_forwarding_rewrites_only_the_sequence_id(h, fa, new_seq):
    buf = bytearray(b"\x00" * 3 + ref.encode_frame(ref.encode_header(h), fa["body"],
                                                   checksum=fa["checksum"]))
    (f,), _ = F.scan(buf, 3)
    before = bytes(buf)
    if f.seq_off < 0:
        with pytest.raises(ValueError):
            F.set_seq_id(buf, f, new_seq)
        return
    F.set_seq_id(buf, f, new_seq)
    lo, hi = 3 + f.seq_off, 3 + f.seq_off + 8
    changed = {i for i in range(len(buf)) if buf[i] != before[i]}
    allowed = set(range(lo, hi)) | (set(range(len(buf) - 4, len(buf))) if f.checksum else set())
    assert changed <= allowed
    (g,), _ = F.scan(buf, 3)
    assert g.seq_id == new_seq
    d = F.decode_frame(bytes(buf[3:]))["header"]
    info = d.get("responseInfo") or d["requestInfo"]
    assert info["sequenceId"] == new_seq


@SPLITS
@given(st.lists(st.tuples(headers(unknown=False), frames_args()), min_size=1, max_size=4),
       st.data())
def test_random_splits_of_a_stream(items, data):
    frames = [ref.encode_frame(ref.encode_header(h), fa["body"], checksum=fa["checksum"])
              for h, fa in items]
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    s, got, prev = F.FrameScanner(), [], 0
    for c in [*cuts, len(stream)]:
        got += s.feed(stream[prev:c])
        prev = c
    assert [f.bytes for f in got] == frames and s.buffered == 0


# ------------------------------------------------------------------ thriftpy2


def to_thriftpy(h):
    sub = {"requestInfo": idl.RequestInfo, "responseInfo": idl.ResponseInfo,
           "traceInfo": idl.TraceInfo, "heartbeatInfo": idl.HeartbeatInfo, "loadInfo": idl.LoadInfo}

    def conv(cls, d):
        return cls(**{k: conv(sub[k], v) if k in sub else v for k, v in d.items()})
    return conv(idl.Header, h)


def from_thriftpy(obj):
    if isinstance(obj, thriftpy2.thrift.TPayload):
        return {k: from_thriftpy(v) for k, v in obj.__dict__.items() if v is not None}
    return obj


@PROPS
@given(headers(unknown=False))
def test_header_bytes_match_thriftpy2_both_ways(h):
    ours = F.encode_header(h)
    theirs = serialize(to_thriftpy(h), TBinaryProtocolFactory())
    assert ours == theirs
    assert from_thriftpy(deserialize(idl.Header(), ours, TBinaryProtocolFactory())) == h
    assert F.decode_header(theirs) == h
