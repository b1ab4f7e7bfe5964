"""Service authentication (docs/auth.md): the token file, the configuration,
and the core's signing and verifying against an independent HMAC (hashlib)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from pathlib import Path

import pytest

from octoproxy import auth as pyauth
from octoproxy._core import auth, frame
from octoproxy.config import ConfigError, parse_config

TOKEN = b"s3cr3t-token-of-web"
CALLER, PROVIDER = b"com.demo.web", b"com.demo.echo"


def mac(token: bytes, caller: bytes, provider: bytes, ts: int, method: bytes) -> str:
    """docs/protocol.md 7.6: base64url, unpadded, of HMAC-SHA256's first 16 bytes."""
    d = hmac.new(token, b"|".join([caller, provider, str(ts).encode(), method]),
                 hashlib.sha256).digest()
    return base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()


def request(local: dict[str, str] | None = None, method: str = "echo", checksum: bool = False,
            caller: str = "com.demo.web") -> bytes:
    body = frame.thrift_call(method, 7)
    return frame.encode_request(5, "com.demo.echo.Service", body, local_context=local,
                                trace_info={"clientAppkey": caller}, checksum=checksum)


def signed(ts: int, sig: str | None = None, method: str = "echo", caller: str = "com.demo.web",
           extra: dict[str, str] | None = None) -> bytes:
    sig = sig if sig is not None else mac(TOKEN, caller.encode(), PROVIDER, ts, method.encode())
    ctx = {"octo-auth": f"{caller}:{ts}:{sig}", **(extra or {})}
    return request(ctx, method)


def verifier(acl: dict[bytes, frozenset[bytes] | None] | None = None) -> auth.Verifier:
    return auth.Verifier(PROVIDER, True, 300_000, {CALLER: (TOKEN,), b"com.demo.other": (b"x",)},
                         {CALLER: None} if acl is None else acl)


NOW = 1_800_000_000_000   # the verifier's clock (ms)
TS = NOW // 1000          # the signature's timestamp (s)


def test_sign_matches_hmac_sha256() -> None:
    assert auth.sign(TOKEN, CALLER, PROVIDER, TS, b"echo") == mac(TOKEN, CALLER, PROVIDER, TS, b"echo")
    long_method = b"m" * 2000  # past the stack buffer
    assert auth.sign(TOKEN, CALLER, PROVIDER, 1, long_method) == mac(TOKEN, CALLER, PROVIDER, 1, long_method)


def test_protocol_doc_vector() -> None:
    """docs/protocol.md 7.6's worked example, read from the document: Python's
    hmac/hashlib/base64 and the core give its values, and the verifier takes
    a request carrying its octo-auth at time T."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    sec = doc[doc.index("7.6. Service authentication"):doc.index("## 8.")]
    rows = dict(re.findall(r"^\| (.+?) \| (`.*`) \|$", sec, re.M))

    def cell(label: str) -> str:
        return rows[label].strip("`").replace("\\|", "|")

    token = cell("token of C").encode()
    c, p, t, m = (x.strip().strip("`") for x in rows["C, P, T, M"].split(","))
    message = cell("message").encode()
    assert message == f"{c}|{p}|{t}|{m}".encode()
    d = hmac.new(token, message, hashlib.sha256).digest()
    assert d.hex() == cell("HMAC-SHA256 (hex)") and d[:16].hex() == cell("its first 16 bytes (hex)")
    s = base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()
    assert s == cell("S") and len(s) == 22
    value = cell("`octo-auth`")
    assert value == f"{c}:{t}:{s}"
    assert auth.sign(token, c.encode(), p.encode(), int(t), m.encode()) == s
    assert auth.context(token, c, p, t, m) == {"octo-auth": value}
    v = auth.Verifier(p.encode(), True, 1000, {c.encode(): (token,)}, {c.encode(): None})
    req = frame.encode_request(5, "com.demo.echo.Service", frame.thrift_call(m, 7),
                               local_context={"octo-auth": value})
    assert v.verify(req, int(t) * 1000 + 500) == 0
    assert v.verify(req, int(t) * 1000 + 1999) == 0    # T.999 is within 1 s of now
    assert v.verify(req, int(t) * 1000 + 2000) == 4


def test_verify_reasons() -> None:
    v = verifier()
    assert v.verify(signed(TS), NOW) == 0
    assert v.verify(signed(TS), NOW + 299_000) == 0
    assert v.verify(request(), NOW) == 1                              # unsigned
    assert v.verify(signed(TS, caller="com.demo.nobody"), NOW) == 5  # no token, not in the ACL
    assert v.verify(signed(TS, sig="0" * 64), NOW) == 3              # bad signature
    assert v.verify(signed(TS, sig="ab"), NOW) == 3
    assert v.verify(signed(TS, sig="A" * 22), NOW) == 3
    good = mac(TOKEN, CALLER, PROVIDER, TS, b"echo")
    assert v.verify(signed(TS, sig=good[:-1] + "B"), NOW) == 3         # non-canonical last char
    assert v.verify(signed(TS, sig=good + "A"), NOW) == 3
    assert v.verify(signed(TS, sig=good), NOW) == 0
    assert v.verify(signed(TS + 1, sig=good), NOW) == 3                # the timestamp is covered
    assert v.verify(signed(TS, sig=good, caller="com.demo.web:x"), NOW) == 5  # a colon in C
    c0 = v.counters()["bad_signature"]
    assert v.verify(signed(TS), NOW + 301_000) == 4                  # expired
    assert v.verify(signed(TS), NOW - 301_000) == 4                  # from the future
    other = mac(b"x", b"com.demo.other", PROVIDER, TS, b"echo")
    assert v.verify(signed(TS, sig=other, caller="com.demo.other"), NOW) == 5  # not in the ACL
    vm = verifier({CALLER: frozenset({b"get"})})
    assert vm.verify(signed(TS), NOW) == 6                           # method not allowed
    assert vm.verify(signed(TS, method="get"), NOW) == 0
    c = v.counters()
    assert c["ok"] == 3 and c["unsigned"] == 1 and c["bad_signature"] == c0 and c["expired"] == 2


def test_which_reason_wins() -> None:
    """restrict -> authenticate -> authorize, except that a caller with no
    token is answered by the ACL: not named -> not allowed (what it would get
    whatever its token), named -> unknown caller (docs/auth.md, "Which reason")."""
    nobody, other = "com.demo.nobody", "com.demo.other"
    good_other = mac(b"x", other.encode(), PROVIDER, TS, b"echo")
    in_acl = verifier({CALLER: None, nobody.encode(): None})
    by_method = verifier({CALLER: None, nobody.encode(): frozenset({b"get"})})
    not_in_acl = verifier()
    nobody_acl = verifier({})
    cases = [
        # (verifier, frame, now, reason)
        (in_acl, signed(TS, caller=nobody), NOW, 2),                  # no token, named
        (in_acl, signed(TS, caller=nobody, sig="0" * 64), NOW, 2),
        (in_acl, signed(TS, caller=nobody), NOW + 301_000, 2),        # before the skew
        (by_method, signed(TS, caller=nobody), NOW, 2),               # before the method
        (not_in_acl, signed(TS, caller=nobody), NOW, 5),              # no token, not named
        (not_in_acl, signed(TS, caller=nobody, sig="ab"), NOW, 5),
        (not_in_acl, signed(TS, caller=nobody), NOW + 301_000, 5),
        (nobody_acl, signed(TS, caller=nobody), NOW, 5),              # an ACL that allows nobody
        (nobody_acl, signed(TS), NOW, 5),
        (not_in_acl, signed(TS, sig=good_other, caller=other), NOW, 5),  # token, not named
        (not_in_acl, signed(TS, sig="0" * 64, caller=other), NOW, 3),    # ... its signature first
        (not_in_acl, signed(TS, sig=good_other, caller=other), NOW + 301_000, 4),
        (by_method, signed(TS, sig="0" * 64), NOW, 3),                # named for other methods
        (by_method, signed(TS), NOW + 301_000, 4),
        (not_in_acl, request(), NOW, 1),                               # unsigned, whatever else
        (not_in_acl, request({"octo-auth": f"{nobody}:{TS}"}), NOW, 1),  # no third part
        (not_in_acl, request({"octo-auth": f":{TS}:{'A' * 22}"}), NOW, 1),  # no caller
        (not_in_acl, signed(TS), NOW, 0),
    ]
    for i, (v, f, now, want) in enumerate(cases):
        assert v.verify(f, now) == want, (i, want)
    assert not_in_acl.counters()["not_allowed"] == 4 and in_acl.counters()["unknown_caller"] == 3
    # the same caller again after a refusal, and after a pass: no stale answer
    assert not_in_acl.verify(signed(TS, caller=nobody), NOW) == 5
    assert not_in_acl.verify(signed(TS), NOW) == 0
    assert not_in_acl.verify(signed(TS, caller=nobody), NOW) == 5
    # the ACL changes at run time: the answer follows it
    not_in_acl.set_acl({CALLER: None, nobody: None})
    assert not_in_acl.verify(signed(TS, caller=nobody), NOW) == 2
    not_in_acl.set_acl({CALLER: None})
    assert not_in_acl.verify(signed(TS, caller=nobody), NOW) == 5


def test_signature_covers_method_and_provider() -> None:
    v = verifier()
    sig = mac(TOKEN, CALLER, PROVIDER, TS, b"echo")
    assert v.verify(signed(TS, sig=sig, method="drop"), NOW) == 3
    wrong_provider = mac(TOKEN, CALLER, b"com.demo.other", NOW, b"echo")
    assert v.verify(signed(TS, sig=wrong_provider), NOW) == 3


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("local", [None, {}, {"octo-remote-appkey": "com.demo.echo"},
                                   {"octo-auth": "com.evil:1:" + "f" * 22}])
def test_sign_frame_roundtrip(local: dict[str, str] | None, checksum: bool) -> None:
    f = request(local, checksum=checksum)
    out = auth.sign_frame(f, TOKEN, PROVIDER, TS)
    frames, used = frame.scan(out)
    assert used == len(out) and len(frames) == 1
    h = frame.decode_header(out[10:10 + int.from_bytes(out[8:10], "big")])
    ctx = h["localContext"]
    assert ctx["octo-auth"] == f"com.demo.web:{TS}:{mac(TOKEN, CALLER, PROVIDER, TS, b'echo')}"
    for k, v in (local or {}).items():
        if k != "octo-auth":
            assert ctx[k] == v
    assert out.endswith(f[len(f) - (4 if checksum else 0) - len(frame.thrift_call("echo", 7)):
                          len(f) - (4 if checksum else 0)] + (out[-4:] if checksum else b""))
    assert verifier().verify(out, NOW) == 0


def test_tokens_never_printed() -> None:
    t = pyauth.Tokens({"a": TOKEN})
    assert TOKEN.decode() not in repr(t) + str(t)
    v = verifier()
    assert TOKEN.decode() not in repr(v) + repr(auth.Signer({CALLER: TOKEN}))
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(v)


def write_tokens(tmp_path: Path, text: str, mode: int) -> str:
    p = tmp_path / "tokens.yaml"
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_token_file_mode_refused(tmp_path: Path, mode: int) -> None:
    p = write_tokens(tmp_path, "com.demo.web: s3cr3t\n", mode)
    with pytest.raises(ConfigError) as e:
        pyauth.load_tokens(p)
    assert "chmod 600" in str(e.value)


def test_token_file_ok_and_errors_quote_nothing(tmp_path: Path) -> None:
    p = write_tokens(tmp_path, "com.demo.web: s3cr3t\ncom.demo.x: other\n", 0o600)
    t = pyauth.load_tokens(p)
    assert t.get("com.demo.web") == b"s3cr3t" and t.appkeys() == ["com.demo.web", "com.demo.x"]
    bad = write_tokens(tmp_path, "com.demo.web: [s3cr3t-unclosed\n", 0o400)
    with pytest.raises(ConfigError) as e:
        pyauth.load_tokens(bad)
    assert "s3cr3t" not in str(e.value)
    os.unlink(bad)
    os.symlink(p, bad)
    with pytest.raises(ConfigError):
        pyauth.load_tokens(bad)


def test_config(tmp_path: Path) -> None:
    base = {"listeners": {"outbound": [{"path": "/tmp/x.sock", "sign_for": ["com.demo.web"]}]}}
    with pytest.raises(ConfigError, match="token_file"):
        parse_config(base)
    with pytest.raises(ConfigError, match="appkey"):
        parse_config({"listeners": {"inbound": [{"port": 1, "upstream_uds": "/x", "auth": {}}]}})
    with pytest.raises(ConfigError, match="twice"):
        parse_config({"auth": {"token_file": "/t"}, "listeners": {"inbound": [
            {"port": 1, "upstream_uds": "/x", "appkey": "p",
             "auth": {"allow": [{"caller": "a"}, {"caller": "a"}]}}]}})
    p = write_tokens(tmp_path, "com.demo.other: t\n", 0o600)
    cfg = parse_config({**base, "auth": {"token_file": p}})
    with pytest.raises(ConfigError, match=r"no token for 'com\.demo\.web'"):
        pyauth.load(cfg)


def test_rotation_window_accepts_current_and_previous(tmp_path: Path) -> None:
    p = write_tokens(tmp_path, "com.demo.web: [new-token, old-token]\n", 0o600)
    toks = pyauth.load_tokens(p)
    assert toks.get("com.demo.web") == b"new-token"
    assert toks.accepted("com.demo.web") == (b"new-token", b"old-token")
    v = auth.Verifier(PROVIDER, True, 300_000, {CALLER: toks.accepted("com.demo.web")}, {CALLER: None})
    for tok, want in ((b"new-token", 0), (b"old-token", 0), (b"older-token", 3)):
        sig = mac(tok, CALLER, PROVIDER, TS, b"echo")
        assert v.verify(signed(TS, sig=sig), NOW) == want
    assert "old-token" not in repr(toks)
