"""OS, kernel, CPU, memory, disk, the CUDA toolkit, installed packages, and what decides how a
driver can be installed (Secure Boot, nouveau, kernel headers) — one remote command."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from . import gpu as gpu_facts
from .. import sections


@dataclass(frozen=True)
class HostFacts:
    os_id: str
    os_version: str
    os_codename: str
    os_pretty: str
    kernel: str
    arch: str
    cpus: int
    cpu_model: str
    mem_total_kib: int
    disk_path: str  # the existing directory at/above the models dir that was measured
    disk_free_bytes: int
    nvcc_path: str | None
    nvcc_version: str | None  # "12.8"
    gcc_version: str | None
    cmake_version: str | None
    packages: dict[str, str] = field(default_factory=dict)  # installed name -> version
    reboot_required: bool = False
    reboot_packages: tuple[str, ...] = ()
    kernel_headers: bool = False
    is_systemd: bool = False
    os_like: str = ""  # ID_LIKE: "debian" for Ubuntu, Mint, ...
    # where the CUDA toolkit is: nvcc on PATH, else /usr/local/cuda, else the newest
    # /usr/local/cuda-X.Y (NVIDIA's packages do not put nvcc on a non-login shell's PATH)
    cuda_home: str | None = None
    secure_boot: bool | None = None  # None: cannot tell (no mokutil, no EFI variables)
    mok_enrolled: bool = False  # a DKMS/shim module signing key is enrolled
    nouveau_loaded: bool = False
    nouveau_blacklisted: bool = False
    headers_candidate: str | None = None  # apt's candidate for linux-headers-<kernel>; None: none
    cuda_keyring_fprs: tuple[str, ...] | None = None  # primary keys in the cuda keyring (None: absent)
    cuda_lists: dict[str, str] = field(default_factory=dict)  # /etc/apt/sources.list.d/cuda-*.list
    nvidia_module: str | None = None  # first line of /proc/driver/nvidia/version (module loaded)
    # why dpkg must finish an interrupted run first ("" when it need not): see dpkg_interrupted()
    dpkg_interrupted: str = ""

    @property
    def uses_apt(self) -> bool:
        return self.os_id in ("debian", "ubuntu") or bool({"debian", "ubuntu"} & set(self.os_like.split()))

    @property
    def distro(self) -> str:
        """NVIDIA's repo name: ubuntu2204, ubuntu2404, debian12, ..."""
        return f"{self.os_id}{self.os_version.replace('.', '')}"


SECTIONS = ("os", "kernel", "arch", "cpu", "mem", "disk", "nvcc", "gcc", "cmake", "packages",
            "reboot", "headers", "init", "headers_candidate", "secureboot", "mok", "nouveau",
            "cuda_keyring", "cuda_lists", "nvidia_module", "dpkg_journal", "dpkg_audit")
KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
MOK_KEYS = ("/var/lib/dkms/mok.pub", "/var/lib/shim-signed/mok/MOK.der")


def script(models_dir: str) -> str:
    d = shlex.quote(models_dir)
    return "; ".join([
        "export LC_ALL=C",
        "echo '@@os'; cat /etc/os-release 2>/dev/null",
        "echo '@@kernel'; uname -r",
        "echo '@@arch'; uname -m",
        "echo '@@cpu'; nproc; grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-",
        "echo '@@mem'; grep MemTotal /proc/meminfo",
        f"echo '@@disk'; d={d}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); done; echo \"$d\"; df -PB1 \"$d\" | tail -n 1",
        # nvcc on PATH first (what the user chose), then NVIDIA's link, then the newest versioned dir
        "echo '@@nvcc'; for p in \"$(command -v nvcc 2>/dev/null)\" /usr/local/cuda/bin/nvcc "
        "$(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -rV); do "
        "[ -n \"$p\" ] && [ -x \"$p\" ] && { echo \"$p\"; \"$p\" --version 2>/dev/null | grep -i release; "
        # the toolkit's own bin dir, even behind a wrapper script (a dry run compiles nothing)
        "\"$p\" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\\$ _HERE_=/here /p'; break; }; done",
        "echo '@@gcc'; gcc -dumpfullversion 2>/dev/null",
        "echo '@@cmake'; cmake --version 2>/dev/null | head -n 1",
        "echo '@@packages'; dpkg-query -W -f='${Package}\\t${db:Status-Abbrev}\\t${Version}\\n' 2>/dev/null",
        "echo '@@reboot'; if [ -e /var/run/reboot-required ]; then echo yes; cat /var/run/reboot-required.pkgs 2>/dev/null; fi",
        "echo '@@headers'; [ -e /lib/modules/$(uname -r)/build ] && echo yes",
        "echo '@@init'; [ -d /run/systemd/system ] && echo systemd",
        "echo '@@secureboot'; if command -v mokutil >/dev/null 2>&1; then mokutil --sb-state 2>&1; "
        "else for f in /sys/firmware/efi/efivars/SecureBoot-*; do [ -r \"$f\" ] && "
        "od -An -t u1 \"$f\" | awk '{print \"efivar \" $NF}'; done; fi",
        "echo '@@mok'; command -v mokutil >/dev/null 2>&1 && for k in " + " ".join(MOK_KEYS)
        + "; do [ -e \"$k\" ] && mokutil --test-key \"$k\" 2>&1; done",
        "echo '@@nouveau'; [ -d /sys/module/nouveau ] && echo loaded; "
        "grep -lsE '^[[:space:]]*blacklist[[:space:]]+nouveau' /etc/modprobe.d/*.conf "
        "/usr/lib/modprobe.d/*.conf /lib/modprobe.d/*.conf 2>/dev/null | head -n 1 | sed 's/^/blacklisted /'",
        f"echo '@@cuda_keyring'; [ -r {KEYRING} ] && base64 -w0 {KEYRING} && echo",
        "echo '@@cuda_lists'; for f in /etc/apt/sources.list.d/cuda-*.list; do [ -f \"$f\" ] && "
        "{ echo \"@file $f\"; cat \"$f\"; }; done",
        "echo '@@nvidia_module'; head -n 1 /proc/driver/nvidia/version 2>/dev/null",
        # an install stopped half-way (Ctrl-C, a dropped link, a power cut): dpkg's journal and
        # the packages it left unpacked or half-configured
        "echo '@@dpkg_journal'; ls -A /var/lib/dpkg/updates 2>/dev/null | head -n 3",
        "echo '@@dpkg_audit'; dpkg --audit 2>/dev/null | head -n 8",
        "true",
    ])


def parse(output: str) -> HostFacts:
    s = sections.split(output, SECTIONS)
    osr = {}
    for line in s["os"]:
        if "=" in line:
            k, v = line.split("=", 1)
            osr[k] = v.strip().strip('"')
    cpu = s["cpu"]
    mem = re.search(r"(\d+)", " ".join(s["mem"]))
    disk_path = s["disk"][0] if s["disk"] else "/"
    free = 0
    if len(s["disk"]) > 1:
        cols = s["disk"][1].split()
        if len(cols) >= 4 and cols[3].isdigit():
            free = int(cols[3])
    nvcc_path = nvcc_ver = None
    if s["nvcc"]:
        nvcc_path = s["nvcc"][0].strip() or None
        m = re.search(r"release ([0-9.]+)", " ".join(s["nvcc"][1:]))
        nvcc_ver = m.group(1) if m else None
    cm = re.search(r"version ([0-9][^\s]*)", " ".join(s["cmake"]))
    pkgs = {}
    for line in s["packages"]:
        parts = line.split("\t")
        # db:Status-Abbrev: desired (i/h/r/p/u), status (i = installed), error flag. "hi " is a
        # held package that IS installed; "rc " (config files only) and "iU " are not.
        if len(parts) == 3 and parts[1][1:2] == "i":
            pkgs[parts[0].split(":")[0]] = parts[2]
    reboot = bool(s["reboot"]) and s["reboot"][0] == "yes"
    nvcc_home = None
    here = [ln[5:].strip() for ln in s["nvcc"] if ln.startswith("here ")]
    if here and here[0].rstrip("/").endswith("/bin"):
        nvcc_home = here[0].rstrip("/")[: -len("/bin")] or None
    elif nvcc_path and nvcc_path.endswith("/bin/nvcc"):
        nvcc_home = nvcc_path[: -len("/bin/nvcc")] or None
    return HostFacts(
        os_id=osr.get("ID", "unknown"), os_version=osr.get("VERSION_ID", ""),
        os_codename=osr.get("VERSION_CODENAME", ""), os_pretty=osr.get("PRETTY_NAME", "unknown"),
        kernel=(s["kernel"] or [""])[0].strip(), arch=(s["arch"] or [""])[0].strip(),
        cpus=int(cpu[0]) if cpu and cpu[0].strip().isdigit() else 0,
        cpu_model=cpu[1].strip() if len(cpu) > 1 else "",
        mem_total_kib=int(mem.group(1)) if mem else 0,
        disk_path=disk_path, disk_free_bytes=free, nvcc_path=nvcc_path, nvcc_version=nvcc_ver,
        gcc_version=(s["gcc"] or [None])[0], cmake_version=cm.group(1) if cm else None,
        packages=pkgs, reboot_required=reboot,
        reboot_packages=tuple(p.strip() for p in s["reboot"][1:] if p.strip()) if reboot else (),
        kernel_headers=bool(s["headers"]) and s["headers"][0] == "yes",
        is_systemd=bool(s["init"]) and s["init"][0] == "systemd",
        os_like=osr.get("ID_LIKE", ""),
        cuda_home=nvcc_home,
        secure_boot=_secure_boot(s["secureboot"]),
        mok_enrolled=any("is already enrolled" in ln for ln in s["mok"]),
        nouveau_loaded="loaded" in [ln.strip() for ln in s["nouveau"]],
        nouveau_blacklisted=any(ln.startswith("blacklisted ") for ln in s["nouveau"]),
        headers_candidate=_candidate(s["headers_candidate"]),
        cuda_keyring_fprs=_keyring(s["cuda_keyring"]),
        cuda_lists=_lists(s["cuda_lists"]),
        nvidia_module=(s["nvidia_module"] or [None])[0] or None,
        dpkg_interrupted=dpkg_interrupted(s["dpkg_journal"], s["dpkg_audit"]),
    )


def dpkg_interrupted(journal: list[str], audit: list[str]) -> str:
    """Why dpkg must finish an interrupted run first, or "": a non-empty journal in
    /var/lib/dpkg/updates, or `dpkg --audit` naming packages left unpacked or half-configured."""
    if "".join(journal).split():
        return "dpkg was interrupted (/var/lib/dpkg/updates is not empty)"
    pkgs = [ln.split()[0] for ln in audit if ln.startswith(" ") and ln.split()]
    if "".join(audit).strip():
        return "dpkg --audit: packages left half-installed" + (f" ({' '.join(pkgs[:5])})" if pkgs else "")
    return ""


def _secure_boot(lines: list[str]) -> bool | None:
    text = " ".join(lines).lower()
    if "secureboot enabled" in text or re.search(r"\befivar 1\b", text):
        return True
    if "secureboot disabled" in text or "doesn't support secure boot" in text or "efivar 0" in text:
        return False
    return None  # no mokutil and no EFI variables: BIOS boot, a container, or unknown


def _candidate(lines: list[str]) -> str | None:
    c = lines[0].strip() if lines else ""
    return None if not c or c == "(none)" else c


def _keyring(lines: list[str]) -> tuple[str, ...] | None:
    if not lines or not lines[0].strip():
        return None
    import base64
    import binascii
    from ..openpgp import KeyringError, primary_fingerprints
    try:
        return tuple(primary_fingerprints(base64.b64decode(lines[0].strip())))
    except (KeyringError, binascii.Error, IndexError):
        return ()  # there, but not a keyring: matches no pinned key


def _lists(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    cur = None
    for ln in lines:
        if ln.startswith("@file "):
            cur = ln[6:].strip()
            out[cur] = ""
        elif cur:
            out[cur] += ln + "\n"
    return out


def gather(target, models_dir: str) -> HostFacts:
    return parse(target.run(script(models_dir), check=False).stdout)


def host_facts(ctx) -> HostFacts:
    """Cached per run."""
    return ctx.fact("host", lambda: gather(ctx.target, ctx.cfg["model"]["dir"]))


def gpu(ctx) -> gpu_facts.GpuFacts:
    return ctx.fact("gpu", lambda: gpu_facts.gather(ctx.target))


def host_and_gpu(ctx, read_ahead: bool = False) -> tuple[HostFacts, gpu_facts.GpuFacts]:
    """Both, in ONE remote command when neither is cached yet, the GPU query running beside the
    host's (the facts step: a no-op run reads everything in one session). `read_ahead`: the
    run's read-ahead (provision/readahead.py: state, units, hashes; as root) rides along, also
    beside the host's script."""
    if "host" not in ctx.facts and "gpu" not in ctx.facts:
        from .. import readahead
        along = readahead.along(ctx) if read_ahead else None
        # the GPU query and the read-ahead run beside the host's script (each its own process:
        # nvidia-smi and python3 take tens of ms to start), their output kept in temp files
        cmd = ("g=$(mktemp) || exit 1; ( " + gpu_facts.GATHER + " ) >\"$g\" 2>/dev/null & "
               + ("r=$(mktemp) || exit 1; ( " + along + " ) >\"$r\" & " if along else "")
               + script(ctx.cfg["model"]["dir"]) + "; wait; "
               + ("echo '@@read_ahead'; cat \"$r\"; rm -f \"$r\"; " if along else "")
               + "echo '@@gpu_facts'; cat \"$g\"; rm -f \"$g\"")
        lines = ctx.target.run(cmd, check=False).stdout.splitlines()
        gpu_at = _last(lines, "@@gpu_facts", len(lines))
        ra_at = _last(lines[:gpu_at], "@@read_ahead", gpu_at) if along else gpu_at
        ctx.facts["host"] = parse("\n".join(lines[:ra_at]))
        ctx.facts["gpu"] = gpu_facts.parse_gather("\n".join(lines[gpu_at + 1:]))
        if along:
            readahead.accept(ctx, "\n".join(lines[ra_at + 1:gpu_at]))
    return host_facts(ctx), gpu(ctx)


def _last(lines: list[str], marker: str, default: int) -> int:
    at = [i for i, ln in enumerate(lines) if ln == marker]
    return at[-1] if at else default


# apt's candidate for the running kernel's headers: apt-cache loads the whole package cache (half a
# second on a small box), so it is asked only when the headers may have to be installed
# (`headers_candidate(ctx)`, from the system step), never in the one facts command.
HEADERS_CANDIDATE = ("command -v apt-cache >/dev/null && apt-cache policy \"linux-headers-$(uname -r)\" "
                     "2>/dev/null | sed -n 's/^ *Candidate: *//p'")


def headers_candidate(ctx) -> str | None:
    """apt's candidate version of linux-headers-<running kernel> (None: apt has none). Cached."""
    return ctx.fact("headers_candidate", lambda: _candidate(
        ctx.target.run(HEADERS_CANDIDATE, check=False).stdout.splitlines()))


def invalidate(ctx, *keys: str) -> None:
    for k in keys or ("host", "gpu", "headers_candidate"):
        ctx.facts.pop(k, None)
