"""Every key of the inventory SCHEMA against every hostile or malformed value of its kind.

Each case is either refused -- one line that names the file, the host and the key, with the
value cut -- or accepted and then proven harmless where it goes: the rendered llama-server unit
keeps its lines and its settings, its ExecStart= reads back (as systemd reads it) as exactly the
argv llama-rig meant, every shell command planned by the system/service/model steps keeps its
word count, and the opencode config is the same JSON after a round trip. (The canary runs, which
execute what the steps run, are in test_canary.py.)"""
from __future__ import annotations

import json
import shlex

import pytest

from provision import inventory as inv
from provision import llama_build as lb
from provision import values
from provision.errors import ExitStatus, InventoryError
from provision.facts.gpu import GpuFacts
from provision.facts.host import HostFacts
from provision.steps import model as model_step
from provision.steps import opencode, service, system
from provision.target import join
from tests.catalog import record
from tests.catalog.cases import CASES, CONTROL, Case
from tests.catalog.systemd_words import exec_words, unescape_percent, unit_settings

PART = "inventory keys"
CANARY = "/nonexistent-llama-rig/CANARY"  # nothing runs in these tests: a fixed path is enough
MODEL = "/var/lib/llama-rig/models/org__name/Q/model-00001-of-00002.gguf"
BASE = {"connection": {"address": "10.0.0.5"}}

HF = HostFacts(os_id="debian", os_version="12", os_codename="bookworm", os_pretty="Debian 12",
               kernel="6.1.0-27-amd64", arch="x86_64", cpus=8, cpu_model="cpu", mem_total_kib=1 << 26,
               disk_path="/", disk_free_bytes=1 << 40, nvcc_path=None, nvcc_version=None,
               gcc_version="12.2.0", cmake_version="3.25.1", packages={}, kernel_headers=True,
               is_systemd=True)
GF = GpuFacts(False, "nvidia-smi not found (no NVIDIA driver installed)")


def host_entry(case: Case, value) -> dict:
    entry = json.loads(json.dumps(BASE))
    if case.section is None:
        entry[case.key] = value
    else:
        entry.setdefault(case.section, {})[case.key] = value
    return entry


def load(case: Case, value):
    return inv.from_data({"hosts": {"rig": host_entry(case, value)}}, "hosts.yaml").hosts["rig"].cfg


def benign(v):
    """The same shape with harmless text: what a hostile value is compared with."""
    if isinstance(v, str):
        return "/tmp/benign" if v.startswith("/") else "benign"
    if isinstance(v, list):
        return [benign(x) for x in v]
    if isinstance(v, dict):
        return {k: benign(x) for k, x in v.items()}
    return v


# -- where accepted values go --------------------------------------------------------------------


def unit_proof(cfg: dict, base: dict) -> None:
    unit = service.render_unit(cfg, MODEL)
    ref = service.render_unit(base, MODEL)
    assert len(unit.split("\n")) == len(ref.split("\n")), unit
    got, want = unit_settings(unit), unit_settings(ref)
    assert [k for k, _ in got] == [k for k, _ in want]  # no setting added, none lost
    settings = dict(got)
    assert exec_words(settings["ExecStart"]) == service.server_argv(cfg, MODEL, service.binary_path(cfg))
    assert exec_words(settings["ExecStartPost"])[0] == service.helper_path(cfg)
    alias = cfg["server"]["alias"] or "llama-server"
    assert unescape_percent(settings["Description"]) == f"llama.cpp server ({alias}) - llama-rig"
    assert unescape_percent(settings["WorkingDirectory"]) == service.user_home(cfg)
    assert unescape_percent(settings["User"]) == cfg["paths"]["service_user"]


def rpc_unit_proof(cfg: dict, base: dict) -> None:
    """The RPC worker's unit (rendered as if this host were a worker): the same lines and
    settings, ExecStart= and the cache paths read back as written."""
    from provision import rpc
    c, b = json.loads(json.dumps(cfg)), json.loads(json.dumps(base))
    for x in (c, b):
        x["rpc"]["bind"] = "10.0.0.5"
    binary = rpc.bin_dir(c) + "/ggml-rpc-server"
    unit, ref = rpc.render_worker_unit(c, binary), rpc.render_worker_unit(b, binary)
    assert len(unit.split("\n")) == len(ref.split("\n")), unit
    got, want = unit_settings(unit), unit_settings(ref)
    assert [k for k, _ in got] == [k for k, _ in want]
    settings = dict(got)
    assert exec_words(settings["ExecStart"]) == rpc.worker_argv(c, binary)
    assert exec_words(settings["ReadWritePaths"]) == [rpc.cache_dir(c)]
    envs = [exec_words(v)[0] for k, v in got if k == "Environment"]
    assert f"LLAMA_CACHE={rpc.cache_dir(c)}" in envs


def commands(cfg: dict) -> list[str]:
    c2 = json.loads(json.dumps(cfg))
    c2["llama_cpp"]["cuda"] = False
    out = [cmd for ch in system.plan(c2, HF, GF) for cmd in getattr(ch, "commands", [])]
    out += [cmd for ch in service.plan(cfg, service.Observed(), MODEL, None)
            for cmd in getattr(ch, "commands", [])]
    out += model_step.venv_commands(cfg)
    return out


def shell_proof(cfg: dict, base: dict) -> None:
    got, want = commands(cfg), commands(base)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(shlex.split(g)) == len(shlex.split(w)), (g, w)


TREE = lb.TreeFacts("GGML_CUDA_FA_QUANTS", frozenset({"llama-server", "llama-bench", "llama-fit-params"}),
                    6895, False, "4341dc8bc")


def build_proof(cfg: dict) -> None:
    """cmake's configure line: every -D argument is one shell word, as built."""
    archs = lb.gpu_archs(cfg["llama_cpp"]["cuda_architectures"], ["8.6"])
    args = lb.cmake_args(cfg, TREE, archs)
    line = f"cmake -S /src -B /build {join(args)}"
    assert shlex.split(line)[5:] == args


def config_proof(cfg: dict) -> None:
    text = json.dumps(opencode.merge(None, cfg, opencode.base_url(cfg, "10.0.0.5"), False), indent=2)
    back = json.loads(text)
    assert list(back["provider"][cfg["opencode"]["provider_id"]]["models"]) == [opencode.model_id(cfg)]


# -- the cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_refused_or_harmless(case: Case):
    value = case.fill(CANARY)
    try:
        cfg = load(case, value)
    except InventoryError as e:
        msg = str(e)
        assert e.status == ExitStatus.BAD_INPUT == 2
        assert msg.startswith(f"hosts.yaml: host 'rig': {case.path}"), msg
        assert values.bad_char(msg) is None and len(msg) <= 400, msg  # one line, cut
        assert "a" * (values.CUT + 1) not in msg and "9" * (values.CUT + 1) not in msg
        record(PART, case.id, "refused")
        return
    # accepted: no control character, nothing that could pass as an option where one is fatal
    assert case.payload.removeprefix("item_").removeprefix("key_").removeprefix("value_") not in CONTROL, case
    base = load(case, benign(value))
    unit_proof(cfg, base)
    rpc_unit_proof(cfg, base)
    shell_proof(cfg, base)
    build_proof(cfg)
    config_proof(cfg)
    record(PART, case.id, "harmless")


def test_catalog_is_large_and_covers_every_key():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)
    keys = {c.path for c in CASES}
    assert keys == {f"{s}.{k}" for s, fs in inv.SCHEMA.items() for k in fs} | set(inv.TOP_LEVEL_HOST_KEYS)


# -- kinds: what each must refuse, and what it must keep accepting ---------------------------------

GOOD = {
    "deb_package": ["cuda-toolkit-12-8", "g++", "libstdc++6", "python3.11", "linux-headers-6.1.0-27-amd64"],
    "git_url": ["https://github.com/ggml-org/llama.cpp", "http://10.0.0.1:8080/llama.cpp.git",
                "git://127.0.0.1:9418/llama.cpp", "ssh://git@github.com/ggml-org/llama.cpp.git",
                "file:///srv/git/llama.cpp", "git@github.com:ggml-org/llama.cpp.git",
                "mirror:llama.cpp", "/srv/git/llama.cpp", "https://[::1]:8443/llama.cpp"],
    "git_ref": ["master", "b6895", "v0.5.0", "refs/tags/b6895", "feature/x-y_z",
                "4341dc8f0e1b2a3c4d5e6f708192a3b4c5d6e7f8", "HEAD", "refs/pr/1"],
    "host": ["192.168.1.50", "rig.lan", "rig", "::1", "[fe80::1]", "0.0.0.0", "a-b.example.com."],
    "hf_model_id": ["unsloth/Qwen3.5-122B-A10B-GGUF", "org/name", "a_b/c.d-e"],
    "proxy_url": ["http://10.0.0.1:3142", "https://proxy.lan", "http://user:pw@proxy:3128/",
                  "http://[fd00::1]:3142"],
    "http_url": ["https://huggingface.co", "http://127.0.0.1:8080/simple/", "http://[::1]:9/v1"],
    "abs_path": ["/opt/llama-rig", "/data/models with space", "/srv/%weird$dir"],
    "alias": ["Qwen3.5-122B-A10B-UD-Q6_K_XL", "my model", "a/b:c"],
    "pip_requirement": ["huggingface-hub>=2.4,<3", "huggingface_hub==2.4.0", "huggingface-hub[hf_xet]"],
    "cuda_arch": ["86", "90a", "120-real", "native", "all-major"],
    "service_user": ["llama", "_llama", "llama-rig"],
    "env_name": ["HF_TOKEN", "_X1"],
    "ssh_address": ["192.168.1.50", "rig.lan", "gpu1", "::1", "[::1]", "[::1]:2222",
                    "[fe80::1%eth0]:2222", "fe80::1%eth0", "10.0.0.5:2200", "rig.lan:22"],
    "rpc_address": ["10.0.0.2", "192.168.1.7", "172.16.0.1", "100.64.0.9", "127.0.0.1", "::1",
                    "fd00::2", "[fd00::2]"],
    "gpu_index": ["0", "7", "15"],
}
BAD = {
    "deb_package": ["cuda-toolkit-12-8; touch x", "-oDebug=1", "Cuda", "a", "pkg name", "pkg'"],
    "git_url": ["--upload-pack=touch x", "-u x", "ext::sh -c touch% x", "fd::3", "https://a b/c",
                "ftp://x/y", "relative/path", "https://-oProxyCommand=x/y", "user@-oProxy:x",
                "http://x:99999/", ""],
    "git_ref": ["--upload-pack=x", "-b", "a..b", "a b", "x~1", "x^", "a:b", "a?", "a*", "[a",
                "a\\b", "/a", "a/", "a//b", "a.", ".a", "a.lock", "a/.b", "@", "a@{1}", ""],
    "host": ["-oProxyCommand=x", "a b", "a;b", "[x]", "", "a..b", "x" * 300],
    "hf_model_id": ["not a repo id!!", "name", "a/b/c", "a--b/c", "a/b..c", "-a/b", "a/b-",
                    "a/b.git", "../../etc", ""],
    "proxy_url": ['http://x:3142";\nAcquire::x "y', 'http://x"', "ftp://x", "http://x y",
                  "http://x:3142/path'", "http://x:0/", "socks5://x:1080", "http://"],
    "http_url": ["javascript:alert(1)", "http://x/'", "http://a b", "ftp://x", "//x", "-x"],
    "abs_path": ["relative", "~/x", "", "/x\ny"],
    "alias": ["-x", "--api-key", "{env:HF_TOKEN}", "{file:/etc/shadow}", "x" * 300],
    "pip_requirement": ["-r /etc/passwd", "--index-url=http://evil", "pkg @ http://evil/x.whl",
                        "not a req!", ""],
    "cuda_arch": ["86;90", "-DX", "sm_86", "8.6", ""],
    "service_user": ["root", "Llama", "ll ama", "-x", "a" * 40],
    "env_name": ["HF-TOKEN", "1X", "X;Y", ""],
    "ssh_address": ["-oProxyCommand=x", "[x]", "[10.0.0.1]", "[::1]:0", "[::1]:99999", "a:b:c",
                    "rig:-1", "a b", "a;b", "[::1]:22:22", ""],
    "rpc_address": ["0.0.0.0", "::", "[::]", "::ffff:0.0.0.0", "8.8.8.8", "2001:4860::8888",
                    "224.0.0.1", "rig.lan", "localhost", "fe80::1%eth0", "-H", "10.0.0.2:50052", ""],
    "gpu_index": ["-1", "0,1", "a", "1.5", "GPU-1234", ""],
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_kind_accepts_what_users_write(kind):
    check = values.CHECKS[kind]
    for v in GOOD[kind]:
        assert check(v) is None, (kind, v, check(v))
        record("value kinds", f"kind {kind} good {v!r}", "harmless")


@pytest.mark.parametrize("kind", sorted(BAD))
def test_kind_refuses(kind):
    check = values.CHECKS[kind]
    for v in BAD[kind]:
        err = check(v)
        assert err and values.bad_char(err) is None and len(err) < 300, (kind, v, err)
        record("value kinds", f"kind {kind} bad {v!r}", "refused")


def test_git_ref_agrees_with_git_check_ref_format():
    """The ref rules are git's own: compare with the real `git check-ref-format`."""
    import subprocess
    for v in GOOD["git_ref"] + BAD["git_ref"]:
        if not v or v.startswith("-") or len(v) == 40:
            continue
        r = subprocess.run(["git", "check-ref-format", "--allow-onelevel", v], capture_output=True)
        assert (r.returncode == 0) == (values.git_ref(v) is None), v


def test_apt_reads_a_word_after_double_dash_as_a_package():
    """The second fence of system.packages: after `--` apt-get takes an option-looking word for a
    package name (simulated install, nothing changes)."""
    import shutil
    import subprocess
    assert shutil.which("apt-get"), "apt-get is needed (Debian/Ubuntu test machine)"
    r = subprocess.run(["apt-get", "install", "-s", "-q", "--", "-oDebug::NoLocking=1"],
                       capture_output=True, text=True)
    assert r.returncode == 100 and "Unable to locate package -oDebug::NoLocking" in r.stderr, r
