"""SIGTERM drain (issue 11): every request the proxy has read gets an answer
before its connection closes; new requests during the drain get a clear
status (6, "shutting down") instead of being taken on."""

from __future__ import annotations

import signal
import time

from attack import Peer, chain_cfgs, req, start_proxy

from harness import cluster


def test_sigterm_answers_everything_read_and_refuses_new_work() -> None:
    with cluster() as c:
        scfg, ccfg, _ = chain_cfgs(c, client_extra={"hot_restart": {"shutdown_s": 10.0}})
        start_proxy(c, "server", scfg)
        client = start_proxy(c, "client", ccfg)
        p = Peer(c.path("px.sock"))
        p.send(b"".join(req(i, b"sleep:800:a%d" % i) for i in range(50)))
        time.sleep(0.2)
        client.signal(signal.SIGTERM)
        time.sleep(0.2)
        p.send(b"".join(req(i) for i in range(100, 110)))
        assert p.wait_closed(15), "the connection was not closed after the drain"
        a = p.answers()
        first = {i: a[i][0].status for i in range(50) if i in a}
        later = {i: (a[i][0].status, a[i][0].message) for i in range(100, 110) if i in a}
        print(f"SIGTERM: {len(first)}/50 in-flight answered, {len(later)}/10 new answered "
              f"({sorted({s for s, _ in later.values()})})")
        assert first == {i: 0 for i in range(50)}, first
        assert len(later) == 10 and all(s == 6 and "shutting down" in (m or "")
                                        for s, m in later.values()), later
        assert all(len(v) == 1 for v in a.values())
        assert client.p.wait(10) == 0


def test_sigterm_past_shutdown_s_still_answers_what_it_owes() -> None:
    # the provider outlives shutdown_s: what is still owed is answered
    # (status 4, the proxy is stopping) before the app connection closes
    with cluster() as c:
        scfg, ccfg, _ = chain_cfgs(c, client_extra={"hot_restart": {"shutdown_s": 1.0,
                                                                    "drain_s": 0.5}})
        start_proxy(c, "server", scfg)
        client = start_proxy(c, "client", ccfg)
        apps = [Peer(c.path("px.sock")) for _ in range(5)]
        for a in apps:
            a.send(b"".join(req(i, b"sleep:5000:x", timeout_ms=10000) for i in range(10)))
        time.sleep(0.3)
        t0 = time.monotonic()
        client.signal(signal.SIGTERM)
        for a in apps:
            assert a.wait_closed(10)
        took = time.monotonic() - t0
        answered = sum(len(a.answers()) for a in apps)
        print(f"SIGTERM past shutdown_s: {answered}/50 owed requests answered, exit after {took:.1f} s")
        assert answered == 50
        for a in apps:
            assert all(v[0].status == 4 and "shutting down" in (v[0].message or "")
                       for v in a.answers().values())
        assert client.p.wait(10) == 0
