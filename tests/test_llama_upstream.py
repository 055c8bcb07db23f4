"""Tests for the llama.cpp upstream repo fixture and the git daemon."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fixtures.llama_upstream import (
    BRANCH,
    SERVER_CPP,
    GitDaemon,
    make_upstream_repo,
    repo_size_bytes,
    template_repo,
)


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout.strip()


def test_sha_is_deterministic(tmp_path: Path) -> None:
    a = make_upstream_repo(tmp_path / "a" / "llama.cpp")
    b = make_upstream_repo(tmp_path / "b" / "llama.cpp")
    assert a.head() == b.head()
    assert a.commit_count() == 1
    assert _git("rev-parse", "--abbrev-ref", "HEAD", cwd=a.path) == BRANCH
    # the build needs these; the bulky ones are gone
    for rel in ("CMakeLists.txt", "tools/server/server.cpp", "tools/fit-params/CMakeLists.txt",
                "tools/llama-bench/llama-bench.cpp", "ggml/CMakeLists.txt", "cmake/build-info.cmake"):
        assert (a.path / rel).is_file(), rel
    assert not list((a.path / "models").glob("*.gguf"))
    assert not (a.path / "docs").exists()
    # same sequence of add_commit calls -> same shas
    assert a.add_commit() == b.add_commit()
    assert a.add_broken_commit() == b.add_broken_commit()


def test_template_is_small() -> None:
    assert repo_size_bytes(template_repo()) < 40 * 1024 * 1024


def test_add_commit_changes_head(llama_upstream) -> None:
    before = llama_upstream.head()
    n = llama_upstream.commit_count()
    sha = llama_upstream.add_commit({"tools/server/README-rig.md": "hello\n"}, "add a file")
    assert sha != before and sha == llama_upstream.head()
    assert llama_upstream.commit_count() == n + 1
    sha2 = llama_upstream.add_commit()  # default: comment appended to server.cpp
    assert sha2 != sha
    assert "llama-rig test commit" in (llama_upstream.path / SERVER_CPP).read_text()
    assert llama_upstream.tag("b-rig-test") == sha2
    assert _git("status", "--porcelain", cwd=llama_upstream.path) == ""


def test_broken_commit_and_reset(tmp_path: Path) -> None:
    repo = make_upstream_repo(tmp_path / "llama.cpp")
    good = repo.head()
    bad = repo.add_broken_commit()
    assert bad != good
    assert "llama-rig broken commit" in (repo.path / SERVER_CPP).read_text()
    repo.reset_hard(good)
    assert repo.head() == good


def test_git_daemon_serves_clone(llama_upstream, llama_upstream_daemon, tmp_path: Path) -> None:
    daemon = llama_upstream_daemon("127.0.0.1")
    url = daemon.url("llama.cpp")
    assert url.startswith("git://127.0.0.1:") and url.endswith("/llama.cpp")
    dest = tmp_path / "clone"
    _git("clone", "-q", url, str(dest))
    assert _git("rev-parse", "HEAD", cwd=dest) == llama_upstream.head()
    assert int(_git("rev-list", "--count", "HEAD", cwd=dest)) == llama_upstream.commit_count()
    # new upstream commits are visible to a fetch
    new = llama_upstream.add_commit()
    _git("fetch", "-q", "origin", cwd=dest)
    assert _git("rev-parse", f"origin/{BRANCH}", cwd=dest) == new
    # same (listen, port) -> same daemon
    assert llama_upstream_daemon("127.0.0.1") is daemon


def test_git_daemon_context_manager(tmp_path: Path) -> None:
    repo = make_upstream_repo(tmp_path / "srv" / "llama.cpp")
    with GitDaemon(tmp_path / "srv", "127.0.0.1") as d:
        out = _git("ls-remote", d.url("llama.cpp"), f"refs/heads/{BRANCH}")
        assert out.split()[0] == repo.head()
    assert d.proc is None
