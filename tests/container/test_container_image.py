"""The image itself: user, no compiler, version, health check, PID 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctr import Podman, wait_for

# the first test also builds the images (minutes when nothing is cached)
pytestmark = pytest.mark.timeout(1200)


def test_image_is_non_root_without_compiler_and_answers_version(podman: Podman,
                                                                  images: dict[str, str]) -> None:
    img = images["v1"]
    out = podman.run(img, "octo-proxy", "version").stdout
    assert out.startswith("octo-proxy ") and "core: compiled" in out, out
    assert podman.run(img, "id", "-u").stdout.strip() == "10001"
    # nothing to compile with at run time, and no build tool in the runtime venv
    probe = ("import shutil, importlib.util as u; "
             "print([c for c in ('gcc', 'cc', 'g++', 'clang', 'ld', 'make') if shutil.which(c)], "
             "[m for m in ('Cython', 'setuptools', 'pip') if u.find_spec(m)])")
    assert podman.run(img, "python", "-c", probe).stdout.strip() == "[] []"
    cfg = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", img))
    assert cfg["User"] == "octo"
    assert cfg["Entrypoint"][0] == "octo-proxy-init"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", img))
    print(f"image {img}: {size / 1e6:.1f} MB")
    hc = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", img))
    assert hc and "ready" in hc["Test"], hc


def test_healthcheck_follows_admin_ready(podman: Podman, images: dict[str, str],
                                         shared_dir: Path) -> None:
    c = podman.start("hc", images["v1"], opts=("--network", "none",
                                               "-v", f"{shared_dir / 'run'}:/run/octo-proxy"))
    wait_for(lambda: (shared_dir / "run" / "octo-proxy.sock").exists(), 30, "the proxy to listen")
    assert podman.healthcheck(c) == (0, "")
    # /ready fails -> the engine's health check fails; and back
    post = "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:9901/healthcheck/{}', method='POST'))"
    podman("exec", c, "python", "-c", post.format("fail"))
    assert podman.healthcheck(c) == (1, "unhealthy")
    assert podman.state(c)["Health"]["Log"][-1]["ExitCode"] == 1
    podman("exec", c, "python", "-c", post.format("ok"))
    assert podman.healthcheck(c) == (0, "")
    assert podman.state(c)["Health"]["Status"] == "healthy"


def test_init_is_pid1_reaps_orphans_and_forwards_sigterm(podman: Podman, images: dict[str, str],
                                                         shared_dir: Path) -> None:
    c = podman.start("pid1", images["v1"], opts=("--network", "none",
                                                 "-v", f"{shared_dir / 'run'}:/run/octo-proxy"))
    wait_for(lambda: (shared_dir / "run" / "octo-proxy.sock").exists(), 30, "the proxy to listen")
    cmd1 = podman("exec", c, "cat", "/proc/1/cmdline").replace("\0", " ")
    assert "octo-proxy-init" in cmd1, cmd1
    # orphans: a process whose parent exits is re-parented to PID 1, which must reap it
    podman("exec", c, "sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.2 &); done")
    zombies = ("import os; print(sum(1 for d in os.listdir('/proc') if d.isdigit() and "
               "open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z'))")

    def no_zombie() -> bool:
        return podman("exec", c, "python", "-c", zombies) == "0"

    wait_for(no_zombie, 10, "PID 1 to reap the orphans")
    # SIGTERM from the engine reaches the proxy: it stops, and so does PID 1, with code 0
    podman("stop", "-t", "20", c, timeout=60)
    st = podman.state(c)
    assert st["ExitCode"] == 0, (st, podman.logs(c))
    logs = podman.logs(c)
    assert "stopping" in logs, logs
    assert not (shared_dir / "run" / "octo-proxy.sock").exists()  # removed on a clean stop
