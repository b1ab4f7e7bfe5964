"""What a service manager sees: the PID file and systemd notifications."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

log = logging.getLogger("octoproxy")


def write_pid_file(path: str | None, pid: int | None = None) -> None:
    """Atomically point the PID file at the live process."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid or os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_pid_file(path: str) -> int | None:
    """The pid a PID file names, or None (missing, empty, garbage)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_mentioning(mark: str) -> list[int]:
    """Live processes, other than this one, whose command line contains `mark`
    (a run's private directory): how generations started by SIGUSR2, which
    are not our children, are found again."""
    out = []
    needle = mark.encode()
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle in f.read() and pid_alive(int(d)):
                    out.append(int(d))
    return out


def remove_pid_file(path: str | None) -> None:
    """Remove the PID file if it still names this process."""
    if not path:
        return
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if int(f.read().strip()) != os.getpid():
                return
        os.unlink(path)


def sd_notify(*lines: str) -> bool:
    """Send a state to systemd when NOTIFY_SOCKET is set (sd_notify(3))."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
