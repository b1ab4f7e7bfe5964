"""Hot restart while the control plane holds the new generation's secrets
(docs/auth.md, "Hot restart"): an xDS double that answers SDS requests of
new streams never (then late), and one that dies during the hand-over.  The
new generation must not serve without its tokens, must give up within
subscribe.timeout_s (no hang), and the running one must keep serving every
call on new and open connections, verifying with the tokens it holds."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid
from octoproxy.xds.authres import RBAC_TYPE, SECRET_TYPE, acl_to_rbac, tokens_to_secret

from harness import cluster, wait_for, xds_auth_server
from outsider import DoubleThread, Wire, mac, now_s

PROVIDER = "com.demo.echo"
CALLER = "com.demo.legacy"
TOKEN = "held-sds-tok-legacy-93"


class Calls(threading.Thread):
    """A new connection per call (a new generation that accepted without its
    tokens would answer those), plus one connection kept open."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.bad: list[tuple[float, str]] = []  # (when, message) of each refusal
        self.error: BaseException | None = None

    def _one(self, w: Any) -> int:
        ts = now_s()
        r = w.signed(b"echo:h", CALLER, ts=ts, sig=mac(CALLER, ts, token=TOKEN))
        if r["status"] != 0:
            self.bad.append((time.monotonic(), r["message"]))
        return int(r["status"])

    def run(self) -> None:
        try:
            kept = Wire(self.port)
            while not self.stop.is_set():
                w = Wire(self.port)
                try:
                    self.statuses.append(self._one(w))
                finally:
                    w.close()
                self.statuses.append(self._one(kept))
                time.sleep(0.005)
            kept.close()
        except BaseException as e:  # reported by the test
            self.error = e


def test_restart_while_secrets_are_held_and_while_the_control_plane_dies() -> None:
    dbl = DoubleThread()
    closed = False
    try:
        dbl.do(dbl.double.put_other, RBAC_TYPE, acl_to_rbac(PROVIDER, {CALLER: None}))
        dbl.do(dbl.double.put_other, SECRET_TYPE, tokens_to_secret(CALLER, (TOKEN.encode(),)))
        with cluster() as c:
            server, port, pidf = xds_auth_server(c, dbl.target, PROVIDER)
            calls = Calls(port)
            calls.start()
            wait_for(lambda: calls.statuses.count(0) > 20 or calls.error, 20, "calls")
            gen1 = read_pid(pidf)
            assert gen1 is not None
            # 1. the control plane holds every SDS answer from now on
            dbl.do(dbl.double.b.delay_s.__setitem__, SECRET_TYPE, 3600.0)
            t0 = time.monotonic()
            os.kill(gen1, signal.SIGUSR2)
            wait_for(lambda: "auth: not received from the control plane" in server.log(), 60,
                     "the new generation to give up")
            gave_up = time.monotonic() - t0
            wait_for(lambda: "still serving" in server.log(), 60, "generation 1 to go on")
            assert read_pid(pidf) == gen1 and pid_alive(gen1)
            n = len(calls.statuses)
            wait_for(lambda: len(calls.statuses) > n + 20 or calls.error, 20, "more calls")
            # 2. the control plane answers again, but dies during the hand-over:
            # SDS answers come 1.5 s late, the double is closed 0.5 s after SIGUSR2
            dbl.do(dbl.double.b.delay_s.__setitem__, SECRET_TYPE, 1.5)
            log0 = len(server.log())
            os.kill(gen1, signal.SIGUSR2)
            time.sleep(0.5)
            closed = True
            dbl.close()
            wait_for(lambda: "still serving" in server.log()[log0:], 60,
                     "generation 1 to go on without the control plane")
            assert read_pid(pidf) == gen1 and pid_alive(gen1)
            n = len(calls.statuses)
            wait_for(lambda: len(calls.statuses) > n + 20 or calls.error, 20, "more calls")
            calls.stop.set()
            calls.join(20)
            assert calls.error is None, calls.error
            log = server.log()
    finally:
        if not closed:
            dbl.close()
    print({"gave_up_s": round(gave_up, 2), "calls": len(calls.statuses)})
    # every call was answered by generation 1 with the tokens it holds
    assert set(calls.statuses) == {0}, (
        {s: calls.statuses.count(s) for s in set(calls.statuses)},
        [(round(t - t0, 3), m) for t, m in calls.bad[:3]])
    assert gave_up < 2 + 20, gave_up  # subscribe.timeout_s, and start_timeout_s at most
    assert TOKEN not in log
    # the startup gate's line names the missing dependency and what of it is missing
    assert ("so the running generation keeps serving: auth: not received from the "
            f"control plane: token of {CALLER}") in log
