"""Tier A rigs: a throwaway sshd on 127.0.0.1 (random port) sharing the host filesystem.

Good for connection / sudo / put / engine logic with paths under ``Rig.root`` (a temp dir used
as a fake filesystem root). Never for apt or /etc: use Tier B (``tests.rigs.nspawn``) for that.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import Rig, run_checked, sh, wait_for

SSHD_BIN = "/usr/sbin/sshd"  # absolute path required by sshd
SUDO_USER = "rigadmin"

SSHD_CONFIG = """\
Port {port}
ListenAddress {listen}
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
UseDNS no
LogLevel VERBOSE
MaxStartups 100:30:200
Subsystem sftp internal-sftp
"""


def make_client_key(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """Create an ed25519 client key pair in ``directory``; return (private key path, public line)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    if not key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llama-rig-tests", "-f", key])
    os.chmod(key, 0o600)
    return key, key.with_suffix(".pub").read_text().strip()


def ensure_sudo_user(user: str = SUDO_USER) -> None:
    """Create ``user`` with NOPASSWD sudo (idempotent; the user is left in place afterwards)."""
    if sh(["id", "-u", user], check=False).returncode != 0:
        r = sh(["useradd", "-m", "-s", "/bin/bash", user], check=False)
        if r.returncode not in (0, 9):  # 9: created concurrently by another session
            raise RuntimeError(f"useradd {user} failed: {r.stderr}")
    # with "UsePAM no" a "!" shadow entry means "locked": use "*" (no password, not locked)
    sh(["usermod", "-p", "*", user])
    sudoers = Path(f"/etc/sudoers.d/{user}")
    want = f"{user} ALL=(ALL) NOPASSWD:ALL\n"
    if not sudoers.exists() or sudoers.read_text() != want:
        tmp = sudoers.with_name(f".{user}.tmp{os.getpid()}")
        tmp.write_text(want)
        os.chmod(tmp, 0o440)
        os.replace(tmp, sudoers)


def _free_port(listen: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((listen, 0))
        return s.getsockname()[1]


def _local_sh(root: Path):
    def run(cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, RIG_ROOT=str(root))
        return run_checked(["/bin/sh", "-c", cmd], check=check, timeout=timeout, env=env,
                           cwd="/", stdin=subprocess.DEVNULL)
    return run


@dataclass
class SshdServer:
    dir: Path  # config, host key, authorized_keys, log
    root: Path  # fake filesystem root handed to tests as Rig.root
    port: int
    popen: subprocess.Popen
    root_rig: Rig
    sudo_rig: Rig
    start_s: float
    _stopped: bool = field(default=False, repr=False)

    @property
    def log(self) -> str:
        return (self.dir / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.root_rig._sh = self.sudo_rig._sh = None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_sshd(key_file: Path, pubkey: str, tmp_base: Optional[Path] = None,
               sudo_user: str = SUDO_USER, attempts: int = 20,
               listen: str = "127.0.0.1") -> SshdServer:
    """Start sshd on 127.0.0.1:<random> (or ``listen``, e.g. ``::1``); returns when it logs
    'Server listening'."""
    t0 = time.monotonic()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privsep dir; nothing creates it here
    d = Path(tempfile.mkdtemp(prefix="rig-sshd-", dir=tmp_base))
    root = Path(tempfile.mkdtemp(prefix="rig-root-", dir=tmp_base))
    try:
        os.chmod(d, 0o755)  # sshd reads authorized_keys as the login user
        os.chmod(root, 0o755)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", d / "host_key"])
        os.chmod(d / "host_key", 0o600)
        (d / "authorized_keys").write_text(pubkey.strip() + "\n")
        os.chmod(d / "authorized_keys", 0o644)
        host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
        last_log = ""
        for _ in range(attempts):
            port = _free_port(listen)
            (d / "sshd_config").write_text(SSHD_CONFIG.format(port=port, d=d, listen=listen))
            logf = open(d / "sshd.log", "wb")
            popen = subprocess.Popen([SSHD_BIN, "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            logf.close()
            marker = f"Server listening on {listen} port {port}."

            def state():
                text = (d / "sshd.log").read_text(errors="replace")
                if marker in text:
                    return "up"
                if popen.poll() is not None:
                    return "dead"
                return None

            try:
                st = wait_for(state, 15, interval=0.005, what="sshd to listen")
            except BaseException:
                popen.kill()
                popen.wait()
                raise
            if st == "up":
                break
            last_log = (d / "sshd.log").read_text(errors="replace")
            if "Address already in use" not in last_log:
                raise RuntimeError(f"sshd failed to start:\n{last_log}")
        else:
            raise RuntimeError(f"sshd: no free port after {attempts} attempts:\n{last_log}")
        known_hosts = d / "known_hosts"
        known_hosts.write_text(f"[{listen}]:{port} {host_pub}\n")
        run = _local_sh(root)
        common = dict(name=socket.gethostname(), address=listen, port=port,
                      key_file=key_file, known_hosts=known_hosts, host_side=listen,
                      root=root, _sh=run)
        return SshdServer(dir=d, root=root, port=port, popen=popen,
                          root_rig=Rig(user="root", **common),
                          sudo_rig=Rig(user=sudo_user, **common),
                          start_s=time.monotonic() - t0)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        raise
