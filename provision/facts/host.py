"""OS, kernel, CPU, memory, disk, nvcc, installed packages — one remote command."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from . import gpu as gpu_facts


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

    @property
    def uses_apt(self) -> bool:
        return self.os_id in ("debian", "ubuntu") or bool({"debian", "ubuntu"} & set(self.os_like.split()))

    @property
    def distro(self) -> str:
        """NVIDIA's repo name: ubuntu2204, ubuntu2404, debian12, ..."""
        return f"{self.os_id}{self.os_version.replace('.', '')}"


SECTIONS = ("os", "kernel", "arch", "cpu", "mem", "disk", "nvcc", "gcc", "cmake", "packages",
            "reboot", "headers", "init")


def script(models_dir: str) -> str:
    d = shlex.quote(models_dir)
    return "; ".join([
        "export LC_ALL=C PATH=$PATH:/usr/local/cuda/bin",
        "echo '@@os'; cat /etc/os-release 2>/dev/null",
        "echo '@@kernel'; uname -r",
        "echo '@@arch'; uname -m",
        "echo '@@cpu'; nproc; grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-",
        "echo '@@mem'; grep MemTotal /proc/meminfo",
        f"echo '@@disk'; d={d}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); done; echo \"$d\"; df -PB1 \"$d\" | tail -n 1",
        "echo '@@nvcc'; p=$(command -v nvcc 2>/dev/null) && { echo \"$p\"; nvcc --version 2>/dev/null | grep -i release; }",
        "echo '@@gcc'; gcc -dumpfullversion 2>/dev/null",
        "echo '@@cmake'; cmake --version 2>/dev/null | head -n 1",
        "echo '@@packages'; dpkg-query -W -f='${Package}\\t${db:Status-Abbrev}\\t${Version}\\n' 2>/dev/null",
        "echo '@@reboot'; if [ -e /var/run/reboot-required ]; then echo yes; cat /var/run/reboot-required.pkgs 2>/dev/null; fi",
        "echo '@@headers'; [ -e /lib/modules/$(uname -r)/build ] && echo yes",
        "echo '@@init'; [ -d /run/systemd/system ] && echo systemd",
        "true",
    ])


def _sections(output: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SECTIONS}
    cur = None
    for line in output.splitlines():
        if line.startswith("@@") and line[2:] in out:
            cur = line[2:]
            continue
        if cur:
            out[cur].append(line)
    return out


def parse(output: str) -> HostFacts:
    s = _sections(output)
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
    )


def gather(target, models_dir: str) -> HostFacts:
    return parse(target.run(script(models_dir), check=False).stdout)


def host_facts(ctx) -> HostFacts:
    """Cached per run."""
    return ctx.fact("host", lambda: gather(ctx.target, ctx.cfg["model"]["dir"]))


def gpu(ctx) -> gpu_facts.GpuFacts:
    return ctx.fact("gpu", lambda: gpu_facts.gather(ctx.target))


def invalidate(ctx, *keys: str) -> None:
    for k in keys or ("host", "gpu"):
        ctx.facts.pop(k, None)
