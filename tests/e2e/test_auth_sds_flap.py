"""A control plane flapping one secret 10,000 times over a real ADS stream
(the xDS double, real grpc.aio) to the real XdsClient and Keyring: the
token in force follows, and the log stays readable: at most one line per
secret per interval (xds.authsource.ChangeLog) plus one summary line per
interval counting the changes not logged one by one; another secret's
change is still logged at once; no token in any line."""

from __future__ import annotations

import logging
import re
import time

from octoproxy import model
from octoproxy._core.route import RouteTable
from octoproxy.config import parse_config
from octoproxy.keyring import Keyring
from octoproxy.xds.authres import RBAC_TYPE, SECRET_TYPE, acl_to_rbac, tokens_to_secret
from octoproxy.xds.authsource import attach
from octoproxy.xds.client import XdsClient

from xds_double import AdsDouble
from xds_helpers import run, until

PROVIDER, WEB, BATCH = "com.flap.echo", "com.flap.web", "com.flap.batch"
CHANGES = 10_000


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_secret_flapping_10000_times_logs_a_line_per_interval() -> None:
    got = Lines()
    xlog = logging.getLogger("octoproxy.xds")
    xlog.addHandler(got)
    old_level = xlog.level
    xlog.setLevel(logging.INFO)
    out: dict[str, float] = {}

    async def main() -> None:
        d = AdsDouble()
        await d.start()
        cfg = parse_config({
            "xds": {"server": d.target}, "auth": {"source": "xds"},
            "listeners": {
                "outbound": [{"path": "/tmp/unused.sock", "sign_for": [WEB]}],
                "inbound": [{"port": 1, "upstream_uds": "/tmp/unused-p.sock",
                             "appkey": PROVIDER, "auth": {"mode": "enforce"}}]}})
        ring = Keyring(cfg, None)
        c = XdsClient(d.target, RouteTable(model.Labels()), node_id="flap", backoff_base_s=0.05)
        secrets, _ = attach(c, ring)
        secrets.changelog.interval_s = 2.0  # the default is 10 s: a short test sees several
        c.start()
        try:
            d.put_other(RBAC_TYPE, acl_to_rbac(PROVIDER, {BATCH: None}))
            d.put_other(SECRET_TYPE, tokens_to_secret(WEB, (b"flap-tok-start",)),
                        tokens_to_secret(BATCH, (b"flap-batch-1",)))
            await until(lambda: not ring.missing(), 20, "the tokens and the ACL")
            t0 = time.monotonic()
            for i in range(CHANGES):
                d.put_other(SECRET_TYPE, tokens_to_secret(WEB, (b"flap-tok-%05d" % i,)))
                if i == CHANGES // 2:
                    # a real rotation of another appkey in the middle of the flap
                    # (its own line at the start is over an interval old)
                    await until(lambda: secrets.changelog.quiet(BATCH), 20, "an interval")
                    version = ring.dump()["tokens"][BATCH]["version"]
                    before = len(got.lines)
                    d.put_other(SECRET_TYPE, tokens_to_secret(BATCH, (b"flap-batch-2",)))
                    await until(lambda v=version: ring.dump()["tokens"][BATCH]["version"] != v,
                                20, "the other secret's change")
                    assert any(BATCH in line for line in got.lines[before:]), got.lines[before:]
                if i % 100 == 99:
                    await until(lambda n=i + 1: secrets.changelog.suppressed + _fresh(got) > n,
                                30, f"change {i + 1}")
            out["flap_s"] = time.monotonic() - t0
            # the summary of the last interval is written by a timer
            await until(lambda: _accounted(got) == CHANGES, 10, "the last summary")
        finally:
            await c.stop()
            await d.stop()

    try:
        run(main(), 300)
    finally:
        xlog.removeHandler(got)
        xlog.setLevel(old_level)
    lines = [line for line in got.lines if WEB in line]
    print(len(lines), "lines for", CHANGES, "changes in", round(out["flap_s"], 1), "s")
    # before: one line per change (10,000); now about two per interval
    assert len(lines) <= 2 * (out["flap_s"] / 2.0 + 2), lines
    assert all("flap-tok" not in line and "flap-batch" not in line for line in got.lines)


def _fresh(lines: Lines) -> int:
    """Changes of WEB logged one by one."""
    return sum(1 for line in lines.lines if line.startswith("xDS: tokens updated for")
               and WEB in line)


def _accounted(lines: Lines) -> int:
    """Changes of WEB logged one by one plus those the summaries count
    (the first token, before the flap, included: minus one)."""
    held = 0
    for line in lines.lines:
        m = re.search(re.escape(WEB) + r" \((\d+)x\)", line)
        if m and "not logged one by one" in line:
            held += int(m.group(1))
    return _fresh(lines) - 1 + held
