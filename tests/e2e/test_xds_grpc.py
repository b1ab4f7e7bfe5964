"""A proxyless gRPC client (grpcio's built-in xDS client, ``xds:///<appkey>``)
calls a real grpcio server registered in the bundled control plane's
endpoints file: LDS -> RDS -> CDS -> EDS from the same file octo-proxy uses.

The gRPC client runs in its own process: grpcio's xDS client reads
GRPC_XDS_BOOTSTRAP once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

import octoproxy

pytestmark = pytest.mark.timeout(90)
SRC = str(Path(octoproxy.__file__).resolve().parents[1])

CLIENT = r"""
import sys, time, grpc
target, want, deadline = sys.argv[1], sys.argv[2].encode(), time.monotonic() + 30
with grpc.insecure_channel(target) as ch:
    say = ch.unary_unary("/test.Echo/Say")
    last = None
    while time.monotonic() < deadline:
        try:
            last = say(b"hi", timeout=5)
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}".encode()
        if last.startswith(want):
            print("OK", last.decode(), flush=True)
            sys.exit(0)
        time.sleep(0.05)
print("FAILED", last, flush=True)
sys.exit(1)
"""


def echo_server(name: str) -> tuple[grpc.Server, int]:
    def say(req: bytes, ctx: Any) -> bytes:
        return name.encode() + b":" + req

    srv = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, port


def write(path: Path, port: int, **ep: Any) -> None:
    tmp = path.with_suffix(".tmp")
    svc = {"appkey": "com.example.greeter", "lb_policy": "round_robin",
           "endpoints": [{"address": f"127.0.0.1:{port}", **ep}]}  # fmt: skip
    tmp.write_text(yaml.safe_dump({"services": [svc]}))
    os.replace(tmp, path)


def test_grpcio_xds_client_calls_a_server_from_the_endpoints_file(tmp_path: Path) -> None:
    a, port_a = echo_server("a")
    b, port_b = echo_server("b")
    f = tmp_path / "endpoints.yaml"
    write(f, port_a)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    cp = subprocess.Popen(
        [sys.executable, "-m", "octoproxy.controlplane", "--endpoints", str(f),
         "--listen", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert cp.stdout is not None
        line = cp.stdout.readline()
        assert "listening on" in line, line
        cp_port = int(line.rsplit(":", 1)[1])
        boot = tmp_path / "bootstrap.json"
        boot.write_text(json.dumps({
            "xds_servers": [{"server_uri": f"127.0.0.1:{cp_port}",
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-client", "locality": {"zone": "bj-a"}},
        }))  # fmt: skip
        cenv = dict(env, GRPC_XDS_BOOTSTRAP=str(boot))

        def call(want: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", CLIENT, "xds:///com.example.greeter", want],
                capture_output=True, text=True, env=cenv, timeout=60,
            )  # fmt: skip

        t0 = time.monotonic()
        r = call("a:hi")
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        assert time.monotonic() - t0 < 15  # not a 15 s does-not-exist timeout
        # the endpoint moves in the file: the gRPC client follows (EDS update)
        write(f, port_b)
        r = call("b:hi")
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        # a node with weight 0 is never picked (gRPC is told it is unhealthy,
        # since it rejects a zero weight): no server to call, not a NACK
        write(f, port_b, weight=0)
        r = call("UNAVAILABLE")
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        assert "must be greater than 0" not in r.stdout
    finally:
        cp.kill()
        cp.wait()
        if cp.stdout is not None:
            cp.stdout.close()
        a.stop(None)
        b.stop(None)
