"""xds/wire.py: a resource's name read without decoding it, and a response
decoded in pieces, each equal to protobuf's own full decode."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.filters.network.thrift_proxy.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from octoproxy.xds import wire
from octoproxy.xds.wire import count_field, resource_name, split_response


def _run(raw: bytes, chunk: int, step: int = 3) -> tuple[bytes, list[tuple[int, int]]]:
    g = split_response(raw, chunk, step)
    while True:
        try:
            next(g)
        except StopIteration as stop:
            out: tuple[bytes, list[tuple[int, int]]] = stop.value
            return out


def _pieces(cls: type, raw: bytes, chunk: int) -> object:
    rest, runs = _run(raw, chunk)
    msg = cls.FromString(rest)
    for a, b in runs:
        msg.MergeFromString(memoryview(raw)[a:b])
    return msg


def test_resource_name_of_each_type() -> None:
    rc = route_pb2.RouteConfiguration(name="com.a")
    rc.routes.add().match.method_name = "m"
    assert resource_name(rc.SerializeToString()) == "com.a"
    c = cluster_pb2.Cluster(name="com.b", connect_timeout={"seconds": 1})
    assert resource_name(c.SerializeToString()) == "com.b"
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="com.c")
    cla.endpoints.add().lb_endpoints.add()
    assert resource_name(cla.SerializeToString()) == "com.c"
    assert resource_name(b"") == ""


def test_resource_name_reads_as_a_full_decode_does() -> None:
    """Field 1 twice: the last one wins, as in any protobuf decoder; the
    name after the routes is found too."""
    a = route_pb2.RouteConfiguration(name="first").SerializeToString()
    r = route_pb2.RouteConfiguration()
    r.routes.add().match.method_name = "m"
    b = r.SerializeToString() + route_pb2.RouteConfiguration(name="last").SerializeToString()
    raw = a + b
    assert route_pb2.RouteConfiguration.FromString(raw).name == "last"
    assert resource_name(raw) == "last"


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0f", b"\x12\x80"])
def test_resource_name_refuses_what_protobuf_refuses(raw: bytes) -> None:
    """Truncated, not UTF-8, an invalid wire type, a truncated length."""
    with pytest.raises(DecodeError):
        route_pb2.RouteConfiguration.FromString(raw)
    with pytest.raises(DecodeError):
        resource_name(raw)


_text = st.text(max_size=20)
_any = st.builds(lambda t, v: any_pb2.Any(type_url=t, value=v), _text, st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(st.lists(_any, max_size=30), _text, _text, _text, st.integers(1, 2000),
       st.booleans())
def test_a_response_in_pieces_equals_the_whole(resources: list[any_pb2.Any], version: str,
                                               type_url: str, nonce: str, chunk: int,
                                               interleave: bool) -> None:
    r = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce,
                                        resources=resources)
    raw = r.SerializeToString()
    if interleave and resources:
        # other fields between the resources, and a field given twice (last wins)
        half = discovery_pb2.DiscoveryResponse(resources=resources[: len(resources) // 2])
        more = discovery_pb2.DiscoveryResponse(nonce="again", resources=resources[len(resources) // 2:])
        raw = raw + half.SerializeToString() + more.SerializeToString()
    whole = discovery_pb2.DiscoveryResponse.FromString(raw)
    assert _pieces(discovery_pb2.DiscoveryResponse, raw, chunk) == whole


def test_a_delta_response_in_pieces_equals_the_whole() -> None:
    r = discovery_pb2.DeltaDiscoveryResponse(system_version_info="v", type_url="t", nonce="n",
                                             removed_resources=["x", "y"])
    for i in range(50):
        res = r.resources.add(name=f"r{i}", version="1")
        res.resource.value = bytes(i * 10)
    raw = r.SerializeToString()
    assert _pieces(discovery_pb2.DeltaDiscoveryResponse, raw, 100) == r


def test_runs_are_bounded_by_the_chunk() -> None:
    r = discovery_pb2.DiscoveryResponse(
        resources=[any_pb2.Any(value=bytes(1000)) for _ in range(100)])
    raw = r.SerializeToString()
    _, runs = _run(raw, 10_000)
    assert len(runs) > 5
    assert all(b - a <= 10_000 for a, b in runs)
    assert runs[-1][1] == len(raw)


@pytest.mark.parametrize("raw", [b"\x12\x05ab", b"\x12", b"\x0b\x0c", b"\x80" * 11])
def test_split_refuses_what_it_cannot_walk(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        _run(raw, 100)


def _key(num: int, wt: int) -> bytes:
    return _varint(num << 3 | wt)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            return bytes(out + bytes([n]))
        out.append(n & 0x7F | 0x80)
        n >>= 7


_fields = st.lists(st.tuples(st.integers(1, 4), st.sampled_from([0, 1, 2, 5]),
                             st.binary(max_size=12)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(_fields, st.binary(max_size=3))
def test_resource_name_equals_protobuf_on_any_wire_data(fields: list[tuple[int, int, bytes]],
                                                        tail: bytes) -> None:
    """Random fields (names, not UTF-8 names, field 1 of other wire types,
    more fields than the Python walk takes), then junk: the same name or the
    same refusal as protobuf's decoder."""
    body = b""
    for num, wt, payload in fields:
        if wt == 0:
            body += _key(num, 0) + _varint(int.from_bytes(payload[:8], "little"))
        elif wt == 1:
            body += _key(num, 1) + payload[:8].ljust(8, b"\0")
        elif wt == 5:
            body += _key(num, 5) + payload[:4].ljust(4, b"\0")
        else:
            body += _key(num, 2) + _varint(len(payload)) + payload
    for raw in (body, body + tail):
        try:
            want: str | None = wire._NameOnly.FromString(raw).name  # type: ignore[attr-defined]
        except DecodeError:
            want = None
        try:
            got: str | None = resource_name(raw)
        except DecodeError:
            got = None
        assert got == want, raw


def test_resource_name_of_a_huge_field_is_not_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """One unknown field of 64 MiB: walked over in Python, never handed to
    protobuf (which copies every unknown field it skips: 0.5 s for 240 MiB)."""

    class Refuse:
        @staticmethod
        def FromString(raw: bytes) -> None:
            raise AssertionError("handed to protobuf")

    body = route_pb2.RouteConfiguration(name="big").SerializeToString()
    body += _key(9999, 2) + _varint(64 << 20) + bytes(64 << 20)
    monkeypatch.setattr(wire, "_NameOnly", Refuse)
    assert resource_name(body) == "big"


def test_count_field_stops_past_the_limit() -> None:
    rc = route_pb2.RouteConfiguration(name="a")
    for i in range(10):
        rc.routes.add().match.method_name = f"m{i}"
    raw = rc.SerializeToString()
    assert count_field(raw, 2, 10) == 10
    assert count_field(raw, 2, 3) == 4  # stopped at limit + 1
    assert count_field(raw, 1, 10) == 1
    names = route_pb2.RouteConfiguration(name="n").SerializeToString() * 200
    assert count_field(names, 2, 10) == -1  # 200 fields walked past 4 x 10 + 64
    with pytest.raises(DecodeError):
        count_field(raw[:-1], 2, 100)


def test_resource_name_with_a_bound_on_fields() -> None:
    """A big body (1 MiB or more) with more top-level fields than the bound:
    TooManyFields with the name read so far; under the bound, or a small
    body, the name as protobuf reads it."""
    from octoproxy.xds.wire import BIG_BODY, TooManyFields

    rc = route_pb2.RouteConfiguration(name="app.a")
    route = rc.routes.add()
    route.match.method_name = "m" * 300
    one = route.SerializeToString()
    many = rc.SerializeToString() + (b"\x12" + _varint(len(one)) + one) * (BIG_BODY // len(one))
    assert len(many) >= BIG_BODY
    with pytest.raises(TooManyFields) as ei:
        resource_name(many, 1000)
    assert ei.value.name == "app.a"
    assert resource_name(many) == "app.a"  # no bound: walked to the end
    assert resource_name(many, 10_000) == "app.a"
    small = rc.SerializeToString() * 3
    assert resource_name(small, 1) == "app.a"  # small: never refused
