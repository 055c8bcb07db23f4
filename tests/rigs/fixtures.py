"""pytest fixtures for test rigs (registered from the repo-root conftest.py).

* ``rig_keys``     (session)  client key pair: ``(private_key_path, public_key_line)``
* ``sshd``         (function) Tier A sshd on 127.0.0.1:<random>: ``.root_rig``, ``.sudo_rig``
* ``base_image``   (session)  Path of the cached Tier B base image (built on first use)
* ``apt_proxy``    (session)  the shared apt-cacher-ng (``.url``)
* ``rig_factory``  (session)  ``rig_factory(name=None, gpus=None, fake_nvidia_smi=True) -> Rig``;
                              also ``.stop(rig)`` (idempotent), ``.reboot(rig)`` (clean
                              power cycle on the same disk), ``.wait_running(rig)`` (after a
                              ``systemctl reboot`` inside the box, which also works),
                              ``.kill_network(rig)`` / ``.restore_network(rig)`` (packets
                              dropped silently: sessions hang, connects time out),
                              ``.boot_seconds(rig)``. Names: [a-z0-9-], at most 12 chars.
                              Every rig also has user ``rigadmin`` (NOPASSWD sudo, same key):
                              ``rig.as_user("rigadmin")``.
* ``rig``          (function) a fresh Tier B rig, torn down right after the test
* ``session_rig``  (session)  one Tier B rig shared by the whole session (don't break it)
* ``nvidia_repo``  (session)  the stand-in NVIDIA CUDA apt repo (tests/rigs/nvidia_repo.py):
                              ``.base_url`` for system.cuda_repo, ``.fingerprint`` for
                              system.cuda_repo_key, ``.toolkit`` (cuda-toolkit-13-0), ``.info``
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

import pytest

from . import Rig
from .aptproxy import AptProxy
from .nspawn import NspawnRig, boot_rig, build_base_image, sweep_stale, use_base_image
from .sshd import ensure_sudo_user, make_client_key, start_sshd


@pytest.fixture(scope="session")
def rig_keys():
    d = Path(tempfile.mkdtemp(prefix="rig-keys-"))
    try:
        yield make_client_key(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def _rig_sudo_user():
    ensure_sudo_user()
    return "rigadmin"


@pytest.fixture
def sshd(rig_keys, _rig_sudo_user):
    key, pub = rig_keys
    server = start_sshd(key, pub, sudo_user=_rig_sudo_user)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def apt_proxy():
    proxy = AptProxy().acquire()
    try:
        yield proxy
    finally:
        proxy.release()


@pytest.fixture(scope="session")
def base_image(apt_proxy) -> Path:
    base = build_base_image(proxy_url=apt_proxy.url)
    fd = use_base_image(base)  # keeps other sessions from pruning it while we use it
    try:
        yield base
    finally:
        os.close(fd)


class RigFactory:
    """Boots Tier B rigs on demand; everything it made is torn down by :meth:`close`."""

    def __init__(self, base: Path, key_file: Path, pubkey: str, known_hosts_dir: Path) -> None:
        self.base = base
        self.key_file = key_file
        self.pubkey = pubkey
        self.known_hosts_dir = known_hosts_dir
        self._rigs: dict[str, NspawnRig] = {}
        self._lock = threading.Lock()

    def __call__(self, name: Optional[str] = None, gpus: Optional[list] = None,
                 fake_nvidia_smi: bool = True, capabilities: tuple = ()) -> Rig:
        nr = boot_rig(self.base, self.pubkey, self.known_hosts_dir, self.key_file, name=name,
                      gpus=gpus, fake_nvidia_smi=fake_nvidia_smi, capabilities=capabilities)
        with self._lock:
            self._rigs[nr.name] = nr
        return nr.rig

    def _get(self, rig: Rig | str) -> NspawnRig:
        name = rig if isinstance(rig, str) else rig.name
        try:
            return self._rigs[name]
        except KeyError:
            raise KeyError(f"rig {name!r} was not made by this factory (or already stopped)")

    def stop(self, rig: Rig | str) -> None:
        """Tear the rig down now (idempotent: stopping a stopped rig does nothing)."""
        name = rig if isinstance(rig, str) else rig.name
        with self._lock:
            nr = self._rigs.pop(name, None)
        if nr is None:
            return
        nr.stop()
        nr.rig.known_hosts.unlink(missing_ok=True)

    def reboot(self, rig: Rig | str) -> None:
        """Clean poweroff + boot on the same disk: /run (tmpfs) is reset, enabled units rerun."""
        self._get(rig).reboot()

    def wait_running(self, rig: Rig | str, timeout: float = 90) -> None:
        """Wait for a box that rebooted itself (``systemctl reboot`` inside) to be back.

        ``rig.sh`` already waits on its own once the reboot has begun; this is for the
        moment right after the request, while the old system is still shutting down.
        """
        nr = self._get(rig)
        nr.wait_running(timeout)

    def kill_network(self, rig: Rig | str) -> None:
        """Cut the rig's network (its veth end goes down): packets are dropped silently, so
        established SSH sessions hang and new connections time out. Undo with restore_network."""
        self._get(rig).kill_network()

    def restore_network(self, rig: Rig | str) -> None:
        self._get(rig).restore_network()

    def boot_seconds(self, rig: Rig | str) -> float:
        return self._get(rig).boot_s

    def close(self) -> None:
        with self._lock:
            rigs, self._rigs = list(self._rigs.values()), {}
        errors = []
        for nr in rigs:
            try:
                nr.stop()
            except Exception as e:  # keep tearing down the others
                errors.append(f"{nr.name}: {e!r}")
        if errors:
            raise RuntimeError("rig teardown failed: " + "; ".join(errors))


@pytest.fixture(scope="session")
def rig_factory(base_image, apt_proxy, rig_keys):
    key, pub = rig_keys
    sweep_stale()  # leftovers of a killed session (nspawn, netns, veth, overlay dirs)
    kh_dir = Path(tempfile.mkdtemp(prefix="rig-known-hosts-"))
    factory = RigFactory(base_image, key, pub, kh_dir)
    atexit.register(factory.close)  # safety net if the session dies without teardown
    try:
        yield factory
    finally:
        try:
            factory.close()
        finally:
            atexit.unregister(factory.close)
            shutil.rmtree(kh_dir, ignore_errors=True)


@pytest.fixture
def rig(rig_factory):
    r = rig_factory()
    try:
        yield r
    finally:
        rig_factory.stop(r)


@pytest.fixture(scope="session")
def session_rig(rig_factory):
    """One rig for the whole session, for read-mostly tests (cheaper than ``rig``)."""
    return rig_factory()


@pytest.fixture(scope="session")
def nvidia_repo(apt_proxy):
    """The stand-in NVIDIA CUDA apt repo, served on the apt proxy's address (every rig reaches it,
    DIRECT). Built from NVIDIA's PyPI wheels on first use (cached)."""
    from .nvidia_repo import serve
    repo = serve()
    try:
        yield repo
    finally:
        repo.stop()
