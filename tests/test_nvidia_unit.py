"""Pure parts behind the CUDA/driver work and the unreachable-dependency lines: OpenPGP keyring
fingerprints, the facts' new sections, apt/pip/git failure parsing, the hub's transport errors,
the llama step's CUDACXX/CUDAToolkit_ROOT hand-off."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from provision import inventory as inv
from provision import openpgp, reach
from provision.console import Console, Environment
from provision.engine import Context
from provision.errors import StepError
from provision.facts import host as host_facts
from provision.steps import llama as L

DATA = Path(__file__).with_name("data")
TWO = (DATA / "keyring-two-keys.asc").read_text()
TWO_FPRS = (DATA / "keyring-two-keys.fpr").read_text().split()


# -- OpenPGP ------------------------------------------------------------------------------------

def test_fingerprints_armored_and_binary():
    assert openpgp.primary_fingerprints(TWO) == TWO_FPRS  # RSA (v4) and ed25519 (v4)
    raw = openpgp.dearmor(TWO)
    assert openpgp.primary_fingerprints(raw) == TWO_FPRS
    assert openpgp.primary_fingerprints(TWO.encode()) == TWO_FPRS


@pytest.mark.parametrize("data", [b"", b"\x00\x01\x02", b"-----BEGIN PGP x-----\n!!\n-----END PGP x-----\n",
                                  b"\x99\x00\x10abc"])
def test_not_a_keyring(data):
    with pytest.raises(openpgp.KeyringError):
        openpgp.primary_fingerprints(data)


def test_normalize():
    assert openpgp.normalize("eb69 3b30 35cd 5710 e231  e123 a4b4 6996 3bf8 63cc") == \
        "EB693B3035CD5710E231E123A4B469963BF863CC"
    assert openpgp.normalize("0xabc") == "ABC"


# -- facts --------------------------------------------------------------------------------------

def facts_output(**sections) -> str:
    base = {"os": "ID=ubuntu\nVERSION_ID=\"24.04\"\nPRETTY_NAME=\"Ubuntu 24.04\"", "kernel": "6.18.44-fc-v669-gpu",
            "arch": "x86_64", "init": "systemd"}
    base.update(sections)
    return "".join(f"@@{k}\n{v}\n" for k, v in base.items())


def test_new_fact_sections():
    key = base64.b64encode(openpgp.dearmor(TWO)).decode()
    hf = host_facts.parse(facts_output(
        nvcc="/usr/local/bin/nvcc\nCuda compilation tools, release 13.0, V13.0.88\nhere /usr/local/cuda-13.0/bin",
        headers_candidate="(none)", secureboot="SecureBoot enabled", mok="/var/lib/dkms/mok.pub is already enrolled",
        nouveau="loaded\nblacklisted /etc/modprobe.d/blacklist-nouveau.conf", cuda_keyring=key,
        cuda_lists="@file /etc/apt/sources.list.d/cuda-ubuntu2404-x86_64.list\ndeb [x] http://r/ /",
        nvidia_module="NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05"))
    assert (hf.nvcc_path, hf.nvcc_version, hf.cuda_home) == ("/usr/local/bin/nvcc", "13.0", "/usr/local/cuda-13.0")
    assert hf.headers_candidate is None and hf.secure_boot is True and hf.mok_enrolled
    assert hf.nouveau_loaded and hf.nouveau_blacklisted
    assert hf.cuda_keyring_fprs == tuple(TWO_FPRS)
    assert hf.cuda_lists == {"/etc/apt/sources.list.d/cuda-ubuntu2404-x86_64.list": "deb [x] http://r/ /\n"}
    assert hf.nvidia_module.endswith("580.95.05") and hf.distro == "ubuntu2404"
    # nothing there
    hf = host_facts.parse(facts_output(nvcc="", headers_candidate="6.8.0-90.91", secureboot="", cuda_keyring=""))
    assert hf.cuda_home is None and hf.headers_candidate == "6.8.0-90.91" and hf.secure_boot is None
    assert hf.cuda_keyring_fprs is None and not hf.nouveau_loaded and hf.nvidia_module is None
    # nvcc found on PATH without a dry-run answer: its own dir; a keyring that is no keyring
    hf = host_facts.parse(facts_output(nvcc="/usr/local/cuda/bin/nvcc\nCuda compilation tools, release 12.8, V12.8.93",
                                       secureboot="efivar 0", cuda_keyring="bm90IGEga2V5cmluZw=="))
    assert hf.cuda_home == "/usr/local/cuda" and hf.secure_boot is False and hf.cuda_keyring_fprs == ()
    assert host_facts.parse(facts_output(secureboot="This system doesn't support Secure Boot")).secure_boot is False
    assert host_facts.parse(facts_output(secureboot="efivar 1")).secure_boot is True


# -- apt / pip / git / hub -----------------------------------------------------------------------

APT_UPDATE_DEAD_PROXY = """\
Err:1 http://deb.debian.org/debian bookworm InRelease
  Could not connect to 10.250.0.1:1 (10.250.0.1). - connect (111: Connection refused)
Err:2 http://10.250.0.1:4000/repos/debian12/x86_64  InRelease
  Could not connect to 10.250.0.1:4000 (10.250.0.1). - connect (111: Connection refused)
Reading package lists...
W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Could not connect to 10.250.0.1:1 (10.250.0.1). - connect (111: Connection refused)
W: Failed to fetch http://10.250.0.1:4000/repos/debian12/x86_64/InRelease  Could not connect to 10.250.0.1:4000 (10.250.0.1). - connect (111: Connection refused)
W: Some index files failed to download. They have been ignored, or old ones used instead.
"""


def test_apt_unreachable_names_each_source_once():
    msg = reach.apt_unreachable("rig", APT_UPDATE_DEAD_PROXY,
                                {"http://10.250.0.1:4000/repos/debian12/x86_64/": "NVIDIA CUDA repo"},
                                proxy="http://10.250.0.1:1")
    assert msg == ("unreachable from rig (through the apt proxy http://10.250.0.1:1): apt mirror "
                   "http://deb.debian.org/debian: Could not connect to 10.250.0.1:1 (10.250.0.1). - "
                   "connect (111: Connection refused); NVIDIA CUDA repo http://10.250.0.1:4000/repos/"
                   "debian12/x86_64/: Could not connect to 10.250.0.1:4000 (10.250.0.1). - connect "
                   "(111: Connection refused)")
    assert "\n" not in msg
    assert reach.apt_unreachable("rig", "Hit:1 http://deb.debian.org/debian bookworm InRelease\n") is None
    assert reach.apt_error("x\nE: Unable to locate package cuda-toolkit-13-0\n") == \
        "Unable to locate package cuda-toolkit-13-0"


def test_apt_print_uris_and_probe_script():
    out = ("'http://deb.debian.org/debian/dists/bookworm/InRelease' deb.debian.org_debian_dists_bookworm_InRelease 0 \n"
           "'http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz' x 0 \n"
           "'http://10.250.0.1:4000/repos/debian12/x86_64/InRelease' y 0 \n"
           # a local flat repo (no InRelease there at all) and a CD: on the box, nothing to reach
           "'file:/srv/local-repo/./InRelease' z 0 \n'cdrom:[Debian 12]/dists/bookworm/InRelease' w 0 \n")
    urls = reach.print_uris_sources(out)
    assert urls == ["http://deb.debian.org/debian/dists/bookworm/InRelease",
                    "http://10.250.0.1:4000/repos/debian12/x86_64/InRelease"]
    s = reach.apt_probe_script(urls, proxy="http://p:3142")
    assert "download-file http://deb.debian.org/debian/dists/bookworm/InRelease" in s
    assert "Acquire::http::Proxy=http://p:3142" in s and "mktemp -d" in s and "rm -rf" in s
    assert reach.source_base("http://x/repos/debian12/x86_64/Packages") == "http://x/repos/debian12/x86_64/"


PIP_DEAD = ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after "
            "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection "
            "object at 0x7f>: Failed to establish a new connection: [Errno 111] Connection refused')': /\n"
            "ERROR: Could not find a version that satisfies the requirement huggingface-hub<3,>=2.4 "
            "(from versions: none)\n")


def test_pip_unreachable():
    m = {"pip_index_url": None, "pip_find_links": "http://10.250.3.1:4444/"}
    assert reach.pip_unreachable("rig", PIP_DEAD, m) == (
        "pip wheelhouse http://10.250.3.1:4444/ unreachable from rig: [Errno 111] Connection refused")
    assert reach.pip_unreachable("rig", "ERROR: No matching distribution found for x\n", m) is None
    assert reach.pip_where({"pip_index_url": None, "pip_find_links": None}).startswith(
        "pip index https://pypi.org/simple/ (PyPI")
    assert reach.parse_url_probe("@@ok\n") is None
    assert reach.parse_url_probe("@@fail [Errno 111] Connection refused\n") == "[Errno 111] Connection refused"


def test_git_unreachable():
    err = "fatal: unable to connect to 10.250.3.1:\n10.250.3.1[0: 10.250.3.1]: errno=Connection refused\n"
    assert reach.git_unreachable("rig", "git://10.250.3.1:1/llama.cpp", err) == (
        "git remote git://10.250.3.1:1/llama.cpp unreachable from rig: unable to connect to "
        "10.250.3.1: 10.250.3.1[0: 10.250.3.1]: errno=Connection refused")
    assert reach.git_unreachable("rig", "https://x/y", "fatal: unable to access 'https://x/y/': "
                                 "Could not resolve host: x\n").endswith("unable to access 'https://x/y/': "
                                                                         "Could not resolve host: x")


def test_hub_transport_errors_are_caught():
    types = reach.network_errors()
    assert OSError in types
    import httpx2  # what huggingface_hub 2.x raises: no OSError
    assert issubclass(httpx2.ConnectError, types) and not issubclass(httpx2.ConnectError, OSError)


def test_hub_unreachable_is_one_line():
    from provision.steps import model as M
    cfg = inv.from_data({"hosts": {"h": {"connection": {"type": "local"},
                                         "model": {"endpoint": "http://127.0.0.1:9"}}}}).hosts["h"].cfg
    with pytest.raises(StepError) as ei:
        M.resolve(cfg, None)
    msg = str(ei.value)
    assert msg.startswith("the hub http://127.0.0.1:9 unreachable from this machine (resolving "
                          "unsloth/Qwen3.5-122B-A10B-GGUF@main): ConnectError") and "\n" not in msg


# -- the llama step's hand-off -----------------------------------------------------------------

def ctx_with(nvcc, home, cuda=True):
    h = inv.from_data({"hosts": {"h": {"connection": {"type": "local"}, "llama_cpp": {"cuda": cuda}}}}).hosts["h"]
    ctx = Context(h, None, Console(Environment(io.StringIO(), io.StringIO(), False)))
    ctx.facts["host"] = host_facts.parse(facts_output(
        nvcc=(f"{nvcc}\nCuda compilation tools, release 13.0, V13.0.88\nhere {home}/bin" if nvcc else "")))
    return ctx


def test_build_env_hands_the_toolkit_to_cmake():
    env = L.Llama(ctx_with("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0")).build_env()
    assert env == {"CCACHE_DIR": "/opt/llama-rig/ccache", "CCACHE_BASEDIR": "/opt/llama-rig/llama.cpp",
                   "CUDACXX": "/usr/local/cuda/bin/nvcc", "CUDAToolkit_ROOT": "/usr/local/cuda-13.0"}
    assert "CUDACXX" not in L.Llama(ctx_with(None, None, cuda=False)).build_env()
    with pytest.raises(StepError, match="llama_cpp.cuda is on but there is no nvcc on this host"):
        L.Llama(ctx_with(None, None)).build_env()
