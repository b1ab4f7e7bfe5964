"""The demo's service-authentication scene (docs/demo.md, docs/auth.md):
after the main run, a client-side proxy signs for two apps and a server-side
proxy verifies them in front of one of the demo's providers.

- `com.demo.web` and `com.demo.batch` each have a token (a token file with
  mode 0600, random tokens) and each their own outbound listener on the
  client-side proxy (`sign_for`), so neither can sign as the other.
- The server-side proxy's inbound listener for `com.demo.echo` enforces
  authentication and an ACL that lets `com.demo.web` call it.
- One request from each app: `com.demo.web` is answered by the provider;
  `com.demo.batch`, correctly signed but not in the ACL, gets status 7
  (SecurityException) with its reason from the server-side proxy and never
  reaches the provider.

Its processes are the demo's (Demo.procs), stopped by the demo's cleanup.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from octoproxy.demo import Demo

PROVIDER = "com.demo.echo"
NODE = "echo-gh-1"  # the main run's provider node that answers (with its name)
APPS = (("com.demo.web", True), ("com.demo.batch", False))  # (caller appkey, in the ACL)


def _call(path: str, caller: str) -> Any:
    """One OCTO request from app `caller` (traceInfo.clientAppkey) through the
    client-side proxy's listener at `path`: the answer frame."""
    from octoproxy._core import frame

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(frame.encode_request(1, "com.demo.EchoService", b"demo", timeout=3000,
                                       local_context={"octo-remote-appkey": PROVIDER},
                                       trace_info={"clientAppkey": caller}))
        sc = frame.FrameScanner()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            got = sc.feed(data)
            if got:
                return got[0]
    raise ConnectionError(f"no answer for {caller}")


def auth_scene(demo: Demo) -> str:
    """Run the scene; the report's lines.  An outcome other than the expected
    one is a failure of the demo (demo.res.failures)."""
    from octoproxy.demo import _free_port
    from octoproxy.ports import can_connect_tcp, can_connect_uds

    t0 = time.monotonic()
    tok = demo.path("auth-tokens.yaml")
    fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        for app, _ in APPS:
            f.write(f"{app}: {secrets.token_hex(16)}\n")
    port = _free_port()
    server = demo._start_proxy("auth-server", {
        "node": {"id": "demo-auth-server"},
        "auth": {"token_file": tok},
        "listeners": {"inbound": [{
            "host": "127.0.0.1", "port": port, "upstream_uds": demo.path(f"{NODE}.sock"),
            "appkey": PROVIDER,
            "auth": {"mode": "enforce", "allow": [{"caller": a} for a, ok in APPS if ok]}}]},
    })
    client = demo._start_proxy("auth-client", {
        "node": {"id": "demo-auth-client"},
        "auth": {"token_file": tok},
        "listeners": {"outbound": [{"path": demo.path(f"auth-{a.split('.')[-1]}.sock"),
                                    "sign_for": [a]} for a, _ in APPS]},
        "static": {"services": [{"appkey": PROVIDER, "service_names": ["com.demo.EchoService"],
                                 "endpoints": [{"address": f"127.0.0.1:{port}"}]}]},
    })
    demo._wait(lambda: can_connect_tcp(port), [server], "the auth scene's server-side proxy")
    demo._wait(lambda: all(can_connect_uds(demo.path(f"auth-{a.split('.')[-1]}.sock"))
                           for a, _ in APPS), [client], "the auth scene's client-side proxy")
    lines = ["", "Service authentication (docs/auth.md): the client-side proxy signs for each "
             "app, the server-side proxy verifies and applies the ACL of "
             f"{PROVIDER} (allows {', '.join(a for a, ok in APPS if ok)})"]
    rows = []
    for app, allowed in APPS:
        t = time.monotonic() - t0
        try:
            fr = _call(demo.path(f"auth-{app.split('.')[-1]}.sock"), app)
        except OSError as e:
            demo.res.failures.append((t, f"auth scene: {app}: {type(e).__name__}: {e}"))
            rows.append((app, "no answer", str(e)))
            continue
        if allowed:
            ok = fr.status == 0 and fr.body == NODE.encode()
            rows.append((app, "authorized", f"answered by {fr.body.decode(errors='replace')}"))
        else:
            ok = fr.status == 7 and "not allowed" in (fr.message or "")
            rows.append((app, f"refused, status {fr.status}", fr.message or ""))
        if not ok:
            demo.res.failures.append((t, f"auth scene: {app}: unexpected status {fr.status}: "
                                         f"{fr.message or fr.body!r}"))
    w = max(len(a) for a, _, _ in rows)
    for app, what, detail in rows:
        lines.append(f"  {app:<{w}}  {what}: {detail}")
    lines.append(f"  (scene set up and run in {time.monotonic() - t0:.1f} s)")
    return "\n".join(lines) + "\n"
