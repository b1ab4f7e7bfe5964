#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv that has no Cython and no
# compiler on PATH, and check that it runs: version, every example config,
# and one request end to end through two proxies (provider <- server proxy
# <- client proxy <- app), all from the installed wheel only.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS
trap 'echo "wheel check: FAILED (line $LINENO, after $((SECONDS - start)) s)" >&2' ERR
PY=${PYTHON:-python3}
unset PYTHONPATH  # nothing from the source tree
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$work/wheels" .
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/wheels/octo_proxy-*.whl
# no compiler and no Cython reachable from the fresh venv
mkdir -p "$work/nocc"
for cc in gcc cc g++ clang; do printf '#!/bin/sh\necho "no compiler here" >&2; exit 1\n' > "$work/nocc/$cc"; chmod +x "$work/nocc/$cc"; done
export PATH="$work/nocc:$work/venv/bin:$PATH"
export CC=false
cd "$work"
if python -c "import Cython" 2>/dev/null; then echo "Cython leaked into the venv" >&2; exit 1; fi
octo-proxy version
python -c "import octoproxy._core.frame, octoproxy._core.route; print('core imported from', octoproxy._core.frame.__file__)"
for f in "$repo"/examples/*.yaml; do
  case "$f" in *endpoints*.yaml) continue;; esac
  octo-proxy validate --no-paths -c "$f"  # examples are for other hosts (a container's /run)
done

# one request through two proxies started from the installed `octo-proxy`
cat > "$work/e2e.py" <<'PYEOF'
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import octoproxy
from octoproxy.sdk import AsyncClient, serve

venv = sys.prefix
assert octoproxy.__file__.startswith(venv), f"octoproxy imported from {octoproxy.__file__}"
exe = shutil.which("octo-proxy")
assert exe and exe.startswith(venv), f"octo-proxy command from {exe}"

d = tempfile.mkdtemp(prefix="owc", dir="/tmp")  # short: UDS paths are limited
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
configs = {
    "server": f"""
node: {{id: wheel-server}}
listeners:
  inbound: [{{host: 127.0.0.1, port: {port}, upstream_uds: {d}/provider.sock}}]
hot_restart: {{socket: {d}/server.hr}}
""",
    "client": f"""
node: {{id: wheel-client}}
listeners:
  outbound: [{{path: {d}/proxy.sock}}]
static:
  services:
    - appkey: com.wheel.echo
      service_names: [com.wheel.Echo]
      endpoints: [{{address: "127.0.0.1:{port}"}}]
hot_restart: {{socket: {d}/client.hr}}
""",
}
procs = {}


def up(check) -> bool:
    try:
        check()
        return True
    except OSError:
        return False


def wait(what, check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not up(check):
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} proxy exited with code {p.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def uds_connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)


async def handler(req):
    return b"wheel:" + req.body


async def main() -> None:
    provider = await serve(f"{d}/provider.sock", handler)
    loop = asyncio.get_running_loop()
    for name, text in configs.items():
        path = f"{d}/{name}.yaml"
        with open(path, "w") as f:
            f.write(text)
        log = open(f"{d}/{name}.log", "wb")
        procs[name] = subprocess.Popen([exe, "run", "-c", path], stdout=log,
                                       stderr=subprocess.STDOUT)
    await loop.run_in_executor(None, wait, "the server proxy",
                               lambda: socket.create_connection(("127.0.0.1", port), 1).close())
    await loop.run_in_executor(None, wait, "the client proxy",
                               lambda: uds_connect(f"{d}/proxy.sock"))
    c = await AsyncClient.connect(f"{d}/proxy.sock")
    r = await c.call("com.wheel.Echo", b"hello", timeout_ms=5000)
    assert r.ok and r.body == b"wheel:hello", r
    await c.close()
    provider.close()
    print(f"end to end through two proxies: {r.body.decode()}")


ok = False
try:
    asyncio.run(asyncio.wait_for(main(), 60))
    ok = True
finally:
    for name, p in procs.items():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                ok = False
                print(f"{name} proxy did not stop on SIGTERM", file=sys.stderr)
        if not ok:
            with open(f"{d}/{name}.log", errors="replace") as f:
                print(f"--- {name} proxy log:\n{f.read()}", file=sys.stderr)
    shutil.rmtree(d, ignore_errors=True)
sys.exit(0 if ok else 1)
PYEOF
python "$work/e2e.py"
echo "wheel check: ok ($((SECONDS - start)) s)"
