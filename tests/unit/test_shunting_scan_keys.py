"""Traffic shunting's context values as the outbound scan picks them out
(fr_scan_want, RouteTable.scan_keys) against the rules' own walk over the
maps and the documented semantics, on headers a generic Thrift encoder may
write: localContext before globalContext, a map repeated, a key repeated,
keys whose lengths share a bucket; the word-at-a-time integer parse, the
remainder bitmap, identical conditions shared by rules.  docs/shunting.md."""

from __future__ import annotations

import struct

import pytest

from octoproxy import shunting
from octoproxy._core import route as R
from octoproxy._core.frame import encode_frame, thrift_call
from octoproxy.model import Endpoint, Labels, Service
from octoproxy.model import ShuntMatch as M
from octoproxy.model import ShuntRule as Rule

APPKEY = "com.test.scan"
T_BYTE, T_I64, T_STRING, T_STRUCT, T_MAP = 3, 10, 11, 12, 13


def _s(v: str | bytes) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return struct.pack(">i", len(b)) + b


def _f(ft: int, fid: int) -> bytes:
    return struct.pack(">bh", ft, fid)


def _map(entries: list[tuple[str | bytes, str | bytes]]) -> bytes:
    return bytes([T_STRING, T_STRING]) + struct.pack(">i", len(entries)) + b"".join(
        _s(k) + _s(v) for k, v in entries
    )


def raw_request(maps: list[tuple[int, list]], appkey: str = APPKEY) -> bytes:
    """An OCTO request whose Header is written field by field: maps is
    [(5 globalContext | 6 localContext, entries)], in wire order, repeats
    allowed (a decoder keeps the last map, and in a map the last entry)."""
    ri = _f(T_STRING, 1) + _s(appkey + ".Iface") + _f(T_I64, 2) + struct.pack(">q", 7) + b"\x00"
    h = _f(T_BYTE, 1) + b"\x00" + _f(T_STRUCT, 2) + ri
    h += _f(T_MAP, 6) + _map([("octo-remote-appkey", appkey)])
    for fid, entries in maps:
        h += _f(T_MAP, fid) + _map(entries)
    return encode_frame(h + b"\x00", thrift_call("get", 1))


def table(rules: tuple[Rule, ...]) -> R.RouteTable:
    eps = (Endpoint("10.0.0.1", 1), Endpoint("10.0.1.1", 1, group="g"))
    t = R.RouteTable(Labels(), seed=1)
    t.replace_all([Service(APPKEY, eps)])
    t.update_shunting(APPKEY, rules)
    return t


def both(t: R.RouteTable, frame: bytes) -> str | None:
    """The matched rule, the same through the scan's keys and the walk."""
    _, scanned = t.route_frame(frame, True)
    _, walked = t.route_frame(frame, False)
    assert scanned == walked
    return scanned


def eq(key: str, value: str, name: str | None = None) -> Rule:
    return Rule(name or f"{key}={value}", (M("context", "eq", key=key, values=(value,)),), group="g")


def test_scan_keys_are_the_rules_keys_and_are_emptied_with_the_rules() -> None:
    t = table((eq("uid", "1"), eq("region", "sh")))
    assert t.scan_keys() == ("uid", "region")
    t.update_shunting(APPKEY, (eq("uid", "1"),))
    assert t.scan_keys() == ("uid", "region")  # append-only while rules exist
    t.update_shunting(APPKEY, ())
    assert t.scan_keys() == ()
    t.update_shunting(APPKEY, (eq("zone", "a"),))
    assert t.scan_keys() == ("zone",)


def test_local_context_written_before_global_still_wins() -> None:
    t = table((eq("k", "local"),))
    f = raw_request([(6, [("k", "local")]), (5, [("k", "global")])])
    assert both(t, f) == "k=local"
    f = raw_request([(6, [("k", "global")]), (5, [("k", "local")])])
    assert both(t, f) is None


def test_a_repeated_map_counts_once_the_last() -> None:
    t = table((eq("k", "v"),))
    assert both(t, raw_request([(5, [("k", "v")]), (5, [("other", "x")])])) is None
    assert both(t, raw_request([(5, [("other", "x")]), (5, [("k", "v")])])) == "k=v"
    assert both(t, raw_request([(6, [("k", "v")]), (6, [("x", "y")])])) is None
    # the global one under a repeated local map that lacks the key
    assert both(t, raw_request([(5, [("k", "v")]), (6, [("k", "no")]), (6, [])])) == "k=v"


def test_a_repeated_key_the_last_entry_wins() -> None:
    t = table((eq("k", "yes"),))
    assert both(t, raw_request([(5, [("k", "no"), ("k", "yes")])])) == "k=yes"
    assert both(t, raw_request([(5, [("k", "yes"), ("k", "no")])])) is None


# keys that share a length bucket (length mod 64), share their first or last
# bytes, or differ in one byte only, at the compare's word boundaries
KEYS = ["a", "b", "a" * 65, "b" * 65, "abcd", "abce", "abcde", "abcdf", "bbcde",
        "abcdefgh", "abcdefgi", "abcdefghijkl", "abcdefghijkm", "abcdefghijklm",
        "abcdefgXijklm", "k" * 64]


@pytest.mark.parametrize("wanted", [KEYS[:8], KEYS[8:]])
def test_keys_are_told_apart_at_every_word_boundary(wanted: list[str]) -> None:
    t = table(tuple(eq(k, "v", name=f"r{i}") for i, k in enumerate(wanted)))
    assert t.scan_keys() == tuple(wanted)
    for i, k in enumerate(wanted):
        # the request carries every other key of the list with the value,
        # and this one: only this rule (and none before it) matches
        others = [(o, "x") for o in KEYS if o != k]
        assert both(t, raw_request([(5, [*others, (k, "v")])])) == f"r{i}"
        assert both(t, raw_request([(5, others)])) is None


def test_keys_that_come_and_go_rebuild_the_table_and_every_service() -> None:
    # rules that over time read more than 16 keys, never more than 16 at
    # once: the scan keeps picking them out (the table is rebuilt, not left
    # full), and a service whose rules did not change is compiled again
    # with the new places (else it would read another key's value)
    other = "com.test.other"
    eps = (Endpoint("10.0.0.1", 1), Endpoint("10.0.1.1", 1, group="g"))
    t = R.RouteTable(Labels(), seed=1)
    t.replace_all([Service(APPKEY, eps), Service(other, eps)])
    t.update_shunting(other, (eq("b", "1"),))
    for gen in range(4):
        keys = [f"g{gen}k{i}" for i in range(8)]
        t.update_shunting(APPKEY, tuple(eq(k, "v") for k in keys))
        assert t.scan_keys() is not None and set(keys) | {"b"} <= set(t.scan_keys())
        for k in keys:
            assert both(t, raw_request([(5, [(k, "v"), ("b", "0")])])) == f"{k}=v"
        for b, want in (("1", "b=1"), ("0", None)):
            f = raw_request([(5, [*((k, "v") for k in keys), ("b", b)])], other)
            assert both(t, f) == want


def test_more_keys_than_the_scan_picks_out_fall_back_to_the_walk() -> None:
    keys = [f"key{i}" for i in range(17)]
    t = table(tuple(eq(k, "v") for k in keys))
    assert t.scan_keys() is None
    for k in keys:
        assert both(t, raw_request([(5, [(k, "v")])])) == f"{k}=v"


INTS = [b"0", b"7", b"42", b"007", b"1234567", b"12345678", b"123456789", b"1234567890123456",
        b"12345678901234567", b"9223372036854775807", b"9223372036854775808",
        b"-9223372036854775808", b"-1", b"+5", b"+", b"-", b"", b"12a4", b"1 ", b" 1",
        b"99999999", b"00000000", b"0000000000000001", b"1234567/", b"/1234567", b"1234567:",
        b"12345678:2345678"]


@pytest.mark.parametrize("raw", INTS, ids=[v.decode() or "empty" for v in INTS])
def test_integers_read_as_the_reference_reads_them(raw: bytes) -> None:
    want = shunting.parse_int(raw)
    rules = (Rule("any", (M("context", "range", key="n", lo=-(2**63), hi=2**63 - 1),), group="g"),)
    t = table(rules)
    got = both(t, raw_request([(5, [("n", raw)])]))
    assert got == ("any" if want is not None and want < 2**63 - 1 else None)
    if want is not None and want < 2**63 - 1:
        exact = table((Rule("exact", (M("context", "range", key="n", lo=want, hi=want + 1),),
                            group="g"),))
        assert both(exact, raw_request([(5, [("n", raw)])])) == "exact"


@pytest.mark.parametrize("modulus", [1, 7, 64, 100, 4096, 4097, 2**33])
@pytest.mark.parametrize("value", [0, 1, 99, 100, 4095, 4096, 2**32 - 1, 2**32, 2**40 + 3, -1, -101])
def test_mod_as_python_floors_it(modulus: int, value: int) -> None:
    rems = tuple(sorted({1 % modulus, modulus - 1}))
    t = table((Rule("m", (M("context", "mod", key="n", modulus=modulus, remainders=rems),),
                    group="g"),))
    got = both(t, raw_request([(5, [("n", str(value))])]))
    assert got == ("m" if value % modulus in rems else None)


def test_identical_conditions_in_two_rules_keep_first_match_wins_and_counts() -> None:
    uid1 = M("context", "eq", key="uid", values=("1",))
    t = table((
        Rule("both", (uid1, M("context", "eq", key="region", values=("x",))), group="g"),
        Rule("uid", (uid1,), group="g"),
        Rule("uid-again", (uid1,), group="g"),
    ))
    assert both(t, raw_request([(5, [("uid", "1"), ("region", "x")])])) == "both"
    assert both(t, raw_request([(5, [("uid", "1"), ("region", "y")])])) == "uid"
    assert both(t, raw_request([(5, [("uid", "2")])])) is None
    hits = {s["name"]: s["hits"] for s in t.shunting_stats()}
    assert hits == {"both": 2, "uid": 2, "uid-again": 0}
