"""The benchmarks stay runnable: a short run of each, figures not asserted."""

from __future__ import annotations

import subprocess
import sys

from harness import ROOT, env


def test_e2e_bench_smoke_runs_clean() -> None:
    # exits non-zero on errors, lost requests, closed connections or a dead process
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e/bench_proxy.py"), "--smoke"],
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # octo-proxy ran in every scenario (HAProxy / nginx only where installed)
    for scen in ("1x1 one-core", "32x8 split", "32x8 one-core", "256x1 split", "256x1 one-core"):
        assert f"{scen:<15} octo " in r.stdout, r.stdout[-3000:]
    assert "| 32x8, A+B CPU us per request" in r.stdout, r.stdout[-3000:]


def test_restart_bench_smoke_runs_clean() -> None:
    # exits non-zero on any error during the hot restarts
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e/bench_restart.py"), "--smoke"],
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ratio" in r.stdout


def test_micro_benchmarks_run() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--benchmark-min-rounds=1", "--benchmark-max-time=0.000001",
                        "--benchmark-warmup=off", str(ROOT / "bench/micro")],
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_xds_bench_smoke_runs_clean() -> None:
    # a real proxy subscribed in concurrent batches; exits non-zero if a call is
    # not answered 200 or a service is left without endpoints
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e/bench_xds.py"), "--proxy",
                        "--services", "60", "--nodes", "5", "--batches", "6", "--rounds", "2"],
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 services left without endpoints" in r.stdout, r.stdout
    assert "one endpoint changed" in r.stdout, r.stdout


def test_adaptive_bench_smoke_runs() -> None:
    # the provider slows down 10x: no limit, the adaptive limiter, fixed limits
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e/bench_adaptive.py"), "--smoke"],
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for system in ("off", "adaptive", "fixed 40", "fixed 3"):
        assert f"  {system:<10} ok " in r.stdout, r.stdout
