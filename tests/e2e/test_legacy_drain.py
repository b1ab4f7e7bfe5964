"""Legacy OCTO clients pipelining on a server-side proxy's inbound port get
no restart notice: the old generation answers what it read and closes their
connections once nothing is in flight, reading nothing more in between (a
request read then would be executed and its answer lost at exit).  The
client sends again what was not answered, on a new connection: nothing is
executed twice.  The same for a stop (SIGTERM)."""

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
