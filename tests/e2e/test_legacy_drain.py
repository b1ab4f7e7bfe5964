"""Legacy OCTO clients pipelining on a server-side proxy's inbound port get
no restart notice: from the drain's start the old generation reads nothing
more from their connections and ends each (FIN) once every request read on
it is answered (docs/protocol.md 7.4).  The client sends again what was not
answered, on a new connection: nothing is executed twice.

Duplicates were seen here in about 1 full CI run in 5.  The path found: the
drain served these clients until nothing was in flight in the whole process
and, when drain_s passed first, ended them with answers still owed by the
provider, whose requests the clients then sent again (with drain_s shrunk to
0.02 s every run had them; tests/adversity/test_shutdown.py reproduces it
every time with a request slower than drain_s, and the in-process tests in
tests/unit/test_datapath_inproc.py pin the per-connection rule).  And the
test's client dropped answers it had already received when a send met a
reset (tests/container/load.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from octoproxy.process import read_pid_file as read_pid
from octoproxy.sdk import Client

from harness import cluster, env, free_port, server_proxy_cfg, wait_for

LOAD = Path(__file__).resolve().parents[1] / "container" / "load.py"


def progress(d: str) -> dict:
    try:
        with open(os.path.join(d, "progress.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"legacy_ok": 0}


def test_legacy_pipelined_clients_across_hot_restarts_and_stop() -> None:
    with cluster() as c:
        c.providers(p="p.sock")
        port = free_port()
        cfg = server_proxy_cfg({port: c.path("p.sock")})
        cfg["hot_restart"] = {"socket": c.path("s.hr"), "pid_file": c.path("s.pid"),
                              "drain_s": 2.0, "shutdown_s": 5.0, "proxy_restart_spread_s": 0}
        c.proxy("server", cfg)
        out = c.path("load")
        os.mkdir(out)
        load = subprocess.Popen([sys.executable, str(LOAD), "--out", out, "--legacy-tcp",
                                 f"127.0.0.1:{port}", "--legacy", "4", "--pipeline", "32",
                                 "--tag", "lg"], env=env())
        try:
            wait_for(lambda: progress(out)["legacy_ok"] > 2000, 30, "legacy load")
            for _ in range(3):
                old = read_pid(c.path("s.pid"))
                assert old
                os.kill(old, signal.SIGUSR2)
                wait_for(lambda o=old: read_pid(c.path("s.pid")) not in (None, o), 30,
                         "a new generation")
                n = progress(out)["legacy_ok"]
                wait_for(lambda n=n: progress(out)["legacy_ok"] > n + 2000, 30, "load after restart")
            (Path(out) / "stop").touch()
            assert load.wait(60) == 0
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        with open(os.path.join(out, "result.json")) as f:
            res = json.load(f)
        with Client(c.path("p.sock")) as cl:
            seen, dup = (int(x) for x in cl.call("m", b"dups").body.split(b"|")[1].split())
        assert res["legacy_failed"] == 0 and res["legacy_ok"] == res["legacy_sent"], res
        assert (seen, dup) == (res["legacy_sent"], 0), (seen, dup, res)
