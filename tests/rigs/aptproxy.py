"""One apt-cacher-ng for all Tier B rigs, shared by concurrent pytest sessions.

It listens on 10.250.0.1:3142, an address on a dummy interface (``lrt-acng``; a host-only veth pair where the
dummy module is missing) of the control
machine; every rig gets a route ``10.250.0.0/24 via 10.250.N.1`` and the apt proxy setting
``Acquire::http::Proxy "http://10.250.0.1:3142";``. Packets from a rig to 10.250.0.1 are
delivered locally by the host (no forwarding involved), so rigs still reach nothing else.

The config dir holds an acng.conf with NO Remap-* lines: apt-cacher-ng is then a plain caching
proxy for whatever http mirror the rig asks for (the stock remap rules point at a mirror that is
unreachable here and give ``503 Host not found``). The cache survives across runs under
``/var/cache/llama-rig-tests/apt-cacher-ng/cache``.

Sharing: every session holds a shared flock on ``users.lock`` while it uses the proxy; the last
one out (it can take the exclusive lock) stops the daemon and removes the dummy interface.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from . import CACHE_ROOT, RUN_ROOT, flocked, pid_alive, sh, tcp_open, wait_for

PROXY_ADDR = "10.250.0.1"
PROXY_PORT = 3142
PROXY_NET = "10.250.0.0/24"
DUMMY_IF = "lrt-acng"
DUMMY_PEER = "lrt-acng-p"
ACNG_BIN = "/usr/sbin/apt-cacher-ng"


class AptProxy:
    def __init__(self, base_dir: Path = CACHE_ROOT / "apt-cacher-ng",
                 run_dir: Path = RUN_ROOT / "apt-cacher-ng") -> None:
        self.base_dir = base_dir
        self.conf_dir = base_dir / "conf"
        self.cache_dir = base_dir / "cache"
        self.log_dir = base_dir / "log"
        self.run_dir = run_dir
        self.pid_file = run_dir / "acng.pid"
        self._users_fd: Optional[int] = None
        self._popen: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{PROXY_ADDR}:{PROXY_PORT}"

    # -- lifecycle ---------------------------------------------------------------------------
    def acquire(self) -> "AptProxy":
        if self._users_fd is not None:
            return self
        with flocked(self.run_dir / "start.lock"):
            if not self._running():
                self._start()
            fd = os.open(self.run_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._users_fd = fd
        return self

    def release(self) -> None:
        if self._users_fd is None:
            return
        os.close(self._users_fd)
        self._users_fd = None
        with flocked(self.run_dir / "start.lock"):
            fd = os.open(self.run_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another session still uses it
                self._stop()
            finally:
                os.close(fd)

    # -- internals ---------------------------------------------------------------------------
    def _pid(self) -> Optional[int]:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _running(self) -> bool:
        pid = self._pid()
        return bool(pid and pid_alive(pid) and tcp_open(PROXY_ADDR, PROXY_PORT, timeout=0.5))

    def _ensure_dummy(self) -> None:
        if sh(["ip", "link", "show", DUMMY_IF], check=False).returncode != 0:
            if sh(["ip", "link", "add", DUMMY_IF, "type", "dummy"], check=False).returncode != 0:
                # no dummy module (as on the CI box): a veth pair whose ends both stay here
                sh(["ip", "link", "add", DUMMY_IF, "type", "veth", "peer", "name", DUMMY_PEER])
                sh(["ip", "link", "set", DUMMY_PEER, "up"])
        addrs = sh(["ip", "-o", "-4", "addr", "show", "dev", DUMMY_IF]).stdout
        if f" {PROXY_ADDR}/" not in addrs:
            sh(["ip", "addr", "add", f"{PROXY_ADDR}/32", "dev", DUMMY_IF])
        sh(["ip", "link", "set", DUMMY_IF, "up"])

    def _write_conf(self) -> None:
        for d in (self.conf_dir, self.cache_dir, self.log_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Deliberately no Remap-* lines (see module docstring).
        (self.conf_dir / "acng.conf").write_text(
            f"CacheDir: {self.cache_dir}\n"
            f"LogDir: {self.log_dir}\n"
            f"Port: {PROXY_PORT}\n"
            f"BindAddress: {PROXY_ADDR}\n"
            f"PidFile: {self.pid_file}\n"
            f"SocketPath: {self.run_dir / 'acng.socket'}\n"
            "ReportPage: acng-report.html\n"
            "ExThreshold: 4\n"
            "VerboseLog: 1\n"
            "DnsCacheSeconds: 1800\n"
        )

    def _start(self) -> None:
        self._ensure_dummy()
        self._write_conf()
        old = self._pid()
        if old and pid_alive(old):  # alive but not answering: a wedged leftover
            os.kill(old, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        log = open(self.log_dir / "daemon.out", "ab")
        self._popen = subprocess.Popen(
            [ACNG_BIN, "-c", str(self.conf_dir), "ForeGround=1"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        self.pid_file.write_text(f"{self._popen.pid}\n")

        def up():
            if self._popen.poll() is not None:
                raise RuntimeError("apt-cacher-ng exited with %s; see %s" % (
                    self._popen.returncode, self.log_dir / "daemon.out"))
            return tcp_open(PROXY_ADDR, PROXY_PORT, timeout=0.5)

        wait_for(up, 20, interval=0.05, what="apt-cacher-ng to listen")
        # ForeGround=1 may rewrite the pid file with the same pid; make sure it is ours
        self.pid_file.write_text(f"{self._popen.pid}\n")

    def _stop(self) -> None:
        pid = self._pid()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            try:
                if self._popen is not None and self._popen.pid == pid:
                    self._popen.wait(timeout=10)
                else:
                    wait_for(lambda: not pid_alive(pid), 10, interval=0.05, what="acng exit")
            except (TimeoutError, subprocess.TimeoutExpired):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        sh(["ip", "link", "del", DUMMY_IF], check=False)
