"""What the demo measures, apart from how it runs: its nodes and callers,
the results of a run, and the statistics the report and the chart share
(demo.py runs the demo, demo_chart.py draws it; both import this)."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

CLIENT_IDC = "gh"
CLIENT_REGION = "beijing"


@dataclass(frozen=True)
class Node:
    """A provider node: one UDS behind one inbound port of the server-side proxy."""

    name: str
    appkey: str
    cell: str = ""
    swimlane: str = ""
    idc: str = CLIENT_IDC
    region: str = CLIENT_REGION
    idle_why: str = ""  # why no caller of the demo should reach it
    group: str = ""  # node group (traffic shunting); "" = the service's default nodes


@dataclass(frozen=True)
class Caller:
    """A consumer context: which service it calls, with which routing labels."""

    label: str
    service: str  # appkey
    workers: int  # concurrent requests it keeps in flight
    expect: frozenset[str]  # destinations the routing rules allow
    swimlane: str | None = None
    set: str | None = None
    liteset: str | None = None
    hash_keys: int = 0  # > 0: rotate over this many octo-hash-key values
    extra: tuple[tuple[str, str], ...] = ()  # other globalContext values (shunting rules read them)


@dataclass
class RestartEvent:
    which: str  # "client-side proxy" / "server-side proxy"
    t_signal: float  # seconds since traffic start
    old_pid: int
    new_pid: int = 0
    t_serving: float = math.nan  # the new generation owns the pid file
    t_old_gone: float = math.nan  # the old generation has exited


@dataclass
class Results:
    callers: list[Caller]
    nodes: list[Node]
    t_send: array[float] = field(default_factory=lambda: array("d"))
    latency: array[float] = field(default_factory=lambda: array("d"))  # seconds
    caller_ix: array[int] = field(default_factory=lambda: array("B"))
    dest_ix: array[int] = field(default_factory=lambda: array("B"))
    failures: list[tuple[float, str]] = field(default_factory=list)
    misrouted: int = 0
    retried: int = 0
    restarts: list[RestartEvent] = field(default_factory=list)
    duration: float = 0.0
    hash_homes: dict[str, set[int]] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latency) + len(self.failures)

    @property
    def failed(self) -> int:
        return len(self.failures) + self.misrouted


def percentile(sorted_values: list[float] | array[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..1)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    return float(sorted_values[min(n - 1, max(0, math.ceil(q * n) - 1))])


def windows(res: Results, width: float = 0.1) -> list[tuple[float, float, float, float]]:
    """(window start s, p50 ms, p99 ms, requests/s) per `width` seconds of send time."""
    buckets: dict[int, list[float]] = {}
    for t, lat in zip(res.t_send, res.latency, strict=True):
        buckets.setdefault(int(t / width), []).append(lat)
    out = []
    # whole windows only: a last partial one would look like a drop in traffic
    for i in range(max(1, int(res.duration / width + 1e-9))):
        lats = sorted(buckets.get(i, []))
        if not lats:
            out.append((i * width, math.nan, math.nan, 0.0))
            continue
        out.append((i * width, percentile(lats, 0.5) * 1e3, percentile(lats, 0.99) * 1e3,
                    len(lats) / width))
    return out
