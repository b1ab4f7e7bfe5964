"""Hot restart with tokens and ACLs from the control plane (docs/auth.md):
tokens are never handed over, so a new generation fetches them before it
takes over; one that cannot (the control plane is down) fails, and the
running generation keeps serving, verifying with the tokens it holds."""

from __future__ import annotations

import os
import signal
from typing import Any

import yaml

from octoproxy.process import pid_alive
from octoproxy.process import read_pid_file as read_pid

from harness import cluster, wait_for, write_token_file, xds_auth_server
from outsider import Wire, mac, now_s

PROVIDER = "com.demo.echo"
TOKEN = "xds-restart-tok-legacy-71"


def call(port: int) -> dict[str, Any]:
    w = Wire(port)
    try:
        ts = now_s()
        return w.signed(b"echo:r", "com.demo.legacy", ts=ts,
                        sig=mac("com.demo.legacy", ts, token=TOKEN))
    finally:
        w.close()


def test_new_generation_fetches_tokens_or_does_not_take_over() -> None:
    with cluster() as c:
        tok = write_token_file(c, {"com.demo.legacy": TOKEN}, "tokens.yaml")
        with open(c.path("eps.yaml"), "w") as f:
            yaml.safe_dump({"services": [], "acls": {PROVIDER: [{"caller": "com.demo.legacy"}]}}, f)
        cp = c.control_plane(c.path("eps.yaml"), "--tokens", tok)
        server, port, pidf = xds_auth_server(c, cp.target, PROVIDER)
        wait_for(lambda: call(port)["status"] == 0, 20, "the token and ACL from the control plane")
        # 1. with the control plane up: the new generation fetches them and takes over
        old = read_pid(pidf)
        assert old is not None
        os.kill(old, signal.SIGUSR2)
        new = wait_for(lambda: (p := read_pid(pidf)) != old and p, 40, "generation 2")
        wait_for(lambda: not pid_alive(old), 40, "generation 1 to exit")
        assert call(port)["status"] == 0
        # 2. with the control plane down: the new generation cannot get them and fails
        cp.stop()
        os.kill(new, signal.SIGUSR2)
        wait_for(lambda: "auth: not received from the control plane" in server.log(), 40,
                 "the new generation to give up")
        wait_for(lambda: server.log().count("still serving") >= 1, 40,
                 "the running generation to notice")
        assert read_pid(pidf) == new and pid_alive(new)
        assert call(port)["status"] == 0  # verified with the tokens it holds
        assert TOKEN not in server.log() and TOKEN not in cp.log()
