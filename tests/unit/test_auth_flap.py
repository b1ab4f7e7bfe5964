"""Token flapping (docs/auth.md, "Rotation"): a token changed thousands of
times, as a control plane or a token file gone wrong would.  Each change
keeps only the token it replaced accepted (for the grace period), so the
accepted set of an appkey never holds more than two tokens, verification
stays exact (the current and the last token pass, any older one fails),
memory stays flat, and the log gets one line per secret per interval
(the changes within it counted in a summary line)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time

import pytest
from google.protobuf import any_pb2

from octoproxy._core import auth, frame
from octoproxy.config import parse_config
from octoproxy.keyring import Keyring
from octoproxy.xds.authres import SECRET_TYPE, tokens_to_secret
from octoproxy.xds.authsource import ChangeLog, SecretSource

CALLER, PROVIDER = b"com.demo.web", b"com.demo.echo"
NOW = int(time.time() * 1000)  # the verifier's clock (ms): the grace runs on the real clock
TS = NOW // 1000  # the signing time (s)


def signed(token: bytes) -> bytes:
    """A request signed as docs/protocol.md 7.6 says (seconds, 128-bit base64url)."""
    d = hmac.new(token, b"|".join([CALLER, PROVIDER, str(TS).encode(), b"echo"]),
                 hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(d[:16]).rstrip(b"=").decode()
    return frame.encode_request(
        1, "com.demo.echo.Service", frame.thrift_call("echo", 1),
        trace_info={"clientAppkey": CALLER.decode()},
        local_context={"octo-auth": f"{CALLER.decode()}:{TS}:{sig}"})


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_flapping_token_keeps_two_accepted_and_memory_flat() -> None:
    store = auth.TokenStore()
    v = auth.Verifier(PROVIDER, True, 300_000, store, {CALLER: None})
    tok = [b"flap-%06d" % i for i in range(60_000)]
    rss = 0
    for i, t in enumerate(tok):
        store.set(CALLER, t)
        if i % 997 == 0 and i >= 2:
            assert v.verify(signed(t), NOW) == 0                # current
            assert v.verify(signed(tok[i - 1]), NOW) == 0       # the one it replaced (grace)
            assert v.verify(signed(tok[i - 2]), NOW) == 3       # any older: bad signature
            assert v.verify(signed(tok[i // 2]), NOW) == 3
        if i == 10_000:
            rss = rss_kib()
    assert len(store) == 1 and store.rotating(CALLER)
    grown = rss_kib() - rss
    assert grown < 4096, grown  # KiB over 50,000 changes: nothing kept per change


def test_flapping_between_two_tokens_accepts_both() -> None:
    store = auth.TokenStore()
    v = auth.Verifier(PROVIDER, True, 300_000, store, {CALLER: None})
    for i in range(5000):
        store.set(CALLER, b"flip" if i % 2 else b"flop")
    assert v.verify(signed(b"flip"), NOW) == 0 and v.verify(signed(b"flop"), NOW) == 0
    assert v.verify(signed(b"flap"), NOW) == 3


def test_flapping_sds_secret_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 changes of one secret, 10 ms apart (100 s on the ChangeLog's
    clock, interval 10 s): the first is logged, the others are counted into
    one summary line per interval (before: 10,000 lines); every change is
    accounted for, and no token is in any line."""
    cfg = parse_config({"xds": {"server": "127.0.0.1:1"}, "auth": {"source": "xds"},
                        "listeners": {"outbound": [{"path": "/tmp/unused.sock",
                                                    "sign_for": [CALLER.decode()]}]}})
    ring = Keyring(cfg, None)
    src = SecretSource(ring, lambda: None)
    now = [0.0]
    src.changelog = ChangeLog("tokens", 10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="octoproxy.xds")
    n = 10_000
    for i in range(n):
        now[0] = i * 0.01
        sec = tokens_to_secret(CALLER.decode(), (b"sds-flap-%05d" % i,))
        errs = src.on_response([(CALLER.decode(), f"v{i}", any_pb2.Any(
            type_url=SECRET_TYPE, value=sec.SerializeToString()))], [], False)
        assert errs == []
    # the same version again: nothing applied, nothing logged
    src.on_response([(CALLER.decode(), f"v{n - 1}", any_pb2.Any(
        type_url=SECRET_TYPE, value=sec.SerializeToString()))], [], False)
    now[0] += 10.0
    src.changelog.flush()  # what the timer does on a running loop
    lines = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert 10 <= len(lines) <= 12, lines
    counted = sum(int(m) for line in lines for m in re.findall(r"\((\d+)x\)", line))
    logged = sum(1 for line in lines if line.startswith("xDS: tokens updated for"))
    assert logged + counted == n and src.changelog.suppressed == counted
    assert all(b"sds-flap" not in line.encode() for line in lines)  # no token in a log
    d = ring.dump()
    assert d["tokens"] == {CALLER.decode(): {"version": f"v{n - 1}", "tokens": 1}}
    assert ring.store.rotating(CALLER) and len(ring.store) == 1


def test_change_log_names_another_appkey_at_once() -> None:
    now = [0.0]
    cl = ChangeLog("tokens", 10.0, clock=lambda: now[0])
    assert cl.fresh(["a"]) == ["a"]
    now[0] = 1.0
    assert cl.fresh(["a", "b"]) == ["b"]  # a: counted; b: its first change
    now[0] = 10.5
    assert cl.fresh(["c"]) == ["c"]  # and a's count written first (the lazy flush)
    assert cl.suppressed == 1 and not cl.quiet("a")
