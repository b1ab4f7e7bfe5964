"""What a service manager sees (the PID file, systemd notifications), and the
safe way to write local files: private directories, atomic files."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import stat
import time

log = logging.getLogger("octoproxy")


class UnsafePath(OSError):
    """A path the proxy refuses to write or listen at (missing, or writable by others)."""


def _check_dir(d: str, *, private: bool) -> None:
    """`d` must be a real directory (not a symlink).  private: owned by this
    user (or root) and writable by nobody else."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise UnsafePath(f"directory {d} does not exist") from None
    except OSError as e:
        raise UnsafePath(f"cannot inspect directory {d}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{d} is not a directory (or is a symlink)")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UnsafePath(f"directory {d} is not writable by this user")
    if private:
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafePath(f"directory {d} belongs to uid {st.st_uid}, not to this user "
                             f"({os.geteuid()}) or root")
        if st.st_mode & 0o022:
            raise UnsafePath(f"directory {d} is writable by other users "
                             f"(mode {stat.S_IMODE(st.st_mode):o}); use a private directory")


def check_writable_dir(d: str) -> None:
    """Raise UnsafePath unless `d` is a directory (not a symlink) this user can write."""
    _check_dir(d, private=False)


def check_private_dir(d: str) -> None:
    """Raise UnsafePath unless only this user (or root) can write in `d`."""
    _check_dir(d, private=True)


def runtime_dir() -> str:
    """A directory for this user's sockets and state that only it can write:
    $XDG_RUNTIME_DIR/octo-proxy, else /run/octo-proxy for root, else
    ~/.local/state/octo-proxy; created 0700 if missing.  Refuses a
    pre-existing one that another user owns or others can write."""
    return ensure_private_dir(runtime_dir_path())


def runtime_dir_path() -> str:
    """Where runtime_dir() is, without creating or checking it."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "octo-proxy")
    if os.geteuid() == 0:
        return "/run/octo-proxy"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "octo-proxy")


def ensure_private_dir(d: str) -> str:
    """Create `d` (and missing parents) with mode 0700; check it is private."""
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UnsafePath(f"cannot create directory {d}: {e.strerror}") from None
    check_private_dir(d)
    return d


class AtomicFile:
    """A file replaced atomically and never through a symlink or a file
    someone else prepared: the content goes to a new temporary file beside it
    (O_CREAT|O_EXCL|O_NOFOLLOW, a name nobody can predict), then rename()
    puts it in place (rename replaces a symlink at the path, never follows it).

    prepare() does everything that can fail (the directory, the temp file);
    commit() only writes, fsyncs and renames."""

    def __init__(self, path: str, mode: int = 0o644) -> None:
        self.path = os.path.abspath(path)
        self.mode = mode
        self._tmp: str | None = None
        self._fd = -1

    def prepare(self) -> AtomicFile:
        d, name = os.path.split(self.path)
        _check_dir(d, private=False)
        if os.path.isdir(self.path):
            raise UnsafePath(f"{self.path} is a directory")
        for _ in range(100):
            tmp = os.path.join(d, f".{name}.{secrets.token_hex(8)}.tmp")
            try:
                self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                   | os.O_CLOEXEC, self.mode)
            except FileExistsError:
                continue
            except OSError as e:
                raise UnsafePath(f"cannot write in {d}: {e.strerror}") from None
            self._tmp = tmp
            return self
        raise UnsafePath(f"cannot create a temporary file in {d}")

    def commit(self, data: bytes) -> None:
        if self._tmp is None:
            self.prepare()
        assert self._tmp is not None
        try:
            os.write(self._fd, data)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        os.replace(self._tmp, self.path)
        self._tmp = None
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


# Signals whose default action ends the process, held (blocked, so they wait
# pending) from the start of `octo-proxy run` until the event loop's handlers
# are in place: a SIGTERM that comes while the proxy starts is then an orderly
# stop (or, before anything is served, a clean exit), never a death by signal.
HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR2})


def hold_signals() -> None:
    """Block HELD_SIGNALS in this thread (and the threads and processes it
    starts from now on: the mask is inherited and survives exec)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def write_pid_file(path: str | None, pid: int | None = None) -> None:
    """Atomically point the PID file at the live process (AtomicFile)."""
    if path:
        AtomicFile(path).commit(f"{pid or os.getpid()}\n".encode())


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
