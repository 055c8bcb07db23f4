"""Tier B rigs: systemd-nspawn boxes, each in its own network namespace.

Layout (all as root on the control machine):

* base image  ``/var/cache/llama-rig-tests/base-<hash>/`` — debootstrap bookworm minbase plus the
  packages in :data:`PACKAGES`, apt lists already fetched, no host keys, empty machine-id.
  Built once into a temp dir and renamed atomically, under a file lock.
* per rig     ``/var/tmp/llama-rig-tests/rigs/<name>/upper`` — overlay upper dir seeded with host
  keys, hostname, machine-id, authorized_keys, apt proxy config and (optionally) the fake
  nvidia-smi; booted with ``systemd-nspawn --overlay=BASE:UPPER:/ --boot``.
* network     netns ``<name>``, veth ``vh-<name>`` (host, 10.250.N.1/24) ⇄ ``vr-<name>`` (rig,
  10.250.N.2/24) plus a route to 10.250.0.0/24 (the apt-cacher-ng address on a dummy
  interface). No default route, no forwarding: rigs reach only the host, never each other.
* locks       ``/run/llama-rig-tests/{names,nets}/*.lock`` — flocks held for a rig's lifetime, so
  names and /24s are unique across concurrent pytest processes; a record ``*.json`` next to each
  name lock lets the next taker clean up after a crashed run.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import (CACHE_ROOT, RUN_ROOT, WORK_ROOT, Rig, flocked, pid_alive, run_checked, sh,
               tcp_banner, try_lock, wait_for)
from .aptproxy import PROXY_ADDR, PROXY_NET, PROXY_PORT

MIRROR = os.environ.get("LLAMA_RIG_TESTS_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
PACKAGES = [
    "openssh-server", "openssh-sftp-server", "sudo", "iproute2", "python3", "procps",
    "systemd", "systemd-sysv", "dbus", "ca-certificates",
]
SUDO_USER = "rigadmin"
# Bump when the build steps below change in a way that matters for the image.
RECIPE_VERSION = 2

FAKE_NVIDIA_SMI = Path(__file__).with_name("fake_nvidia_smi.py")
RIG_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _log(msg: str) -> None:
    print(f"[rigs] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# base image
# --------------------------------------------------------------------------------------------

def recipe_hash() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": sorted(PACKAGES),
        "sudo_user": SUDO_USER,
        # Monthly refresh: apt lists baked into the image go stale when a point release
        # removes superseded .debs from the mirror.
        "month": time.strftime("%Y-%m", time.gmtime()),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


_BUILD_SCRIPT = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
apt-get update -q || {{ sleep 5; apt-get update -q; }}
apt-get install -y -q --no-install-recommends {packages} || {{ sleep 5; apt-get install -y -q --no-install-recommends {packages}; }}
apt-get clean
# apt-get clean also drops pkgcache.bin: without it every rig's first apt call re-parses the
# 80 MB of lists (seconds on a busy box)
apt-cache gencaches >/dev/null
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/bash {user}
usermod -p '*' {user}
printf '%s ALL=(ALL) NOPASSWD:ALL\n' {user} > /etc/sudoers.d/{user}
chmod 0440 /etc/sudoers.d/{user}
# nothing in a test box needs these; they only slow boot or fail in a container
systemctl mask systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer getty@tty1.service \
    2>/dev/null || true
"""


def build_base_image(force: bool = False, proxy_url: Optional[str] = None) -> Path:
    """Return the cached base image dir, building it first if needed (lock-protected).

    With ``proxy_url`` (the apt-cacher-ng) the build downloads through it, so a rebuild
    (monthly, or after a recipe change) reuses the cached .debs.
    """
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    key = recipe_hash()
    final = CACHE_ROOT / f"base-{key}"
    stamp = final / ".llama-rig-base-ok"
    if stamp.exists() and not force:
        return final
    with flocked(CACHE_ROOT / f"base-{key}.lock"):
        if stamp.exists() and not force:
            return final
        # We hold the lock: any temp dir for this key is a leftover of a crashed build.
        for stale in CACHE_ROOT.glob(f"base-{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE_ROOT / f"base-{key}.tmp-{os.getpid()}"
        t0 = time.monotonic()
        try:
            _log(f"building base image {final} (debootstrap {SUITE} from {MIRROR}) ...")
            env = dict(os.environ)
            proxy_env = []
            if proxy_url:
                env["http_proxy"] = proxy_url
                proxy_env = [f"--setenv=http_proxy={proxy_url}"]
            for attempt in (1, 2, 3):  # a mirror hiccup should not fail the whole session
                try:
                    sh(["debootstrap", "--variant=minbase", SUITE, tmp, MIRROR], timeout=1800,
                       env=env)
                    break
                except subprocess.CalledProcessError as e:
                    if attempt == 3:
                        raise
                    _log(f"debootstrap failed (attempt {attempt}), retrying: {e}")
                    shutil.rmtree(tmp, ignore_errors=True)
                    time.sleep(5)
            t1 = time.monotonic()
            policy = tmp / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            script = _BUILD_SCRIPT.format(packages=" ".join(PACKAGES), user=SUDO_USER)
            sh(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                f"--directory={tmp}", "--resolv-conf=copy-host", "--timezone=off", *proxy_env,
                "/bin/sh", "-c", script], timeout=1800)
            policy.unlink()
            # debootstrap copies the host's resolv.conf/hostname; rigs have no DNS anyway
            (tmp / "etc/hostname").write_text("rig-base\n")
            (tmp / "etc/resolv.conf").unlink(missing_ok=True)
            (tmp / "etc/resolv.conf").write_text("# test rig: no DNS\n")
            stamp_tmp = tmp / ".llama-rig-base-ok"
            stamp_tmp.write_text(json.dumps({
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "debootstrap_s": round(t1 - t0, 1),
                "total_s": round(time.monotonic() - t0, 1),
                "packages": PACKAGES,
            }) + "\n")
            if final.exists():  # forced rebuild (or a stampless leftover)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"base image built in {time.monotonic() - t0:.1f}s")
    prune_base_images(keep=final)
    return final


def use_base_image(base: Path) -> int:
    """Take a shared "in use" lock on ``base`` (keep the fd open while rigs may boot from it)."""
    fd = os.open(base.parent / f"{base.name}.users", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def prune_base_images(keep: Path) -> list[str]:
    """Remove superseded base images (older recipe or month) that no session is using."""
    removed = []
    for d in CACHE_ROOT.glob("base-*"):
        if d == keep or not d.is_dir() or ".tmp-" in d.name:
            continue
        fd = try_lock(CACHE_ROOT / f"{d.name}.users")
        if fd is None:
            continue  # some session still boots rigs from it
        try:
            rigs_on_it = False
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f"--directory={d}\0".encode() in f.read():
                            rigs_on_it = True
                            break
                except OSError:
                    continue
            if not rigs_on_it:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------------------------
# name / network slot allocation
# --------------------------------------------------------------------------------------------

NAME_MAX = 12  # "vh-" + name must fit IFNAMSIZ-1 (15)


def _names_dir() -> Path:
    return RUN_ROOT / "names"


def _nets_dir() -> Path:
    return RUN_ROOT / "nets"


def _cleanup_stale(name: str) -> None:
    """Undo whatever a crashed run left behind for rig ``name`` (we hold its name lock)."""
    rec_path = _names_dir() / f"{name}.json"
    rec = {}
    if rec_path.exists():
        try:
            rec = json.loads(rec_path.read_text())
        except ValueError:
            rec = {}
    pid = rec.get("pid")
    if pid and pid_alive(pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                is_nspawn = f.read().strip() == "systemd-nspawn"
        except OSError:
            is_nspawn = False
        if is_nspawn:
            leader = _find_leader(pid)  # re-derived: never trust a recorded pid blindly
            if leader:
                try:
                    os.kill(leader, signal.SIGKILL)
                    wait_for(lambda: not pid_alive(pid), 10, interval=0.05, what="nspawn exit")
                except (ProcessLookupError, TimeoutError):
                    pass
            _terminate_nspawn(pid, leader)
    _remove_network(name)
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}", ignore_errors=True)
    shutil.rmtree(WORK_ROOT / "rigs" / name, ignore_errors=True)
    rec_path.unlink(missing_ok=True)


def sweep_stale() -> list[str]:
    """Clean up rigs of crashed sessions: records whose name lock nobody holds any more."""
    cleaned = []
    for rec in sorted(_names_dir().glob("*.json")):
        name = rec.stem
        fd = try_lock(_names_dir() / f"{name}.lock")
        if fd is None:
            continue  # alive, owned by some session
        try:
            _cleanup_stale(name)
            cleaned.append(name)
        finally:
            os.close(fd)
    return cleaned


def _alloc_name(name: Optional[str]) -> tuple[str, int]:
    if name is not None:
        if len(name) > NAME_MAX or not name.replace("-", "").isalnum():
            raise ValueError(f"rig name {name!r}: use [a-z0-9-], at most {NAME_MAX} chars")
        fd = try_lock(_names_dir() / f"{name}.lock")
        if fd is None:
            raise RuntimeError(f"rig name {name!r} is in use by another rig")
        _cleanup_stale(name)
        return name, fd
    for _ in range(100):
        cand = f"rig-{random.getrandbits(16):04x}"
        fd = try_lock(_names_dir() / f"{cand}.lock")
        if fd is not None:
            _cleanup_stale(cand)
            return cand, fd
    raise RuntimeError("could not allocate a rig name")


def _alloc_net() -> tuple[int, int]:
    """Pick N in 1..254 whose lock we can take; 10.250.N.0/24 is then ours."""
    start = random.randrange(1, 255)
    for i in range(254):
        n = (start + i) % 254 + 1
        fd = try_lock(_nets_dir() / f"{n}.lock")
        if fd is None:
            continue
        # A crashed run may have left an interface holding 10.250.N.1: remove it.
        out = sh(["ip", "-o", "-4", "addr", "show"], check=False).stdout
        for line in out.splitlines():
            if f" 10.250.{n}.1/" in line:
                dev = line.split()[1].split("@")[0]
                sh(["ip", "link", "del", dev], check=False)
        return n, fd
    raise RuntimeError("no free 10.250.N.0/24 network left")


def _setup_network(name: str, n: int) -> None:
    host_if, rig_if = f"vh-{name}", f"vr-{name}"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", rig_if],
        ["ip", "link", "set", rig_if, "netns", name],
        ["ip", "addr", "add", f"10.250.{n}.1/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", f"10.250.{n}.2/24", "dev", rig_if],
        ["ip", "-n", name, "link", "set", rig_if, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        # the shared apt-cacher-ng lives on 10.250.0.1 (dummy interface on the host)
        ["ip", "-n", name, "route", "add", PROXY_NET, "via", f"10.250.{n}.1"],
    ]
    for c in cmds:
        sh(c, timeout=30)


def _remove_network(name: str) -> None:
    sh(["ip", "link", "del", f"vh-{name}"], check=False, timeout=30)
    sh(["ip", "netns", "del", name], check=False, timeout=30)


# --------------------------------------------------------------------------------------------
# boot / stop
# --------------------------------------------------------------------------------------------

def _find_leader(nspawn_pid: int) -> Optional[int]:
    """PID (host view) of the container's init: the child of nspawn living in another pid ns."""
    try:
        host_ns = os.readlink(f"/proc/{nspawn_pid}/ns/pid")
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != nspawn_pid:
                continue
            if os.readlink(f"/proc/{entry}/ns/pid") != host_ns:
                return int(entry)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _terminate_nspawn(pid: int, leader: Optional[int], popen: Optional[subprocess.Popen] = None,
                      timeout: float = 20) -> None:
    """SIGTERM nspawn (clean container poweroff); SIGKILL the container's init if that stalls."""
    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not pid_alive(pid)

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        wait_for(gone, timeout, interval=0.05, what="nspawn to exit")
        return
    except TimeoutError:
        pass
    for victim in (leader, pid):
        if victim:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        wait_for(gone, 10, interval=0.05, what="nspawn to die")
    except TimeoutError:
        _log(f"nspawn pid {pid} refuses to die")


def _write(path: Path, text: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, gid)


HOST_KEY_TYPES = ("ed25519", "ecdsa")


def _host_keys(upper: Path) -> None:
    """Per-rig host keys (what ``ssh-keygen -A -f UPPER`` makes, minus RSA).

    RSA-3072 generation alone took 1.6 s on the busy 2-core CI box, longer than the whole
    container boot; ed25519 + ecdsa take milliseconds. sshd is told to load exactly these.
    """
    procs = [subprocess.Popen(["ssh-keygen", "-q", "-t", t, "-N", "", "-C", f"root@{upper.parent.name}",
                               "-f", str(upper / f"etc/ssh/ssh_host_{t}_key")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for t in HOST_KEY_TYPES]
    for p in procs:
        out = p.communicate(timeout=60)[0]
        if p.returncode != 0:
            raise RuntimeError(f"ssh-keygen failed: {out!r}")
    _write(upper / "etc/ssh/sshd_config.d/00-rig-hostkeys.conf",
           "".join(f"HostKey /etc/ssh/ssh_host_{t}_key\n" for t in HOST_KEY_TYPES))


def _passwd_entry(base: Path, user: str) -> tuple[int, int, str]:
    for line in (base / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == user:
            return int(f[2]), int(f[3]), f[5]
    raise KeyError(user)


@dataclass
class NspawnRig:
    """Bookkeeping for one booted Tier B box (the public face is ``.rig``)."""
    name: str
    n: int
    dir: Path
    base: Path
    popen: Optional[subprocess.Popen] = None
    leader: Optional[int] = None
    rig: Optional[Rig] = None
    boot_s: float = 0.0
    _lock_fds: list = field(default_factory=list, repr=False)
    capabilities: tuple = ()  # extra capabilities for the box (e.g. CAP_NET_ADMIN: nft in its netns)
    stopped: bool = False
    # "booting" | "running" | "rebooting" (asked for it from inside) | "off" (powered off/died)
    state: str = "booting"
    _mu: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._mu)

    def _set_state(self, state: str) -> None:
        with self._mu:
            self.state = state
            self._changed.notify_all()

    def _watch(self, popen: subprocess.Popen) -> None:
        """Follow the box's power state: a reboot requested inside it (``systemctl reboot``,
        nspawn exits 133) boots it again on the same disk, like real hardware."""
        rc = popen.wait()
        with self._mu:
            if self.stopped or self.popen is not popen:
                return  # stop() or reboot() did this on purpose
            self.leader = None
            if rc != 133:
                self._set_state("off")
                return
            self._set_state("rebooting")
            try:
                self._spawn()
            except Exception as e:  # leave it off; sh() reports it
                self.boot_error = e
                self._set_state("off")

    def wait_running(self, timeout: float = 90) -> None:
        """Block while the box is (re)booting; raise if it is off or stopped."""
        with self._mu:
            self._changed.wait_for(lambda: self.state not in ("booting", "rebooting")
                                   or self.stopped, timeout)
            if self.stopped:
                raise RuntimeError(f"rig {self.name} is stopped")
            if self.state != "running":
                err = getattr(self, "boot_error", None)
                raise RuntimeError(f"rig {self.name} is {self.state}"
                                   + (f" (boot failed: {err})" if err else ""))

    @property
    def address(self) -> str:
        return f"10.250.{self.n}.2"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    def _record(self) -> None:
        _write(_names_dir() / f"{self.name}.json", json.dumps({
            "n": self.n, "dir": str(self.dir),
            "pid": self.popen.pid if self.popen else None, "leader": self.leader}))

    def _spawn(self, boot_timeout: float = 60) -> None:
        """Start systemd-nspawn on the existing upper dir and wait for the ssh banner."""
        t0 = time.monotonic()
        name, base = self.name, self.base
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}", ignore_errors=True)
        log = open(self.dir / "console.log", "ab")
        popen = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine={name}",
             f"--directory={base}", f"--overlay={base}:{self.upper}:/",
             f"--network-namespace-path=/run/netns/{name}", f"--hostname={name}",
             "--console=read-only", "--timezone=off", "--resolv-conf=off",
             *([f"--capability={','.join(self.capabilities)}"] if self.capabilities else []), "--boot"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        self.popen, self.leader = popen, None
        self._set_state("booting")
        self._record()

        def ready():
            if popen.poll() is not None:
                raise RuntimeError(f"systemd-nspawn for {name} exited with {popen.returncode}:\n"
                                   + (self.dir / "console.log").read_text(errors="replace")[-4000:])
            return tcp_banner(self.address, 22, timeout=0.5)

        try:
            wait_for(ready, boot_timeout, interval=0.02, what=f"ssh banner from {name}")
            self.leader = wait_for(lambda: _find_leader(popen.pid), 10, what="container init pid")
        except BaseException:
            _terminate_nspawn(popen.pid, _find_leader(popen.pid), popen)
            self._set_state("off")
            raise
        self._record()
        self.boot_s = time.monotonic() - t0
        self._set_state("running")
        threading.Thread(target=self._watch, args=(popen,), name=f"rig-watch-{name}",
                         daemon=True).start()

    def sh(self, cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        if self.stopped:
            raise RuntimeError(f"rig {self.name} is stopped")
        if self.state != "running" or self.leader is None:
            self.wait_running()
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
                "--", "/usr/bin/env", "-i", f"PATH={RIG_PATH}", "HOME=/root", "USER=root",
                "LOGNAME=root", "LANG=C.UTF-8", "TERM=dumb", "/bin/sh", "-c", cmd]
        return run_checked(argv, check=check, timeout=timeout, stdin=subprocess.DEVNULL)

    def kill_network(self) -> None:
        """Cut the cable: the rig's end of the veth goes down.

        Packets in both directions are then silently dropped (the host keeps its route to the
        rig, so nothing leaks out of the default route): new connections time out and
        established SSH sessions hang, as with a real network outage.
        """
        sh(["ip", "-n", self.name, "link", "set", f"vr-{self.name}", "down"])

    def restore_network(self) -> None:
        sh(["ip", "-n", self.name, "link", "set", f"vr-{self.name}", "up"])
        # link down dropped the static route to the apt proxy: put it back
        sh(["ip", "-n", self.name, "route", "replace", PROXY_NET, "via", f"10.250.{self.n}.1"])
        wait_for(lambda: tcp_banner(self.address, 22, timeout=0.5), 10, interval=0.05,
                 what=f"ssh on {self.name} after network restore")

    def reboot(self, boot_timeout: float = 60) -> None:
        """Power the box off cleanly and boot it again on the same disk (upper dir).

        Like a real reboot: tmpfs (/run, so also the fake nvidia-smi state) is lost, enabled
        units start again, the host keys stay the same.
        """
        with self._mu:
            if self.stopped:
                raise RuntimeError(f"rig {self.name} is stopped")
            self.wait_running(boot_timeout)
            old, self.popen = self.popen, None  # the watcher of `old` now stands aside
            if old is not None:
                _terminate_nspawn(old.pid, self.leader, old)
            self.leader = None
            self._spawn(boot_timeout)

    def stop(self, fast: bool = True) -> None:
        """Tear the box down: container, netns/veth, propagate dir, overlay dir, locks."""
        with self._mu:
            if self.stopped:
                return
            self.stopped = True
            self._changed.notify_all()
        if self.popen is not None:
            if fast and self.leader and self.popen.poll() is None:
                # The disk is thrown away anyway: SIGKILL to the container's init takes the
                # whole pid namespace down at once, and nspawn exits right after.
                try:
                    os.kill(self.leader, signal.SIGKILL)
                    self.popen.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            _terminate_nspawn(self.popen.pid, self.leader, self.popen)
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        _remove_network(self.name)
        shutil.rmtree(self.dir, ignore_errors=True)
        (_names_dir() / f"{self.name}.json").unlink(missing_ok=True)
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds.clear()


def default_gpus_json(gpus: Optional[list]) -> Optional[str]:
    if gpus is None:
        return None
    return json.dumps(gpus, indent=2) + "\n"


def boot_rig(base: Path, client_pubkey: str, known_hosts_dir: Path, client_key: Path,
             name: Optional[str] = None, gpus: Optional[list] = None,
             fake_nvidia_smi: bool = True, boot_timeout: float = 60,
             capabilities: tuple = ()) -> NspawnRig:
    """Boot a Tier B rig from ``base``; returns once its sshd sends a banner. ``capabilities``:
    extra ones for the box (``("CAP_NET_ADMIN",)`` lets it load nft tables in its own netns)."""
    t0 = time.monotonic()
    name, name_fd = _alloc_name(name)
    fds = [name_fd]
    try:
        n, net_fd = _alloc_net()
        fds.append(net_fd)
        rdir = WORK_ROOT / "rigs" / name
        shutil.rmtree(rdir, ignore_errors=True)
        nr = NspawnRig(name=name, n=n, dir=rdir, base=base, _lock_fds=fds, capabilities=tuple(capabilities))
        upper = nr.upper
        (upper / "etc/ssh").mkdir(parents=True)
        os.chmod(rdir, 0o700)
        os.chmod(upper, 0o755)  # becomes the rig's "/": must be 0755 root
        nr._record()

        # identity
        _host_keys(upper)
        _write(upper / "etc/hostname", f"{name}\n")
        _write(upper / "etc/hosts",
               f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n"
               "::1\tlocalhost ip6-localhost ip6-loopback\n"
               "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
        _write(upper / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        # login keys: root and the sudo user
        _write(upper / "root/.ssh/authorized_keys", client_pubkey.strip() + "\n", 0o600)
        os.chmod(upper / "root", 0o700)
        os.chmod(upper / "root/.ssh", 0o700)
        uid, gid, home = _passwd_entry(base, SUDO_USER)
        uhome = upper / home.lstrip("/")
        uhome.mkdir(parents=True, exist_ok=True)
        shutil.copystat(base / home.lstrip("/"), uhome)
        os.chown(uhome, uid, gid)
        _write(uhome / ".ssh/authorized_keys", client_pubkey.strip() + "\n", 0o600, uid, gid)
        os.chmod(uhome / ".ssh", 0o700)
        os.chown(uhome / ".ssh", uid, gid)
        # apt through the host's apt-cacher-ng; repos served on the host itself (the stand-in
        # NVIDIA repo, tests/rigs/nvidia_repo.py) are reached directly
        _write(upper / "etc/apt/apt.conf.d/01proxy",
               f'Acquire::http::Proxy "http://{PROXY_ADDR}:{PROXY_PORT}";\n'
               f'Acquire::http::Proxy::{PROXY_ADDR} "DIRECT";\n')
        if fake_nvidia_smi:
            _write(upper / "usr/bin/nvidia-smi", FAKE_NVIDIA_SMI.read_text(), 0o755)
        if gpus is not None:
            _write(upper / "etc/fake-nvidia-smi/gpus.json", default_gpus_json(gpus))

        host_keys = []
        for pub in sorted((upper / "etc/ssh").glob("ssh_host_*_key.pub")):
            ktype, kdata = pub.read_text().split()[:2]
            host_keys.append(f"10.250.{n}.2 {ktype} {kdata}\n")
        known_hosts = known_hosts_dir / f"{name}.known_hosts"
        _write(known_hosts, "".join(host_keys), 0o644)

        _setup_network(name, n)
        nr._spawn(boot_timeout)
    except BaseException:
        _cleanup_stale(name)
        for fd in fds:
            os.close(fd)
        raise
    nr.boot_s = time.monotonic() - t0
    nr.rig = Rig(name=name, address=nr.address, port=22, user="root", key_file=client_key,
                 known_hosts=known_hosts, host_side=f"10.250.{n}.1", root=None, _sh=nr.sh)
    return nr


@contextlib.contextmanager
def standalone_rig(prefix: str):
    """One Tier B rig outside pytest (the benchmarks): the apt proxy, the base image, a client
    key, the rig; yields (booted rig, temp dir); stops the rig, releases the proxy and removes
    the temp dir after."""
    import tempfile

    from .aptproxy import AptProxy
    from .sshd import make_client_key

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    proxy = AptProxy().acquire()
    nr = None
    try:
        base = build_base_image(proxy_url=proxy.url)
        key, pub = make_client_key(tmp)
        (tmp / "known_hosts").mkdir()
        nr = boot_rig(base, pub, tmp / "known_hosts", key)
        yield nr, tmp
    finally:
        if nr is not None:
            try:
                nr.stop()
            except Exception as e:  # noqa: BLE001
                print(f"teardown of {nr.name}: {e}", file=sys.stderr)
        proxy.release()
        shutil.rmtree(tmp, ignore_errors=True)
