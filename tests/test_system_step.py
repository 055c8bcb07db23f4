"""The system step as data: facts in -> planned changes out."""
from __future__ import annotations

import dataclasses

import pytest

from provision import inventory as inv
from provision.engine import Run, WriteFile
from provision.errors import StepError
from provision.facts.gpu import Gpu, GpuFacts
from provision.facts.host import HostFacts
from provision.steps import system

ALL_DEFAULT = {p: "1.0" for p in inv.DEFAULT_PACKAGES}
APT = "DEBIAN_FRONTEND=noninteractive"
APT_GET = f"{APT} apt-get -o DPkg::Lock::Timeout=600"


def cfg(**sections) -> dict:
    host = {"connection": {"type": "local"}, **sections}
    return inv.from_data({"hosts": {"h": host}}).hosts["h"].cfg


def hf(distro=("debian", "12"), packages=None, nvcc=None, headers=False, arch="x86_64",
       kernel="6.1.0-27-amd64") -> HostFacts:
    return HostFacts(os_id=distro[0], os_version=distro[1], os_codename="", os_pretty="x",
                     kernel=kernel, arch=arch, cpus=8, cpu_model="cpu", mem_total_kib=1 << 26,
                     disk_path="/", disk_free_bytes=1 << 40, nvcc_path=nvcc,
                     nvcc_version="12.8" if nvcc else None, gcc_version="12.2.0",
                     cmake_version="3.25.1",
                     packages=dict(ALL_DEFAULT if packages is None else packages),
                     kernel_headers=headers, is_systemd=True)


GPU = Gpu(0, "GPU-0", "NVIDIA GeForce RTX 3090", "00000000:01:00.0", "8.6", 24576, 1, True, 20.0,
          350.0, 350.0, 100.0, 350.0, "570.133.20")
GF_OK = GpuFacts(True, "", (GPU,), "12.8")
GF_NONE = GpuFacts(False, "nvidia-smi not found (no NVIDIA driver installed)")
NVCC = "/usr/local/cuda/bin/nvcc"


def test_all_present_no_change():
    assert system.plan(cfg(llama_cpp={"cuda": False}), hf(), GF_NONE) == []
    assert system.plan(cfg(), hf(nvcc=NVCC), GF_OK) == []  # cuda on, nvcc there


def test_some_missing_exactly_one_run():
    pk = {k: v for k, v in ALL_DEFAULT.items() if k not in ("cmake", "ninja-build", "ccache")}
    changes = system.plan(cfg(llama_cpp={"cuda": False}), hf(packages=pk), GF_NONE)
    assert changes == [Run("install packages: cmake ninja-build ccache", commands=[
        f"{APT_GET} update -q",
        f"{APT_GET} install -y -q --no-install-recommends -- cmake ninja-build ccache",
    ], timeout=3600)]
    assert changes[0].sudo is True and changes[0].notify == ()


def test_nothing_installed_keeps_the_configured_order():
    (ch,) = system.plan(cfg(llama_cpp={"cuda": False}), hf(packages={}), GF_NONE)
    assert ch.commands[1].endswith("--no-install-recommends -- " + " ".join(inv.DEFAULT_PACKAGES))


def test_extra_packages_and_duplicates():
    c = cfg(llama_cpp={"cuda": False}, system={"extra_packages": ["htop", "cmake", "htop"]})
    (ch,) = system.plan(c, hf(), GF_NONE)
    assert ch.description == "install packages: htop"


def _keyring_run(distro, arch="x86_64"):
    return Run("add NVIDIA's CUDA apt repo (cuda-keyring)", commands=[
        "apt-key del 7fa2af80 >/dev/null 2>&1 || true",
        f"curl -fsSL -o /tmp/cuda-keyring.deb https://developer.download.nvidia.com/compute/cuda/repos/{distro}/{arch}/cuda-keyring_1.1-1_all.deb",
        "dpkg -i /tmp/cuda-keyring.deb && rm -f /tmp/cuda-keyring.deb",
    ])


def _toolkit_run(toolkit="cuda-toolkit-12-8"):
    return Run(f"install {toolkit} (nvcc missing)", commands=[
        f"{APT_GET} update -q",
        f"{APT_GET} install -y -q --no-install-recommends -- {toolkit}",
    ], timeout=7200)


@pytest.mark.parametrize("distro,name", [(("ubuntu", "22.04"), "ubuntu2204"),
                                         (("ubuntu", "24.04"), "ubuntu2404"),
                                         (("debian", "12"), "debian12")])
def test_nvcc_missing_cuda_on_keyring_and_toolkit(distro, name):
    assert system.plan(cfg(), hf(distro=distro), GF_OK) == [_keyring_run(name), _toolkit_run()]


def test_keyring_already_there_only_toolkit_and_arm():
    p = {**ALL_DEFAULT, "cuda-keyring": "1.1-1"}
    assert system.plan(cfg(system={"cuda_toolkit": "cuda-toolkit-12-6"}), hf(packages=p), GF_OK) == [
        _toolkit_run("cuda-toolkit-12-6")]
    assert system.plan(cfg(), hf(distro=("ubuntu", "24.04"), arch="aarch64"), GF_OK) == [
        _keyring_run("ubuntu2404", "sbsa"), _toolkit_run()]


def test_missing_packages_come_before_the_keyring():
    pk = {k: v for k, v in ALL_DEFAULT.items() if k != "curl"}
    changes = system.plan(cfg(), hf(packages=pk), GF_OK)
    assert [c.description for c in changes] == [
        "install packages: curl", "add NVIDIA's CUDA apt repo (cuda-keyring)",
        "install cuda-toolkit-12-8 (nvcc missing)"]


@pytest.mark.parametrize("distro,message", [
    (("ubuntu", "20.04"), "nvcc not found and NVIDIA's apt repo has no 'ubuntu2004' (supported: debian12, ubuntu2204, ubuntu2404); install CUDA by hand"),
    (("fedora", "40"), "nvcc not found and NVIDIA's apt repo has no 'fedora40' (supported: debian12, ubuntu2204, ubuntu2404); install CUDA by hand"),
    (("debian", "11"), "nvcc not found and NVIDIA's apt repo has no 'debian11' (supported: debian12, ubuntu2204, ubuntu2404); install CUDA by hand"),
])
def test_nvcc_missing_other_distro_error(distro, message):
    with pytest.raises(StepError) as ei:
        system.plan(cfg(), hf(distro=distro), GF_OK)
    assert str(ei.value) == message


def test_unknown_cpu_arch_error():
    with pytest.raises(StepError) as ei:
        system.plan(cfg(), hf(arch="ppc64le"), GF_OK)
    assert str(ei.value) == "no NVIDIA apt repo for CPU architecture 'ppc64le'"


def test_cuda_off_no_toolkit():
    assert system.plan(cfg(llama_cpp={"cuda": False}), hf(nvcc=None), GF_NONE) == []


def test_kernel_headers_auto():
    # auto (null): wanted when GPUs are configured, not otherwise
    c_gpu = cfg(gpus={"count": 1}, llama_cpp={"cuda": False})
    c_cpu = cfg(llama_cpp={"cuda": False})
    assert system.wanted_packages(c_cpu, hf()) == inv.DEFAULT_PACKAGES
    assert system.plan(c_cpu, hf(), GF_OK) == []
    (ch,) = system.plan(c_gpu, hf(headers=False), GF_OK)
    assert ch.description == "install packages: linux-headers-6.1.0-27-amd64"
    # headers present for the running kernel -> nothing
    assert system.plan(c_gpu, hf(headers=True), GF_OK) == []
    # forced on without GPUs / forced off with GPUs
    (ch,) = system.plan(cfg(system={"kernel_headers": True}, llama_cpp={"cuda": False}), hf(), GF_NONE)
    assert ch.description == "install packages: linux-headers-6.1.0-27-amd64"
    assert system.plan(cfg(gpus={"count": 1}, system={"kernel_headers": False},
                           llama_cpp={"cuda": False}), hf(), GF_OK) == []


def test_apt_proxy_file():
    c = cfg(system={"apt_proxy": "http://10.0.0.1:3142"}, llama_cpp={"cuda": False})
    want = 'Acquire::http::Proxy "http://10.0.0.1:3142";\n'
    assert system.plan(c, hf(), GF_NONE, proxy_now=None) == [
        WriteFile("apt proxy http://10.0.0.1:3142", path="/etc/apt/apt.conf.d/01llama-rig-proxy",
                  content=want, before=None)]
    old = 'Acquire::http::Proxy "http://10.0.0.9:3142";\n'
    (ch,) = system.plan(c, hf(), GF_NONE, proxy_now=old)
    assert ch.before == old and ch.content == want
    assert "-Acquire::http::Proxy \"http://10.0.0.9:3142\";" in ch.diff()
    assert system.plan(c, hf(), GF_NONE, proxy_now=want) == []
    # the proxy goes in before apt runs
    (w, r) = system.plan(c, hf(packages={}), GF_NONE)
    assert isinstance(w, WriteFile) and isinstance(r, Run)


def test_driver_not_answering_with_gpus_is_a_step_error():
    c = cfg(gpus={"count": 6})
    no_driver = GpuFacts(False, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it "
                                "couldn't communicate with the NVIDIA driver.")
    assert system.driver_problem(c, no_driver) == (
        "the NVIDIA driver does not answer: nvidia-smi failed (exit 9): NVIDIA-SMI has failed "
        "because it couldn't communicate with the NVIDIA driver. — install the driver (and reboot "
        "if it was just installed)")
    assert system.driver_problem(c, GF_OK) is None
    assert system.driver_problem(cfg(), GF_NONE) is None  # no GPUs configured: fine

    class Ctx:  # what SystemStep.plan reads
        def __init__(self):
            self.cfg = c
            self.facts = {"host": hf(nvcc=NVCC), "gpu": no_driver}

        def fact(self, key, fn):
            return self.facts[key]

    with pytest.raises(StepError) as ei:
        system.SystemStep().plan(Ctx())
    assert str(ei.value) == system.driver_problem(c, no_driver)


def test_plan_is_pure():
    c = cfg()
    facts = hf(packages={})
    before = dataclasses.asdict(facts), repr(c)
    system.plan(c, facts, GF_OK)
    assert (dataclasses.asdict(facts), repr(c)) == before


def test_not_an_apt_distro():
    fedora = dataclasses.replace(hf(distro=("fedora", "40"), packages={}), os_pretty="Fedora Linux 40")
    with pytest.raises(StepError) as ei:
        system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": ["cmake", "git"]}), fedora, GF_NONE)
    assert str(ei.value) == ("Fedora Linux 40 is not Debian or Ubuntu (no apt): install cmake git "
                             "yourself, or list what you have in system.packages")
    # nothing missing: nothing to say, whatever the distro
    assert system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": []}), fedora, GF_NONE) == []
    # Ubuntu derivatives (ID_LIKE) use apt
    mint = dataclasses.replace(hf(distro=("linuxmint", "22"), packages={}), os_like="ubuntu debian")
    (ch,) = system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": ["cmake"]}), mint, GF_NONE)
    assert ch.description == "install packages: cmake"
