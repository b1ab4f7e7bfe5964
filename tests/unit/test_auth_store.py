"""The core's HMAC with precomputed state against Python's hmac module, and the
TokenStore's changes at run time (docs/auth.md): rotation, removal, the ACL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import pickle
import random
import time

import pytest

from octoproxy._core import auth, frame

CALLER, PROVIDER = b"com.demo.web", b"com.demo.echo"


def mac(token: bytes, caller: bytes, provider: bytes, ts: int, method: bytes) -> str:
    d = hmac.new(token, b"|".join([caller, provider, str(ts).encode(), method]),
                 hashlib.sha256).digest()
    return base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()


def signed(token: bytes, ms: int, method: str = "echo", caller: bytes = CALLER) -> bytes:
    """A request signed at `ms` (its timestamp: the second, ms // 1000)."""
    ts = ms // 1000
    ctx = {"octo-auth": f"{caller.decode()}:{ts}:{mac(token, caller, PROVIDER, ts, method.encode())}"}
    return frame.encode_request(5, "com.demo.echo.Service", frame.thrift_call(method, 7),
                                local_context=ctx, trace_info={"clientAppkey": caller.decode()})


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.parametrize("seed", range(8))
def test_hmac_matches_python_hmac(seed: int) -> None:
    """Random keys (empty-ish to far past the 64-byte block) and messages
    (short, block-sized, past the 512-byte stack buffer)."""
    rnd = random.Random(seed)
    for _ in range(200):
        klen = rnd.choice([1, 2, 31, 32, 63, 64, 65, 127, 128, 129, 1000, rnd.randint(1, 300)])
        key = bytes(rnd.getrandbits(8) for _ in range(klen))
        caller = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 60)))
        method = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 1, 9, 55, 56, 64, 600])))
        ts = rnd.randint(0, 10**15)
        assert auth.sign(key, caller, PROVIDER, ts, method) == mac(key, caller, PROVIDER, ts, method)


def test_the_same_token_twice_gives_the_same_mac_keys_do_not_leak_state() -> None:
    # a MAC under one key between two under another changes nothing (the work context is reset)
    a = auth.sign(b"k1", CALLER, PROVIDER, 1, b"m")
    auth.sign(b"k2" * 100, CALLER, PROVIDER, 2, b"x" * 700)
    assert auth.sign(b"k1", CALLER, PROVIDER, 1, b"m") == a


def test_store_set_remove_replace() -> None:
    s = auth.TokenStore({"com.demo.web": b"t1", b"com.demo.x": ("t2", "t0")})
    assert s.appkeys() == ["com.demo.web", "com.demo.x"] and len(s) == 2
    assert "com.demo.web" in s and b"com.demo.x" in s and "nobody" not in s and 3 not in s
    assert s.rotating("com.demo.x") and not s.rotating("com.demo.web")
    g = s.generation
    s.set("com.demo.y", b"t3")
    assert s.generation > g and "com.demo.y" in s
    assert s.remove("com.demo.y") and not s.remove("com.demo.y")
    s.replace({"com.demo.web": b"t1"})
    assert s.appkeys() == ["com.demo.web"]
    for bad in (b"", "", None, 3):
        with pytest.raises(TypeError):
            s.set("com.demo.web", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        s.replace({"a": ()})


def test_store_never_shows_or_serialises_tokens() -> None:
    secret = b"very-secret-token-value"
    s = auth.TokenStore({"com.demo.web": (secret, b"older-secret-value")})
    v = auth.Verifier(PROVIDER, True, 1000, s, {CALLER: None})
    sg = auth.Signer(s, ["com.demo.web"])
    for obj in (s, v, sg):
        assert b"secret" not in repr(obj).encode()
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    with pytest.raises(TypeError) as e:
        s.set("com.demo.web", 12345)  # type: ignore[arg-type]
    assert "12345" not in str(e.value)


def test_rotation_keeps_previous_for_the_grace_then_drops_it() -> None:
    s = auth.TokenStore({CALLER: b"old"}, rotation_grace_s=0.3)
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: None})
    assert v.verify(signed(b"old", now_ms())) == 0
    s.set(CALLER, b"new")                        # e.g. an SDS update
    assert s.rotating(CALLER)
    assert v.verify(signed(b"new", now_ms())) == 0
    assert v.verify(signed(b"old", now_ms())) == 0   # in flight during the change
    s.set(CALLER, b"new")                        # the same again: the grace period goes on
    assert s.rotating(CALLER)
    deadline = time.monotonic() + 10
    while s.rotating(CALLER):                    # the grace ends (condition, not a sleep)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert v.verify(signed(b"old", now_ms())) == 3
    assert v.verify(signed(b"new", now_ms())) == 0


def test_explicit_previous_until_dropped() -> None:
    s = auth.TokenStore({CALLER: (b"new", b"old")}, rotation_grace_s=3600)
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: None})
    assert v.verify(signed(b"old", now_ms())) == 0
    s.replace({CALLER: b"new"})                  # the token file drops `old`: at once
    assert not s.rotating(CALLER)
    assert v.verify(signed(b"old", now_ms())) == 3
    s.remove(CALLER)
    assert v.verify(signed(b"new", now_ms())) == 2   # unknown caller


def test_signer_follows_the_store() -> None:
    s = auth.TokenStore({CALLER: b"t1"})
    sg = auth.Signer(s, [CALLER.decode()])
    assert sg.appkeys == ["com.demo.web"]
    req = frame.encode_request(5, "com.demo.echo.Service", frame.thrift_call("echo", 7),
                               trace_info={"clientAppkey": "com.demo.web"})
    v = auth.Verifier(PROVIDER, True, 300_000, auth.TokenStore({CALLER: b"t2"}), {CALLER: None})
    assert v.verify(auth.sign_frame(req, b"t1", PROVIDER)) == 3
    assert v.verify(auth.sign_frame(req, b"t2", PROVIDER)) == 0
    sg.set_sign_for([])
    assert sg.appkeys == []
    with pytest.raises(TypeError):
        auth.Signer(s)  # a store needs the appkeys signed for


def test_acl_changes_at_run_time() -> None:
    s = auth.TokenStore({CALLER: b"t"})
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: None})
    assert v.verify(signed(b"t", now_ms())) == 0
    v.set_acl({"com.demo.web": ["get"]})
    assert v.verify(signed(b"t", now_ms())) == 6
    assert v.verify(signed(b"t", now_ms(), method="get")) == 0
    v.set_acl({})
    assert v.verify(signed(b"t", now_ms(), method="get")) == 5
    v.set_enforce(False)
    assert not v.enforce and v.tokens is s


def test_remembered_mac_never_accepts_another_signature() -> None:
    """A key remembers its last message's MAC (requests of one caller within one
    second share it): the same request again passes, any other signature
    for it, or another message, is computed and checked again."""
    s = auth.TokenStore({CALLER: (b"cur", b"prev")})
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: None})
    rnd = random.Random(7)
    t = now_ms()
    for i in range(300):
        ts = t + 1000 * rnd.choice([0, 0, 0, 1, 2])
        method = rnd.choice(["echo", "get", "m" * 300])     # the long one is never remembered
        tok = rnd.choice([b"cur", b"cur", b"prev", b"other"])
        good = signed(tok, ts, method)
        want = 0 if tok != b"other" else 3
        assert v.verify(good) == want, (i, tok, method)
        sig = mac(tok, CALLER, PROVIDER, ts // 1000, method.encode())
        forged = good.replace(sig.encode(), bytes(reversed(sig.encode())))
        assert v.verify(forged) == 3
        assert v.verify(good) == want


def test_a_signature_wrong_in_any_one_byte_is_refused() -> None:
    s = auth.TokenStore({CALLER: b"t"})
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: ["echo"]})
    ts = now_ms()
    good = signed(b"t", ts)
    sig = mac(b"t", CALLER, PROVIDER, ts // 1000, b"echo").encode()
    assert v.verify(good) == 0
    for i in range(len(sig)):
        bad = sig[:i] + (b"0" if sig[i:i + 1] != b"0" else b"1") + sig[i + 1:]
        assert v.verify(good.replace(sig, bad)) == 3, i
        assert v.verify(good) == 0
    assert v.verify(signed(b"t", ts, method="drop")) == 6   # the method answer is not reused
    assert v.verify(good) == 0


def test_remembered_timestamps_are_still_checked() -> None:
    # the verifier keeps the last timestamp's value, the signer its text: both
    # follow every change, and the skew applies to a remembered value too
    s = auth.TokenStore({CALLER: b"t"})
    v = auth.Verifier(PROVIDER, True, 1000, s, {CALLER: None})
    t = now_ms()
    assert v.verify(signed(b"t", t), t) == 0
    assert v.verify(signed(b"t", t), t + 5000) == 4           # same text, now outside the skew
    assert v.verify(signed(b"t", t + 1), t) == 0
    assert v.verify(signed(b"t", t), t) == 0
    req = frame.encode_request(5, "com.demo.echo.Service", frame.thrift_call("echo", 7),
                               trace_info={"clientAppkey": "com.demo.web"})
    ts0 = t // 1000
    for ts in (ts0, ts0, ts0 + 1, 7, ts0):
        out = auth.sign_frame(req, b"t", PROVIDER, ts)
        h = frame.decode_header(out[10:10 + int.from_bytes(out[8:10], "big")])
        assert h["localContext"]["octo-auth"].split(":")[1] == str(ts)


def test_the_last_pass_answers_only_the_same_request() -> None:
    """A verifier keeps the last request that passed (caller, timestamp,
    method, the signature they call for): the same one passes again, but an
    ACL change, a token change, the skew, another signature or method take
    the whole path."""
    s = auth.TokenStore({CALLER: b"t"}, 0.0)
    v = auth.Verifier(PROVIDER, True, 300_000, s, {CALLER: None})
    t = now_ms()
    good = signed(b"t", t)
    assert v.verify(good, t) == 0 and v.verify(good, t) == 0
    sig = mac(b"t", CALLER, PROVIDER, t // 1000, b"echo").encode()
    assert v.verify(good.replace(sig, sig[:-1] + (b"A" if sig[-1:] != b"A" else b"Q")), t) == 3
    assert v.verify(signed(b"t", t, method="get"), t) == 0
    assert v.verify(good.replace(sig, mac(b"t", CALLER, PROVIDER, t // 1000, b"get").encode()),
                    t) == 3                                # the method's signature, not echo's
    assert v.verify(good, t) == 0
    v.set_acl({CALLER: ["get"]})
    assert v.verify(good, t) == 6
    v.set_acl({CALLER: None})
    assert v.verify(good, t) == 0
    assert v.verify(good, t + 400_000) == 4
    s.set(CALLER, b"u")                                    # no grace: the old token is out
    assert v.verify(good, t) == 3
    assert v.verify(signed(b"u", t), t) == 0
    assert v.counters()["ok"] == 6
