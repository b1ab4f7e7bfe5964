"""The container tests: the real image, run by a real engine (podman + runc).

The image is built once per test session by ci/container.sh (layers cached
by the engine between runs).  Without a usable podman the tests are skipped
with the reason, unless OCTO_REQUIRE_CONTAINERS=1 (CI sets it), which turns
that into a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("OCTO_IMAGE", "localhost/octo-proxy")
UID = 10001  # the image's user (Dockerfile: OCTO_UID)


def _flags() -> tuple[list[str], list[str]]:
    out = subprocess.run(["bash", str(REPO / "ci/container.sh"), "flags"], capture_output=True,
                         text=True, check=True).stdout
    engine, run, conf = out.strip().split("|")
    os.environ["CONTAINERS_CONF"] = conf  # the pods' infra containers read their limits there
    return engine.split(), run.split()


def _unusable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (ci/container.sh setup installs it, as root)"
    if os.geteuid() != 0:
        return "the container tests run rootful podman: run them as root"
    engine, _ = _flags()
    r = subprocess.run(["podman", *engine, "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"podman cannot run here: {r.stderr.strip()[:300]}"
    return None


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Podman:
    """Runs podman with the flags this machine needs; removes what it made."""

    def __init__(self) -> None:
        self.engine, self.run_flags = _flags()
        self.containers: list[str] = []
        self.pods: list[str] = []
        self.prefix = f"octo-t{uuid.uuid4().hex[:6]}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run(["podman", *self.engine, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout.strip()

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def pod(self, what: str, *args: str) -> str:
        name = self.name(what)
        self("pod", "create", "--name", name, *args)
        self.pods.append(name)
        return name

    def start(self, what: str, image: str, *args: str, opts: tuple[str, ...] = ()) -> str:
        """podman run -d: `opts` before the image, `args` after it."""
        name = self.name(what)
        self("run", "-d", "--name", name, *self.run_flags, *opts, image, *args)
        self.containers.append(name)
        return name

    def run(self, image: str, *args: str, opts: tuple[str, ...] = (), timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["podman", *self.engine, "run", "--rm", *self.run_flags, *opts, image,
                            *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman run {image} {' '.join(args)}: exit {r.returncode}: "
                               f"{r.stdout}{r.stderr}")
        return r

    def healthcheck(self, name: str) -> tuple[int, str]:
        """`podman healthcheck run`: (0, "") healthy, (1, "unhealthy").  With no
        systemd to schedule it, the engine runs the check only when asked."""
        r = subprocess.run(["podman", *self.engine, "healthcheck", "run", name],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, (r.stdout + r.stderr).strip()

    def state(self, name: str) -> dict[str, Any]:
        out = self("inspect", "--format", "{{json .State}}", name)
        return json.loads(out)

    def running(self, name: str) -> bool:
        return bool(self.state(name)["Running"])

    def logs(self, name: str) -> str:
        r = subprocess.run(["podman", *self.engine, "logs", name], capture_output=True, text=True)
        return r.stdout + r.stderr

    def cleanup(self) -> None:
        for c in reversed(self.containers):
            self("rm", "-f", "-t", "0", c, check=False)
        for p in reversed(self.pods):
            self("pod", "rm", "-f", "-t", "0", p, check=False)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Three tags of the image, built from the repository's Dockerfile: v1,
    and v2/v3 standing for newer releases (another OCTO_IMAGE_ID)."""
    why = _unusable()
    if why:
        if os.environ.get("OCTO_REQUIRE_CONTAINERS") == "1":
            pytest.fail(f"container tests required (OCTO_REQUIRE_CONTAINERS=1) but {why}")
        pytest.skip(why)
    tags = {}
    # tags of this checkout only: two checkouts testing at once on one
    # machine (one engine, one image store) must not run each other's image
    here = hashlib.sha1(str(REPO).encode()).hexdigest()[:8]
    for tag in (f"v1-{here}", f"v2-{here}", f"v3-{here}"):
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(REPO / "ci/container.sh"), "build", tag],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            pytest.fail(f"image build {tag} failed:\n{r.stdout}\n{r.stderr}")
        print(f"image {IMAGE}:{tag} ready in {time.monotonic() - t0:.1f} s", flush=True)
        tags[tag.split("-")[0]] = f"{IMAGE}:{tag}"
    return tags


@pytest.fixture
def podman(images: dict[str, str]) -> Iterator[Podman]:
    p = Podman()
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory to mount as a container's /run/octo-proxy (short:
    UDS paths are limited), owned by the image's user."""
    d = Path(tempfile.mkdtemp(prefix="oct", dir="/tmp"))
    for sub in ("run", "out", "cfg"):
        (d / sub).mkdir()
        os.chown(d / sub, UID, UID)
    # as a Kubernetes emptyDir: writable by everyone, so the hot-restart
    # socket must be in a private directory inside (octo-proxy-init makes it)
    os.chmod(d / "run", 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(d: Path, name: str, cfg: dict[str, Any]) -> str:
    """Write a config under d/cfg; returns its path inside the containers."""
    (d / "cfg" / name).write_text(yaml.safe_dump(cfg))
    return f"/cfg/{name}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


RUN = "/run/octo-proxy"


def proxy_cfg(**over: object) -> dict:
    cfg: dict = {
        "node": {"id": "pair"},
        "listeners": {
            "outbound": [{"path": f"{RUN}/octo-proxy.sock"}],
            "inbound": [{"host": "127.0.0.1", "port": 9001, "upstream_uds": f"{RUN}/provider.sock"}],
        },
        # the pod's own inbound port stands for the remote server side
        "static": {"services": [{"appkey": "com.demo.echo", "service_names": ["com.demo.Echo"],
                                 "endpoints": [{"address": "127.0.0.1:9001"}]}]},
        "admin": {"host": "127.0.0.1", "port": 9901},
        "hot_restart": {"socket": f"{RUN}/hot-restart/restart.sock", "drain_s": 3.0,
                        "shutdown_s": 10.0, "proxy_restart_spread_s": 0.2,
                        "start_timeout_s": 30.0},
    }
    cfg.update(over)
    return cfg


def uds_up(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


class Pair:
    def __init__(self, podman: Podman, images: dict[str, str], d: Path) -> None:
        self.podman, self.images, self.d = podman, images, d
        self.pod = podman.pod("pair", "--network", "none")
        self.vol = ("-v", f"{d / 'run'}:{RUN}", "-v", f"{d / 'cfg'}:/cfg:ro",
                    "-v", f"{REPO / 'tests'}:/tests:ro")
        self.n = 0

    def slot(self, slot: str, tag: str, config: str = "/cfg/proxy.yaml") -> str:
        self.n += 1
        return self.podman.start(
            f"{slot}{self.n}-{tag}", self.images[tag], "octo-proxy", "run", "-c", config,
            # read-only root, no tmpfs: as readOnlyRootFilesystem in deploy/kubernetes
            opts=("--pod", self.pod, *self.vol, "--read-only", "--read-only-tmpfs=false",
                  "--entrypoint", json.dumps(["octo-proxy-init", "--slot", slot, "--"])))

    def wait_serving(self, c: str) -> None:
        """Until the proxy in `c` has its signal handlers in place and serves
        (it logs that last): a listening UDS alone is not enough, a SIGTERM
        that arrives while the proxy still starts ends it (docs/operating.md)."""
        wait_for(lambda: "serving (pid" in self.podman.logs(c), 60, f"{c} to serve")

    def other(self, what: str, *args: str) -> str:
        return self.podman.start(what, self.images["v1"], *args,
                                 opts=("--pod", self.pod, *self.vol, "-v", f"{self.d / 'out'}:/out"))
