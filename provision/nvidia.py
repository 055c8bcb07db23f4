"""What llama-rig knows about NVIDIA's apt repos, CUDA toolkits, drivers and GPUs (pure data and
functions; the system step uses them). Sources: /work/shared/reference/nvidia-install.md.

- Repos: `<cuda_repo>/<distro>/<arch>/`, flat (`deb [signed-by=…] URL /`), for ubuntu2204,
  ubuntu2404, debian12 and debian13; the `cuda-keyring` package installs the key and the `.list`.
  Ubuntu 26.04 carries `cuda-toolkit` and the driver in its own archive.
- Each repo's signing key is pinned here by its full fingerprint; a mirror of NVIDIA's repo serves
  NVIDIA's keyring, a stand-in or private repo names its own key in `system.cuda_repo_key`.
- CUDA 13 builds for compute capability 7.5 and newer only; new GPUs need a new enough CUDA.
"""
from __future__ import annotations

import re

DEFAULT_REPO = "https://developer.download.nvidia.com/compute/cuda/repos"
KEYRING_PACKAGE = "cuda-keyring"
KEYRING_DEB = "cuda-keyring_1.1-1_all.deb"  # the 1.0-1 URL is 404 on ubuntu2404
KEYRING_FILE = "/usr/share/keyrings/cuda-archive-keyring.gpg"
OLD_KEY_ID = "7fa2af80"  # rotated in 2022; still in many old apt keyrings

# NVIDIA's repo keys (long IDs …3BF863CC and …8793F200). 3BF863CC: NVIDIA's SIGNATURES.md and
# every public install recipe. 8793F200 (the debian13 repo's new key): taken from public install
# scripts that check it; confirm against the keyring on a box that can reach NVIDIA.
KEY_3BF863CC = "EB693B3035CD5710E231E123A4B469963BF863CC"
KEY_8793F200 = "02182E60104FCDC26EAE1B8597A5D4CB8793F200"
REPO_KEYS = {
    "ubuntu2204": KEY_3BF863CC,
    "ubuntu2404": KEY_3BF863CC,
    "debian12": KEY_3BF863CC,
    "debian13": KEY_8793F200,  # the debian12/ubuntu2404 repos fail trixie's sqv (SHA-1)
}
OWN_ARCHIVE = {"ubuntu2604": "cuda-toolkit"}  # distro -> its own toolkit package
REPO_ARCH = {"x86_64": "x86_64", "aarch64": "sbsa"}

DRIVER_DEFAULT = "nvidia-open"  # since R615 cuda-drivers lacks the kernel modules
# installed package names that mean "an NVIDIA driver is installed"
_DRIVER_RE = re.compile(r"^(nvidia-open(-\d+)?|nvidia-driver(-\d+)?(-open|-server|-server-open)?|"
                        r"cuda-drivers(-\d+)?|nvidia-kernel(-open)?-dkms|nvidia-dkms(-\d+)?(-open)?|"
                        r"nvidia-kernel-source(-\d+)?(-open)?)$")


def repo_url(base: str, distro: str, arch: str) -> str:
    return f"{base.rstrip('/')}/{distro}/{REPO_ARCH.get(arch, arch)}/"


def keyring_url(base: str, distro: str, arch: str) -> str:
    return repo_url(base, distro, arch) + KEYRING_DEB


def sources_path(distro: str, arch: str) -> str:
    """The `.list` NVIDIA's cuda-keyring installs (llama-rig rewrites it for a mirror)."""
    return f"/etc/apt/sources.list.d/cuda-{distro}-{REPO_ARCH.get(arch, arch)}.list"


def sources_line(url: str) -> str:
    return f"deb [signed-by={KEYRING_FILE}] {url} /\n"


def pinned_key(distro: str, cfg_key: str | None) -> str | None:
    from .openpgp import normalize
    return normalize(cfg_key) if cfg_key else REPO_KEYS.get(distro)


# -- versions ---------------------------------------------------------------------------------

_TOOLKIT_RE = re.compile(r"^cuda-toolkit-(\d+)-(\d+)$")


def toolkit_version(package: str) -> tuple[int, int] | None:
    """`cuda-toolkit-13-0` -> (13, 0); a name without a version -> None."""
    m = _TOOLKIT_RE.match(package)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_version(v: str | None) -> tuple[int, int] | None:
    """`13.0` / `13.0.88` -> (13, 0)."""
    m = re.match(r"^(\d+)\.(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


# oldest compute capability each CUDA major still compiles for (NVIDIA release notes)
MIN_CC = {11: (3, 5), 12: (5, 0), 13: (7, 5)}
# the first CUDA that knows a compute capability
CC_SINCE = {(8, 0): (11, 0), (8, 6): (11, 1), (8, 7): (11, 4), (8, 9): (11, 8), (9, 0): (11, 8),
            (10, 0): (12, 8), (12, 0): (12, 8)}


def parse_cc(s: str) -> tuple[int, int] | None:
    """`8.6` / `86` / `86-real` / `90a` / `120a-real` -> (major, minor); `native` -> None."""
    s = s.strip()
    m = re.match(r"^(\d+)\.(\d+)$", s)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.match(r"^(\d+?)(\d)[a-z]?(-real|-virtual)?$", s)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cc_problem(cuda: tuple[int, int], cc: tuple[int, int]) -> str | None:
    """Why CUDA `cuda` cannot build for compute capability `cc` (None: it can)."""
    lo = MIN_CC.get(cuda[0])
    if lo and cc < lo:
        return f"CUDA {cuda[0]} builds for compute capability {lo[0]}.{lo[1]} and newer only"
    since = CC_SINCE.get(cc)
    if since and cuda < since:
        return f"compute capability {cc[0]}.{cc[1]} needs CUDA {since[0]}.{since[1]} or newer"
    return None


# -- drivers ----------------------------------------------------------------------------------


def driver_packages(packages: dict[str, str]) -> list[str]:
    """Installed packages that are an NVIDIA driver."""
    return sorted(p for p in packages if _DRIVER_RE.match(p))


def secure_boot_help() -> str:
    return ("Secure Boot is on and no module signing key (MOK) is enrolled, so an unsigned NVIDIA "
            "kernel module would silently fail to load. At the console: create and enroll a key "
            "(Ubuntu: `update-secureboot-policy --new-key` then `update-secureboot-policy "
            "--enroll-key`; Debian: `dkms generate_mok` then `mokutil --import "
            "/var/lib/dkms/mok.pub`), reboot and confirm it in MokManager — or turn Secure Boot "
            "off in the firmware; then run again")
