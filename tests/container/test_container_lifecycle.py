"""Stopping as an orchestrator does: the preStop hook (octo-proxy-init
prestop) drains the serving proxy and leaves a standby alone; SIGTERM from
the engine drains within the grace period, every request read is answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from octoproxy.sdk import AsyncClient

from ctr import RUN, Pair, Podman, proxy_cfg, uds_up, wait_for, write_config

# the first test also builds the images (minutes when nothing is cached)
pytestmark = pytest.mark.timeout(1200)

SLOW_MS = 1500
N = 60


async def slow_calls(uds: str, started: asyncio.Event) -> list:
    """N requests that the provider answers after SLOW_MS, on 4 connections."""
    clients = [await AsyncClient.connect(uds) for _ in range(4)]
    calls = [asyncio.ensure_future(clients[i % 4].call(
        "com.demo.Echo", b"sleep:%d:slow%d" % (SLOW_MS, i), appkey="com.demo.echo",
        timeout_ms=20000, raise_on_error=False)) for i in range(N)]
    await asyncio.sleep(0.3)  # the requests are on their way to the provider
    started.set()
    out = await asyncio.gather(*calls, return_exceptions=True)
    for c in clients:
        await c.close()
    return out


def test_prestop_drains_the_serving_proxy_and_sigterm_waits_for_answers(
        podman: Podman, images: dict[str, str], shared_dir: Path) -> None:
    d = shared_dir
    write_config(d, "proxy.yaml", proxy_cfg())
    pair = Pair(podman, images, d)
    pair.other("provider", "python", "/tests/e2e/provider_app.py", f"p={RUN}/provider.sock")
    wait_for(lambda: uds_up(d / "run" / "provider.sock"), 60, "the provider")
    a = pair.slot("a", "v1")
    pair.wait_serving(a)
    b = pair.slot("b", "v1")
    wait_for(lambda: "standby" in podman.logs(b), 30, "slot b to go on standby")

    # the standby's preStop does nothing (the admin port is not its own)
    out = podman("exec", b, "octo-proxy-init", "prestop")
    assert "does not serve" in out, out
    assert podman.running(a) and uds_up(d / "run" / "octo-proxy.sock")

    async def scenario() -> tuple[list, str, float]:
        started = asyncio.Event()
        calls = asyncio.ensure_future(slow_calls(str(d / "run" / "octo-proxy.sock"), started))
        await started.wait()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        # preStop on the serving one: /drain, then wait for nothing in flight
        pre = await loop.run_in_executor(None, lambda: podman("exec", a, "octo-proxy-init",
                                                              "prestop", timeout=60))
        took = time.monotonic() - t0
        return await calls, pre, took

    answers, pre, took = asyncio.run(scenario())
    assert "drained" in pre, pre
    assert took >= SLOW_MS / 1000 - 0.5, took  # it waited for the slow answers
    assert all(not isinstance(r, BaseException) and r.ok for r in answers), answers[:5]
    assert sorted(r.body for r in answers) == sorted(b"p|slow%d" % i for i in range(N))
    assert not uds_up(d / "run" / "octo-proxy.sock")  # drained: no new connection
    rc, why = podman.healthcheck(a)
    assert rc == 1, why  # /ready fails while draining
    podman("stop", "-t", "30", a, timeout=90)
    assert podman.state(a)["ExitCode"] == 0, podman.logs(a)
    podman("stop", "-t", "30", b, timeout=90)
    assert podman.state(b)["ExitCode"] == 0, podman.logs(b)


def test_sigterm_from_the_engine_answers_every_request_read(
        podman: Podman, images: dict[str, str], shared_dir: Path) -> None:
    d = shared_dir
    write_config(d, "proxy.yaml", proxy_cfg())
    pair = Pair(podman, images, d)
    pair.other("provider", "python", "/tests/e2e/provider_app.py", f"p={RUN}/provider.sock")
    wait_for(lambda: uds_up(d / "run" / "provider.sock"), 60, "the provider")
    a = pair.slot("a", "v1")
    pair.wait_serving(a)
    grace = 20

    async def scenario() -> tuple[list, float]:
        started = asyncio.Event()
        calls = asyncio.ensure_future(slow_calls(str(d / "run" / "octo-proxy.sock"), started))
        await started.wait()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        # `podman stop`: SIGTERM (the image's STOPSIGNAL) to PID 1, SIGKILL after the grace period
        await loop.run_in_executor(None, lambda: podman("stop", "-t", str(grace), a, timeout=90))
        return await calls, time.monotonic() - t0

    answers, took = asyncio.run(scenario())
    st = podman.state(a)
    print(f"SIGTERM: {N} slow requests in flight, all answered; container stopped in {took:.1f} s "
          f"(grace {grace} s), exit code {st['ExitCode']}")
    assert st["ExitCode"] == 0, (st, podman.logs(a))  # not 137: no SIGKILL was needed
    assert SLOW_MS / 1000 - 0.5 <= took < grace, took
    assert all(not isinstance(r, BaseException) and r.ok for r in answers), answers[:5]
    assert sorted(r.body for r in answers) == sorted(b"p|slow%d" % i for i in range(N))
    logs = podman.logs(a)
    assert "stopping" in logs and "still in flight" not in logs, logs
