"""Fact parsers with realistic outputs (nvidia-smi, os-release, dpkg-query, df), and the real
gather commands run on this machine through LocalTarget (with a fake nvidia-smi on PATH)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.facts import gpu as gpu_facts
from provision.facts import host as host_facts
from provision.target import LocalTarget

DATA = Path(__file__).with_name("data")
FAKE_SMI = Path(__file__).parent / "rigs" / "fake_nvidia_smi.py"


def data(name: str) -> str:
    return (DATA / name).read_text()


# ----------------------------------------------------------------------------- nvidia-smi

def test_query_six_3090():
    gpus = gpu_facts.parse_query(data("nvidia-smi-6x3090.csv"))
    assert len(gpus) == 6
    g0 = gpus[0]
    assert g0 == gpu_facts.Gpu(
        index=0, uuid="GPU-4b2a3f1e-8c1d-5e2f-9a0b-1c2d3e4f5a60", name="NVIDIA GeForce RTX 3090",
        pci_bus_id="00000000:01:00.0", compute_cap="8.6", memory_total_mib=24576,
        memory_used_mib=1, persistence=True, power_draw=21.83, power_limit=350.0,
        power_default=350.0, power_min=100.0, power_max=350.0, driver_version="570.133.20")
    assert g0.arch == "86" and g0.power_settable
    assert [g.index for g in gpus] == [0, 1, 2, 3, 4, 5]
    assert gpus[3].persistence is False and gpus[3].power_limit == 280.0
    assert gpus[5].memory_used_mib == 23871 and gpus[5].pci_bus_id == "00000000:C1:00.0"


def test_query_na_not_supported_and_warning_line():
    gpus = gpu_facts.parse_query(data("nvidia-smi-na.csv"))
    assert len(gpus) == 2  # the infoROM warning is not a GPU
    laptop, h200 = gpus
    assert laptop.name == "NVIDIA RTX A2000 Laptop GPU"
    assert laptop.memory_used_mib is None and laptop.persistence is None
    assert laptop.power_draw is None and laptop.power_limit is None
    assert laptop.power_min is None and laptop.power_max is None and laptop.power_default is None
    assert not laptop.power_settable
    assert laptop.driver_version == "550.54.15"
    assert (h200.name, h200.arch, h200.memory_total_mib) == ("NVIDIA H200", "90", 143771)
    assert (h200.power_limit, h200.power_min, h200.power_max, h200.power_default) == (700, 200, 700, 700)


def test_query_plain_na_and_units():
    line = "0, GPU-x, Tesla T4, 00000000:00:1E.0, 7.5, 15360 MiB, 0 MiB, N/A, 9.64 W, 70.00 W, 70.00 W, 60.00 W, 70.00 W, 535.183.01"
    (g,) = gpu_facts.parse_query(line + "\n")
    assert g.memory_total_mib == 15360 and g.persistence is None and g.power_limit == 70.0
    assert g.power_min == 60.0 and g.arch == "75"


def test_query_wrong_field_count_is_an_error():
    with pytest.raises(ValueError) as ei:
        gpu_facts.parse_query("0, GPU-x, NVIDIA GeForce RTX 3090, 00000000:01:00.0, 8.6, 24576\n")
    assert "6 fields, want 14" in str(ei.value)


def test_query_is_what_the_gather_command_asks():
    assert gpu_facts.QUERY == (
        "nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,compute_cap,memory.total,memory.used,"
        "persistence_mode,power.draw,power.limit,power.default_limit,power.min_limit,"
        "power.max_limit,driver_version --format=csv,noheader,nounits")


def test_banner_cuda_version():
    assert gpu_facts.parse_banner_cuda(data("nvidia-smi-banner.txt")) == "12.8"
    assert gpu_facts.parse_banner_cuda("") is None


def test_gather_ok():
    out = "@@rc 0\n" + data("nvidia-smi-6x3090.csv") + "@@banner\n" + data("nvidia-smi-banner.txt")
    f = gpu_facts.parse_gather(out)
    assert f.available and f.reason == ""
    assert len(f.gpus) == 6 and f.cuda_version == "12.8" and f.driver_version == "570.133.20"


def test_gather_driver_not_loaded_exit_9():
    f = gpu_facts.parse_gather("@@rc 9\n" + data("nvidia-smi-no-driver.txt") + "@@banner\n")
    assert not f.available and f.gpus == () and f.driver_version is None
    assert f.reason == ("nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't "
                        "communicate with the NVIDIA driver. Make sure that the latest NVIDIA "
                        "driver is installed and running.")


def test_gather_absent_and_no_devices():
    f = gpu_facts.parse_gather("@@absent\n")
    assert not f.available and f.reason == "nvidia-smi not found (no NVIDIA driver installed)"
    f = gpu_facts.parse_gather("@@rc 6\nNo devices were found\n@@banner\n")
    assert not f.available and f.reason == "nvidia-smi failed (exit 6): No devices were found"


def test_gather_garbage_is_not_a_crash():
    f = gpu_facts.parse_gather("@@rc 0\n0, GPU-x, only three\n@@banner\n")
    assert not f.available
    assert f.reason.startswith("cannot parse nvidia-smi output: unexpected nvidia-smi line (3 fields")


# ----------------------------------------------------------------------------- host facts

def _host_output(os_release: str, packages: str = "", nvcc: str = "", df_line: str | None = None,
                 reboot: str = "", headers: str = "yes\n") -> str:
    df_line = df_line or "/dev/nvme0n1p2 1967317618688 1072345600000 794919051264      58% /"
    return ("@@os\n" + os_release + "@@kernel\n6.8.0-49-generic\n@@arch\nx86_64\n"
            "@@cpu\n32\n AMD Ryzen Threadripper PRO 5975WX 32-Cores\n"
            "@@mem\nMemTotal:       131781404 kB\n@@disk\n/var/lib\n" + df_line + "\n"
            "@@nvcc\n" + nvcc + "@@gcc\n13.2.0\n@@cmake\ncmake version 3.28.3\n\nCMake suite maintained\n"
            "@@packages\n" + packages + "@@reboot\n" + reboot + "@@headers\n" + headers + "@@init\nsystemd\n")


@pytest.mark.parametrize("fname,os_id,version,codename,distro,pretty", [
    ("os-release-ubuntu2204", "ubuntu", "22.04", "jammy", "ubuntu2204", "Ubuntu 22.04.5 LTS"),
    ("os-release-ubuntu2404", "ubuntu", "24.04", "noble", "ubuntu2404", "Ubuntu 24.04.1 LTS"),
    ("os-release-debian12", "debian", "12", "bookworm", "debian12", "Debian GNU/Linux 12 (bookworm)"),
    ("os-release-fedora40", "fedora", "40", "", "fedora40", "Fedora Linux 40 (Server Edition)"),
])
def test_os_release(fname, os_id, version, codename, distro, pretty):
    hf = host_facts.parse(_host_output(data(fname)))
    assert (hf.os_id, hf.os_version, hf.os_codename, hf.distro, hf.os_pretty) == (
        os_id, version, codename, distro, pretty)
    assert hf.uses_apt == (os_id != "fedora")
    assert hf.os_like == ("debian" if os_id == "ubuntu" else "")


def test_dpkg_query_status_abbrev():
    hf = host_facts.parse(_host_output(data("os-release-debian12"), data("dpkg-query-debian12.txt")))
    assert hf.packages == {
        "build-essential": "12.9", "cmake": "3.25.1-1",
        "git": "1:2.39.5-0+deb12u1",  # "hi": on hold, but installed
        "libssl-dev": "3.0.15-1~deb12u1", "pkg-config": "1.8.1-1",
        "curl": "7.88.1-10+deb12u8", "ca-certificates": "20230311", "libc6": "2.36-9+deb12u9",
    }
    # "iU" (unpacked, not configured), "rc" (config files only), "un" are NOT installed
    for p in ("ninja-build", "ccache", "python3-venv"):
        assert p not in hf.packages


def test_df_and_the_rest():
    hf = host_facts.parse(_host_output(data("os-release-ubuntu2404"),
                                       nvcc="/usr/local/cuda/bin/nvcc\nCuda compilation tools, release 12.8, V12.8.93\n"))
    assert hf.disk_path == "/var/lib" and hf.disk_free_bytes == 794919051264
    assert hf.kernel == "6.8.0-49-generic" and hf.arch == "x86_64"
    assert hf.cpus == 32 and hf.cpu_model == "AMD Ryzen Threadripper PRO 5975WX 32-Cores"
    assert hf.mem_total_kib == 131781404
    assert hf.nvcc_path == "/usr/local/cuda/bin/nvcc" and hf.nvcc_version == "12.8"
    assert hf.gcc_version == "13.2.0" and hf.cmake_version == "3.28.3"
    assert hf.kernel_headers and hf.is_systemd and not hf.reboot_required


def test_no_nvcc_no_headers_bad_df():
    hf = host_facts.parse(_host_output(data("os-release-debian12"), headers="",
                                       df_line="df: /var/lib: No such file or directory"))
    assert hf.nvcc_path is None and hf.nvcc_version is None
    assert not hf.kernel_headers
    assert hf.disk_free_bytes == 0


def test_full_sample_with_reboot_required():
    hf = host_facts.parse(data("host-facts-ubuntu2204-gpu.txt"))
    assert hf.distro == "ubuntu2204" and hf.cpus == 64 and hf.cpu_model == "AMD EPYC 7532 32-Core Processor"
    assert hf.reboot_required and hf.reboot_packages == ("linux-image-5.15.0-130-generic", "linux-base")
    assert hf.packages["linux-headers-5.15.0-126-generic"] == "5.15.0-126.136"
    assert hf.nvcc_version == "12.8" and hf.kernel_headers and hf.is_systemd


def test_empty_output_gives_unknown_not_a_crash():
    hf = host_facts.parse("")
    assert (hf.os_id, hf.cpus, hf.mem_total_kib, hf.disk_free_bytes, hf.packages) == ("unknown", 0, 0, 0, {})


# ----------------------------------------------------------------------------- real commands

def _local_target():
    i = inv.from_data({"hosts": {"local": {"connection": {"type": "local"}}}})
    return LocalTarget(i.hosts["local"])


def test_host_script_on_this_machine(tmp_path):
    hf = host_facts.gather(_local_target(), str(tmp_path / "models" / "not" / "yet"))
    osr = dict(l.split("=", 1) for l in Path("/etc/os-release").read_text().splitlines() if "=" in l)
    assert hf.os_id == osr["ID"].strip('"')
    assert hf.kernel == os.uname().release and hf.arch == os.uname().machine
    assert hf.cpus == os.cpu_count()
    assert hf.mem_total_kib > 0
    assert hf.disk_path == str(tmp_path)  # nearest existing parent of the models dir
    st = os.statvfs(tmp_path)
    assert abs(hf.disk_free_bytes - st.f_bavail * st.f_frsize) < 2 ** 30
    assert "dpkg" in hf.packages and "coreutils" in hf.packages


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_SMI.read_text())
    smi.chmod(0o755)
    cfg = tmp_path / "gpus.json"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_CONFIG", str(cfg))
    monkeypatch.setenv("FAKE_NVIDIA_SMI_STATE", str(tmp_path / "state.json"))
    return cfg


def test_gpu_gather_with_fake_nvidia_smi(fake_smi):
    f = gpu_facts.gather(_local_target())
    assert f.available, f.reason
    assert len(f.gpus) == 6 and {g.name for g in f.gpus} == {"NVIDIA GeForce RTX 3090"}
    assert f.gpus[0].power_limit == 350.0 and f.gpus[0].power_min == 100.0
    assert f.gpus[0].persistence is False and f.gpus[0].arch == "86"
    assert f.driver_version == "570.133.20" and f.cuda_version == "12.8"


def test_gpu_gather_driver_not_loaded(fake_smi):
    fake_smi.write_text(json.dumps({"driver_loaded": False}))
    f = gpu_facts.gather(_local_target())
    assert not f.available
    assert f.reason.startswith("nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it "
                               "couldn't communicate with the NVIDIA driver.")


def test_gpu_gather_absent(monkeypatch, tmp_path):
    t = _local_target()  # the gather command runs with a PATH that has no nvidia-smi
    monkeypatch.setattr(t, "_exec", _with_bash(t._exec))
    f = gpu_facts.gather(t)
    assert not f.available and f.reason == "nvidia-smi not found (no NVIDIA driver installed)"


def _with_bash(exec_):
    def run(command, **kw):
        return exec_(f"PATH=/nonexistent; {command}", **kw)
    return run
