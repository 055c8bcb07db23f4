"""Every dependency a run reaches out to, unreachable: ONE line naming it and where from, never a
traceback — in --check (a read-only probe) and when applying, for one host and for two at once
(the healthy host goes on; the exit status is 1).

Two Tier B rigs: `good` reaches everything (the host side: apt proxy, stand-in NVIDIA repo, git
daemon, wheelhouse, stand-in hub); `bad` has one dependency pointed at a port where nothing
listens (10.250.0.1:1 / its own host side:1), one dependency per test:
  apt mirror (through a dead apt proxy) · NVIDIA CUDA repo · git remote · pip wheelhouse · hub
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from tests.fixtures.rig_ccache import seed_ccache
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub

pytestmark = pytest.mark.rig
REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
DEAD = "10.250.0.1:1"  # the apt proxy's address, a port nothing listens on


@pytest.fixture(scope="module")
def pair(rig_factory, nvidia_repo, llama_upstream, llama_upstream_daemon, wheelhouse_dir,
         tmp_path_factory):
    good, bad = rig_factory(), rig_factory()
    hub = StandInHub(good.host_side).start()
    hub_bad_side = StandInHub(bad.host_side).start()
    tmp = tmp_path_factory.mktemp("unreach")
    for h in (hub, hub_bad_side):
        make_gguf_like_shards(h, REPO, n=1, size=4096, decoys=False)
    wheels = {r.name: WheelServer(wheelhouse_dir, r.host_side) for r in (good, bad)}
    daemon = llama_upstream_daemon(good.host_side)
    try:
        seed_ccache(good)

        def entry(rig, h, **sec):
            # good builds llama.cpp (the default packages); bad needs only git and a venv
            pk = {} if rig is good else {"packages": ["git", "python3-venv"]}
            e = rig.inventory_entry(
                connection={"connect_timeout": 5},
                system={**pk, "kernel_headers": False},
                llama_cpp={"repo": daemon.url("llama.cpp"), "cuda": False, "native": False,
                           "prebuilt_ui": False, "targets": ["llama-server"]},
                model={"repo": REPO, "include": "UD-Q6_K_XL/*", "endpoint": h.endpoint,
                       "pip_find_links": wheels[rig.name].url, "free_space_margin_gb": 0,
                       "token_env": "LLAMA_RIG_TEST_HF_TOKEN"})
            for k, v in sec.items():
                e.setdefault(k, {}).update(v)
            return e

        def write(bad_sections: dict, good_sections: dict | None = None) -> Path:
            p = tmp / "hosts.yaml"
            p.write_text(yaml.safe_dump({"hosts": {
                "good": entry(good, hub, **(good_sections or {})),
                "bad": entry(bad, hub_bad_side, **bad_sections)}}, sort_keys=False))
            return p

        # the packages first (what the system step installs anyway)
        rc, out = run(write({}), "good,bad", only="facts,system")
        assert rc == 0, out
        yield {"good": good, "bad": bad, "write": write, "repo": nvidia_repo, "hub": hub,
               "wheels": wheels, "daemon": daemon}
    finally:
        for w in wheels.values():
            w.stop()
        hub.stop()
        hub_bad_side.stop()
        rig_factory.stop(good)
        rig_factory.stop(bad)


def run(path: Path, hosts: str, check: bool = False, only: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    rc = int(App(str(path), env=Environment(out, out, False)).provision(hosts, check=check, only=only))
    return rc, out.getvalue()


def one_line(out: str, host: str, step: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"[{host}] {step}: FAILED: ")]
    assert len(lines) == 1, out
    assert "Traceback" not in out and "File \"" not in out, out
    return lines[0].split(": FAILED: ", 1)[1]


def recap(out: str) -> dict[str, str]:
    rows = {}
    for ln in out.splitlines():
        parts = ln.split()
        if parts[:1] and parts[0] in ("good", "bad") and len(parts) >= 7:
            rows[parts[0]] = parts[1]
    return rows


def both_modes(pair, bad: dict, only: str, step: str, expect: str, good: dict | None = None,
               after=None) -> None:
    """--check then apply; alone and with the good host; the same one line each time."""
    path = pair["write"](bad, good)
    for check in (True, False):
        for hosts in ("bad", "good,bad"):
            rc, out = run(path, hosts, check=check, only=only)
            assert rc == 1, out
            msg = one_line(out, "bad", step)
            print(f"\n[{'--check' if check else 'apply'} {hosts}] {msg}")
            assert re.search(expect, msg), (msg, expect)
            if hosts == "good,bad":
                assert recap(out) == {"good": "ok", "bad": "FAILED"}, out
                assert "1 of 2 hosts failed" in out
            if after:
                after(check)


def test_apt_mirror_unreachable(pair):
    bad = pair["bad"]
    try:
        both_modes(pair, {"system": {"apt_proxy": f"http://{DEAD}", "extra_packages": ["hello"]}},
                   "facts,system", "system",
                   r"^unreachable from bad \(through the apt proxy http://10\.250\.0\.1:1\): apt mirror "
                   r"http://deb\.debian\.org/debian(-security)?: Could not connect to 10\.250\.0\.1:1 .*"
                   r"Connection refused",
                   good={"system": {"extra_packages": ["hello"]}})
        assert bad.sh("dpkg -s hello", check=False).returncode != 0
    finally:
        bad.sh("rm -f /etc/apt/apt.conf.d/99llama-rig-proxy")


def test_nvidia_repo_unreachable(pair):
    repo = pair["repo"]
    both_modes(pair, {"llama_cpp": {"cuda": True}, "gpus": {"count": 6},
                      "system": {"cuda_repo": f"http://{DEAD}/repos", "cuda_toolkit": repo.toolkit}},
               "facts,system", "system",
               r"^unreachable from bad: NVIDIA CUDA repo http://10\.250\.0\.1:1/repos/debian12/x86_64/: "
               r"Could not connect to 10\.250\.0\.1:1 .*Connection refused\)$")
    assert pair["bad"].sh("dpkg -s cuda-keyring", check=False).returncode != 0


def test_git_remote_unreachable(pair):
    both_modes(pair, {"llama_cpp": {"repo": f"git://{pair['bad'].host_side}:1/llama.cpp"}},
               "llama", "llama",
               rf"^git remote git://{re.escape(pair['bad'].host_side)}:1/llama\.cpp unreachable from "
               r"bad: .*Connection refused")


def test_pip_wheelhouse_unreachable(pair):
    both_modes(pair, {"model": {"pip_find_links": f"http://{pair['bad'].host_side}:1/"}},
               "model", "model",
               rf"^pip wheelhouse http://{re.escape(pair['bad'].host_side)}:1/ unreachable from bad: "
               r".*Connection refused")


def test_hub_unreachable(pair):
    both_modes(pair, {"model": {"endpoint": f"http://{DEAD}"}}, "model", "model",
               r"^the hub http://10\.250\.0\.1:1 unreachable from this machine \(resolving "
               r"unsloth/Qwen3\.5-122B-A10B-GGUF@main\): ConnectError: .*Connection refused")
