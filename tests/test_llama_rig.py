"""The llama step and tasks on a Tier B rig, against the REAL llama.cpp tree (slow).

One rig, one cold build (the session fixture `llama_rig`), then in order: no-op provision, check
mode, update by one commit (ccache), a commit that does not compile, a bad -D, rollback, status,
and provision converging back. Timings are printed (run with -s) for benchmarks/README.md.
"""
from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.rig, pytest.mark.build]

NUMBERS: dict[str, object] = {}


def _out(r) -> str:
    return r.stdout


def test_first_provision_built_and_switched(llama_rig):
    lr = llama_rig
    out = _out(lr.first)
    assert "llama: change: fetch and build llama.cpp master" in out
    name = lr.current()
    head = lr.upstream.head()
    assert name and re.fullmatch(rf"b{lr.upstream.commit_count()}-{head[:7]}-[0-9a-f]{{8}}", name)
    ver = lr.version()
    assert f"build {lr.upstream.commit_count()}, commit {head[:7]}" in ver
    info = lr.build_info()
    assert info["commit"] == head and info["targets"] == ["llama-server", "llama-fit-params"]
    assert "-DGGML_CUDA=OFF" in info["cmake_args"] and "-DLLAMA_USE_PREBUILT_UI=OFF" in info["cmake_args"]
    assert info["compiled"] > 100
    # [n/N] progress reached the control machine as plain lines (not a TTY)
    assert re.search(r"llama: build b\d+-\w+-\w+: \[\d+/\d+\] 100%", out)
    # the full log stays on the rig
    assert "Linking CXX executable bin/llama-server" in lr.rig.sh(f"cat {info['log']}").stdout
    st = lr.state()["llama"]
    assert st["current"] == name and st["commit"] == head and st["fingerprint"] == info["fingerprint"]
    # both binaries exist; the service user can run them (static, no shared libs of ours)
    lr.rig.sh(f"{lr.prefix}/llama.cpp/current/bin/llama-fit-params --help >/dev/null 2>&1 || "
              f"test -x {lr.prefix}/llama.cpp/current/bin/llama-fit-params")
    NUMBERS["cold_build_s"] = info["configure_seconds"] + info["build_seconds"]
    NUMBERS["cold_compiled"] = info["compiled"]
    NUMBERS["first_provision_s"] = round(lr.first_seconds, 1)


def test_second_provision_changes_nothing(llama_rig):
    lr = llama_rig
    before = lr.current()
    r = lr.provision()
    out = _out(r)
    assert r.returncode == 0, out
    assert "llama: ok (no change)" in out
    assert re.search(r"^rig\s+ok\s+\d+\s+0\s+0\s+", out, re.M), out  # 0 changed
    assert "Building" not in out and lr.current() == before
    r = lr.invoke("llama.build")
    assert r.returncode == 0 and "same fingerprint, nothing to build" in _out(r), _out(r)


def test_check_mode_shows_new_commit_without_fetching(llama_rig):
    lr = llama_rig
    before = lr.current()
    new = lr.upstream.add_commit(message="server: a small upstream change")
    r = lr.provision("--check")
    out = _out(r)
    assert r.returncode == 0, out
    assert f"llama: would change: fetch and build llama.cpp master @ {new[:7]}" in out
    # nothing fetched, nothing switched
    assert lr.rig.sh(f"git -C {lr.prefix}/llama.cpp/src cat-file -e {new}^{{commit}}", check=False).returncode != 0
    assert lr.current() == before


def test_update_rebuilds_with_ccache_and_switches(llama_rig):
    lr = llama_rig
    old = lr.current()
    old_info = lr.build_info(old)
    head = lr.upstream.head()
    r = lr.invoke("llama.update")
    out = _out(r)
    assert r.returncode == 0, out
    assert "1 new commit(s)" in out and "server: a small upstream change" in out
    name = lr.current()
    assert name != old and name.startswith(f"b{lr.upstream.commit_count()}-{head[:7]}-")
    info = lr.build_info()
    assert info["ccache"]["hits"] > 0, info["ccache"]
    assert info["compiled"] <= old_info["compiled"]
    assert info["ccache"]["misses"] < old_info["compiled"] // 4, info["ccache"]
    assert f"commit {head[:7]}" in lr.version()
    assert old in lr.builds()  # the previous build is kept
    NUMBERS["rebuild_s"] = info["configure_seconds"] + info["build_seconds"]
    NUMBERS["rebuild_ccache"] = info["ccache"]
    NUMBERS["rebuild_ratio"] = round(NUMBERS["rebuild_s"] / NUMBERS["cold_build_s"], 3)


def test_commit_that_does_not_compile_leaves_current(llama_rig):
    lr = llama_rig
    before = lr.current()
    builds = lr.builds()
    good = lr.upstream.head()
    lr.upstream.add_broken_commit()
    try:
        r = lr.invoke("llama.update")
        out = _out(r)
        assert r.returncode != 0, out
        assert re.search(r"llama\.update: FAILED: build of b\d+-\w+-\w+ failed \(exit \d+\) — current "
                         rf"unchanged \({before}\)", out), out
        assert "llama: last lines of /var/lib/llama-rig/logs/llama-build-" in out
        assert "  | " in out and "error" in out.lower()
        assert lr.current() == before and lr.builds() == builds  # the failed dir is gone
        assert f"commit {good[:7]}" in lr.version()
    finally:
        lr.upstream.reset_hard(good)


def test_bad_cmake_option_leaves_current(llama_rig):
    lr = llama_rig
    before = lr.current()
    r = lr.invoke("llama.build", "--set", "llama_cpp.cmake_options={CMAKE_CXX_COMPILER: /nonexistent/c++}")
    out = _out(r)
    assert r.returncode != 0, out
    assert "configure of" in out and f"current unchanged ({before})" in out, out
    assert "Configuring incomplete, errors occurred" in out  # the log tail says why
    assert lr.current() == before


def test_rollback_switches_to_previous(llama_rig):
    lr = llama_rig
    cur = lr.current()
    prev = lr.state()["llama"]["previous"]
    assert prev and prev != cur
    r = lr.invoke("llama.rollback")
    assert r.returncode == 0, _out(r)
    assert f"rolled back {cur} → {prev}" in _out(r)
    assert lr.current() == prev
    assert f"commit {lr.build_info(prev)['commit'][:7]}" in lr.version()
    st = lr.state()["llama"]
    assert st["current"] == prev and st["previous"] == cur


def test_status_shows_builds(llama_rig):
    lr = llama_rig
    r = lr.invoke("llama.status")
    out = _out(r)
    assert r.returncode == 0, out
    cur = lr.current()
    assert re.search(rf"^{re.escape(cur)}\s+current\s+b\d+\s+[0-9a-f]{{9}}\s+[0-9a-f]{{12}}\s+\S+", out, re.M), out
    for b in lr.builds():
        assert b in out
    assert "llama: disk used" in out and "llama: ccache:" in out


def test_pin_to_a_commit_keeps_it_and_provision_converges(llama_rig):
    lr = llama_rig
    cur = lr.current()  # rolled back: the first build
    pinned = lr.build_info(cur)["commit"]
    r = lr.provision("--check", "--set", f"llama_cpp.ref={pinned}")
    assert r.returncode == 0 and "llama: ok (no change)" in _out(r), _out(r)
    # unpinned (master) the inventory wants the newer build again: a switch, no compile
    r = lr.provision()
    out = _out(r)
    assert r.returncode == 0, out
    assert "switch llama.cpp current → builds/" in out and "Building" not in out
    assert lr.current() != cur
    r = lr.provision()
    assert r.returncode == 0 and "llama: ok (no change)" in _out(r)
    print("\nllama rig numbers:", NUMBERS)
