"""Slow, obviously-correct pure-Python twin of octoproxy._core.frame.

Written from docs/protocol.md, not from frame.pyx, so that the compiled codec
is checked against an independent reading of the wire format:

- encode_header/encode_frame: Header dicts (IDL field names) to bytes, with
  optional unknown fields (``"_unknown": [(index, fid, ttype, value), ...]``
  in any struct dict; inserted before the index-th known field).
- scan_one: the same contract as fr_scan (length > 0, 0 = need more, FE_* < 0)
  plus a dict of what it learnt, for differential tests and fuzzing.
- decode_frame: full decode of one frame in the shape frame.decode_frame uses.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

# Thrift type codes
STOP, BOOL, BYTE, DOUBLE, I16, I32, I64, STRING, STRUCT, MAP, SET, LIST = (
    0, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15)

FK_OCTO, FK_THRIFT = 1, 2
FF_CHECKSUM, FF_GZIP, FF_SNAPPY, FF_REQUEST, FF_RESPONSE = 1, 2, 4, 8, 16
FF_PROXY_RESTART, FF_PROXY_ANNOUNCE, FF_RESTART_NOTICE = 32, 64, 128
FE_NEED_MORE, FE_BAD_MAGIC, FE_TOO_LARGE, FE_BAD_LENGTH = 0, -1, -2, -3
FE_HEADER_TOO_LARGE, FE_BAD_HEADER, FE_BAD_FIELD_TYPE, FE_TOO_DEEP = -4, -5, -6, -7
FE_BAD_CHECKSUM, FE_BAD_THRIFT = -8, -9
MAX_DEPTH = 32

TRACE_FIELDS = {1: ("clientAppkey", STRING), 2: ("traceId", STRING), 3: ("spanId", STRING),
                4: ("rootMessageId", STRING), 5: ("currentMessageId", STRING),
                6: ("serverMessageId", STRING), 7: ("debug", BOOL), 8: ("sample", BOOL),
                9: ("clientIp", STRING)}
REQUEST_FIELDS = {1: ("serviceName", STRING), 2: ("sequenceId", I64), 3: ("callType", BYTE),
                  4: ("timeout", I32)}
RESPONSE_FIELDS = {1: ("sequenceId", I64), 2: ("status", BYTE), 3: ("message", STRING)}
LOAD_FIELDS = {1: ("averageLoad", DOUBLE), 2: ("oldGC", I32), 3: ("threadNum", I32),
               4: ("queueSize", I32), 5: ("methodQpsMap", MAP)}
HEARTBEAT_FIELDS = {1: ("appkey", STRING), 2: ("sendTime", I64), 3: ("loadInfo", STRUCT),
                    4: ("status", I32)}
HEADER_FIELDS = {1: ("messageType", BYTE), 2: ("requestInfo", STRUCT),
                 3: ("responseInfo", STRUCT), 4: ("traceInfo", STRUCT),
                 5: ("globalContext", MAP), 6: ("localContext", MAP),
                 7: ("heartbeatInfo", STRUCT)}
SUBSTRUCTS = {"requestInfo": REQUEST_FIELDS, "responseInfo": RESPONSE_FIELDS,
              "traceInfo": TRACE_FIELDS, "heartbeatInfo": HEARTBEAT_FIELDS,
              "loadInfo": LOAD_FIELDS}


class RefError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# ------------------------------------------------------------------ encoding

def enc_value(t: int, v: Any) -> bytes:
    """Generic TBinaryProtocol value: STRUCT = [(fid, type, value)], MAP =
    (ktype, vtype, [(k, v)]), SET/LIST = (etype, [v]), STRING = bytes/str."""
    if t == BOOL:
        return b"\x01" if v else b"\x00"
    if t == BYTE:
        return struct.pack(">b", v)
    if t == I16:
        return struct.pack(">h", v)
    if t == I32:
        return struct.pack(">i", v)
    if t == I64:
        return struct.pack(">q", v)
    if t == DOUBLE:
        return struct.pack(">d", v)
    if t == STRING:
        b = v.encode() if isinstance(v, str) else bytes(v)
        return struct.pack(">i", len(b)) + b
    if t == STRUCT:
        return b"".join(bytes([ft]) + struct.pack(">h", fid) + enc_value(ft, fv)
                        for fid, ft, fv in v) + b"\x00"
    if t == MAP:
        kt, vt, items = v
        return (bytes([kt, vt]) + struct.pack(">i", len(items))
                + b"".join(enc_value(kt, k) + enc_value(vt, x) for k, x in items))
    if t in (SET, LIST):
        et, items = v
        return bytes([et]) + struct.pack(">i", len(items)) + b"".join(enc_value(et, x) for x in items)
    raise ValueError(t)


def _struct_fields(d: dict[str, Any], spec: dict[int, tuple[str, int]]) -> list[tuple[int, int, Any]]:
    known: list[tuple[int, int, Any]] = []
    for fid, (name, t) in sorted(spec.items()):
        if d.get(name) is None:
            continue
        v = d[name]
        if t == STRUCT:
            v = _struct_fields(v, SUBSTRUCTS[name])
        elif t == MAP:
            vt = DOUBLE if name == "methodQpsMap" else STRING
            v = (STRING, vt, list(v.items()))
        known.append((fid, t, v))
    for index, fid, t, v in sorted(d.get("_unknown", ()), key=lambda u: u[0]):
        known.insert(min(index, len(known)), (fid, t, v))
    return known


def encode_header(h: dict[str, Any]) -> bytes:
    return enc_value(STRUCT, _struct_fields(h, HEADER_FIELDS))


def encode_frame(header: bytes, body: bytes = b"", *, protocol: int = 1, checksum: bool = False,
                 version: int = 1) -> bytes:
    proto = protocol | 0x80 if checksum else protocol & 0x7F
    total = 2 + len(header) + len(body) + (4 if checksum else 0)
    frame = (b"\xab\xba" + bytes([version, proto]) + struct.pack(">IH", total, len(header))
             + header + body)
    if checksum:
        frame += struct.pack(">I", zlib.adler32(frame))
    return frame


def encode_thrift(name: str, mtype: int, seq_id: int, payload: bytes = b"") -> bytes:
    nb = name.encode()
    msg = b"\x80\x01\x00" + bytes([mtype]) + struct.pack(">i", len(nb)) + nb
    msg += struct.pack(">i", seq_id) + payload
    return struct.pack(">i", len(msg)) + msg


# ------------------------------------------------------------------ decoding

class Reader:
    def __init__(self, b: bytes, pos: int, end: int) -> None:
        self.b, self.pos, self.end = b, pos, end

    def take(self, k: int) -> bytes:
        if k < 0 or self.pos + k > self.end:
            raise RefError(FE_BAD_HEADER)
        r = self.b[self.pos:self.pos + k]
        self.pos += k
        return r

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, t: int, depth: int) -> Any:
        fixed = {BOOL: ">?", BYTE: ">b", I16: ">h", I32: ">i", I64: ">q", DOUBLE: ">d"}
        if t in fixed:
            return self.unpack(fixed[t])
        if t == STRING:
            return self.take(self.unpack(">i"))
        if t not in (STRUCT, MAP, SET, LIST):
            raise RefError(FE_BAD_HEADER)
        if depth > MAX_DEPTH:
            raise RefError(FE_TOO_DEEP)
        if t == STRUCT:
            out = []
            while True:
                ft = self.unpack(">B")
                if ft == STOP:
                    return out
                fid = self.unpack(">h")
                out.append((fid, ft, self.value(ft, depth + 1)))
        if t == MAP:
            kt, vt, n = self.unpack(">B"), self.unpack(">B"), self.unpack(">i")
            if n == 0:
                return (kt, vt, [])
            if n < 0 or kt not in _MIN or vt not in _MIN or n * (_MIN[kt] + _MIN[vt]) > self.end - self.pos:
                raise RefError(FE_BAD_HEADER)
            return (kt, vt, [(self.value(kt, depth + 1), self.value(vt, depth + 1)) for _ in range(n)])
        et, n = self.unpack(">B"), self.unpack(">i")
        if n == 0:
            return (et, [])
        if n < 0 or et not in _MIN or n * _MIN[et] > self.end - self.pos:
            raise RefError(FE_BAD_HEADER)
        return (et, [self.value(et, depth + 1) for _ in range(n)])


_MIN = {BOOL: 1, BYTE: 1, I16: 2, I32: 4, I64: 8, DOUBLE: 8, STRING: 4, STRUCT: 1, MAP: 6,
        SET: 5, LIST: 5}


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _typed(fields: list[tuple[int, int, Any]], spec: dict[int, tuple[str, int]], *,
           strict: bool) -> dict[str, Any]:
    """Generic struct -> IDL dict.  strict: a known field with another type is
    an error (what the scanner checks); otherwise it is ignored."""
    out: dict[str, Any] = {}
    for fid, ft, v in fields:
        if fid not in spec:
            continue
        name, t = spec[fid]
        if ft != t:
            if strict:
                raise RefError(FE_BAD_FIELD_TYPE)
            continue
        if t == STRING:
            v = _s(v)
        elif t == STRUCT:
            v = _typed(v, SUBSTRUCTS[name], strict=False)
        elif t == MAP:
            kt, vt, items = v
            want = DOUBLE if name == "methodQpsMap" else STRING
            if items and (kt != STRING or vt != want):
                if want == STRING:
                    raise RefError(FE_BAD_FIELD_TYPE)
                continue
            v = {_s(k): (_s(x) if want == STRING else x) for k, x in items}
        out[name] = v
    return out


def decode_header(b: bytes) -> dict[str, Any]:
    r = Reader(b, 0, len(b))
    fields = r.value(STRUCT, 0)
    if r.pos != r.end:
        raise RefError(FE_BAD_HEADER)
    for fid, ft, _ in fields:  # the scanner checks the types of the seven Header fields
        if fid in HEADER_FIELDS and ft != HEADER_FIELDS[fid][1]:
            raise RefError(FE_BAD_FIELD_TYPE)
    h = _typed(fields, HEADER_FIELDS, strict=True)
    for name in ("requestInfo", "responseInfo"):
        raw = [v for fid, ft, v in fields if fid == HEADER_FIELDS_ID[name]]
        for sub in raw:
            spec = SUBSTRUCTS[name]
            for fid, ft, _ in sub:
                if fid in spec and ft != spec[fid][1]:
                    raise RefError(FE_BAD_FIELD_TYPE)
            if not any(spec[fid][0] == "sequenceId" for fid, _, _ in sub if fid in spec):
                raise RefError(FE_BAD_HEADER)
    mt = h.get("messageType", -1)
    if "requestInfo" not in h and "responseInfo" not in h and mt <= 0:
        raise RefError(FE_BAD_HEADER)
    return h


HEADER_FIELDS_ID = {name: fid for fid, (name, _) in HEADER_FIELDS.items()}


def scan_one(b: bytes, max_frame: int = 16 << 20, max_header: int = 64 << 10) -> tuple[int, dict[str, Any]]:
    """fr_scan's contract, the slow way: (length or FE_* code, info)."""
    n = len(b)
    if n == 0:
        return FE_NEED_MORE, {}
    if b[0] != 0xAB:
        return _scan_thrift(b, max_frame)
    if n < 2:
        return FE_NEED_MORE, {}
    if b[1] != 0xBA:
        return FE_BAD_MAGIC, {}
    if n < 8:
        return FE_NEED_MORE, {}
    proto = b[3]
    trailer = 4 if proto & 0x80 else 0
    (tl,) = struct.unpack(">i", b[4:8])
    if tl < 2 + trailer:
        return FE_BAD_LENGTH, {}
    total = 8 + tl
    if total > max_frame:
        return FE_TOO_LARGE, {}
    if n < 10:
        return FE_NEED_MORE, {}
    (hl,) = struct.unpack(">H", b[8:10])
    if hl > max_header:
        return FE_HEADER_TOO_LARGE, {}
    compressed = proto & 0x60
    if not compressed and 2 + hl + trailer > tl:
        return FE_BAD_LENGTH, {}
    if n < total:
        return FE_NEED_MORE, {}
    frame = b[:total]
    if trailer and zlib.adler32(frame[:-4]) != struct.unpack(">I", frame[-4:])[0]:
        return FE_BAD_CHECKSUM, {}
    flags = (FF_CHECKSUM if trailer else 0) | (FF_GZIP if proto & 0x40 else 0) \
        | (FF_SNAPPY if proto & 0x20 else 0)
    info: dict[str, Any] = {"kind": FK_OCTO, "version": b[2], "protocol": proto, "flags": flags,
                            "length": total}
    if compressed:
        info.update(msg_type=-1, header=None, body=frame[10:total - trailer])
        return total, info
    try:
        h = decode_header(frame[10:10 + hl])
    except RefError as e:
        return e.code, {}
    info.update(header=h, body=frame[10 + hl:total - trailer], msg_type=h.get("messageType", -1))
    if "requestInfo" in h:
        info["flags"] |= FF_REQUEST
    if "responseInfo" in h:
        info["flags"] |= FF_RESPONSE
    local = h.get("localContext", {})
    if local.get("octo-proxy-restart") == "1":
        info["flags"] |= FF_PROXY_RESTART
    if local.get("octo-proxy") == "1":
        info["flags"] |= FF_PROXY_ANNOUNCE
    if local.get("octo-restart-notice") == "1":
        info["flags"] |= FF_RESTART_NOTICE
    return total, info


def _scan_thrift(b: bytes, max_frame: int) -> tuple[int, dict[str, Any]]:
    n = len(b)
    if n >= 4 and struct.unpack(">i", b[:4])[0] <= 0:
        return FE_BAD_MAGIC, {}
    for i, want in ((4, 0x80), (5, 0x01), (6, 0x00)):
        if n > i and b[i] != want:
            return FE_BAD_MAGIC, {}
    if n < 8:
        return FE_NEED_MORE, {}
    mtype = b[7]
    if not 1 <= mtype <= 4:
        return FE_BAD_THRIFT, {}
    (mlen,) = struct.unpack(">i", b[:4])
    if 4 + mlen > max_frame:
        return FE_TOO_LARGE, {}
    if mlen < 12:
        return FE_BAD_THRIFT, {}
    if n >= 12:
        (nlen,) = struct.unpack(">i", b[8:12])
        if nlen < 0 or nlen > mlen - 12:
            return FE_BAD_THRIFT, {}
    if n < 4 + mlen:
        return FE_NEED_MORE, {}
    (nlen,) = struct.unpack(">i", b[8:12])
    (seq,) = struct.unpack(">i", b[12 + nlen:16 + nlen])
    return 4 + mlen, {"kind": FK_THRIFT, "message_type": mtype,
                      "name": _s(b[12:12 + nlen]), "seq_id": seq, "body": b[4:4 + mlen],
                      "flags": FF_REQUEST if mtype in (1, 4) else FF_RESPONSE}


def decode_frame(b: bytes) -> dict[str, Any]:
    """One whole frame -> the dict shape of octoproxy._core.frame.decode_frame."""
    r, info = scan_one(b)
    if r <= 0:
        raise RefError(r)
    if r != len(b):
        raise ValueError("more than one frame")
    if info["kind"] == FK_THRIFT:
        return {k: info[k] for k in ("kind", "message_type", "name", "seq_id", "body")}
    return {"kind": FK_OCTO, "version": info["version"], "protocol": info["protocol"],
            "checksum": bool(info["flags"] & FF_CHECKSUM),
            "compressed": bool(info["flags"] & (FF_GZIP | FF_SNAPPY)),
            "body": info["body"], "header": info["header"]}


# ---- Dorado compatibility helpers (docs/protocol.md, "Compatibility with Dorado")

def snappy_uncompress(b: bytes) -> bytes:
    """Raw snappy, the slow way: varint length, then literal/copy elements."""
    i = shift = ulen = 0
    while True:
        c = b[i]
        i += 1
        ulen |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            break
    out = bytearray()
    while i < len(b):
        tag = b[i]
        i += 1
        kind = tag & 3
        if kind == 0:
            ln = tag >> 2
            if ln >= 60:
                k = ln - 59
                ln = int.from_bytes(b[i:i + k], "little")
                i += k
            ln += 1
            out += b[i:i + ln]
            i += ln
            continue
        if kind == 1:
            ln = ((tag >> 2) & 7) + 4
            off = ((tag >> 5) << 8) | b[i]
            i += 1
        else:
            k = 2 if kind == 2 else 4
            ln = (tag >> 2) + 1
            off = int.from_bytes(b[i:i + k], "little")
            i += k
        if not 0 < off <= len(out):
            raise ValueError("bad snappy copy")
        for _ in range(ln):
            out.append(out[-off])
    if len(out) != ulen:
        raise ValueError("snappy length mismatch")
    return bytes(out)


def uncompress_frame(b: bytes) -> bytes:
    """A gzip/snappy-compressed frame -> the same frame uncompressed (flags cleared)."""
    proto = b[3]
    trailer = 4 if proto & 0x80 else 0
    payload = b[10:len(b) - trailer]
    plain = snappy_uncompress(payload) if proto & 0x20 else zlib.decompress(payload, 47)
    return encode_frame(plain[:struct.unpack(">H", b[8:10])[0]],
                        plain[struct.unpack(">H", b[8:10])[0]:], protocol=proto & 0x1F,
                        version=b[2])


def decode_thrift_message(b: bytes) -> dict[str, Any]:
    """A strict TBinaryProtocol message header; for an EXCEPTION (type 3) also
    the TApplicationException's message (field 1) and type (field 2)."""
    if b[:3] != b"\x80\x01\x00":
        raise ValueError("not a strict TBinaryProtocol message")
    (nlen,) = struct.unpack(">i", b[4:8])
    out: dict[str, Any] = {"type": b[3], "name": b[8:8 + nlen].decode(),
                           "seq_id": struct.unpack(">i", b[8 + nlen:12 + nlen])[0]}
    if b[3] == 3:
        fields = Reader(b, 12 + nlen, len(b)).value(STRUCT, 0)
        for fid, t, v in fields:
            if fid == 1 and t == STRING:
                out["message"] = _s(v)
            elif fid == 2 and t == I32:
                out["exc_type"] = v
    return out
