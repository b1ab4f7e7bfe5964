"""Service authentication micro benchmarks (docs/auth.md, "Cost"): one request
signed (au_sign_into: MAC and the signed copy) or verified (au_verify: parse
the timestamp, MAC, constant-time compare, ACL) N times inside the core per
call, so the figure is the core's, not Python's.  `computed`: every
operation computes its MAC (the messages alternate); `remembered`: the same
message again (requests of one caller in one millisecond), the key's
remembered MAC.

    PYTHONPATH=src python -m pytest bench/micro/test_bench_auth.py --benchmark-only
ns per sign / verify = mean / N (printed in extra_info)."""

import time

import pytest

from octoproxy._core import auth as A
from octoproxy._core import frame as F

N = 10_000
TOKEN = b"a-32-byte-token-of-the-caller-ok"
CALLER, PROVIDER = "com.sankuai.caller", b"com.sankuai.octo.echo"


def _request(local=None):
    return F.encode_request(
        123456789, "com.sankuai.octo.EchoService", F.thrift_call("echo", 1) + b"x" * 128,
        timeout=1000, trace_info={"clientAppkey": CALLER, "traceId": "7d1f0c5e9a2b4c3d"},
        local_context=local)


@pytest.mark.parametrize("mac", ["computed", "remembered"])
def test_sign(benchmark, mac):
    req = _request({"octo-remote-appkey": PROVIDER.decode()})
    assert benchmark(A.bench_sign, req, TOKEN, PROVIDER, N, mac == "computed") > len(req)
    benchmark.extra_info["ns_per_sign"] = benchmark.stats.stats.mean / N * 1e9


@pytest.mark.parametrize("mac", ["computed", "remembered"])
@pytest.mark.parametrize("token", ["current", "previous"])
def test_verify(benchmark, mac, token):
    # previous: during a rotation, a caller still on the previous token (two MACs)
    now = int(time.time() * 1000)
    tok = TOKEN if token == "current" else b"the-previous-token"
    frames = tuple(A.sign_frame(_request(), tok, PROVIDER, now // 1000 + i)
                   for i in range(2 if mac == "computed" else 1))
    v = A.Verifier(PROVIDER, True, 300_000, A.TokenStore({CALLER: (TOKEN, b"the-previous-token")}),
                   {CALLER: None})
    assert benchmark(A.bench_verify, v, frames, N, now) == N
    benchmark.extra_info["ns_per_verify"] = benchmark.stats.stats.mean / N * 1e9
