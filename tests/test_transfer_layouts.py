"""`provision --from` with the versioned model layout, on two `connection: local` hosts (this
machine's Python stands in for each rig's venv) against the in-process stand-in hub; the copy is
relayed (a local host has no address other rigs can use). The Tier B version with two real rigs:
tests/test_transfer_rigs.py.

What is proved, from the hub's request log and the files on disk:
* the source in the versioned layout: its shards are read under commits/<sha>; the destination
  gets them in staging/<sha>, hashes them, then `current` switches (0 bytes from the hub);
* a source that was updated since: a destination pinned to the OLD commit gets the changed shard
  from the commit the source keeps (commits/<old>), the rest from the source's current commit;
* a destination that already serves a commit moves to a new one: unchanged shards hard-linked
  here (0 bytes), only the changed one copied from the source;
* a source still in the flat layout of an earlier version: its files are copied just the same,
  and nothing on it changes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import GeneratedBlob

MB = 1024 * 1024
SIZE = MB + 5


class Rigs:
    """`src` and `dst`: two local hosts, each with its own prefix, state dir and model dir."""

    def __init__(self, tmp: Path, hub):
        self.tmp, self.hub = tmp, hub
        self.s = make_gguf_like_shards(hub, size=SIZE, seed="t0")
        self.repo = self.s.repo_id
        self.revision = {"src": "main", "dst": "main"}
        for h in ("src", "dst"):
            (tmp / h / "prefix/hf-venv/bin").mkdir(parents=True)
            (tmp / h / "prefix/hf-venv/bin/python").symlink_to(sys.executable)
        self.inv = tmp / "hosts.yaml"
        self.write()

    def rdir(self, h: str) -> Path:
        return self.tmp / h / "models" / self.repo.replace("/", "__")

    def write(self) -> None:
        def entry(h: str) -> dict:
            return {"connection": {"type": "local"},
                    "paths": {"prefix": str(self.tmp / h / "prefix"), "state_dir": str(self.tmp / h / "state")},
                    "model": {"repo": self.repo, "revision": self.revision[h], "dir": str(self.tmp / h / "models"),
                              "endpoint": self.hub.endpoint, "free_space_margin_gb": 0,
                              "token_env": "LLAMA_RIG_TEST_HF_TOKEN"}}
        self.inv.write_text(yaml.safe_dump({"hosts": {h: entry(h) for h in ("src", "dst")}}, sort_keys=False))

    def provision(self, host: str, source: str | None = None) -> str:
        out = io.StringIO()
        rc = int(App(str(self.inv), env=Environment(out, out, False)).provision(host, only="model", source=source))
        assert rc == 0, out.getvalue()
        return out.getvalue()

    def state(self, h: str) -> dict:
        return json.loads((self.tmp / h / "state/state.json").read_text())

    def cdn(self, since: int) -> list[str]:
        return sorted(r.file for r in self.hub.requests[since:] if r.server == "cdn" and r.method == "GET")

    def served(self, h: str) -> dict[str, str]:
        """repo path -> sha256 of what dst's `current` holds."""
        base = self.rdir(h) / "current"
        return {p: hashlib.sha256((base / p).read_bytes()).hexdigest() for p in self.s.shards}

    def snapshot(self, h: str) -> tuple[str, list]:
        """A rig's state and every file under its model dir (path, size, mtime, inode)."""
        files = []
        for root, _dirs, names in os.walk(self.rdir(h)):
            for n in names:
                st = os.lstat(os.path.join(root, n))
                files.append((os.path.relpath(os.path.join(root, n), self.rdir(h)), st.st_size, st.st_mtime_ns,
                              st.st_ino))
        return (self.tmp / h / "state/state.json").read_text(), sorted(files)


@pytest.fixture
def rigs(tmp_path, hub):
    return Rigs(tmp_path, hub)


def test_from_a_versioned_source_into_staging_then_current(rigs):
    rigs.provision("src")
    a = rigs.s.sha
    before = rigs.snapshot("src")
    n0 = len(rigs.hub.requests)
    out = rigs.provision("dst", source="src")
    assert rigs.cdn(n0) == []  # not one byte of a shard from the hub
    assert f"copy 4 files ({4 * SIZE / 1e6:.1f} MB) from src, relayed through this machine" in out
    assert re.search(rf"model: 4 of 4 file\(s\) from src \([^)]*\) into staging/{a[:7]}\n", out), out
    assert "model: from src: 4 file(s)" in out and "from the hub" not in out
    for p in rigs.s.shards:
        assert f"model: {p.rsplit('/', 1)[-1]} <- src: copying" in out
    assert os.readlink(rigs.rdir("dst") / "current") == f"commits/{a}"
    assert not (rigs.rdir("dst") / "staging").exists()
    assert sorted(os.listdir(rigs.rdir("dst") / "commits" / a)) == sorted(
        {".llama-rig-model.json", *(p.split("/", 1)[0] for p in rigs.s.shards)})  # no .cache left
    assert rigs.served("dst") == {p: rigs.hub.file_sha256(rigs.repo, p) for p in rigs.s.shards}
    st = rigs.state("dst")
    assert st["model"]["layout"] == "commits" and st["model"]["commit"] == a and "model_staging" not in st
    assert sorted(st["model"]["verified"]) == sorted(rigs.s.shards)
    assert rigs.snapshot("src") == before  # the source was only read
    assert "model: ok (no change)" in rigs.provision("dst", source="src")


def test_old_commit_from_the_copy_the_source_keeps_and_a_new_one_links_here(rigs):
    a = rigs.s.sha
    rigs.provision("src")
    b = rigs.hub.commit(rigs.repo, {rigs.s.shards[2]: GeneratedBlob(SIZE, "t1")}, message="requant shard 3")
    changed = rigs.s.shards[2]
    out = rigs.provision("src")  # src moves to b (revision main) and keeps a as previous
    assert os.readlink(rigs.rdir("src") / "current") == f"commits/{b}"
    assert (rigs.rdir("src") / "commits" / a / changed).exists()
    before = rigs.snapshot("src")

    # dst pinned to the OLD commit: the changed shard's old bytes exist on src only under commits/<a>
    rigs.revision["dst"] = a
    rigs.write()
    n0 = len(rigs.hub.requests)
    out = rigs.provision("dst", source="src")
    assert rigs.cdn(n0) == [] and "model: from src: 4 file(s)" in out, out
    assert os.readlink(rigs.rdir("dst") / "current") == f"commits/{a}"
    assert rigs.served("dst")[changed] == hashlib.sha256(
        (rigs.rdir("src") / "commits" / a / changed).read_bytes()).hexdigest()

    # dst moves to b: 3 unchanged shards hard-linked here, only the changed one copied from src
    rigs.revision["dst"] = "main"
    rigs.write()
    n1 = len(rigs.hub.requests)
    out = rigs.provision("dst", source="src")
    assert rigs.cdn(n1) == []
    assert "link 3 unchanged from current (0 bytes)" in out
    assert f"copy 1 file ({SIZE / 1e6:.1f} MB) from src" in out
    assert re.search(rf"model: 1 of 1 file\(s\) from src \([^)]*\) into staging/{b[:7]}\n", out), out
    assert os.readlink(rigs.rdir("dst") / "current") == f"commits/{b}"
    for p in rigs.s.shards:
        same = (rigs.rdir("dst") / "commits" / a / p).stat().st_ino == (rigs.rdir("dst") / "commits" / b / p).stat().st_ino
        assert same == (p != changed), p
    assert rigs.served("dst") == {p: rigs.hub.file_sha256(rigs.repo, p) for p in rigs.s.shards}
    assert rigs.state("dst")["model"]["previous"] == a
    assert rigs.snapshot("src") == before


def test_from_a_source_still_in_the_flat_layout(rigs):
    rigs.provision("src")
    a = rigs.s.sha
    # make src look like a rig of an earlier version: files straight in the repo dir, no current
    rd = rigs.rdir("src")
    for p in rigs.s.shards:
        (rd / p).parent.mkdir(parents=True, exist_ok=True)
        os.rename(rd / "commits" / a / p, rd / p)
    (rd / "current").unlink()
    shutil.rmtree(rd / "commits")
    st = rigs.state("src")
    del st["model"]["layout"], st["model"]["previous"], st["model"]["branch"]
    (rigs.tmp / "src/state/state.json").write_text(json.dumps(st))
    before = rigs.snapshot("src")

    n0 = len(rigs.hub.requests)
    out = rigs.provision("dst", source="src")
    assert rigs.cdn(n0) == [] and "model: from src: 4 file(s)" in out, out
    assert os.readlink(rigs.rdir("dst") / "current") == f"commits/{a}"
    assert rigs.served("dst") == {p: rigs.hub.file_sha256(rigs.repo, p) for p in rigs.s.shards}
    assert rigs.snapshot("src") == before  # not migrated, not touched: only read

    # a flat file changed on src since it was verified there comes from the hub instead
    victim = rigs.s.shards[1]
    os.utime(rd / victim, ns=(1, 1))
    shutil.rmtree(rigs.rdir("dst"))
    n1 = len(rigs.hub.requests)
    out = rigs.provision("dst", source="src")
    assert rigs.cdn(n1) == [victim], out
    assert (f"model: from the hub: 1 file(s), {SIZE / 1e6:.1f} MB: {victim.rsplit('/', 1)[-1]} "
            "(changed on src since it was verified there)") in out
    assert rigs.served("dst") == {p: rigs.hub.file_sha256(rigs.repo, p) for p in rigs.s.shards}
