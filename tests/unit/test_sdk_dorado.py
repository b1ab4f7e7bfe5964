"""The SDK provider answers Dorado clients the way Dorado providers do
(docs/protocol.md, "Compatibility with Dorado"): scanner heartbeats with
messageType 2 and heartbeatInfo, errors with a Thrift EXCEPTION body.
Real UDS sockets, the real provider code."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from tests.reference import octo_codec as ref

from octoproxy._core import frame as F
from octoproxy.sdk import Request, serve

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "dorado"


def exchange(handler, frames: list[bytes], want: int) -> list[F.Frame]:
    async def main() -> list[F.Frame]:
        d = tempfile.mkdtemp(prefix="opd", dir="/tmp")
        path = os.path.join(d, "p.sock")
        server = await serve(path, handler)
        try:
            r, w = await asyncio.open_unix_connection(path)
            w.write(b"".join(frames))
            sc = F.FrameScanner()
            got: list[F.Frame] = []
            while len(got) < want:
                data = await asyncio.wait_for(r.read(65536), 10)
                assert data, "provider closed the connection"
                got += sc.feed(data)
            w.close()
            return got
        finally:
            server.close()
            await server.wait_closed()
            os.unlink(path)
            os.rmdir(d)

    return asyncio.run(main())


def echo(req: Request) -> bytes | tuple[int, bytes, str | None]:
    if b"fail" in req.body:
        return (1, b"", "it failed")
    return b"ok"


def test_scanner_heartbeat_gets_message_type_2_with_status_and_ms_send_time():
    scan = F.encode_frame(F.encode_header({"messageType": 2, "requestInfo": {
        "serviceName": "", "sequenceId": 11, "callType": 0, "timeout": 0}}))
    before = int(time.time() * 1000)
    (f,) = exchange(echo, [scan], 1)
    h = ref.decode_frame(f.bytes)["header"]
    assert h["messageType"] == F.MT_SCANNER_HEARTBEAT
    assert h["responseInfo"] == {"sequenceId": 11, "status": 0}
    assert h["heartbeatInfo"]["status"] == F.HB_ALIVE
    assert before <= h["heartbeatInfo"]["sendTime"] <= int(time.time() * 1000)


def test_normal_heartbeat_still_gets_message_type_1():
    (f,) = exchange(echo, [F.encode_heartbeat(4)], 1)
    assert (f.msg_type, f.seq_id, f.status) == (F.MT_HEARTBEAT, 4, 0)


def test_error_for_a_dorado_request_has_a_thrift_exception_body():
    req = (GOLDEN / "request_checksum_seq2p31.bin").read_bytes()  # body: echo("sum")
    failing = F.encode_request(9, "com.x.Echo", F.encode_thrift_message("echo", 1, 9, b"fail")[4:])
    a, b = exchange(echo, [req, failing], 2)
    assert (a.seq_id, a.status, a.body[:4]) == (2**31, 0, b"ok")
    assert a.checksum  # the request's checksum convention is kept
    assert (b.seq_id, b.status, b.message) == (9, 1, "it failed")
    exc = ref.decode_thrift_message(b.body)
    assert (exc["type"], exc["name"], exc["seq_id"], exc["message"]) == (3, "echo", 9, "it failed")


def test_error_for_a_non_thrift_body_stays_empty():
    (f,) = exchange(echo, [F.encode_request(3, "s", b"fail")], 1)
    assert (f.status, f.message, f.body) == (1, "it failed", b"")
