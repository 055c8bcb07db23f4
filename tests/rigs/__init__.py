"""Test rigs for llama-rig.

Tier A (``tests.rigs.sshd``): a throwaway sshd on 127.0.0.1 sharing the host filesystem.
Tier B (``tests.rigs.nspawn``): systemd-nspawn boxes with systemd as PID 1, real apt
(through a host-side apt-cacher-ng), own network namespace, host keys and hostname.

Both hand out :class:`Rig` objects; pytest fixtures live in ``tests.rigs.fixtures``.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import socket
import time
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["Rig", "RigCommandError", "deep_merge", "run_checked"]


def deep_merge(base: dict, overrides: dict) -> dict:
    """Return a new dict: ``base`` with ``overrides`` merged in recursively (dicts merge, others replace)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


ShRunner = Callable[[str, bool, float], subprocess.CompletedProcess]


@dataclass
class Rig:
    name: str  # hostname of the box
    address: str  # where SSH listens
    port: int
    user: str  # login user: "root" or "rigadmin" (passwordless sudo)
    key_file: Path  # client private key, mode 0600
    known_hosts: Path  # this box's host key line(s), OpenSSH format
    host_side: str  # control machine's address as seen from the box
    root: Optional[Path] = None  # Tier A: temp dir used as fake filesystem root; Tier B: None
    _sh: Optional[ShRunner] = field(default=None, repr=False, compare=False)

    def sh(self, cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a shell string) as root inside the box, bypassing the library under test.

        Returns a text-mode CompletedProcess with stdout/stderr captured. With ``check=True`` a
        non-zero exit raises ``subprocess.CalledProcessError`` (its ``stdout``/``stderr`` set).
        """
        if self._sh is None:
            raise RuntimeError(f"rig {self.name} has no shell runner (already torn down?)")
        return self._sh(cmd, check, timeout)

    def inventory_entry(self, **overrides) -> dict:
        entry = {
            "connection": {
                "type": "ssh",
                "address": self.address,
                "port": self.port,
                "user": self.user,
                "key": str(self.key_file),
                "known_hosts": str(self.known_hosts),
                "host_key_policy": "strict",
            }
        }
        return deep_merge(entry, overrides)

    def as_user(self, user: str) -> "Rig":
        """A copy of this rig that logs in as ``user`` (same box, same keys, same ``sh``)."""
        return Rig(self.name, self.address, self.port, user, self.key_file, self.known_hosts,
                   self.host_side, self.root, self._sh)


class RigCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the tail of stdout/stderr."""

    def __str__(self) -> str:
        msg = super().__str__()
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                msg += f"\n--- {label} ---\n{text[-3000:]}"
        return msg


def recap_row(out: str, host: str) -> dict[str, str]:
    """The recap row of `host` in a task's plain output (a `recap` title line, a header, rows),
    as {column: value}."""
    lines = out.splitlines()
    i = max(i for i, l in enumerate(lines) if l.startswith("recap"))
    cols = lines[i + 1].split()
    row = next(l.split() for l in lines[i + 2:] if l.split()[:1] == [host])
    return dict(zip(cols, row))


def run_checked(argv, *, check: bool, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in text mode with captured output; the error carries the output."""
    proc = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RigCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


# ---- shared helpers (locks, subprocess, waiting) used by the rig modules ----

CACHE_ROOT = Path(os.environ.get("LLAMA_RIG_TESTS_CACHE", "/var/cache/llama-rig-tests"))
RUN_ROOT = Path(os.environ.get("LLAMA_RIG_TESTS_RUN", "/run/llama-rig-tests"))
WORK_ROOT = Path(os.environ.get("LLAMA_RIG_TESTS_WORK", "/var/tmp/llama-rig-tests"))


def sh(argv, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return run_checked([str(a) for a in argv], check=check, timeout=timeout, **kw)


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX):
    """Hold a flock on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take an exclusive non-blocking flock; return the fd (keep it open to hold the lock) or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def tcp_banner(host: str, port: int, prefix: bytes = b"SSH-2.0-", timeout: float = 1.0) -> bool:
    """True if a TCP connection to host:port greets us with ``prefix``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while len(data) < len(prefix):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(prefix)
    except OSError:
        return False


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
