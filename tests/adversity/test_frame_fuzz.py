"""Fuzz the frame scanner with hostile byte streams.

Every input is also run through the pure-Python reference scanner: both must
agree on accept/reject and on what an accepted frame holds, and the compiled
one must never crash, hang or read outside the buffer (run under the debug
build and/or ASan for the last one, see CONTRIBUTING.md "Fuzzing and the sanitizer build").

CI runs a few hundred examples per test (seconds).  Longer run:
    OCTOPROXY_FUZZ_EXAMPLES=200000 PYTHONPATH=src python -m pytest tests/adversity/test_frame_fuzz.py
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octoproxy._core import frame as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import octo_codec as ref

EXAMPLES = int(os.environ.get("OCTOPROXY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
HEADER_LEVEL = {F.FE_BAD_HEADER, F.FE_BAD_FIELD_TYPE, F.FE_TOO_DEEP}

SEEDS = [
    F.encode_request(1, "com.x.Echo", b"body", timeout=5, global_context={"octo-set": "s"},
                     local_context={"octo-remote-appkey": "a", "octo-hash-key": "h"},
                     trace_info={"traceId": "t", "debug": True}),
    F.encode_request(2, "s", b"", checksum=True, local_context={"octo-proxy": "1"}),
    F.encode_response(3, b"r", status=3, message="m", local_context={"octo-proxy-restart": "1"}),
    F.encode_heartbeat(4, appkey="k", send_time_ms=5),
    F.encode_proxy_restart(),
    F.encode_thrift_message("ping", 1, 6, b"\x0c\x00\x01\x00"),
    ref.encode_frame(ref.encode_header({"requestInfo": {"sequenceId": 7}, "_unknown": [
        (0, 40, ref.LIST, (ref.MAP, [(ref.STRING, ref.STRUCT, [(b"k", [(1, ref.I64, 9)])])])),
        (1, 41, ref.SET, (ref.DOUBLE, [1.0, 2.0])), (1, 42, ref.STRUCT, [(3, ref.BOOL, True)])]}),
        b"xyz"),
    ref.encode_frame(b"", b"\x01\x02compressed", protocol=0x41),
]


def reference_scan(buf, max_frame, max_header):
    """The reference's answer for a whole buffer: (infos, consumed, error code or None)."""
    infos, pos = [], 0
    while pos < len(buf):
        r, info = ref.scan_one(buf[pos:], max_frame, max_header)
        if r == 0:
            break
        if r < 0:
            return infos, pos, r
        infos.append(info)
        pos += r
    return infos, pos, None


def core_scan(buf, max_frame, max_header):
    frames, pos, err = [], 0, None
    while True:
        try:
            got, used = F.scan(buf, pos, max_frame=max_frame, max_header=max_header)
        except F.FrameError as e:
            err = e.code
            break
        if not got:
            break
        frames += got
        pos += used
    return frames, pos, err


def check_agreement(buf, max_frame=F.DEFAULT_MAX_FRAME, max_header=F.DEFAULT_MAX_HEADER):
    frames, pos, err = core_scan(buf, max_frame, max_header)
    infos, rpos, rerr = reference_scan(buf, max_frame, max_header)
    assert pos == rpos and len(frames) == len(infos)
    assert (err is None) == (rerr is None)
    if err is not None and not (err in HEADER_LEVEL and rerr in HEADER_LEVEL):
        # framing errors are decided by the same rules, in the same order
        assert err == rerr
    for f, info in zip(frames, infos, strict=True):
        assert f.kind == info["kind"] and f.length == len(f.bytes)
        assert f.flags == info["flags"]
        if f.kind == F.FK_OCTO:
            assert f.msg_type == info["msg_type"]
            assert F.decode_frame(f.bytes) == ref.decode_frame(f.bytes)
        else:
            assert (f.seq_id, f.service_name) == (info["seq_id"], info["name"])
    return frames, pos, err


def mutate(data, draw):
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "int"]))
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and b:
            b[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 2, 3, 8, 10, 11, 12, 13, 14, 15]))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            del b[i:i + draw(st.integers(1, 4))]
        elif op == "truncate":
            del b[i:]
        elif op == "int" and len(b) >= 4:
            # lengths/counts are where parsers die: plant extreme i32s
            j = draw(st.integers(0, len(b) - 4))
            b[j:j + 4] = draw(st.sampled_from([b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff",
                                               b"\x80\x00\x00\x00", b"\x00\x00\x00\x00",
                                               b"\x00\x00\x10\x00", b"\x00\x00\x00\x01"]))
    return bytes(b)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(buf):
    check_agreement(buf)
    check_agreement(b"\xab\xba" + buf)


@FUZZ
@given(st.data())
def test_mutated_valid_frames(data):
    stream = b"".join(data.draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4)))
    buf = mutate(stream, data.draw)
    max_frame = data.draw(st.sampled_from([F.DEFAULT_MAX_FRAME, 64, 4096]))
    max_header = data.draw(st.sampled_from([F.DEFAULT_MAX_HEADER, 16]))
    check_agreement(buf, max_frame, max_header)
    try:
        F.decode_frame(buf)
    except ValueError:  # FrameError included
        pass


@FUZZ
@given(st.data())
def test_random_splits_of_mutated_streams(data):
    stream = b"".join(data.draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4)))
    if data.draw(st.booleans()):
        stream = mutate(stream, data.draw)
    frames, _, err = core_scan(stream, F.DEFAULT_MAX_FRAME, F.DEFAULT_MAX_HEADER)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    s, got, raised = F.FrameScanner(), [], None
    # feed(b"") at the end: an error behind frames already returned is raised
    # by the next feed
    for chunk in [*(stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)), b""]:
        try:
            got += s.feed(chunk)
        except F.FrameError as e:
            raised = e.code
            break
    # a split never changes what is found, only when: the frames before the
    # first bad byte come out, then the same error
    assert [f.bytes for f in got] == [f.bytes for f in frames]
    assert raised == err


@FUZZ
@given(st.binary(max_size=64), st.integers(-(2**63), 2**63 - 1))
def test_set_seq_id_on_accepted_frames_keeps_them_valid(tail, seq):
    for seed in SEEDS:
        buf = bytearray(seed + tail)
        frames, _ = F.scan(buf)
        f = frames[0]
        if f.seq_off < 0:
            continue
        if f.kind == F.FK_THRIFT:
            seq = seq & 0x7FFFFFFF
        F.set_seq_id(buf, f, seq)
        assert F.scan(buf)[0][0].seq_id == seq


@FUZZ
@given(st.data())
def test_scan_header_agrees_with_scan(data):
    stream = b"".join(data.draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=2)))
    buf = mutate(stream, data.draw)
    try:
        h = F.scan_header(buf)
    except F.FrameError:
        h = None
    try:
        frames, _ = F.scan(buf)
    except F.FrameError:
        return
    if frames and frames[0].kind == F.FK_OCTO and not frames[0].compressed:
        f = frames[0]
        assert h is not None
        assert (h.seq_id, h.seq_off, h.flags, h.msg_type, h.service_name, h.length) == (
            f.seq_id, f.seq_off, f.flags, f.msg_type, f.service_name, f.length)
