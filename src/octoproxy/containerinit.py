"""`octo-proxy-init`: PID 1 of the container image, and its probes.

    octo-proxy-init [--slot NAME] [--hot-restart-socket PATH] -- COMMAND...
    octo-proxy-init ready [URL]        exit 0 when the admin /ready answers 200
    octo-proxy-init prestop [URL]      drain the proxy of this container, if it serves

Why an init of our own: a hot restart (SIGUSR2) starts the next generation
as a child of the live one, which then drains and exits.  If the proxy were
PID 1, its exit would end the container and kill the new generation with it;
tini, dumb-init and podman's --init (catatonit) exit as soon as their own
child exits, with the same result.  This init runs COMMAND in a process group
of its own, forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to
that group (every generation: a draining one ignores SIGUSR2, docs/operating.md),
reaps every process that ends up as its child (it is PID 1, or a child
subreaper when it is not), and exits when no process is left, with the exit
status of the last one.

--slot NAME makes a pair of proxy containers (the serving one and a standby
that shares its directory and network namespace, as in a Kubernetes Pod)
decide by themselves what to do at start, so an upgrade is just "give the
standby container the new image" (docs/operating.md):

* no proxy serves yet (nothing listens on the hot-restart socket): start
  one (the first of the pair to take `slot.lock` wins);
* a proxy serves and this slot ran another image before (the operator
  changed this container's image): run COMMAND with `--hot-restart-from`,
  taking over the listeners; the serving container's proxy drains and exits,
  and so does that container;
* a proxy serves and this slot ran this very image (a first start beside a
  serving one, or the container that just handed over, restarted by the
  orchestrator): stay on standby, do nothing until stopped.

The image of each slot (OCTO_PROXY_IMAGE_ID, set at build time) is recorded
in `slot-NAME.image` beside the hot-restart socket (a directory this init
creates 0700 when missing) once this slot's proxy serves, so a new image that fails to start is tried again at each restart
and never mistaken for a standby.

No import beyond the standard library, and only the small modules while it
supervises (the probes import urllib in their own process).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import sys
import time

from octoproxy.process import AtomicFile

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
DEFAULT_SOCKET = "/run/octo-proxy/hot-restart/restart.sock"
DEFAULT_ADMIN = "http://127.0.0.1:9901"
PR_SET_CHILD_SUBREAPER = 36
SO_ACCEPTCON = 0x10000


def log(msg: str) -> None:
    print(f"octo-proxy-init[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ who listens where


def listening_inodes(path: str) -> set[int]:
    """The inodes of the sockets listening as the hot-restart socket `path`
    in this network namespace (/proc/net/unix): a check that connects
    nowhere, so the serving proxy sees nothing.  A proxy binds that socket
    under a temporary name beside `path` and renames it into place, and
    /proc/net/unix shows the name it was bound to: both count."""
    d, name = os.path.split(path)
    tmp_prefix = os.path.join(d, f".{name}.")
    out = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if (len(parts) >= 8 and int(parts[3], 16) & SO_ACCEPTCON
                        and (parts[7] == path or parts[7].startswith(tmp_prefix))):
                    out.add(int(parts[6]))
    except OSError:
        return set()
    return out


def serving(path: str) -> bool:
    """A proxy serves: its hot-restart socket is in place and listened on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    return bool(listening_inodes(path))


def socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def serves_here(path: str, pids: list[int]) -> bool:
    """True when one of `pids` holds the socket listening on `path`."""
    inodes = listening_inodes(path)
    return bool(inodes) and os.path.exists(path) and any(inodes & socket_inodes(p) for p in pids)


def proxy_pids() -> list[int]:
    """The processes of this PID namespace other than PID 1 and this one
    (in the container: the proxy's generations)."""
    me = os.getpid()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) not in (1, me)]


# ------------------------------------------------------------ the slot decision


def decide(slot: str, sock: str, command: list[str]) -> tuple[list[str] | None, str]:
    """What this slot does: the command to run (None: standby) and why."""
    image = os.environ.get("OCTO_PROXY_IMAGE_ID", "dev")
    record = os.path.join(os.path.dirname(sock), f"slot-{slot}.image")
    try:
        with open(record) as f:
            before: str | None = f.read().strip()
    except OSError:
        before = None
    if not serving(sock):
        return command, "no proxy serves: starting one"
    if before is not None and before != image:
        return ([*command, "--hot-restart-from", sock],
                f"a proxy serves and this slot's image changed ({before} -> {image}): taking over")
    return None, (f"a proxy serves and this slot already ran image {image}: standby"
                  if before is not None else "a proxy serves: standby")


def write_record(slot: str, sock: str) -> None:
    image = os.environ.get("OCTO_PROXY_IMAGE_ID", "dev")
    record = os.path.join(os.path.dirname(sock), f"slot-{slot}.image")
    AtomicFile(record).commit(f"{image}\n".encode())  # never through a symlink


# ------------------------------------------------------------ PID 1


def private_dir(d: str) -> None:
    """Create the hot-restart socket's directory 0700 if it is missing: the
    proxy listens there only if nobody else can write in it, and a shared
    volume (a Kubernetes emptyDir is mode 0777) is not such a place."""
    old = os.umask(0o077)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        log(f"cannot create {d}: {e.strerror}")
    finally:
        os.umask(old)


def supervise(command: list[str], slot: str | None, sock: str) -> int:
    private_dir(os.path.dirname(sock))
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    waited = {*FORWARDED, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    lock_fd = -1
    if slot is not None:
        # one of the pair decides at a time: two starting together do not
        # both start a proxy (the loser would find the UDS taken and fail)
        lock_fd = os.open(os.path.join(os.path.dirname(sock), "slot.lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        run, why = decide(slot, sock, command)
        log(f"slot {slot}: {why}")
        if run is None:
            os.close(lock_fd)
            write_record(slot, sock)
            return standby()
        command = run
    pid = os.fork()
    if pid == 0:  # the child: a process group of its own, default signal mask
        try:
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execvp(command[0], command)
        except OSError as e:
            log(f"cannot run {command[0]}: {e}")
        os._exit(127)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    status = 0
    recorded = slot is None
    while True:
        timeout = 0.2 if not recorded else None
        info = (signal.sigtimedwait(waited, timeout) if timeout is not None
                else signal.sigwaitinfo(waited))
        if info is not None and info.si_signo != signal.SIGCHLD:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, info.si_signo)
            continue
        # reap everything that ended; leave when nothing is left
        while True:
            try:
                child, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                if lock_fd >= 0:
                    os.close(lock_fd)
                return status
            if child == 0:
                break
            status = os.waitstatus_to_exitcode(st)
            if status < 0:
                status = 128 - status
        if not recorded and slot is not None and serves_here(sock, proxy_pids()):
            # this slot's proxy serves: remember its image, let the peer decide
            write_record(slot, sock)
            os.close(lock_fd)
            lock_fd = -1
            recorded = True


def standby() -> int:
    """Do nothing until asked to stop (SIGTERM, SIGINT)."""
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    info = signal.sigwaitinfo(stop)
    log(f"standby: stopped by signal {info.si_signo}")
    return 0


# ------------------------------------------------------------ probes


def ready(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=3) as r:
            print(r.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as e:
        print(f"{e.code}: {e.read().decode(errors='replace').strip()}")
    except OSError as e:
        print(f"admin endpoint unreachable: {e}")
    return 1


def prestop(url: str, sock: str, timeout: float) -> int:
    """Before the orchestrator's SIGTERM: if this container's proxy is the
    one serving, POST /drain (stop accepting, fail /ready) and wait until
    nothing is in flight.  A standby container, or one whose proxy already
    handed over, does nothing: the admin port belongs to the serving one."""
    if not serves_here(sock, proxy_pids()):
        print("prestop: this container's proxy does not serve; nothing to drain")
        return 0
    import urllib.request

    req = urllib.request.Request(f"{url}/drain", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        print(f"prestop: {r.read().decode().strip()}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/drain", timeout=5) as r:
            body = r.read().decode()
        if '"in_flight": 0' in body:
            print(f"prestop: drained: {body.strip()}")
            return 0
        time.sleep(0.1)
    print("prestop: requests still in flight; SIGTERM will wait for them (shutdown_s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    url = os.environ.get("OCTO_PROXY_ADMIN", DEFAULT_ADMIN)
    sock = os.environ.get("OCTO_PROXY_HOT_RESTART_SOCKET", DEFAULT_SOCKET)
    if args[:1] == ["ready"]:
        return ready(args[1] if len(args) > 1 else url)
    if args[:1] == ["prestop"]:
        return prestop(args[1] if len(args) > 1 else url, sock,
                       float(os.environ.get("OCTO_PROXY_PRESTOP_S", "20")))
    slot = None
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--slot" and args:
            slot = args.pop(0)
        elif opt == "--hot-restart-socket" and args:
            sock = args.pop(0)
        else:
            print(__doc__, file=sys.stderr)
            return 64
    command = args[1:]
    if not command:
        print(__doc__, file=sys.stderr)
        return 64
    return supervise(command, slot, sock)


if __name__ == "__main__":
    sys.exit(main())
