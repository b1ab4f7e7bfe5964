"""Every shipped example config validates, and `octo-proxy validate` reports
every error of a bad config with its path inside the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from octoproxy.controlplane.store import CLUSTER_TYPE, ENDPOINT_TYPE, Store

from harness import ROOT, env

EXAMPLES = ROOT / "examples"
PROXY_CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("endpoints"))
ENDPOINT_FILES = sorted(EXAMPLES.glob("endpoints*.yaml"))


def validate(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octoproxy", "validate", "-c", str(path), *args],
                          env=env(), capture_output=True, text=True, timeout=60, cwd=str(ROOT))


def test_there_are_examples() -> None:
    assert len(PROXY_CONFIGS) >= 3 and ENDPOINT_FILES


@pytest.mark.parametrize("path", PROXY_CONFIGS, ids=lambda p: p.name)
def test_example_proxy_config_validates(path: Path) -> None:
    # examples are meant for other hosts (a container's /run/octo-proxy)
    r = validate(path, "--no-paths")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: ok"


@pytest.mark.parametrize("path", ENDPOINT_FILES, ids=lambda p: p.name)
def test_example_endpoints_file_loads_in_the_control_plane(path: Path) -> None:
    store = Store(path)
    store.load()  # raises FileError on any problem
    raw = yaml.safe_load(path.read_text())
    appkeys = {s["appkey"] for s in raw["services"]}
    res = store.snapshot.resources
    assert set(res[CLUSTER_TYPE]) == appkeys and set(res[ENDPOINT_TYPE]) == appkeys


@pytest.mark.parametrize("path", PROXY_CONFIGS, ids=lambda p: p.name)
def test_example_as_json_validates(path: Path, tmp_path: Path) -> None:
    j = tmp_path / (path.stem + ".json")
    j.write_text(json.dumps(yaml.safe_load(path.read_text())))
    r = validate(j, "--no-paths")
    assert r.returncode == 0, r.stderr


BAD = """\
node:
  id: bad
  colour: blue                 # unknown key
listeners:
  inbound:
    - port: 70000              # out of range
      upstream_uds: /tmp/p.sock
    - host: 127.0.0.1          # upstream_uds missing
      port: 9001
  outbound:
    - path: /tmp/x.sock
      mode: 0o7777             # above 0o777
limits:
  max_frame_bytes: 10          # below 64
upstream:
  default_timeout_ms: 5000
  max_timeout_ms: 1000         # lower than the default
hot_restart:
  drain_s: 20                  # not less than shutdown_s
logging:
  format: xml
surprise: true                 # unknown top-level key
"""


def test_bad_config_lists_every_error_with_its_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    r = validate(p)
    assert r.returncode != 0
    err = r.stderr
    lines = [ln.strip() for ln in err.splitlines()]
    assert lines[0].startswith(f"{p}: ") and "error(s)" in lines[0]
    expected = [
        "node.colour: Extra inputs are not permitted",
        "listeners.inbound[0].port:",
        "listeners.inbound[1].upstream_uds: Field required",
        "listeners.outbound[0].mode:",
        "limits.max_frame_bytes:",
        "upstream: Value error, default_timeout_ms cannot exceed max_timeout_ms",
        "hot_restart: Value error, drain_s must be less than shutdown_s",
        "logging.format:",
        "surprise: Extra inputs are not permitted",
    ]
    for want in expected:
        assert any(ln.startswith(want) for ln in lines[1:]), (want, err)
    n = int(lines[0].rsplit(":", 1)[1].split()[0])
    assert n == len(lines) - 1 >= len(expected)
    assert r.stdout == ""


def test_unknown_key_alone_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "typo.yaml"
    p.write_text("listeners:\n  outbound:\n    - path: /tmp/a.sock\n      mdoe: 0660\n")
    r = validate(p)
    assert r.returncode != 0
    assert "listeners.outbound[0].mdoe: Extra inputs are not permitted" in r.stderr


def test_bad_json_config_errors_with_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"listeners": {"inbound": [{"port": -1, "upstream_uds": "/x"}]}}))
    r = validate(p)
    assert r.returncode != 0 and "listeners.inbound[0].port:" in r.stderr
    p.write_text("{not json")
    r = validate(p)
    assert r.returncode != 0 and "not valid JSON" in r.stderr


def test_unreadable_and_non_mapping_configs(tmp_path: Path) -> None:
    r = validate(tmp_path / "missing.yaml")
    assert r.returncode != 0 and "cannot read" in r.stderr
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    r = validate(p)
    assert r.returncode != 0 and "(top level): must be a mapping" in r.stderr
