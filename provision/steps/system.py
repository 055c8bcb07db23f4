"""`system`: apt packages to build llama.cpp; NVIDIA's CUDA apt repo (its keyring fetched into a
private temp dir and its key checked against the fingerprint pinned for that repo); the CUDA
toolkit; the driver (`system.driver: require | install`), with kernel headers only when DKMS will
build a module, nouveau blacklisted, Secure Boot explained. A driver change needs a reboot: it is
a planned change (`RebootHost`) that is reported — and done only with `invoke provision --reboot`.
"""
from __future__ import annotations

import base64
import dataclasses
import re
from dataclasses import dataclass, field

from .. import nvidia, reach, readahead
from ..engine import Change, Context, RebootHost, Run, Step, WriteFile
from ..errors import StepError, UnsafeValue
from ..facts import host as hostfacts
from ..facts.gpu import GpuFacts
from ..facts.host import HostFacts
from ..openpgp import KeyringError, primary_fingerprints
from ..target import join, quote
from ..values import proxy_url

APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# a fresh Ubuntu box runs unattended-upgrades right after boot: wait for the dpkg lock instead
# of failing with "Could not get lock /var/lib/dpkg/lock-frontend"
APT_GET = f"{APT_ENV} apt-get -o DPkg::Lock::Timeout=600"
# read last: system.apt_proxy wins over a proxy set by an earlier file in apt.conf.d
PROXY_FILE = "/etc/apt/apt.conf.d/99llama-rig-proxy"
NOUVEAU_FILE = "/etc/modprobe.d/llama-rig-blacklist-nouveau.conf"
NOUVEAU_CONF = "# written by llama-rig: the NVIDIA driver needs the GPUs\nblacklist nouveau\noptions nouveau modeset=0\n"
UBUNTU_2604_DRIVER = "nvidia-driver-595-open"


# ---------------------------------------------------------------------------------------------
# changes


@dataclass
class AptInstall(Change):
    """`apt-get update` (optional) + `apt-get install -- PACKAGES`. A source apt cannot reach is
    one line naming it (`sources`: url prefix -> what it is, e.g. the NVIDIA CUDA repo)."""

    packages: list[str] = field(default_factory=list)
    update: bool = True
    sources: dict[str, str] = field(default_factory=dict)
    proxy: str | None = None
    timeout: float = 3600

    @property
    def commands(self) -> list[str]:
        """The exact command lines, in order (update first when asked for)."""
        install = f"{APT_GET} install -y -q --no-install-recommends -- {join(self.packages)}"
        return [f"{APT_GET} update -q", install] if self.update else [install]

    def apply(self, ctx: Context) -> None:
        t = ctx.target
        host = ctx.host.name
        upd = ""
        if self.update:
            r = t.run(self.commands[0], sudo=True, check=False, timeout=self.timeout)
            upd = r.stdout + "\n" + r.stderr
            if not r.ok:
                raise StepError(reach.apt_unreachable(host, upd, self.sources, self.proxy)
                                or f"apt-get update failed on {host}: {reach.apt_error(upd)}")
        r = t.run(self.commands[-1], sudo=True, check=False, timeout=self.timeout)
        out = r.stdout + "\n" + r.stderr
        if not r.ok:
            why = reach.apt_unreachable(host, upd + "\n" + out, self.sources, self.proxy)
            if why:
                raise StepError(f"{why} — could not install {' '.join(self.packages)}")
            raise StepError(f"cannot install {' '.join(self.packages)}: {reach.apt_error(out)}")
        stale = reach.apt_unreachable(host, upd, self.sources, self.proxy)
        if stale:  # installed anyway (from lists fetched earlier): still worth a line
            ctx.warn(f"apt: {stale}")


@dataclass
class AddCudaRepo(Change):
    """Fetch cuda-keyring into a private temp dir, install it, compare the key(s) in the keyring
    with the pinned fingerprint (a mismatch purges the package and stops), then make sure the
    `.list` points at the configured repo (a mirror serves NVIDIA's keyring unchanged)."""

    repo: str = ""
    keyring_url: str = ""
    fingerprint: str = ""
    list_path: str = ""
    list_line: str = ""
    proxy: str | None = None

    def apply(self, ctx: Context) -> None:
        t = ctx.target
        host = ctx.host.name
        opts = ["-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=1"]
        if self.proxy:
            opts += ["-o", f"Acquire::http::Proxy={self.proxy}"]
        script = "\n".join([
            "d=$(mktemp -d) || exit 1",  # private (0700), an unguessable name: never /tmp/x.deb
            'trap \'rm -rf "$d"\' EXIT',
            f"command -v apt-key >/dev/null 2>&1 && apt-key del {nvidia.OLD_KEY_ID} >/dev/null 2>&1",
            f"{reach.APT_HELPER} {join(opts)} download-file {quote(self.keyring_url)} \"$d/cuda-keyring.deb\" || exit 90",
            'dpkg -i "$d/cuda-keyring.deb" || exit 91',
        ])
        r = t.run(script, sudo=True, check=False, timeout=600)
        out = r.stdout + "\n" + r.stderr
        if r.exited == 90:
            raise StepError(reach.apt_unreachable(host, out, {self.repo: "NVIDIA CUDA repo"}, self.proxy)
                            or f"cannot download {self.keyring_url} on {host}: {reach.apt_error(out)}")
        if not r.ok:
            raise StepError(f"installing {self.keyring_url} failed on {host} (exit {r.exited}): "
                            f"{reach.apt_error(out)}")
        raw = t.run(f"base64 -w0 {quote(nvidia.KEYRING_FILE)}", sudo=True, check=False)
        try:
            found = primary_fingerprints(base64.b64decode(raw.stdout.strip())) if raw.ok else []
        except (KeyringError, ValueError):
            found = []
        if found != [self.fingerprint]:
            t.run(f"dpkg -P {nvidia.KEYRING_PACKAGE}", sudo=True, check=False)
            have = ", ".join(found) if found else "no readable key"
            raise StepError(f"the CUDA repo keyring from {self.keyring_url} holds {have}, not the "
                            f"pinned key {self.fingerprint}: removed it, nothing was installed from "
                            "that repo (a mirror serves NVIDIA's keyring; another repo names its own "
                            "key in system.cuda_repo_key)")
        ctx.say(f"system: {nvidia.KEYRING_FILE}: key {self.fingerprint} (pinned) — ok")
        now = t.read_file(self.list_path, sudo=True)
        if now != self.list_line:
            t.write_file(self.list_path, self.list_line)


# ---------------------------------------------------------------------------------------------
# the plan (pure)


def driver_package(cfg: dict, hf: HostFacts) -> str:
    pkg = cfg["system"]["driver_package"]
    if pkg:
        return pkg
    return UBUNTU_2604_DRIVER if hf.distro in nvidia.OWN_ARCHIVE else nvidia.DRIVER_DEFAULT


def toolkit_package(cfg: dict, hf: HostFacts) -> str:
    pkg = cfg["system"]["cuda_toolkit"]
    if hf.distro in nvidia.OWN_ARCHIVE and nvidia.toolkit_version(pkg):
        return nvidia.OWN_ARCHIVE[hf.distro]  # NVIDIA's versioned name does not exist there
    return pkg


def wanted_archs(cfg: dict, gf: GpuFacts) -> list[tuple[str, tuple[int, int]]]:
    """(what, compute capability) the build is for: the inventory's override or the GPUs found."""
    over = cfg["llama_cpp"]["cuda_architectures"]
    out: list[tuple[str, tuple[int, int]]] = []
    if over not in (None, "auto", [], ["auto"]):
        for a in ([over] if isinstance(over, str) else over):
            for part in str(a).replace(",", ";").split(";"):
                cc = nvidia.parse_cc(part)
                if cc:
                    out.append((f"llama_cpp.cuda_architectures {part.strip()}", cc))
        return out
    for g in gf.gpus:
        cc = nvidia.parse_cc(g.compute_cap or "")
        if cc:
            out.append((f"GPU {g.index} ({g.name}, compute capability {g.compute_cap})", cc))
    return out


def check_toolkit_fits(cfg: dict, hf: HostFacts, gf: GpuFacts, toolkit: str | None) -> None:
    """nvcc's CUDA version (installed, or the package about to be) against the GPUs' compute
    capability: CUDA 13 needs >= 7.5, a new GPU needs a new enough CUDA."""
    if hf.nvcc_path:
        ver, what = nvidia.parse_version(hf.nvcc_version), f"nvcc {hf.nvcc_version} ({hf.nvcc_path})"
        fix = "put a toolkit that supports it first (PATH or /usr/local/cuda), or set llama_cpp.cuda_architectures"
    else:
        ver, what = (nvidia.toolkit_version(toolkit) if toolkit else None), f"system.cuda_toolkit {toolkit}"
        fix = "set system.cuda_toolkit to a toolkit that supports it (e.g. cuda-toolkit-12-8 for GPUs before 7.5)"
    if ver is None:
        return
    for label, cc in wanted_archs(cfg, gf):
        problem = nvidia.cc_problem(ver, cc)
        if problem:
            raise StepError(f"{what} cannot build for {label}: {problem}; {fix}")


def headers_plan(cfg: dict, hf: HostFacts, dkms_build: bool, notes: list[str]) -> list[str]:
    """`linux-headers-<kernel>` when a DKMS module will be built (or asked for) and apt has it."""
    asked = cfg["system"]["kernel_headers"]
    want = dkms_build if asked is None else asked
    name = f"linux-headers-{hf.kernel}"
    if not want or hf.kernel_headers or name in hf.packages or not hf.uses_apt:
        return []
    if hf.headers_candidate is None:
        msg = (f"apt has no {name} for the running kernel (a custom kernel?): DKMS cannot build the "
               "NVIDIA module for it — boot a distribution kernel or install its headers yourself")
        if asked:
            raise StepError(f"system.kernel_headers: {msg}")
        notes.append(msg)
        return []
    return [name]


def headers_may_be_wanted(cfg: dict, hf: HostFacts, gf: GpuFacts) -> bool:
    """Whether `headers_plan` may look at apt's candidate (a superset of when it does): only then
    is apt asked (`hostfacts.headers_candidate`)."""
    name = f"linux-headers-{hf.kernel}"
    if hf.kernel_headers or name in hf.packages or not hf.uses_apt:
        return False
    asked = cfg["system"]["kernel_headers"]
    if asked is not None:
        return bool(asked)
    return cfg["gpus"]["count"] > 0 and not gf.available and cfg["system"]["driver"] == "install"


def nouveau_changes(hf: HostFacts) -> list[Change]:
    if not hf.nouveau_loaded or hf.nouveau_blacklisted:
        return []
    return [WriteFile("blacklist nouveau (it holds the GPUs the NVIDIA driver needs)",
                      path=NOUVEAU_FILE, content=NOUVEAU_CONF, before=None),
            Run("rebuild the initramfs without nouveau", commands=[
                "if command -v update-initramfs >/dev/null; then update-initramfs -u; fi"], timeout=900)]


def driver_problem(cfg: dict, hf: HostFacts, gf: GpuFacts) -> str:
    """Why the driver does not answer, and what to do (one line)."""
    hints = []
    installed = nvidia.driver_packages(hf.packages)
    if hf.secure_boot and not hf.mok_enrolled and installed:
        hints.append(nvidia.secure_boot_help())
    if hf.nouveau_loaded and not hf.nouveau_blacklisted:
        hints.append("nouveau (the open-source driver) is loaded: system.driver: install blacklists "
                     "it, or blacklist it yourself and reboot")
    if installed:
        hints.append(f"{', '.join(installed)} installed but not loaded: reboot it (with system.driver: "
                     "install, provision --reboot does)")
    else:
        hints.append("install it: set system.driver: install (nvidia-open from NVIDIA's repo), or "
                     "install a driver yourself and reboot")
    return f"the NVIDIA driver does not answer ({gf.reason}) — " + "; ".join(hints)


def plan(cfg: dict, hf: HostFacts, gf: GpuFacts, proxy_now: str | None = None,
         notes: list[str] | None = None) -> list[Change]:
    """Facts in, changes out (pure). `notes` collects one-line warnings (no change needed)."""
    notes = notes if notes is not None else []
    sysc = cfg["system"]
    changes: list[Change] = []
    proxy = sysc["apt_proxy"]
    if proxy:
        if proxy_url(proxy):  # the inventory refused it already; never a second line
            raise UnsafeValue(f"system.apt_proxy: {proxy_url(proxy)}")
        want = f'Acquire::http::Proxy "{proxy}";\n'
        if proxy_now != want:
            changes.append(WriteFile(f"apt proxy {proxy}", path=PROXY_FILE, content=want,
                                     before=proxy_now))

    # -- what the CUDA side needs ---------------------------------------------------------------
    cuda = cfg["llama_cpp"]["cuda"]
    toolkit = toolkit_package(cfg, hf) if cuda and not hf.nvcc_path else None
    if cuda:
        check_toolkit_fits(cfg, hf, gf, toolkit or sysc["cuda_toolkit"])
    if toolkit is not None and not sysc["cuda_toolkit"]:
        raise StepError("nvcc not found and system.cuda_toolkit is not set (install CUDA yourself "
                        "or name a toolkit package, e.g. cuda-toolkit-12-8)")
    gpus_wanted = cfg["gpus"]["count"] > 0
    installed_drivers = nvidia.driver_packages(hf.packages)
    driver_pkg = driver_package(cfg, hf)
    install_driver = (gpus_wanted and not gf.available and sysc["driver"] == "install"
                      and not installed_drivers)
    reboot: RebootHost | None = None
    if gpus_wanted and not gf.available and not install_driver:
        if installed_drivers and (sysc["driver"] == "install" or hf.reboot_required):
            if hf.secure_boot and not hf.mok_enrolled:
                raise StepError(driver_problem(cfg, hf, gf))
            reboot = RebootHost(f"reboot {'' if not hf.reboot_required else '(reboot required) '}to load "
                                f"the NVIDIA driver ({', '.join(installed_drivers)} installed, not loaded)",
                                after=driver_problem(cfg, hf, gf))
        else:
            raise StepError(driver_problem(cfg, hf, gf))
    if install_driver:
        if hf.secure_boot and not hf.mok_enrolled:
            raise StepError(nvidia.secure_boot_help())
        if hf.distro == "debian13" and re.search(r"-580(\D|$)", driver_pkg):
            raise StepError(f"system.driver_package {driver_pkg}: NVIDIA's debian13 repo has no 580 "
                            "branch; use nvidia-open (the newest branch) or install 580 yourself")

    # -- packages (+ kernel headers when DKMS will build the module) ----------------------------
    pkgs = list(dict.fromkeys([*sysc["packages"], *sysc["extra_packages"]]))
    missing = [p for p in pkgs if p not in hf.packages]
    missing += [h for h in headers_plan(cfg, hf, install_driver, notes) if h not in missing]
    needs_apt = bool(missing) or toolkit is not None or install_driver
    if needs_apt and not hf.uses_apt:
        what = " ".join(missing + ([toolkit] if toolkit else []) + ([driver_pkg] if install_driver else []))
        raise StepError(f"{hf.os_pretty} is not Debian or Ubuntu (no apt): install {what} yourself"
                        + (", then run again" if toolkit or install_driver else
                           ", or list what you have in system.packages"))
    if missing:
        changes.append(AptInstall(f"install packages: {' '.join(missing)}", packages=missing,
                                  proxy=proxy, timeout=3600))

    # -- NVIDIA's repo: keyring checked against the pinned key, the .list at cuda_repo ----------
    repo_changes, repo_sources = cuda_repo_plan(cfg, hf, toolkit is not None or install_driver)
    changes += repo_changes
    if install_driver:
        changes += nouveau_changes(hf)
    if toolkit is not None:
        changes.append(AptInstall(f"install {toolkit} (nvcc missing)", packages=[toolkit],
                                  sources=repo_sources, proxy=proxy, timeout=7200))
    if install_driver:
        changes.append(AptInstall(f"install the NVIDIA driver {driver_pkg}", packages=[driver_pkg],
                                  update=toolkit is None, sources=repo_sources, proxy=proxy,
                                  timeout=3600))
        reboot = RebootHost(f"reboot to load the new NVIDIA driver ({driver_pkg})",
                            after=f"the NVIDIA driver ({driver_pkg}) still does not answer after the "
                                  "reboot: check `dmesg | grep -i nvidia` and `dkms status` on the host")
    elif reboot is not None:
        changes += nouveau_changes(hf)
    if reboot is not None:
        changes.append(reboot)
    return changes


def cuda_repo_plan(cfg: dict, hf: HostFacts, needed: bool) -> tuple[list[Change], dict[str, str]]:
    """The keyring (when something from the repo is to be installed and it is not there) and the
    `.list`; an installed keyring whose key is not the pinned one stops the step."""
    sysc = cfg["system"]
    distro = hf.distro
    if distro in nvidia.OWN_ARCHIVE:
        return [], {}
    keyring_there = nvidia.KEYRING_PACKAGE in hf.packages and hf.cuda_keyring_fprs is not None
    if not needed and not keyring_there:
        return [], {}
    pinned = nvidia.pinned_key(distro, sysc["cuda_repo_key"])
    if distro not in nvidia.REPO_KEYS and not sysc["cuda_repo_key"]:
        if not needed:
            return [], {}
        raise StepError(f"NVIDIA has no apt repo for {hf.os_pretty} ({distro}; it has "
                        f"{', '.join(sorted(nvidia.REPO_KEYS))}, and Ubuntu 26.04 carries CUDA "
                        "itself): install the CUDA toolkit / driver yourself (nvcc on PATH or under "
                        "/usr/local/cuda) and run again")
    if hf.arch not in nvidia.REPO_ARCH:
        raise StepError(f"no NVIDIA apt repo for CPU architecture {hf.arch!r} "
                        f"(it has {', '.join(nvidia.REPO_ARCH)})")
    url = nvidia.repo_url(sysc["cuda_repo"], distro, hf.arch)
    list_path = nvidia.sources_path(distro, hf.arch)
    line = nvidia.sources_line(url)
    sources = {url: "NVIDIA CUDA repo"}
    if not keyring_there:
        kurl = nvidia.keyring_url(sysc["cuda_repo"], distro, hf.arch)
        return [AddCudaRepo(f"add the NVIDIA CUDA apt repo {url} (cuda-keyring, key {pinned} pinned)",
                            repo=url, keyring_url=kurl, fingerprint=pinned or "", list_path=list_path,
                            list_line=line, proxy=sysc["apt_proxy"])], sources
    if list(hf.cuda_keyring_fprs or ()) != [pinned]:
        have = ", ".join(hf.cuda_keyring_fprs or ()) or "no readable key"
        raise StepError(f"{nvidia.KEYRING_FILE} (cuda-keyring) holds {have}, not the key pinned for "
                        f"{distro} ({pinned}): remove it (`dpkg -P cuda-keyring`) and run again, or "
                        "name the right key in system.cuda_repo_key")
    now = hf.cuda_lists.get(list_path)
    if now != line:
        return [WriteFile(f"point the CUDA apt source at {url}", path=list_path, content=line,
                          before=now)], sources
    return [], sources


# ---------------------------------------------------------------------------------------------
# the step


readahead.wants(lambda ctx: readahead.Want(read=[PROXY_FILE] if ctx.cfg["system"]["apt_proxy"] else []))


class SystemStep(Step):
    name = "system"
    title = "packages, CUDA repo + toolkit, driver, kernel headers"

    def plan(self, ctx: Context) -> list[Change]:
        hf = hostfacts.host_facts(ctx)
        gf = hostfacts.gpu(ctx)
        if headers_may_be_wanted(ctx.cfg, hf, gf):
            hf = dataclasses.replace(hf, headers_candidate=hostfacts.headers_candidate(ctx))
        proxy_now = readahead.read_file(ctx, PROXY_FILE) if ctx.cfg["system"]["apt_proxy"] else None
        notes: list[str] = []
        changes = dpkg_repair(dpkg_interrupted(ctx)) + plan(ctx.cfg, hf, gf, proxy_now, notes)
        if hf.reboot_required and not any(isinstance(c, RebootHost) for c in changes):
            notes.append("a reboot is pending (" + (", ".join(hf.reboot_packages) or "/var/run/reboot-required")
                         + "): llama-rig reboots only to load a driver (provision --reboot); "
                         "reboot when the rig may go down")
        for n in notes:
            ctx.warn(f"system: {n}")
        if ctx.check:
            probe_for_check(ctx, changes)
        return changes

    def verify(self, ctx: Context) -> None:
        hostfacts.invalidate(ctx)
        hf = hostfacts.host_facts(ctx)
        pkgs = list(dict.fromkeys([*ctx.cfg["system"]["packages"], *ctx.cfg["system"]["extra_packages"]]))
        still = [p for p in pkgs if p not in hf.packages]
        if still:
            raise StepError(f"packages still missing after install: {' '.join(still)}")
        if ctx.cfg["llama_cpp"]["cuda"] and not hf.nvcc_path:
            raise StepError("nvcc still not found after installing the CUDA toolkit (looked on PATH, "
                            "in /usr/local/cuda/bin and /usr/local/cuda-*/bin)")
        if ctx.cfg["llama_cpp"]["cuda"]:
            ctx.say(f"system: CUDA toolkit {hf.nvcc_version} at {hf.cuda_home} (nvcc {hf.nvcc_path})")


DPKG_REPAIR = f"{APT_ENV} dpkg --force-confdef --force-confold --configure -a"


def dpkg_interrupted(ctx: Context) -> str:
    """Why dpkg must finish an interrupted run first (an install stopped half-way: Ctrl-C, a
    dropped link, a power cut), or "". Read with the host's facts (facts/host.py), in the same
    read-only round trip."""
    return hostfacts.host_facts(ctx).dpkg_interrupted


def dpkg_repair(why: str) -> list[Change]:
    """The change that finishes an interrupted dpkg run, before anything else uses apt."""
    return [Run(f"repair: {why}: dpkg --configure -a", commands=[DPKG_REPAIR], timeout=3600)] if why else []


def probe_for_check(ctx: Context, changes: list[Change]) -> None:
    """--check: what the plan would download from, reached the read-only way (an InRelease per
    source, or the keyring URL). Unreachable -> StepError, one line."""
    apt = [c for c in changes if isinstance(c, AptInstall)]
    repo = [c for c in changes if isinstance(c, AddCudaRepo)]
    if not apt and not repo:
        return
    t = ctx.target
    proxy = ctx.cfg["system"]["apt_proxy"]
    known: dict[str, str] = {}
    for c in apt:
        known.update(c.sources)
    urls: list[str] = []
    if apt:
        r = t.run("apt-get update --print-uris", sudo=True, check=False, timeout=120)
        urls = reach.print_uris_sources(r.stdout)
    for c in repo:
        known[c.repo] = "NVIDIA CUDA repo"
        urls.append(c.keyring_url)
    if not urls:
        return
    r = t.run(reach.apt_probe_script(urls, proxy), sudo=True, check=False, timeout=60 + 20 * len(urls))
    why = reach.apt_unreachable(ctx.host.name, r.stdout + "\n" + r.stderr, known, proxy)
    if why:
        raise StepError(why)
    ctx.say(f"system: reached {len(urls)} apt source{'s' if len(urls) != 1 else ''} (read-only probe)")
