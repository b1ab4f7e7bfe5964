"""Reading xDS messages in pieces, so that a big response never holds the
event loop in one piece (docs/xds.md section 7, "Big responses").

- `resource_name`: the name of a serialized Cluster, ClusterLoadAssignment
  or Thrift RouteConfiguration (field 1, a string, in all three) without
  decoding the rest of it: the other fields are only skipped.  A SotW
  response may carry thousands of resources nobody asked for; only their
  names are ever read.
- `count_field`: how many times a field occurs at the top of a message,
  walking at most a given number of fields: a resource with far more
  entries than its bound allows is refused without being decoded.
- `split_response`: a serialized (Delta)DiscoveryResponse cut into its
  fields other than ``resources`` and runs of ``resources`` entries of about
  `chunk` bytes, so the caller can build the message a run at a time with
  the loop served in between (merging protobuf wire data piece by piece in
  order gives the same message as decoding it at once).
"""

from __future__ import annotations

from collections.abc import Generator

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

_F = descriptor_pb2.FieldDescriptorProto


def _name_only() -> type[Message]:
    fd = descriptor_pb2.FileDescriptorProto(
        name="octoproxy/xds/name_only.proto", package="octoproxy.xds", syntax="proto3"
    )
    m = fd.message_type.add(name="NameOnly")
    m.oneof_decl.add(name="_name")
    # proto3 optional: UTF-8 checked, and presence (a later piece may lack it)
    m.field.add(name="name", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL,
                oneof_index=0, proto3_optional=True)
    pool = descriptor_pool.DescriptorPool()  # its own pool: nothing else sees the type
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("octoproxy.xds.NameOnly"))


# field 1 (string) alone: the rest of a resource is skipped as unknown fields
_NameOnly = _name_only()
# fields walked in Python before the rest is left to protobuf: Python walks a
# few huge fields at no cost (protobuf copies every unknown field it skips:
# 2.3 ms per MiB), protobuf walks many small ones faster
_WALK = 64


class TooManyFields(ValueError):
    """A big resource with more top-level fields than the caller allows;
    `name` is the name as far as the walk read it ("" if none yet)."""

    def __init__(self, name: str, fields: int) -> None:
        super().__init__(f"more than {fields} top-level fields")
        self.name = name
        self.fields = fields


def _walk(body: bytes, i: int, fields: int, name: str | None
          ) -> tuple[int, str | None, bool]:
    """Walk at most `fields` top-level fields from offset i: (where it
    stopped, the last name (field 1) seen, True if it stopped at a field it
    leaves to protobuf: field 1 of another wire type, or a group)."""
    n = len(body)
    try:
        for _ in range(fields):
            if i >= n:
                break
            start = i
            key, i = _varint(body, i)
            wt = key & 7
            if wt == 2:
                ln, i = _varint(body, i)
                if i + ln > n:
                    raise DecodeError("truncated message")
                if key == 0x0A:  # field 1, length-delimited: the name (so far)
                    try:
                        name = body[i:i + ln].decode()
                    except UnicodeDecodeError as bad:
                        raise DecodeError(f"name is not UTF-8: {bad}") from None
                i += ln
            elif key >> 3 == 1 or wt not in (0, 1, 5):
                return start, name, True
            else:
                i = _skip(body, i, wt)
            if i > n:
                raise DecodeError("truncated message")
    except IndexError:
        raise DecodeError("truncated message") from None
    return i, name, False


def resource_name(body: bytes, max_fields: int | None = None) -> str:
    """Field 1 (``name``; ``cluster_name`` of a ClusterLoadAssignment) of a
    serialized resource, as a full decode would read it (the last occurrence
    wins, UTF-8 checked), the other fields skipped, not decoded.  Raises
    DecodeError if the wire data is not a message.  Nested fields are not
    looked into: a resource that is read in full later is checked then.

    `max_fields`: for a type whose resources have a bound on their top-level
    fields (TRDS: the rules).  A body of BIG_BODY bytes or more is then
    walked in Python (a few ms) and TooManyFields raised past the bound,
    instead of leaving the rest to protobuf (2.4 ms per MiB, in one call)."""
    n = len(body)
    i, name, stopped = _walk(body, 0, _WALK, None)
    if i < n and not stopped and max_fields is not None and n >= BIG_BODY:
        i, name, stopped = _walk(body, i, max(0, max_fields - _WALK), name)
        if i < n and not stopped:
            raise TooManyFields(name or "", max_fields)
    if i < n:
        msg = _NameOnly.FromString(body[i:] if i else body)
        if msg.HasField("name"):
            return str(msg.name)  # type: ignore[attr-defined]
    return name or ""


# a resource body from which on its digest is taken in a worker thread
BIG_BODY = 1 << 20

RESOURCES_FIELD = 2  # DiscoveryResponse.resources and DeltaDiscoveryResponse.resources


def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = b[i]
    if x < 0x80:
        return x, i + 1
    result, shift = x & 0x7F, 7
    while True:
        i += 1
        x = b[i]
        result |= (x & 0x7F) << shift
        if x < 0x80:
            return result, i + 1
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _skip(b: bytes, i: int, wt: int) -> int:
    """Past the value of wire type wt that starts at b[i] (the key read):
    the one field walker of split_response and count_field (and _walk for
    the types it skips).  DecodeError for groups and invalid wire types
    (protobuf decides those); the caller checks the end against len(b)."""
    if wt == 0:
        return _varint(b, i)[1]
    if wt == 1:
        return i + 8
    if wt == 2:
        ln, i = _varint(b, i)
        return i + ln
    if wt == 5:
        return i + 4
    raise DecodeError(f"wire type {wt} at offset {i}")


def split_response(
    raw: bytes, chunk: int = 1 << 20, step: int = 2048
) -> Generator[None, None, tuple[bytes, list[tuple[int, int]]]]:
    """A generator (yielding every `step` fields, so the caller can serve
    the loop) whose return value is (the response's fields other than
    ``resources``, as wire data; the ``(start, end)`` offsets in `raw` of
    runs of consecutive ``resources`` entries, each run at most `chunk`
    bytes or one entry).  Raises DecodeError on wire data this top-level
    scan cannot walk (then decode it whole for protobuf's own verdict)."""
    n = len(raw)
    rest: list[bytes] = []
    runs: list[tuple[int, int]] = []
    run_start = run_end = -1
    i = fields = 0
    try:
        while i < n:
            fields += 1
            if fields % step == 0:
                yield
            start = i
            key, i = _varint(raw, i)
            wt = key & 7
            i = _skip(raw, i, wt)
            if i > n:
                raise DecodeError("truncated message")
            if key >> 3 == RESOURCES_FIELD and wt == 2:
                if run_start >= 0 and run_end == start and i - run_start <= chunk:
                    run_end = i
                    continue
                if run_start >= 0:
                    runs.append((run_start, run_end))
                run_start, run_end = start, i
            else:
                rest.append(raw[start:i])
    except IndexError:
        raise DecodeError("truncated message") from None
    if run_start >= 0:
        runs.append((run_start, run_end))
    return b"".join(rest), runs


def count_field(body: bytes, field: int, limit: int) -> int:
    """How many times `field` occurs at the top level of the serialized
    message, counted up to `limit` + 1 (then the walk stops: more than the
    limit).  At most 4 x `limit` + 64 fields are walked; past that, -1 (a
    message of that many fields is not one to decode; the same bound as
    the TRDS handler's for resource_name).  DecodeError on wire
    data the walk cannot follow."""
    n = len(body)
    i = count = walked = 0
    try:
        while i < n:
            walked += 1
            if walked > 4 * limit + 64:
                return -1
            key, i = _varint(body, i)
            i = _skip(body, i, key & 7)
            if i > n:
                raise DecodeError("truncated message")
            if key >> 3 == field:
                count += 1
                if count > limit:
                    return count
    except IndexError:
        raise DecodeError("truncated message") from None
    return count
