"""A shunting rule changed over xDS takes effect in under 1 s with no failed
request (issue 16).

Real processes: the bundled control plane (its file edited at run time), a
client-side proxy subscribed over xDS (SotW and delta), a server-side proxy
and two provider nodes of one service, `a` (default) and `g` (group `gray`).
Continuous load carries `userId` in the global context; the rule
`userId % 2 == 1 -> gray` is added, then removed.  Which node answers each
request says when the change took effect: the effect time is the send time
of the first request from which on every request went where the current
rules say (measured from the file's rename; it includes the control plane's
100 ms file poll).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from typing import Any

import pytest
import yaml

from octoproxy.sdk import AsyncClient
from octoproxy.sdk.client import Context
from octoproxy.sdk.subscribe import subscribe

from harness import Cluster, Proc, cluster, free_port, server_proxy_cfg, wait_for

pytestmark = pytest.mark.timeout(120)
CYCLES = 2  # rule added then removed, each time
PHASE_S = 1.2  # between two changes (and at least 500 answers)
TAIL_S = 0.3
RULE = {
    "name": "odd-users",
    "match": [{"source": "context", "key": "userId", "op": "mod", "modulus": 2, "remainders": [1]}],
    "group": "gray",
}


class Load:
    """Pipelined calls in a thread; records (send time, user id, node) per answer."""

    def __init__(self, uds: str, clients: int = 2, inflight: int = 8) -> None:
        self.uds = uds
        self.clients = clients
        self.inflight = inflight
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._t.start()
        wait_for(lambda: len(self.answers) > 200 or self.errors, 20, "load to flow")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(30)
        assert not self._t.is_alive(), "load thread hung"

    def _run(self) -> None:
        import uvloop

        uvloop.run(self._main())

    async def _main(self) -> None:
        ids = itertools.count(1)

        async def one(c: AsyncClient) -> None:
            while not self._stop.is_set():
                i = next(ids)
                t = time.monotonic()
                ctx = Context(global_extra={"userId": str(i)})
                try:
                    r = await c.call(
                        "com.demo.Echo", b"echo:%d" % i, context=ctx, timeout_ms=5000,
                        raise_on_error=False,
                    )  # fmt: skip
                except Exception as e:
                    self.errors.append(f"{i}: {type(e).__name__}: {e}")
                    continue
                if r.ok and r.body.endswith(b"|%d" % i):
                    self.answers.append((t, i, r.body.split(b"|")[0].decode()))
                else:
                    self.errors.append(f"{i}: status {r.status}: {r.message} {r.body!r}")

        async def client() -> None:
            c = await AsyncClient.connect(self.uds)
            await asyncio.gather(*(one(c) for _ in range(self.inflight)))
            await c.close()

        await asyncio.gather(*(client() for _ in range(self.clients)))


def effect_time(
    answers: list[tuple[float, int, str]], since: float, until: float, rule_on: bool
) -> float:
    """Seconds from `since` to the send time of the first request from which
    on every answer came from where the rules (on/off) send it.  Only requests
    sent before `until` count: the next change is made TAIL_S after it (a
    request is routed a little after its send time is taken)."""

    def right(i: int, node: str) -> bool:
        return node == ("g" if rule_on and i % 2 else "a")

    after = sorted(a for a in answers if since <= a[0] < until)
    last_wrong = max((k for k, (_, i, n) in enumerate(after) if not right(i, n)), default=-1)
    assert last_wrong < len(after) - 50, "the change had not settled when the load stopped"
    return after[last_wrong + 1][0] - since


def write_endpoints(c: Cluster, ports: dict[str, int], rules: list[dict[str, Any]]) -> float:
    data = {
        "services": [
            {
                "appkey": "com.demo.echo",
                "service_names": ["com.demo.Echo"],
                "endpoints": [
                    {"address": f"127.0.0.1:{ports['a']}"},
                    {"address": f"127.0.0.1:{ports['g']}", "group": "gray"},
                ],
                "shunting": rules,
            }
        ]
    }
    tmp = c.path("endpoints.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f)
    t = time.monotonic()  # before the rename: the change cannot be seen earlier
    os.replace(tmp, c.path("endpoints.yaml"))
    return t


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_rule_change_over_xds_takes_effect_fast_with_no_failed_request(delta: bool) -> None:
    with cluster() as c:
        c.providers(a="a.sock", g="g.sock")
        ports = {n: free_port() for n in "ag"}
        c.proxy("server", server_proxy_cfg({ports[n]: c.path(f"{n}.sock") for n in "ag"}))
        write_endpoints(c, ports, [])
        cp_port = free_port()
        cp = Proc(
            [sys.executable, "-m", "octoproxy", "control-plane", "--endpoints",
             c.path("endpoints.yaml"), "--listen", f"127.0.0.1:{cp_port}"],
            "cp", c.dir,
        )  # fmt: skip
        c.procs.append(cp)
        wait_for(lambda: "listening on" in cp.log() or not cp.alive(), 15, "control plane")
        sub_port = free_port()
        c.proxy(
            "client",
            {
                "node": {"id": "client"},
                "listeners": {"outbound": [{"path": c.path("px.sock")}]},
                "xds": {"server": f"127.0.0.1:{cp_port}", "delta": delta},
                "subscribe": {"port": sub_port, "timeout_s": 10},
            },
        )
        subscribe(f"http://127.0.0.1:{sub_port}", ["com.demo.echo"])
        load = Load(c.path("px.sock")).start()
        changes: list[tuple[float, float, bool]] = []  # (rename time, next rename, rule on)
        try:
            # no rule: every request on the default node
            wait_for(lambda: len(load.answers) > 500, 20, "answers")
            assert {n for _, _, n in load.answers} == {"a"}
            for k in range(2 * CYCLES):
                on = k % 2 == 0
                t = write_endpoints(c, ports, [RULE] if on else [])
                if changes:
                    changes[-1] = (changes[-1][0], t, changes[-1][2])
                changes.append((t, float("inf"), on))
                n = len(load.answers)
                wait_for(
                    lambda n=n, t=t: (
                        (time.monotonic() > t + PHASE_S and len(load.answers) > n + 500)
                        or load.errors
                    ),
                    30,
                    "answers",
                )
        finally:
            load.stop()
        assert load.errors == [], load.errors[:5]
        times = [effect_time(load.answers, t, nxt - TAIL_S, on) for t, nxt, on in changes]
        print(
            f"\nshunting rule over xDS ({'delta' if delta else 'sotw'}): time to effect "
            f"{', '.join(f'{x * 1000:.0f}' for x in times)} ms (on/off alternately), "
            f"{len(load.answers)} answers, 0 failed"
        )
        assert max(times) < 1.0, times
        assert "NACK" not in cp.log() and "rejected" not in cp.log()
