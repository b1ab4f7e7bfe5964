"""Hot restart at container granularity: two proxy containers in one pod
(the serving one and a standby) share the runtime directory (UDS +
hot-restart socket) and the network namespace.  Giving the standby slot a
newer image makes it take over the listeners (`run --hot-restart-from`,
through `octo-proxy-init --slot`); the serving container's proxy drains and
the container exits by itself.  Then the roles swap.  A new container that
fails to start leaves the serving one serving.

The pod has a network namespace of its own with nothing but loopback: the
inbound TCP port (legacy clients) lives there; the UDS are in a host
directory mounted into every container as /run/octo-proxy."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from octoproxy.sdk import Client

from ctr import RUN, Pair, Podman, proxy_cfg, read_json, uds_up, wait_for, write_config

# the first test also builds the images (minutes when nothing is cached)
pytestmark = pytest.mark.timeout(1200)


def test_standby_container_takes_over_then_roles_swap(podman: Podman, images: dict[str, str],
                                                      shared_dir: Path) -> None:
    d = shared_dir
    write_config(d, "proxy.yaml", proxy_cfg())
    # valid, but one listener cannot be opened: fails after receiving the sockets
    bad = proxy_cfg()
    bad["listeners"]["outbound"].append({"path": "/nonexistent/dir/x.sock"})
    write_config(d, "bad.yaml", bad)
    pair = Pair(podman, images, d)
    pair.other("provider", "python", "/tests/e2e/provider_app.py", f"p={RUN}/provider.sock")
    wait_for(lambda: uds_up(d / "run" / "provider.sock"), 60, "the provider")
    a = pair.slot("a", "v1")
    pair.wait_serving(a)
    b = pair.slot("b", "v1")
    wait_for(lambda: "standby" in podman.logs(b), 30, "slot b to go on standby")
    load = pair.other("load", "python", "/tests/container/load.py", "--out", "/out",
                      "--uds", f"{RUN}/octo-proxy.sock", "--clients", "3", "--inflight", "8",
                      "--appkey", "com.demo.echo", "--legacy-tcp", "127.0.0.1:9001",
                      "--legacy", "2", "--pipeline", "16", "--tag", "ho")
    progress = d / "out" / "progress.json"

    def ok_count() -> int:
        p = read_json(progress)
        return (p["ok"] + p["legacy_ok"]) if p else 0

    def traffic_goes_on(what: str) -> None:
        n = ok_count()
        wait_for(lambda: ok_count() > n + 300, 60, f"traffic {what}")

    def upgrade(old: str, standby: str, slot: str, tag: str) -> tuple[str, float]:
        """Replace the standby container by one with a newer image; wait until
        the serving container has exited by itself."""
        podman("rm", "-f", "-t", "10", standby)
        t0 = time.monotonic()
        new = pair.slot(slot, tag)
        podman("wait", old, timeout=120)
        took = time.monotonic() - t0
        st = podman.state(old)
        assert st["ExitCode"] == 0, (st, podman.logs(old))
        assert "taking over" in podman.logs(new), podman.logs(new)
        assert podman.running(new), podman.logs(new)
        return new, took

    figures = []
    try:
        traffic_goes_on("through slot a")
        # 1. slot b gets v2: takes over from a (v1); a drains and exits
        b2, took = upgrade(a, b, "b", "v2")
        figures.append(("a(v1) -> b(v2)", took))
        traffic_goes_on("through slot b")
        # the orchestrator restarts a's container (same image): it is the standby now
        podman("start", a)
        wait_for(lambda: podman.logs(a).count("standby") >= 1, 30, "slot a to go on standby")
        assert podman.running(a) and podman.running(b2)
        # 2. roles swap: slot a gets v3 and takes over from b (v2)
        a3, took = upgrade(b2, a, "a", "v3")
        figures.append(("b(v2) -> a(v3)", took))
        traffic_goes_on("through slot a again")
        # 3. a new container that cannot start: the serving one keeps serving
        podman("start", b2)
        wait_for(lambda: "standby" in podman.logs(b2).split("taking over")[-1], 30,
                 "slot b to go on standby")
        podman("rm", "-f", "-t", "10", b2)
        broken = pair.slot("b", "v1", "/cfg/bad.yaml")
        podman("wait", broken, timeout=120)
        assert podman.state(broken)["ExitCode"] != 0
        assert "cannot start" in podman.logs(broken), podman.logs(broken)
        assert podman.running(a3), podman.logs(a3)
        assert "still serving" in podman.logs(a3), podman.logs(a3)
        traffic_goes_on("after the failed start")
        (d / "out" / "stop").touch()
        podman("wait", load, timeout=90)
        res = read_json(d / "out" / "result.json")
        assert res, podman.logs(load)
        with Client(str(d / "run" / "provider.sock")) as cl:
            seen, dup = (int(x) for x in cl.call("com.demo.Echo", b"dups").body.split(b"|")[1].split())
        total = res["sent"] + res["legacy_sent"]
        print(f"handover: {total} requests ({res['sent']} SDK, {res['legacy_sent']} legacy), "
              f"failed {res['failed'] + res['legacy_failed']}, executed {seen}, duplicated {dup}; "
              f"SDK retries {res['retries']}, legacy resent {res['legacy_resent']}; "
              + "; ".join(f"{w}: standby start to old container exit {t:.1f} s" for w, t in figures))
        assert res["failed"] == 0 and res["legacy_failed"] == 0, res
        assert res["ok"] == res["sent"] and res["legacy_ok"] == res["legacy_sent"], res
        assert dup == 0 and seen == total, (seen, dup, total)
    except BaseException:
        for c in podman.containers:
            print(f"--- {c}:\n{podman.logs(c)[-2500:]}")
        raise
