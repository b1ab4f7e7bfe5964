"""deploy/kubernetes: valid against the Kubernetes schemas (strict: no
unknown field), the embedded proxy config valid for octo-proxy, and the
pod laid out as docs/operating.md says (two proxy slots, one uid, shared
emptyDir, readiness on /ready, a preStop that drains)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from octoproxy.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_misspelt_field_is_caught() -> None:
    pod = next(d for d in docs(MANIFESTS[0]) if d["kind"] == "Pod")
    pod["spec"]["containers"][1]["readinessProb"] = pod["spec"]["containers"][1].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_sidecar_pod_layout_and_embedded_config(tmp_path: Path) -> None:
    items = docs(DEPLOY / "octo-proxy-sidecar.yaml")
    cm = next(d for d in items if d["kind"] == "ConfigMap")
    pod = next(d for d in items if d["kind"] == "Pod")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cm["data"]["config.yaml"])
    cfg = load_config(str(cfg_file))
    run = "/run/octo-proxy"
    assert cfg.hot_restart.socket == f"{run}/hot-restart/restart.sock"
    assert cfg.listeners.outbound[0].path.startswith(run + "/")
    assert cfg.hot_restart.pid_file is None  # pids mean nothing across two containers
    spec = pod["spec"]
    assert spec["securityContext"]["runAsUser"] == 10001
    assert any(v["name"] == "octo-run" and "emptyDir" in v for v in spec["volumes"])
    proxies = [c for c in spec["containers"] if c["name"].startswith("octo-proxy-")]
    assert [c["command"][:3] for c in proxies] == [["octo-proxy-init", "--slot", "a"],
                                                   ["octo-proxy-init", "--slot", "b"]]
    for c in proxies:
        assert c["readinessProbe"]["exec"]["command"] == ["octo-proxy-init", "ready"]
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["octo-proxy-init", "prestop"]
        assert {"name": "octo-run", "mountPath": run} in c["volumeMounts"]
        assert "runAsUser" not in c.get("securityContext", {})  # the pod's: the same for both
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert {"name": "octo-run", "mountPath": run} in app["volumeMounts"]
    # the grace period covers the preStop drain and the stop after it
    assert spec["terminationGracePeriodSeconds"] > cfg.hot_restart.shutdown_s
