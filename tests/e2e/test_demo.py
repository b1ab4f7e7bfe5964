"""`octo-proxy demo` end to end: it runs to completion with zero failures, draws
its chart, and leaves no process or temp dir behind, also when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import ROOT, env, wait_for


def demo_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "octoproxy", "demo", *extra]


def processes_mentioning(mark: str) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if mark in cmd:
                out.append((int(d), cmd))
    return out


def octoproxy_pids_alive(pids: set[int]) -> list[int]:
    """The ones among `pids` that are still an octoproxy process (pids get reused)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if b"octoproxy" in cmd and not zombie:
            alive.append(pid)
    return alive


def workdir_of(stderr: str) -> str:
    m = re.search(r"setting up in (\S+)", stderr)
    assert m, stderr
    return m.group(1)


def assert_nothing_left(stderr: str) -> None:
    work = workdir_of(stderr)
    assert work.startswith("/tmp/")
    assert not os.path.exists(work), f"{work} was not removed"
    assert processes_mentioning(work) == []
    pids = {int(p) for p in re.findall(r"pids? (\d+)", stderr)}
    pids |= {int(p) for pair in re.findall(r"(\d+) -> (\d+)", stderr) for p in pair}
    pids |= {int(p) for p in re.findall(r"pid (\d+) serving", stderr)}
    assert pids, stderr
    assert octoproxy_pids_alive(pids) == []


def test_demo_short_runs_clean_with_zero_failures(tmp_path: Path) -> None:
    chart = tmp_path / "c.svg"
    p = subprocess.run(demo_args("--short", "--no-progress", "--chart", str(chart)),
                       env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=50)
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, out + err
    assert re.search(r"^Failed: 0$", out, re.M), out
    # the governance scene (docs/demo.md): a greedy caller limited, a failing node ejected
    assert re.search(r"caller com\.demo\.polite .* 0 refused with status 6", out), out
    assert "ejected after 3 consecutive errors" in out, out
    # the table: more than one destination, the routing contexts, the percentiles
    dests = set(re.findall(r"\b((?:echo|order|cart)-[a-z0-9]+(?:-[a-z0-9]+)?)\s+\S+\s+\S+\s+"
                           r"\w+/\w+\s+[\d,]+\s+[\d.]+%", out))
    assert len(dests) > 1, out
    assert {"echo-gray-gh", "echo-fx-yf", "order-s1-gh"} <= dests, dests
    for ctx in ("trunk", "liteset=gray", "swimlane=feature-x", "set=s1", "hash-key"):
        assert ctx in out
    # traffic shunting: the uid=17 caller, and only it, reached the canary group
    assert "echo-canary-gh" in dests, dests
    assert re.search(r"^  Traffic shunting: rule 'canary-users' \(uid % 10 in \[7\]\) -> group "
                     r"'canary': [\d,]+ from uid=17$", out, re.M), out
    for q in ("p50", "p90", "p99", "p99.9", "requests/s"):
        assert q in out
    assert "transparently retried" in out
    assert "client-side proxy" in out and "server-side proxy" in out
    assert len(re.findall(r"(\d+) -> (\d+)", out)) == 2  # both proxies restarted
    # the service-authentication scene: one caller authorized, one refused with its reason
    assert re.search(r"^  com\.demo\.web +authorized: answered by echo-gh-1$", out, re.M), out
    assert re.search(r"^  com\.demo\.batch +refused, status 7: authorization failed: caller "
                     r"'com\.demo\.batch' is not allowed to call com\.demo\.echo$", out, re.M), out
    # the chart: a valid SVG with the two restarts marked
    root = ET.parse(chart).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "client-side proxy hot restart" in text and "server-side proxy hot restart" in text
    assert "p99" in text and "requests/s" in text
    assert_nothing_left(err)


def test_demo_png_without_matplotlib_writes_svg_beside(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed: the PNG is written")
    from octoproxy.demo import CALLERS, NODES, RestartEvent, Results
    from octoproxy.demo_chart import write_chart

    res = Results(CALLERS, NODES)
    for i in range(200):
        res.t_send.append(i * 0.01)
        res.latency.append(0.001 + (i % 7) * 1e-4)
        res.caller_ix.append(0)
        res.dest_ix.append(0)
    res.duration = 2.0
    res.restarts.append(RestartEvent("client-side proxy", 0.5, 10, 11, 0.9, 1.2))
    msg = write_chart(res, str(tmp_path / "c.png"))
    assert "c.svg" in msg and not (tmp_path / "c.png").exists()
    ET.parse(tmp_path / "c.svg")


@pytest.mark.parametrize("when", ["client-side proxy: idc", "hot restart of the client-side"])
def test_sigint_stops_everything_and_removes_the_temp_dir(tmp_path: Path, when: str) -> None:
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(demo_args("--seconds", "30", "--no-progress"), env=env(),
                             cwd=str(ROOT), stdout=out, stderr=err)
    try:
        wait_for(lambda: when in err_path.read_text() or p.poll() is not None, 40, when)
        assert p.poll() is None, err_path.read_text()
        p.send_signal(signal.SIGINT)
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err_text = err_path.read_text()
    assert rc == 130, err_text
    assert "cleaned up" in err_text
    assert_nothing_left(err_text)
