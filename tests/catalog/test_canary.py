"""Canary runs: the catalog's accepted hostile values go through what the steps really run, and
a canary file they all name (`touch CANARY`, `$(touch CANARY)`, `> CANARY`, ...) must never appear.

* `provision --check` with `connection: local` (commands run here, through bash), several hosts,
  every key that reaches the rig holding a hostile value at once;
* the same through real SSH (Tier A sshd on 127.0.0.1), through the `invoke` command line;
* applied (not --check): the llama step's clone/fetch/resolve with a hostile ref and prefix and a
  repository at a hostile path, against a real local git repository.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.app import App
from provision.console import Console, Environment
from provision.engine import Context
from provision.errors import InventoryError, StepError
from provision.steps import llama as llama_step
from provision.target import LocalTarget
from tests.catalog import record
from tests.catalog.cases import CASES

PART = "canary runs"
REPO = Path(__file__).resolve().parents[2]
RIG_KEYS = ("llama_cpp.ref", "llama_cpp.cmake_options", "model.revision", "model.include", "model.dir",
            "model.pip_find_links", "server.alias", "server.extra_args", "paths.prefix", "paths.state_dir")


def accepted_payloads(canary: str) -> dict[str, list]:
    """Per key that reaches the rig: the hostile values of the catalog that the inventory accepts."""
    out: dict[str, list] = {k: [] for k in RIG_KEYS}
    for c in CASES:
        if c.path not in out:
            continue
        v = c.fill(canary)
        try:
            inv.from_data({"hosts": {"r": {"connection": {"type": "local"}, c.section: {c.key: v}}}})
        except InventoryError:
            continue
        out[c.path].append(v)
    out["llama_cpp.ref"].append("master")  # one host in four gets past the llama step's resolve
    return out


def git_repo(path: Path) -> Path:
    """A real git repository with one commit on `master` (at a path that is itself hostile)."""
    path.mkdir(parents=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=path, env=env, check=True)
    return path


def hostile_hosts(tmp: Path, canary: str, base_entry: dict) -> tuple[dict, int]:
    pay = accepted_payloads(canary)
    n = max(len(v) for v in pay.values())
    assert n >= 5 and all(pay.values()), {k: len(v) for k, v in pay.items()}
    repo = git_repo(tmp / f"repo $(touch {canary}); x'y")
    hosts = {}
    for i in range(n):
        e = json.loads(json.dumps(base_entry))
        e.setdefault("llama_cpp", {})["repo"] = str(repo)
        e.setdefault("model", {})["endpoint"] = "http://127.0.0.1:9"  # refused at once: no hub here
        e.setdefault("gpus", {})["count"] = 0
        for key, vals in pay.items():
            sec, k = key.split(".")
            e.setdefault(sec, {})[k] = vals[i % len(vals)]
        hosts[f"h{i}"] = e
    return {"hosts": hosts}, sum(len(v) for v in pay.values())


def run_app(inventory: Path, args: dict) -> tuple[int, str]:
    out = io.StringIO()
    app = App(inventory_path=str(inventory), env=Environment(out, out, False))
    rc = app.provision(None, all_hosts=True, **args)
    return int(rc), out.getvalue()


def test_local_check_runs_no_hostile_value(tmp_path):
    canary = str(tmp_path / "CANARY")
    data, n_values = hostile_hosts(tmp_path, canary, {"connection": {"type": "local"}})
    p = tmp_path / "hosts.yaml"
    p.write_text(json.dumps(data))
    rc, out = run_app(p, {"check": True})
    assert "Traceback" not in out and rc in (0, 1), out
    rc2, out2 = run_app(p, {"check": True, "skip": "llama,model"})  # service and opencode plan too
    assert "Traceback" not in out2 and rc2 in (0, 1), out2
    assert not Path(canary).exists(), out + out2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hosts.yaml", next(
        x.name for x in tmp_path.iterdir() if x.name.startswith("repo "))]  # --check made nothing
    for i in range(n_values - 1):
        record(PART, f"canary local --check value {i}", "harmless")


@pytest.mark.sshd
def test_ssh_check_through_the_cli_runs_no_hostile_value(sshd, tmp_path):
    canary = str(tmp_path / "CANARY")
    base = sshd.root_rig.inventory_entry()
    data, n_values = hostile_hosts(tmp_path, canary, base)
    first = dict(list(data["hosts"].items())[:4])  # 4 hosts through SSH: every key hostile in each
    p = tmp_path / "hosts.yaml"
    p.write_text(json.dumps({"hosts": first}))
    r = subprocess.run([sys.executable, "-m", "invoke", "-r", str(REPO), "provision", "--all", "--check",
                        "--inventory", str(p)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "UNREACHABLE" not in r.stdout + r.stderr
    assert not Path(canary).exists()
    for h in first:
        record(PART, f"canary ssh --check host {h}", "harmless")


@pytest.mark.parametrize("ref_payload", ["$(touch${IFS}{canary})", "%n-%h-%u", "$HOME${PATH}"])
def test_llama_sync_applied_with_hostile_ref_and_prefix(tmp_path, ref_payload):
    """Not --check: clone, fetch and resolve really run, with a hostile ref, a prefix full of
    shell syntax and a repository at a hostile path. The ref is not in the repository: the step
    says so in one line; the clone is where the prefix says, literally; no canary."""
    canary = str(tmp_path / "CANARY")
    ref = ref_payload.replace("{canary}", canary)
    repo = git_repo(tmp_path / f"up $(touch {canary})")
    prefix = tmp_path / f"opt; touch {canary}; '$(touch {canary})'"
    host = inv.from_data({"hosts": {"box": {"connection": {"type": "local"},
                                            "llama_cpp": {"repo": str(repo), "ref": ref},
                                            "paths": {"prefix": str(prefix),
                                                      "state_dir": str(tmp_path / "state")}}}}).hosts["box"]
    out = io.StringIO()
    ctx = Context(host, LocalTarget(host), Console(Environment(out, out, False)))
    ll = llama_step.Llama(ctx)
    with pytest.raises(StepError) as ei:
        ll.sync(ll.view())
    assert str(ei.value) == f"llama_cpp.ref {ref!r} not found in {repo}"
    assert (prefix / "llama.cpp" / "src" / ".git").is_dir()  # the value was a path, nothing else
    assert not Path(canary).exists()
    # second run: the clone exists, so it fetches (origin set again to the same hostile path)
    with pytest.raises(StepError):
        ll.sync(ll.view())
    assert not Path(canary).exists()
    record(PART, f"canary llama sync {ref_payload}", "harmless")


def test_llama_second_fence_if_validation_were_bypassed(tmp_path):
    """Values put into the settings after validation (code, a lock) never reach git as options:
    the step checks them again, and `--` ends git's options anyway."""
    canary = tmp_path / "pwned"
    host = inv.from_data({"hosts": {"box": {"connection": {"type": "local"},
                                            "paths": {"prefix": str(tmp_path / "p")}}}}).hosts["box"]
    host.cfg["llama_cpp"]["repo"] = f"--upload-pack=touch {canary};"
    out = io.StringIO()
    ctx = Context(host, LocalTarget(host), Console(Environment(out, out, False)))
    ll = llama_step.Llama(ctx)
    with pytest.raises(StepError) as ei:
        ll.resolve_readonly(ll.view())
    assert str(ei.value).startswith("llama_cpp.repo: must be a git URL")
    # and git itself, given the value after `--`, takes it for a repository
    r = subprocess.run(f"git ls-remote -- '--upload-pack=touch {canary};' master", shell=True,
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and not canary.exists()
    record(PART, "canary llama second fence", "refused")
