"""Local answers are pre-encoded once per reason and patched per request
(datapath answer.pxi): the patched frame must be byte for byte what the
encoder makes for that request."""

from __future__ import annotations

import pytest

from octoproxy._core import datapath as D
from octoproxy._core import frame as F

SEQ_IDS = [0, 1, 2**31, -1, -(2**63), 2**63 - 1, 0x0102030405060708]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("seq_id", SEQ_IDS)
def test_plain_answer_is_the_encoders(protocol: int, restart: bool, seq_id: int) -> None:
    msg = "unknown service 'com.x': no route"
    got = D._answer_for_test(8, msg, restart, protocol, seq_id)
    want = F.encode_response(
        seq_id,
        b"",
        status=8,
        message=msg,
        local_context={"octo-proxy-restart": "1"} if restart else None,
        protocol=protocol,
    )
    assert got == want


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("method", [b"", b"echo", b"a" * 300, "m\u00e9thode".encode()])
@pytest.mark.parametrize("body_seq", [0, 7, -1, 2**31 - 1])
def test_thrift_exception_answer_is_the_encoders(checksum: bool, method: bytes, body_seq: int) -> None:
    # kind: serialization 1 (Thrift), 4 = checksum trailer, 8 = Thrift EXCEPTION body
    kind = 1 | (4 if checksum else 0) | 8
    protocol = 1 | (0x80 if checksum else 0)
    msg = "overload: 10 requests in flight on this connection (limit 10)"
    got = D._answer_for_test(6, msg, False, kind, 42, method, body_seq)
    want = F.encode_error_response(
        42, 6, msg, protocol=protocol, method=method, body_seq_id=body_seq
    )
    assert got == want
    frames, used = F.scan(got)
    assert used == len(got) and frames[0].seq_id == 42
