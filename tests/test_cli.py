"""The invoke command line: every task listed with a one-line help; `facts --host local` works."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def invoke(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _all_task_names(coll: dict, prefix="") -> dict[str, str]:
    out = {prefix + t["name"]: t["help"] for t in coll["tasks"]}
    for sub in coll.get("collections", []):
        out.update(_all_task_names(sub, prefix + sub["name"] + "."))
    return out


def _parse_list(text: str) -> dict[str, str]:
    """`invoke --list` text: '  name   help' lines, help wrapped onto indented lines."""
    lines = text.splitlines()
    assert lines[0] == "Available tasks:" and lines[1] == ""
    tasks: dict[str, str] = {}
    last = None
    for ln in lines[2:]:
        if not ln.strip():
            continue
        m = re.match(r"^  (\S+)(?:\s{2,}(.*))?$", ln)
        if m and not ln.startswith("   "):
            last = m.group(1)
            tasks[last] = (m.group(2) or "").strip()
        else:
            assert last is not None and ln.startswith(" " * 4), ln
            tasks[last] += " " + ln.strip()
    return tasks


def test_list_shows_every_task_with_one_line_help():
    r = invoke("--list")
    assert r.returncode == 0, r.stderr
    listed = _parse_list(r.stdout)
    j = invoke("--list", "--list-format=json")
    assert j.returncode == 0
    tree = _all_task_names(json.loads(j.stdout))
    assert set(listed) == set(tree)  # the text listing shows every task of the collection
    assert {"provision", "facts"} <= set(listed)
    for name, help_text in listed.items():
        assert help_text, f"{name} has no help"
        assert tree[name] and "\n" not in tree[name], f"{name}: help must be one line"
        assert help_text == " ".join(tree[name].split()), name
    # and it matches the collection tasks.py exports
    sys.path.insert(0, str(REPO))
    try:
        import tasks
    finally:
        sys.path.remove(str(REPO))
    assert set(tasks.ns.task_names) == set(tree)


def test_provision_help_long_flags_no_h_collision():
    r = invoke("--help", "provision")
    assert r.returncode == 0
    for flag in ("--host", "--inventory", "--check", "--diff", "--only", "--skip", "--set", "--all"):
        assert flag in r.stdout, flag
    assert not re.search(r"^\s+-h\b", r.stdout, re.M)  # -h stays help


def test_facts_host_local():
    r = invoke("facts", "--host", "local")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout.splitlines()
    assert out[0] == "facts: local"
    rows = {ln.split("  ", 1)[0]: ln.split("  ", 1)[1].strip() for ln in out[2:] if "  " in ln}
    osr = dict(l.split("=", 1) for l in Path("/etc/os-release").read_text().splitlines() if "=" in l)
    assert rows["os"] == osr["PRETTY_NAME"].strip('"')
    import os
    assert rows["kernel"] == f"{os.uname().release} ({os.uname().machine})"
    assert rows["cpu"].startswith(f"{os.cpu_count()} × ")
    assert set(rows) >= {"os", "kernel", "cpu", "memory", "disk free", "nvcc", "gcc / cmake",
                         "driver / CUDA"}


def test_provision_local_check_only_facts():
    r = invoke("provision", "--host", "local", "--check", "--only", "facts")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[local] facts: ok (no change)" in r.stdout
    assert "recap (check mode: nothing was changed)" in r.stdout
    row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("local "))
    assert row[1:3] == ["ok", "1"] and row[3:5] == ["0", "0"]


def test_unknown_task_and_unknown_host():
    r = invoke("provison")
    assert r.returncode != 0 and "No idea what 'provison' is!" in r.stderr
    r = invoke("facts", "--host", "lokal")
    assert r.returncode == 2
    assert r.stderr == "hosts.yaml: unknown host or group 'lokal' (did you mean 'local'?)\n"


def test_no_host_given_is_exit_2():
    r = invoke("provision", "--check")
    assert r.returncode == 2
    assert r.stderr == "hosts.yaml: no host given (use --host NAME, a group, or --all)\n"


def test_the_library_bytecode_is_cached_across_runs(tmp_path):
    """invoke turns .pyc writing off before loading tasks.py; tasks.py turns it back on for the
    library (it was compiled from source on every run), and leaves it off under -B /
    PYTHONDONTWRITEBYTECODE."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    prefix = tmp_path / "pyc"
    r = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(env, PYTHONPYCACHEPREFIX=str(prefix)))
    assert r.returncode == 0, r.stderr
    cached = {p.name.split(".")[0] for p in prefix.rglob("*.pyc") if "provision" in p.parts}
    assert {"app", "engine", "inventory", "options"} <= cached, sorted(cached)
    off = tmp_path / "pyc-off"
    r = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(env, PYTHONPYCACHEPREFIX=str(off), PYTHONDONTWRITEBYTECODE="1"))
    assert r.returncode == 0, r.stderr
    assert not [p for p in off.rglob("*.pyc") if "provision" in p.parts]
