"""The system step as data: facts in -> planned changes out (packages, NVIDIA repo + pinned key,
toolkit, nvcc vs compute capability, driver require|install, headers, nouveau, Secure Boot, reboot)."""
from __future__ import annotations

import dataclasses

import pytest

from provision import inventory as inv
from provision import nvidia
from provision.engine import RebootHost, Run, WriteFile
from provision.errors import StepError
from provision.facts.gpu import Gpu, GpuFacts
from provision.facts.host import HostFacts
from provision.steps import system
from provision.steps.system import AddCudaRepo, AptInstall

ALL_DEFAULT = {p: "1.0" for p in inv.DEFAULT_PACKAGES}
NV = nvidia.DEFAULT_REPO
FPR = nvidia.KEY_3BF863CC


def cfg(**sections) -> dict:
    host = {"connection": {"type": "local"}, **sections}
    return inv.from_data({"hosts": {"h": host}}).hosts["h"].cfg


def hf(distro=("debian", "12"), packages=None, nvcc=None, headers=False, arch="x86_64",
       kernel="6.1.0-27-amd64", **kw) -> HostFacts:
    base = HostFacts(os_id=distro[0], os_version=distro[1], os_codename="", os_pretty="x",
                     kernel=kernel, arch=arch, cpus=8, cpu_model="cpu", mem_total_kib=1 << 26,
                     disk_path="/", disk_free_bytes=1 << 40, nvcc_path=nvcc,
                     nvcc_version=kw.pop("nvcc_version", "12.8") if nvcc else None, gcc_version="12.2.0",
                     cmake_version="3.25.1",
                     packages=dict(ALL_DEFAULT if packages is None else packages),
                     kernel_headers=headers, is_systemd=True,
                     headers_candidate=kw.pop("headers_candidate", "6.1.123-1"))
    return dataclasses.replace(base, **kw)


def gpu(i=0, cc="8.6", name="NVIDIA GeForce RTX 3090") -> Gpu:
    return Gpu(i, f"GPU-{i}", name, f"00000000:0{i + 1}:00.0", cc, 24576, 1, True, 20.0,
               350.0, 350.0, 100.0, 350.0, "580.95.05")


GF_OK = GpuFacts(True, "", (gpu(),), "13.0")
GF_NONE = GpuFacts(False, "nvidia-smi not found (no NVIDIA driver installed)")
GF_NOT_LOADED = GpuFacts(False, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it "
                                "couldn't communicate with the NVIDIA driver.")
NVCC = "/usr/local/cuda/bin/nvcc"
KEYRING = {**ALL_DEFAULT, "cuda-keyring": "1.1-1"}
LIST = {nvidia.sources_path("debian12", "x86_64"): nvidia.sources_line(f"{NV}/debian12/x86_64/")}


def repo_change(distro="debian12", arch="sbsa" if False else "x86_64", fpr=FPR, base=NV, proxy=None):
    url = f"{base}/{distro}/{arch}/"
    return AddCudaRepo(f"add the NVIDIA CUDA apt repo {url} (cuda-keyring, key {fpr} pinned)",
                       repo=url, keyring_url=url + "cuda-keyring_1.1-1_all.deb", fingerprint=fpr,
                       list_path=f"/etc/apt/sources.list.d/cuda-{distro}-{arch}.list",
                       list_line=f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {url} /\n",
                       proxy=proxy)


def toolkit_change(pkg="cuda-toolkit-12-8", distro="debian12", arch="x86_64", base=NV, update=True):
    url = f"{base}/{distro}/{arch}/"
    return AptInstall(f"install {pkg} (nvcc missing)", packages=[pkg],
                      sources={url: "NVIDIA CUDA repo"}, timeout=7200, update=update)


def test_all_present_no_change():
    assert system.plan(cfg(llama_cpp={"cuda": False}), hf(), GF_NONE) == []
    assert system.plan(cfg(), hf(nvcc=NVCC), GF_OK) == []  # cuda on, nvcc there


def test_some_missing_exactly_one_install_with_packages_after_dashdash():
    pk = {k: v for k, v in ALL_DEFAULT.items() if k not in ("cmake", "ninja-build", "ccache")}
    (ch,) = system.plan(cfg(llama_cpp={"cuda": False}), hf(packages=pk), GF_NONE)
    assert ch == AptInstall("install packages: cmake ninja-build ccache",
                            packages=["cmake", "ninja-build", "ccache"], timeout=3600)
    assert ch.notify == ()


def test_apt_install_commands_quote_and_end_options():
    ran = []

    class T:
        def run(self, cmd, **kw):
            ran.append(cmd)
            from provision.target import Result
            return Result(cmd, 0, "", "")

    class C:
        target = T()
        host = type("H", (), {"name": "h"})()

        def warn(self, t):
            raise AssertionError(t)
    AptInstall("x", packages=["cmake", "odd name;touch x"]).apply(C())
    assert ran == ["DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q",
                   "DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "
                   "--no-install-recommends -- cmake 'odd name;touch x'"]


def test_extra_packages_and_duplicates():
    c = cfg(llama_cpp={"cuda": False}, system={"extra_packages": ["htop", "cmake", "htop"]})
    (ch,) = system.plan(c, hf(), GF_NONE)
    assert ch.description == "install packages: htop"


@pytest.mark.parametrize("distro,name", [(("ubuntu", "22.04"), "ubuntu2204"),
                                         (("ubuntu", "24.04"), "ubuntu2404"),
                                         (("debian", "12"), "debian12")])
def test_nvcc_missing_keyring_and_toolkit(distro, name):
    assert system.plan(cfg(), hf(distro=distro), GF_OK) == [repo_change(name), toolkit_change(distro=name)]


def test_debian13_has_its_own_key_and_rejects_580():
    c = cfg(system={"cuda_toolkit": "cuda-toolkit-13-0"})
    chs = system.plan(c, hf(distro=("debian", "13")), GF_OK)
    assert chs == [repo_change("debian13", fpr=nvidia.KEY_8793F200),
                   toolkit_change("cuda-toolkit-13-0", distro="debian13")]
    c = cfg(gpus={"count": 1}, llama_cpp={"cuda": False},
            system={"driver": "install", "driver_package": "nvidia-driver-580-open"})
    with pytest.raises(StepError, match="debian13 repo has no 580 branch"):
        system.plan(c, hf(distro=("debian", "13")), GF_NONE)


def test_mirror_and_own_key():
    c = cfg(system={"cuda_repo": "http://mirror.lan/cuda/repos/", "cuda_repo_key": "ab" * 20})
    (repo, tk) = system.plan(c, hf(), GF_OK)
    assert repo == repo_change(base="http://mirror.lan/cuda/repos", fpr="AB" * 20)
    assert tk.sources == {"http://mirror.lan/cuda/repos/debian12/x86_64/": "NVIDIA CUDA repo"}


def test_keyring_there_checked_list_rewritten_for_a_mirror():
    ok = hf(packages=KEYRING, cuda_keyring_fprs=(FPR,), cuda_lists=dict(LIST))
    assert system.plan(cfg(), ok, GF_OK) == [toolkit_change()]
    assert system.plan(cfg(), dataclasses.replace(ok, nvcc_path=NVCC, nvcc_version="12.8"), GF_OK) == []
    # a mirror: NVIDIA's keyring (same key), the .list is pointed at the mirror
    c = cfg(system={"cuda_repo": "http://mirror.lan/repos"})
    w, tk = system.plan(c, ok, GF_OK)
    assert isinstance(w, WriteFile) and w.path == "/etc/apt/sources.list.d/cuda-debian12-x86_64.list"
    assert w.content == nvidia.sources_line("http://mirror.lan/repos/debian12/x86_64/")
    assert w.before == LIST[w.path]
    # a keyring with another (or an extra) key stops the step, naming both
    for bad in ((nvidia.KEY_8793F200,), (FPR, "0" * 40), ()):
        with pytest.raises(StepError) as ei:
            system.plan(cfg(), dataclasses.replace(ok, cuda_keyring_fprs=bad), GF_OK)
        assert f"not the key pinned for debian12 ({FPR})" in str(ei.value)
        assert "dpkg -P cuda-keyring" in str(ei.value)


def test_ubuntu_2604_uses_its_own_archive():
    chs = system.plan(cfg(), hf(distro=("ubuntu", "26.04")), GF_OK)
    assert chs == [AptInstall("install cuda-toolkit (nvcc missing)", packages=["cuda-toolkit"], timeout=7200)]


@pytest.mark.parametrize("distro", [("ubuntu", "20.04"), ("fedora", "40"), ("debian", "11")])
def test_nvcc_missing_other_distro_error(distro):
    facts = hf(distro=distro)
    if distro[0] == "fedora":
        facts = dataclasses.replace(facts, packages={**ALL_DEFAULT})  # nothing else to install
    with pytest.raises(StepError) as ei:
        system.plan(cfg(), facts, GF_OK)
    msg = str(ei.value)
    assert msg.startswith("NVIDIA has no apt repo for x (" + f"{distro[0]}{distro[1].replace('.', '')}") \
        or "is not Debian or Ubuntu" in msg, msg
    if distro[0] != "fedora":
        assert "install the CUDA toolkit / driver yourself (nvcc on PATH or under /usr/local/cuda)" in msg


def test_unknown_cpu_arch_error_and_arm():
    with pytest.raises(StepError) as ei:
        system.plan(cfg(), hf(arch="ppc64le"), GF_OK)
    assert str(ei.value) == "no NVIDIA apt repo for CPU architecture 'ppc64le' (it has x86_64, aarch64)"
    (repo, _) = system.plan(cfg(), hf(distro=("ubuntu", "24.04"), arch="aarch64"), GF_OK)
    assert repo.repo == f"{NV}/ubuntu2404/sbsa/" and repo.list_path.endswith("cuda-ubuntu2404-sbsa.list")


def test_cuda_off_no_toolkit():
    assert system.plan(cfg(llama_cpp={"cuda": False}), hf(nvcc=None), GF_NONE) == []


# -- nvcc vs compute capability -------------------------------------------------------------------

def test_cuda13_refuses_volta_before_installing():
    v100 = GpuFacts(True, "", (gpu(0, "7.0", "Tesla V100-SXM2-32GB"),), "12.8")
    with pytest.raises(StepError) as ei:
        system.plan(cfg(system={"cuda_toolkit": "cuda-toolkit-13-0"}), hf(), v100)
    assert str(ei.value) == (
        "system.cuda_toolkit cuda-toolkit-13-0 cannot build for GPU 0 (Tesla V100-SXM2-32GB, compute "
        "capability 7.0): CUDA 13 builds for compute capability 7.5 and newer only; set "
        "system.cuda_toolkit to a toolkit that supports it (e.g. cuda-toolkit-12-8 for GPUs before 7.5)")
    assert system.plan(cfg(system={"cuda_toolkit": "cuda-toolkit-12-8"}), hf(), v100)  # fine
    # an installed nvcc 13 and a V100, or an old nvcc and a Blackwell override
    with pytest.raises(StepError, match=r"nvcc 13.0 \(/usr/local/cuda/bin/nvcc\) cannot build for GPU 0"):
        system.plan(cfg(), hf(nvcc=NVCC, nvcc_version="13.0"), v100)
    with pytest.raises(StepError, match=r"llama_cpp.cuda_architectures 120a-real: compute capability "
                                        r"12.0 needs CUDA 12.8 or newer"):
        system.plan(cfg(llama_cpp={"cuda_architectures": ["120a-real"]}),
                    hf(nvcc=NVCC, nvcc_version="12.4"), GF_OK)
    assert system.plan(cfg(llama_cpp={"cuda_architectures": "86"}), hf(nvcc=NVCC, nvcc_version="13.0"), GF_OK) == []


def test_nvidia_version_tables():
    assert nvidia.parse_cc("8.6") == nvidia.parse_cc("86") == nvidia.parse_cc("86-real") == (8, 6)
    assert nvidia.parse_cc("120a-real") == (12, 0) and nvidia.parse_cc("90a") == (9, 0)
    assert nvidia.parse_cc("native") is None
    assert nvidia.toolkit_version("cuda-toolkit-13-0") == (13, 0) and nvidia.toolkit_version("cuda-toolkit") is None
    assert nvidia.cc_problem((13, 0), (7, 5)) is None and nvidia.cc_problem((13, 0), (7, 0))
    assert nvidia.cc_problem((12, 8), (12, 0)) is None and nvidia.cc_problem((12, 6), (12, 0))
    assert nvidia.cc_problem((11, 0), (8, 6)) == "compute capability 8.6 needs CUDA 11.1 or newer"
    assert nvidia.driver_packages({"nvidia-open": "1", "nvidia-driver-580-open": "1", "cuda-drivers": "1",
                                   "nvidia-settings": "1", "libnvidia-compute-580": "1"}) == [
        "cuda-drivers", "nvidia-driver-580-open", "nvidia-open"]


# -- driver ---------------------------------------------------------------------------------------

DRV = {"gpus": {"count": 1}, "llama_cpp": {"cuda": False}}


def test_driver_require_not_answering_says_what_to_do():
    with pytest.raises(StepError) as ei:
        system.plan(cfg(**DRV), hf(), GF_NONE)
    assert str(ei.value) == (
        "the NVIDIA driver does not answer (nvidia-smi not found (no NVIDIA driver installed)) — "
        "install it: set system.driver: install (nvidia-open from NVIDIA's repo), or install a "
        "driver yourself and reboot")
    with pytest.raises(StepError, match="nouveau .* is loaded: system.driver: install blacklists it"):
        system.plan(cfg(**DRV), hf(nouveau_loaded=True), GF_NONE)
    assert system.plan(cfg(llama_cpp={"cuda": False}), hf(), GF_NONE) == []  # no GPUs configured


def test_driver_install_plan_headers_repo_driver_reboot():
    c = cfg(**DRV, system={"driver": "install"})
    chs = system.plan(c, hf(), GF_NONE)
    assert [type(x) for x in chs] == [AptInstall, AddCudaRepo, AptInstall, RebootHost]
    assert chs[0].packages == ["linux-headers-6.1.0-27-amd64"]  # DKMS will build: headers first
    assert chs[2] == AptInstall("install the NVIDIA driver nvidia-open", packages=["nvidia-open"],
                                sources={f"{NV}/debian12/x86_64/": "NVIDIA CUDA repo"}, timeout=3600)
    assert chs[3].description == "reboot to load the new NVIDIA driver (nvidia-open)"
    # a pinned branch; the toolkit and the driver share one apt-get update
    c2 = cfg(gpus={"count": 1}, system={"driver": "install", "driver_package": "nvidia-driver-580-open"})
    chs = system.plan(c2, hf(headers=True), GF_NONE)
    assert [x.description for x in chs] == [
        f"add the NVIDIA CUDA apt repo {NV}/debian12/x86_64/ (cuda-keyring, key {FPR} pinned)",
        "install cuda-toolkit-12-8 (nvcc missing)", "install the NVIDIA driver nvidia-driver-580-open",
        "reboot to load the new NVIDIA driver (nvidia-driver-580-open)"]
    assert chs[1].update and not chs[2].update
    # with GPUs that answer: nothing about drivers (and no headers)
    assert system.plan(c, hf(), GF_OK) == []


def test_headers_only_with_a_candidate():
    c = cfg(**DRV, system={"driver": "install"})
    notes: list[str] = []
    chs = system.plan(c, hf(kernel="6.18.44-fc-v669-gpu", headers_candidate=None), GF_NONE, notes=notes)
    assert not any(isinstance(x, AptInstall) and "linux-headers" in " ".join(x.packages) for x in chs)
    assert notes == ["apt has no linux-headers-6.18.44-fc-v669-gpu for the running kernel (a custom "
                     "kernel?): DKMS cannot build the NVIDIA module for it — boot a distribution "
                     "kernel or install its headers yourself"]
    with pytest.raises(StepError, match="system.kernel_headers: apt has no linux-headers-6.18"):
        system.plan(cfg(llama_cpp={"cuda": False}, system={"kernel_headers": True}),
                    hf(kernel="6.18.44-fc-v669-gpu", headers_candidate=None), GF_NONE)
    # a driver that answers on a custom kernel: no headers planned, nothing said
    notes = []
    assert system.plan(cfg(gpus={"count": 1}, llama_cpp={"cuda": False}),
                       hf(kernel="6.18.44-fc-v669-gpu", headers_candidate=None), GF_OK, notes=notes) == []
    assert notes == []


def test_secure_boot_says_enroll_a_mok():
    c = cfg(**DRV, system={"driver": "install"})
    with pytest.raises(StepError) as ei:
        system.plan(c, hf(secure_boot=True), GF_NONE)
    assert "Secure Boot is on and no module signing key (MOK) is enrolled" in str(ei.value)
    assert "mokutil --import /var/lib/dkms/mok.pub" in str(ei.value)
    assert system.plan(c, hf(secure_boot=True, mok_enrolled=True), GF_NONE)  # enrolled: go on


def test_nouveau_blacklisted_when_installing():
    c = cfg(**DRV, system={"driver": "install"})
    chs = system.plan(c, hf(nouveau_loaded=True, headers=True), GF_NONE)
    w = next(x for x in chs if isinstance(x, WriteFile))
    assert w.path == "/etc/modprobe.d/llama-rig-blacklist-nouveau.conf" and "blacklist nouveau" in w.content
    assert any(isinstance(x, Run) and "update-initramfs -u" in x.commands[0] for x in chs)
    assert isinstance(chs[-1], RebootHost)
    chs = system.plan(c, hf(nouveau_loaded=True, nouveau_blacklisted=True, headers=True), GF_NONE)
    assert not any(isinstance(x, WriteFile) for x in chs)


def test_installed_not_loaded_means_reboot():
    pk = {**ALL_DEFAULT, "nvidia-open": "580.95.05-1"}
    (rb,) = system.plan(cfg(**DRV, system={"driver": "install"}), hf(packages=pk), GF_NOT_LOADED)
    assert rb == RebootHost("reboot to load the NVIDIA driver (nvidia-open installed, not loaded)",
                            after=rb.after)
    assert "nvidia-open installed but not loaded" in rb.after
    # require + Ubuntu's reboot-required flag: the reboot too; require without it: say so
    (rb,) = system.plan(cfg(**DRV), hf(packages=pk, reboot_required=True), GF_NOT_LOADED)
    assert rb.description.startswith("reboot (reboot required) to load")
    with pytest.raises(StepError, match="nvidia-open installed but not loaded: reboot"):
        system.plan(cfg(**DRV), hf(packages=pk), GF_NOT_LOADED)


def test_apt_proxy_file():
    c = cfg(system={"apt_proxy": "http://10.0.0.1:3142"}, llama_cpp={"cuda": False})
    want = 'Acquire::http::Proxy "http://10.0.0.1:3142";\n'
    assert system.plan(c, hf(), GF_NONE, proxy_now=None) == [
        WriteFile("apt proxy http://10.0.0.1:3142", path="/etc/apt/apt.conf.d/99llama-rig-proxy",
                  content=want, before=None)]
    old = 'Acquire::http::Proxy "http://10.0.0.9:3142";\n'
    (ch,) = system.plan(c, hf(), GF_NONE, proxy_now=old)
    assert ch.before == old and ch.content == want
    assert "-Acquire::http::Proxy \"http://10.0.0.9:3142\";" in ch.diff()
    assert system.plan(c, hf(), GF_NONE, proxy_now=want) == []
    # the proxy goes in before apt runs, and apt's errors name it
    (w, r) = system.plan(c, hf(packages={}), GF_NONE)
    assert isinstance(w, WriteFile) and isinstance(r, AptInstall) and r.proxy == "http://10.0.0.1:3142"


def test_plan_is_pure():
    c = cfg(gpus={"count": 1}, system={"driver": "install"})
    facts = hf(packages={})
    before = dataclasses.asdict(facts), repr(c)
    system.plan(c, facts, GF_NONE)
    assert (dataclasses.asdict(facts), repr(c)) == before


def test_not_an_apt_distro():
    fedora = dataclasses.replace(hf(distro=("fedora", "40"), packages={}), os_pretty="Fedora Linux 40")
    with pytest.raises(StepError) as ei:
        system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": ["cmake", "git"]}), fedora, GF_NONE)
    assert str(ei.value) == ("Fedora Linux 40 is not Debian or Ubuntu (no apt): install cmake git "
                             "yourself, or list what you have in system.packages")
    assert system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": []}), fedora, GF_NONE) == []
    mint = dataclasses.replace(hf(distro=("linuxmint", "22"), packages={}), os_like="ubuntu debian")
    (ch,) = system.plan(cfg(llama_cpp={"cuda": False}, system={"packages": ["cmake"]}), mint, GF_NONE)
    assert ch.description == "install packages: cmake"


def test_inventory_keys():
    c = cfg()
    assert c["system"]["cuda_repo"] == NV and c["system"]["driver"] == "require"
    assert c["system"]["cuda_repo_key"] is None and c["system"]["reboot_timeout"] == 900
    from provision.errors import InventoryError
    with pytest.raises(InventoryError, match=r"system.driver: must be one of require, install, got 'yes'"):
        cfg(system={"driver": "yes"})
    with pytest.raises(InventoryError, match=r"system.cuda_repo_key: must be a full key fingerprint"):
        cfg(system={"cuda_repo_key": "3BF863CC"})
    assert cfg(system={"cuda_repo_key": "EB69 3B30 35CD 5710 E231  E123 A4B4 6996 3BF8 63CC"})
    for bad in ("ftp://x/", "http://x/ /\ndeb http://evil/ /", "x", "http://a b/"):
        with pytest.raises(InventoryError, match=r"system.cuda_repo: (.*an http\(s\) URL|must be one line)"):
            cfg(system={"cuda_repo": bad})
    with pytest.raises(InventoryError, match=r"system.driver_package: "):
        cfg(system={"driver_package": "-o APT::x=1"})


class _Box:
    """A fake rig for AddCudaRepo.apply: records commands, serves a keyring file."""

    def __init__(self, keyring: bytes, download_rc: int = 0):
        import base64 as b64
        from provision.target import Result
        self.R = Result
        self.ran: list[str] = []
        self.written: dict[str, str] = {}
        self.keyring = b64.b64encode(keyring).decode()
        self.download_rc = download_rc

    def run(self, cmd, **kw):
        self.ran.append(cmd)
        if cmd.startswith("base64 -w0"):
            return self.R(cmd, 0, self.keyring, "")
        if "download-file" in cmd and self.download_rc:
            return self.R(cmd, 90, "Err:1 http://x/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb\n"
                          "  Could not connect to x:80 (10.0.0.9). - connect (111: Connection refused)\n", "")
        return self.R(cmd, 0, "", "")

    def read_file(self, path, sudo=False):
        return self.written.get(path)

    def write_file(self, path, content, **kw):
        self.written[path] = content


def _ctx(box):
    class C:
        target = box
        host = type("H", (), {"name": "rig"})()

        def say(self, t):
            pass
    return C()


def test_add_cuda_repo_private_tempdir_pinned_key_or_purge():
    from pathlib import Path
    from provision import openpgp
    data = Path(__file__).with_name("data")
    asc = (data / "keyring-two-keys.asc").read_text()
    raw = openpgp.dearmor(asc)
    fprs = (data / "keyring-two-keys.fpr").read_text().split()
    # a keyring with exactly the first key: build it from its packets (public key + uid + sig)
    one = b""
    for tag, body in openpgp.packets(raw):
        if tag == 6 and one:
            break
        hdr = bytes([0xC0 | tag]) + (bytes([len(body)]) if len(body) < 192 else
                                     bytes([((len(body) - 192) >> 8) + 192, (len(body) - 192) & 0xFF]))
        one += hdr + body
    assert openpgp.primary_fingerprints(one) == fprs[:1]
    ch = repo_change(fpr=fprs[0], base="http://x/repos")
    box = _Box(one)
    ch.apply(_ctx(box))
    script = box.ran[0]
    assert "d=$(mktemp -d)" in script and 'rm -rf "$d"' in script and '"$d/cuda-keyring.deb"' in script
    assert "/tmp/" not in script
    assert box.written == {ch.list_path: ch.list_line}
    assert not any(c.startswith("dpkg -P") for c in box.ran)
    # two keys where one is pinned: purged, stopped
    box = _Box(raw)
    with pytest.raises(StepError) as ei:
        ch.apply(_ctx(box))
    assert f"holds {fprs[0]}, {fprs[1]}, not the pinned key {fprs[0]}: removed it" in str(ei.value)
    assert "dpkg -P cuda-keyring" in box.ran and box.written == {}
    # the repo unreachable: one line naming it
    box = _Box(one, download_rc=90)
    with pytest.raises(StepError) as ei:
        ch.apply(_ctx(box))
    assert str(ei.value) == ("unreachable from rig: NVIDIA CUDA repo http://x/repos/debian12/x86_64/: "
                             "Could not connect to x:80 (10.0.0.9). - connect (111: Connection refused)")


def test_apt_is_asked_for_the_headers_candidate_only_when_headers_may_be_installed():
    """apt-cache loads the whole package cache: not part of the facts command, asked (by the
    step) only when headers_plan may look at the candidate."""
    from provision.facts import host as host_facts
    assert "apt-cache" not in host_facts.script("/m")
    gpus = {"count": 1}
    c = cfg(gpus=gpus, system={"driver": "install"})
    assert system.headers_may_be_wanted(c, hf(), GF_OK) is False  # the GPU answers: no DKMS build
    assert system.headers_may_be_wanted(c, hf(), GF_NONE) is True  # a driver to install
    assert system.headers_may_be_wanted(c, hf(headers=True), GF_NONE) is False
    assert system.headers_may_be_wanted(cfg(gpus=gpus, system={"kernel_headers": True}), hf(), GF_OK) is True
    assert system.headers_may_be_wanted(cfg(gpus=gpus, system={"kernel_headers": False, "driver": "install"}),
                                        hf(), GF_NONE) is False
    # whenever headers_plan would look at the candidate, the step asks apt for it
    for kw in ({}, {"kernel_headers": True}, {"kernel_headers": False}):
        for driver in ("install", "require"):
            for gf in (GF_OK, GF_NONE):
                for h in (hf(), hf(headers=True), hf(headers_candidate=None)):
                    c = cfg(gpus=gpus, system={**kw, "driver": driver})
                    dkms = not gf.available and driver == "install"
                    if not system.headers_may_be_wanted(c, h, gf):
                        notes: list[str] = []
                        assert system.headers_plan(c, h, dkms, notes) == [] and not notes
