"""`system`: apt packages to build llama.cpp, the CUDA toolkit from NVIDIA's repo, kernel headers,
and a driver that answers. Reboots are reported, never done."""
from __future__ import annotations

from ..engine import Change, Context, Run, Step, WriteFile
from ..errors import StepError, UnsafeValue
from ..facts import host as hostfacts
from ..facts.gpu import GpuFacts
from ..facts.host import HostFacts
from ..target import join
from ..values import proxy_url

NVIDIA_REPOS = {"ubuntu2204", "ubuntu2404", "debian12"}
NVIDIA_ARCH = {"x86_64": "x86_64", "aarch64": "sbsa"}
APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# a fresh Ubuntu box runs unattended-upgrades right after boot: wait for the dpkg lock instead
# of failing with "Could not get lock /var/lib/dpkg/lock-frontend"
APT_GET = f"{APT_ENV} apt-get -o DPkg::Lock::Timeout=600"
PROXY_FILE = "/etc/apt/apt.conf.d/01llama-rig-proxy"


def wanted_packages(cfg: dict, hf: HostFacts) -> list[str]:
    sysc = cfg["system"]
    pkgs = list(dict.fromkeys([*sysc["packages"], *sysc["extra_packages"]]))
    headers = sysc["kernel_headers"]
    if headers is None:
        headers = cfg["gpus"]["count"] > 0
    if headers and not hf.kernel_headers:
        pkgs.append(f"linux-headers-{hf.kernel}")
    return pkgs


def plan(cfg: dict, hf: HostFacts, gf: GpuFacts, proxy_now: str | None = None) -> list[Change]:
    """Facts in, changes out (pure)."""
    changes: list[Change] = []
    sysc = cfg["system"]
    if sysc["apt_proxy"]:
        if proxy_url(sysc["apt_proxy"]):  # the inventory refused it already; never a second line
            raise UnsafeValue(f"system.apt_proxy: {proxy_url(sysc['apt_proxy'])}")
        want = f'Acquire::http::Proxy "{sysc["apt_proxy"]}";\n'
        if proxy_now != want:
            changes.append(WriteFile(f"apt proxy {sysc['apt_proxy']}", path=PROXY_FILE,
                                     content=want, before=proxy_now))
    missing = [p for p in wanted_packages(cfg, hf) if p not in hf.packages]
    if missing and not hf.uses_apt:
        raise StepError(f"{hf.os_pretty} is not Debian or Ubuntu (no apt): install {' '.join(missing)}"
                        " yourself, or list what you have in system.packages")
    if missing:
        changes.append(Run(f"install packages: {' '.join(missing)}", commands=[
            f"{APT_GET} update -q",
            f"{APT_GET} install -y -q --no-install-recommends -- {join(missing)}",
        ], timeout=3600))
    if cfg["llama_cpp"]["cuda"] and not hf.nvcc_path:
        toolkit = sysc["cuda_toolkit"]
        if not toolkit:
            raise StepError("nvcc not found and system.cuda_toolkit is not set "
                            "(install CUDA yourself or name a toolkit package, e.g. cuda-toolkit-12-8)")
        if hf.distro not in NVIDIA_REPOS:
            raise StepError(f"nvcc not found and NVIDIA's apt repo has no {hf.distro!r} "
                            f"(supported: {', '.join(sorted(NVIDIA_REPOS))}); install CUDA by hand")
        arch = NVIDIA_ARCH.get(hf.arch)
        if arch is None:
            raise StepError(f"no NVIDIA apt repo for CPU architecture {hf.arch!r}")
        if "cuda-keyring" not in hf.packages:
            url = (f"https://developer.download.nvidia.com/compute/cuda/repos/{hf.distro}/{arch}/"
                   "cuda-keyring_1.1-1_all.deb")
            changes.append(Run("add NVIDIA's CUDA apt repo (cuda-keyring)", commands=[
                "apt-key del 7fa2af80 >/dev/null 2>&1 || true",
                f"curl -fsSL -o /tmp/cuda-keyring.deb {url}",
                "dpkg -i /tmp/cuda-keyring.deb && rm -f /tmp/cuda-keyring.deb",
            ]))
        changes.append(Run(f"install {toolkit} (nvcc missing)", commands=[
            f"{APT_GET} update -q",
            f"{APT_GET} install -y -q --no-install-recommends -- {join([toolkit])}",
        ], timeout=7200))
    return changes


def driver_problem(cfg: dict, gf: GpuFacts) -> str | None:
    if cfg["gpus"]["count"] > 0 and not gf.available:
        return (f"the NVIDIA driver does not answer: {gf.reason} — install the driver"
                " (and reboot if it was just installed)")
    return None


class SystemStep(Step):
    name = "system"
    title = "packages, CUDA toolkit, kernel headers, driver"

    def plan(self, ctx: Context) -> list[Change]:
        hf = hostfacts.host_facts(ctx)
        gf = hostfacts.gpu(ctx)
        problem = driver_problem(ctx.cfg, gf)
        if problem:
            raise StepError(problem)
        if hf.reboot_required:
            ctx.warn("reboot required — not rebooting; do it when the rig may go down")
        proxy_now = ctx.target.read_file(PROXY_FILE) if ctx.cfg["system"]["apt_proxy"] else None
        return plan(ctx.cfg, hf, gf, proxy_now)

    def verify(self, ctx: Context) -> None:
        hostfacts.invalidate(ctx, "host")
        hf = hostfacts.host_facts(ctx)
        still = [p for p in wanted_packages(ctx.cfg, hf) if p not in hf.packages]
        if still:
            raise StepError(f"packages still missing after install: {' '.join(still)}")
        if ctx.cfg["llama_cpp"]["cuda"] and not hf.nvcc_path:
            raise StepError("nvcc still not found after installing the CUDA toolkit")
        if hf.reboot_required:
            ctx.warn("reboot required after these changes — llama-rig does not reboot by itself")
