"""What service authentication costs: CPU per request of the two-proxy chain
with signing (A) and verifying plus the ACL (B) against the same chain
without, in the same run, rounds alternating (docs/auth.md, "Cost").

    loadgen --UDS--> A --TCP--> B --UDS--> provider (echo), as bench_proxy.py

- octo:      no authentication
- octo-auth: A signs every request for its app (listeners.outbound[].sign_for),
             B verifies the signature (enforce) and checks the ACL, which
             names the method; tokens from a token file (mode 0600)
- octo-pad:  no authentication, but the app's requests carry one more
             localContext entry of exactly octo-auth's size: what carrying
             the signature costs without computing or checking it (the
             app -> A leg carries it too, which octo-auth's does not)

The request body is a Thrift call and the header carries
traceInfo.clientAppkey (the appkey A signs for), for both systems; the
loadgen writes its stamp after the call's message header, so the method the
signature and the ACL cover stays "echo" (bench_governance's templates put it
over the method name). Each system has a provider of its own, started the
same way (octo-auth's expects the signed frame: B forwards the octo-auth
entry), and the same inbound listener, with the provider's appkey; only
the authentication differs.

    PYTHONPATH=src python bench/e2e/bench_auth.py [--repeat 5] [--duration 5]
        [--scenario '32x8 free'] [--no-pad] [--instructions]

Prints per system the median A+B CPU per request (utime+stime, /proc) and
the ratio to octo.  --instructions runs both proxies of every system under
valgrind's callgrind and adds A's and B's user-space instructions per
request (counted from just before each round's load to its end, divided by
the requests answered in it, warm-up included, as the CPU figure): a figure
the host's load does not change (`perf stat -e instructions` needs hardware
counters, which the test VM does not expose).  Under valgrind the proxies
run some 50 times slower, so the CPU figures of such a run mean nothing.
Exit status 1 when a run saw errors or refusals (a refused request would be
a cheap one: the figure would lie).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_governance as BG  # noqa: E402
import bench_proxy as BP  # noqa: E402
from bench_proxy import APPKEY, SERVICE, harness  # noqa: E402

from octoproxy._core import auth, frame  # noqa: E402

CALLER = "com.bench.caller"   # bench_governance's templates' traceInfo.clientAppkey
HEAD = len(frame.thrift_call("echo", 1))  # the body's Thrift message header


def padded_template(outdir: str) -> dict[str, Any]:
    """bench_governance's request with octo-auth's size in localContext under
    another key of the same length (octo-pad), as the loadgen's template."""
    head = frame.thrift_call("echo", 1)
    body = head + bytes(BP.BODY_LEN - len(head))
    data = frame.encode_request(1, SERVICE, body, local_context={
        "octo-remote-appkey": APPKEY, "octo-xpad": f"{CALLER}:{'1' * 10}:{'A' * 22}"},
        trace_info={"clientAppkey": CALLER})
    f = frame.scan(data)[0][0]
    path = os.path.join(outdir, "req-pad.bin")
    with open(path, "wb") as fh:
        fh.write(data)
    return {"path": path, "seq_off": f.seq_off + f.offset, "body_off": f.body_off + f.offset,
            "len": len(data)}


def valgrind_cmd(out: str) -> list[str]:
    """A proxy under callgrind, counting nothing until InstrCounter turns it on."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-jumps=no",
            f"--callgrind-out-file={out}"]


class InstrCounter:
    """The user-space instructions one proxy (started under valgrind_cmd)
    executes from now until stop(): callgrind's instrumentation turned on and
    its counters zeroed now, its totals dumped at stop()."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out = pid, out
        for op in ("-i", "-z"):
            subprocess.run(["callgrind_control", op, *(["on"] if op == "-i" else []), str(pid)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)

    def stop(self) -> int:
        before = set(glob.glob(self.out + ".*"))
        for args in (["-d"], ["-i", "off"]):
            subprocess.run(["callgrind_control", *args, str(self.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        for path in set(glob.glob(self.out + ".*")) - before:
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1])
        raise RuntimeError(f"no callgrind dump for pid {self.pid}")


class AuthBench(BP.Bench):
    token_file = ""
    token = b""
    pad: dict[str, Any] = {}
    instructions = False

    def run(self, system: str, *args: Any, **kw: Any) -> dict[str, Any]:
        saved = self.tpl["req"]
        if system == "octopad":
            self.tpl["req"] = {**self.pad, "body_off": self.pad["body_off"] + HEAD}
        sysm = self.systems[system]
        counters = {k: InstrCounter(p.pid, self.c.path(f"cg-{system}-{k}"))
                    for k, p in (("a", sysm.a), ("b", sysm.b))
                    if p is not None} if self.instructions else {}
        try:
            r = super().run(system, *args, **kw)
        finally:
            self.tpl["req"] = saved
            got = {k: c.stop() for k, c in counters.items()}
        total = max(r.get("total", 0), 1)
        for k, n in got.items():
            r[f"{k}_instr"] = n / total
        return r

    def own_provider(self, name: str, signed: bool, padded: bool = False) -> str:
        """A provider of the system's own, started the same way for each,
        whose request template is what B forwards: the signed request, the
        padded one, or the app's request as it is."""
        src = self.pad if padded else self.tpl["req"]
        with open(src["path"], "rb") as f:
            data = auth.sign_frame(f.read(), self.token, APPKEY.encode()) if signed else f.read()
        frames, _ = frame.scan(data)
        fr = frames[0]
        path = self.c.path(f"{name}-req.bin")
        with open(path, "wb") as f:
            f.write(data)
        sock = self.c.path(f"{name}-prov.sock")
        resp = self.tpl["resp"]
        p = harness.Proc([self.tools["provider"], sock, path, str(fr.seq_off + fr.offset),
                          str(fr.body_off + fr.offset), resp["path"], str(resp["seq_off"]),
                          str(resp["body_off"])], f"{name}-provider", self.c.dir)
        self.c.procs.append(p)
        harness.wait_for(lambda: harness.can_connect_uds(sock) or not p.alive(), 10,
                         "provider socket")
        assert p.alive(), p.log()
        return sock

    def _octo(self, name: str, signed: bool, padded: bool = False) -> BP.System:
        port = harness.free_port()
        tag = f"bench-{os.getpid()}-{name}"
        prov = self.own_provider(name, signed, padded)
        scfg = harness.server_proxy_cfg({port: prov}, id=f"{tag}-server")
        # the same listener with or without authentication: a provider appkey
        scfg["listeners"]["inbound"][0]["appkey"] = APPKEY
        scfg["hot_restart"] = {"socket": self.c.path(f"{name}-server.hr")}
        svc: dict[str, Any] = {"appkey": APPKEY, "service_names": [SERVICE],
                               "endpoints": [{"address": f"127.0.0.1:{port}"}]}
        entry = self.c.path(f"{name}.sock")
        ccfg = harness.client_proxy_cfg(entry, [svc], node={"id": f"{tag}-client"},
                                        hot_restart={"socket": self.c.path(f"{name}-c.hr")})
        if signed:
            ib = scfg["listeners"]["inbound"][0]
            ib["auth"] = {"mode": "enforce", "allow": [{"caller": CALLER, "methods": ["echo"]}]}
            scfg["auth"] = {"token_file": self.token_file}
            ccfg["listeners"]["outbound"][0]["sign_for"] = [CALLER]
            ccfg["auth"] = {"token_file": self.token_file}
        b = self.proxy(f"{name}-b", scfg)
        a = self.proxy(f"{name}-a", ccfg)
        return BP.System(name, entry, a, b)

    def proxy(self, name: str, cfg: dict[str, Any]) -> harness.Proc:
        if not self.instructions:
            return self.c.proxy(name, cfg)
        path = self.c.write_config(name, cfg)
        p = harness.Proc([*valgrind_cmd(self.c.path(f"cg-{name}")), sys.executable, "-m",
                          "octoproxy", "run", "-c", path], name, self.c.dir)
        self.c.procs.append(p)
        self.c.wait_ready(p, cfg, timeout=600)   # Python's start under valgrind: a minute or more
        return p

    def start_octo(self) -> BP.System:
        return self._octo("octo", False)

    def start_octoauth(self) -> BP.System:
        return self._octo("octoauth", True)

    def start_octopad(self) -> BP.System:
        return self._octo("octopad", False, padded=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-pad", action="store_true", help="leave out octo-pad")
    ap.add_argument("--instructions", action="store_true",
                    help="A's and B's user-space instructions per request (callgrind)")
    args = BP.cost_args(ap, argv)
    systems = ["octo", "octoauth"] + ([] if args.no_pad else ["octopad"])
    tmp = tempfile.mkdtemp(prefix="opauth", dir="/tmp")
    tok = os.path.join(tmp, "tokens.yaml")
    fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    token = os.urandom(24).hex()
    with os.fdopen(fd, "w") as f:
        f.write(f"{CALLER}: {token}\n")
    AuthBench.token_file, AuthBench.token = tok, token.encode()
    AuthBench.pad = padded_template(tmp)
    AuthBench.instructions = args.instructions
    pinner = BP.Pinner()
    tpl = BG.make_templates(tmp)
    bench = AuthBench(BP.build_tools(tmp), tpl, pinner, sorted(os.sched_getaffinity(0)), systems)
    # the loadgen's stamp after the Thrift message header (the method stays "echo");
    # the providers were started with the body's real offset, and echo it whole
    bench.tpl["req"] = {**tpl["req"], "body_off": tpl["req"]["body_off"] + HEAD}
    bad = False
    try:
        runs, bad = BP.cost_rounds(bench, systems, args, note=(
            lambda r: f"instructions per request: A {r['a_instr']:.0f}, B {r['b_instr']:.0f}"
        ) if args.instructions else None)
    finally:
        bench.close()
        if not bad:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bench.c.dir, ignore_errors=True)
    BP.print_cost(runs, args)
    if args.instructions:
        print(f"\nmedian user-space instructions per request (callgrind) over {args.repeat} "
              "round(s):")
        ins = {s: [(r["a_instr"], r["b_instr"]) for r in rs] for s, rs in runs.items()}
        ib = sum(statistics.median(x[i] for x in ins["octo"]) for i in range(2))
        for s in systems:
            ia, ibb = (statistics.median(x[i] for x in ins[s]) for i in range(2))
            print(f"  {s:<8} A {ia:7.0f}  B {ibb:7.0f}  A+B {ia + ibb:7.0f}  "
                  f"{((ia + ibb) / ib - 1) * 100:+6.1f}% vs octo")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
