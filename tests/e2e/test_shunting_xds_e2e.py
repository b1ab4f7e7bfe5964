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

import time
from typing import Any

import pytest

from octoproxy.sdk.client import Context
from octoproxy.sdk.subscribe import subscribe

from harness import Cluster, LoadThread, cluster, free_port, wait_for, xds_client_cfg

pytestmark = pytest.mark.timeout(120)
CYCLES = 2  # rule added then removed, each time
PHASE_S = 1.2  # between two changes (and at least 500 answers)
TAIL_S = 0.3
RULE = {
    "name": "odd-users",
    "match": [{"source": "context", "key": "userId", "op": "mod", "modulus": 2, "remainders": [1]}],
    "group": "gray",
}


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
    """The control plane's file; returns the time just before its rename."""
    t = time.monotonic()  # before the rename: the change cannot be seen earlier
    c.write_endpoints({
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
    })
    return t


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_rule_change_over_xds_takes_effect_fast_with_no_failed_request(delta: bool) -> None:
    with cluster() as c:
        ports = c.provider_nodes("ag")
        write_endpoints(c, ports, [])
        cp = c.control_plane(c.path("endpoints.yaml"))
        sub_port = free_port()
        c.proxy("client", xds_client_cfg(c.path("px.sock"), cp.target, sub_port,
                                         xds={"delta": delta}, subscribe={"timeout_s": 10}))
        subscribe(f"http://127.0.0.1:{sub_port}", ["com.demo.echo"])
        load = LoadThread(c.path("px.sock"), clients=2, inflight=8, service="com.demo.Echo",
                          context=lambda i: Context(global_extra={"userId": str(i)})).start()
        changes: list[tuple[float, float, bool]] = []  # (rename time, next rename, rule on)
        try:
            # no rule: every request on the default node
            wait_for(lambda: len(load.answered) > 500, 20, "answers")
            assert {n for _, _, n in load.answered} == {"a"}
            for k in range(2 * CYCLES):
                on = k % 2 == 0
                t = write_endpoints(c, ports, [RULE] if on else [])
                if changes:
                    changes[-1] = (changes[-1][0], t, changes[-1][2])
                changes.append((t, float("inf"), on))
                n = len(load.answered)
                wait_for(
                    lambda n=n, t=t: (
                        (time.monotonic() > t + PHASE_S and len(load.answered) > n + 500)
                        or load.errors
                    ),
                    30,
                    "answers",
                )
        finally:
            load.stop()
        assert load.errors == [], load.errors[:5]
        times = [effect_time(load.answered, t, nxt - TAIL_S, on) for t, nxt, on in changes]
        print(
            f"\nshunting rule over xDS ({'delta' if delta else 'sotw'}): time to effect "
            f"{', '.join(f'{x * 1000:.0f}' for x in times)} ms (on/off alternately), "
            f"{len(load.answered)} answers, 0 failed"
        )
        assert max(times) < 1.0, times
        assert "NACK" not in cp.log() and "rejected" not in cp.log()
