"""A control plane that sends very large auth updates (docs/auth.md,
"Limits"): an ACL naming thousands of callers makes the verifying proxy ask
for thousands of SDS secrets at once.  Real processes: the bundled control
plane serving from its files, a verifying server-side proxy, and a legacy
caller signing by itself that keeps calling through the update.  The proxy
must apply it without stalling the calls in flight, its memory bounded, its
log not flooded, and an ACL past the limit refused whole (NACK) with the old
one kept."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import pytest
from test_auth_xds import _complete, _get, _write

from harness import cluster, free_port, wait_for
from outsider import Wire, mac, now_s

PROVIDER = "com.demo.echo"
WEB_TOKEN = "big-tok-web-1d2e3f4a"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Caller(threading.Thread):
    """A legacy client signing by itself, calling in a loop; keeps each
    call's (start, latency, status)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.calls: list[tuple[float, float, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            w = Wire(self.port)
            while not self.stop.is_set():
                ts = now_s()
                t0 = time.monotonic()
                r = w.signed(b"x", "com.demo.web", ts, mac("com.demo.web", ts, "",
                                                              WEB_TOKEN))
                self.calls.append((t0, time.monotonic() - t0, r["status"]))
            w.close()
        except BaseException as e:  # reported by the test
            self.error = e


def callers(n: int) -> list[str]:
    return [f"com.big.caller{i:05d}" for i in range(n)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("n", [9_999])
def test_acl_with_thousands_of_callers_and_their_secrets(n: int) -> None:
    with cluster() as c:
        tokens: dict[str, Any] = {"com.demo.web": WEB_TOKEN}
        _write(c.path("tokens.yaml"), tokens, 0o600)
        _write(c.path("eps.yaml"), {"services": [], "acls": {PROVIDER: [
            {"caller": "com.demo.web"}]}})
        cp_port = free_port()
        from harness import Proc

        cp = Proc([sys.executable, "-m", "octoproxy", "control-plane", "--endpoints",
                   c.path("eps.yaml"), "--tokens", c.path("tokens.yaml"),
                   "--listen", f"127.0.0.1:{cp_port}"], "cp", c.dir)
        c.procs.append(cp)
        wait_for(lambda: "listening on" in cp.log() or not cp.alive(), 20, "the control plane")
        c.providers(echo="echo.sock")
        port, admin = free_port(), free_port()
        proxy = c.proxy("server", {
            "node": {"id": "server"}, "xds": {"server": f"127.0.0.1:{cp_port}"},
            "auth": {"source": "xds", "max_skew_s": 60}, "admin": {"port": admin},
            "listeners": {"inbound": [{
                "host": "127.0.0.1", "port": port, "upstream_uds": c.path("echo.sock"),
                "appkey": PROVIDER, "auth": {"mode": "enforce"}}]}})
        wait_for(lambda: _complete(admin), 30, "tokens and ACLs")
        caller = Caller(port)
        caller.start()
        wait_for(lambda: len(caller.calls) > 200 or caller.error, 20, "calls")
        rss0 = rss_kib(proxy.pid)
        many = callers(n)
        tokens.update({a: f"big-tok-{i:05d}-0123456789abcdef" for i, a in enumerate(many)})
        _write(c.path("tokens.yaml"), tokens, 0o600)
        # one caller past the limit: the ACL is refused whole, the old one stays
        _write(c.path("eps.yaml"), {"services": [], "acls": {PROVIDER: [
            {"caller": "com.demo.web"}, *({"caller": a} for a in callers(n + 1))]}})
        wait_for(lambda: "typed_config.rules: more than 10000 " in proxy.log(), 60,
                 "the NACK of the ACL past the limit")
        n_calls = len(caller.calls)
        wait_for(lambda: len(caller.calls) > n_calls + 50 or caller.error, 20, "calls")
        assert {st for _, _, st in caller.calls} == {0}
        log0 = len(proxy.log())
        t_change = time.monotonic()
        _write(c.path("eps.yaml"), {"services": [], "acls": {PROVIDER: [
            {"caller": "com.demo.web"}, *({"caller": a} for a in many)]}})

        last = many[-1]
        probe = Wire(port)

        def done() -> bool:
            # the last caller of the new ACL verified with its new token (not
            # the admin API: a /config_dump of 10,000 tokens is work for the proxy)
            ts = now_s()
            return probe.signed(b"x", last, ts, mac(last, ts, "", tokens[last]))["status"] == 0

        try:
            wait_for(done, 240, "the big ACL and its secrets applied", interval=0.05)
        except TimeoutError:
            raise AssertionError(proxy.log()[-3000:] + cp.log()[-2000:]) from None
        probe.close()
        t_done = time.monotonic()
        time.sleep(0.5)
        caller.stop.set()
        caller.join(20)
        assert caller.error is None, caller.error
        rss1 = rss_kib(proxy.pid)
        dump = json.loads(_get(admin, "/config_dump"))
        log = proxy.log()[log0:]
        assert proxy.alive()
    during = [(lat, st) for t0, lat, st in caller.calls if t_change - 0.1 <= t0 <= t_done]
    before = sorted(lat for t0, lat, st in caller.calls if t0 < t_change)
    worst = max(lat for lat, _ in during)
    stats = {"apply_s": round(t_done - t_change, 2), "calls_during": len(during),
             "worst_ms": round(worst * 1000, 1),
             "p50_before_ms": round(before[len(before) // 2] * 1000, 2),
             "rss_kib": (rss0, rss1), "log_bytes": len(log),
             "xds": dump["xds"]["stats"]}
    print(stats)
    assert {st for _, st in during} == {0}, stats
    # the update is applied in steps (test_big_auth_updates_are_applied_in_steps);
    # what is left on a loaded 2-CPU host is scheduling and the collector:
    # nothing like a stall of seconds
    assert worst < 2.0, stats
    # memory bounded: each token is two SHA-256 states and a few objects
    assert rss1 - rss0 < 64 * 1024, stats
    # the log says what changed, not every appkey
    assert len(log) < 8 * 1024, log[-2000:]


def test_big_auth_updates_are_applied_in_steps() -> None:
    """An ACL of 10,000 callers and their 10,000 secrets are converted and
    applied in steps the xDS client runs with the loop serving traffic in
    between (docs/auth.md, "Limits"): one step per policy and per secret, at
    most SecretSource.CHUNK tokens applied in one, where each response was
    handled at once (0.1-0.3 s each on the test VM)."""
    from google.protobuf import any_pb2

    from octoproxy.config import parse_config
    from octoproxy.keyring import Keyring
    from octoproxy.xds.authres import RBAC_TYPE, SECRET_TYPE, acl_to_rbac, tokens_to_secret
    from octoproxy.xds.authsource import RbacSource, SecretSource

    cfg = parse_config({"xds": {"server": "127.0.0.1:1"}, "auth": {"source": "xds"},
                        "listeners": {"inbound": [{
                            "port": 1, "upstream_uds": "/tmp/unused.sock", "appkey": PROVIDER,
                            "auth": {"mode": "enforce"}}]}})
    ring = Keyring(cfg, None)
    ring.verifier(cfg.listeners.inbound[0])
    secrets = SecretSource(ring, lambda: None)
    rbac = RbacSource(ring, lambda: None, secrets)
    many = callers(9_999)
    tec = acl_to_rbac(PROVIDER, dict.fromkeys(many))
    acl_res = [("", "", any_pb2.Any(type_url=RBAC_TYPE, value=tec.SerializeToString()))]
    sec_res = [("", "", any_pb2.Any(type_url=SECRET_TYPE, value=tokens_to_secret(
        a, (f"big-tok-{i:05d}".encode(),)).SerializeToString())) for i, a in enumerate(many)]
    for source, res in ((rbac, acl_res), (secrets, sec_res)):
        gen = source.steps(res, [], True)
        longest, steps, total = 0.0, 0, time.perf_counter()
        held, most = len(ring.store), 0  # tokens applied between two steps
        while True:
            t0 = time.perf_counter()
            try:
                next(gen)
            except StopIteration as stop:
                assert stop.value == []
                break
            longest = max(longest, time.perf_counter() - t0)
            steps += 1
            most, held = max(most, len(ring.store) - held), len(ring.store)
        total = time.perf_counter() - total
        # timings are shown, not asserted (a loaded host); the split is checked
        print(source.short, {"steps": steps, "longest_ms": round(longest * 1000, 1),
                             "total_ms": round(total * 1000, 1), "most_tokens_in_a_step": most})
        assert steps >= len(many), steps  # at least one per policy / per secret
        assert most <= SecretSource.CHUNK, most
    assert not ring.missing() and len(ring.dump()["tokens"]) == 9_999
