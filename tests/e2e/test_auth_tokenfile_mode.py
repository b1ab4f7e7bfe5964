"""The token file's mode is checked where an operator meets it (issue 15,
docs/auth.md, docs/xds.md section 3): `octo-proxy run` and `octo-proxy
validate` refuse a token file that group or others may read (or write) with
an error naming the file, its mode and the fix, and `octo-proxy
control-plane --tokens` refuses to start on one; none of them quotes a
token.  Real processes, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import ROOT, env

TOKEN = "mode-check-tok-9d8c7b6a"


def _tokens(tmp: Path, mode: int) -> str:
    p = tmp / "tokens.yaml"
    p.write_text(f"com.demo.web: {TOKEN}\n")
    os.chmod(p, mode)
    return str(p)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octoproxy", *args], env=env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o666])
def test_proxy_refuses_a_token_file_others_can_read(tmp_path: Path, mode: int) -> None:
    tok = _tokens(tmp_path, mode)
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({
        "auth": {"token_file": tok},
        "listeners": {"outbound": [{"path": str(tmp_path / "o.sock"),
                                    "sign_for": ["com.demo.web"]}]}}))
    for cmd in (["validate", "-c", str(cfg)], ["run", "-c", str(cfg)]):
        r = _cli(*cmd)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (cmd, r.returncode, out)
        assert tok in out and f"mode {mode:04o}" in out and "chmod 600" in out, out
        assert TOKEN not in out
    assert not (tmp_path / "o.sock").exists()  # run never listened
    os.chmod(tok, 0o600)
    r = _cli("validate", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr


def test_control_plane_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    tok = _tokens(tmp_path, 0o644)
    eps = tmp_path / "eps.yaml"
    eps.write_text("services: []\n")
    r = _cli("control-plane", "--endpoints", str(eps), "--tokens", tok, "--listen", "127.0.0.1:1")
    out = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, out)
    assert "0644" in out and TOKEN not in out, out
