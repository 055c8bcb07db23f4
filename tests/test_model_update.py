"""`invoke model.update` and the versioned model layout, on a `connection: local` host (this
machine's Python, which has huggingface_hub, stands in for the rig's venv) against the in-process
stand-in hub. The real service switch and rollback on a rig: tests/test_model_update_rig.py.

What is proved here, from the hub's request log and the files on disk:
* a new commit that changes one shard: `--check` shows the commits, the changed file and the plan
  and fetches nothing; the update fetches only that shard, hard-links the others (same inode),
  switches `current`, keeps the old copy, writes the lock; again: up to date;
* a corrupted download of the new shard: the update stops, `current` and the verified old copy
  untouched; once the hub heals, the staging dir is resumed (only that shard fetched);
* a new model that fails its health check: `current` goes back, the lock stays;
* a 40-hex model.revision in hosts.yaml moves with the rig (comments kept);
* keep_versions prunes the oldest copy, never current or previous;
* an earlier version's flat layout migrates by hard links: no download, no re-hash.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from provision.engine import Context
from provision.errors import StepError
from provision.model import update as U
from provision.steps import model as M
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import GeneratedBlob

MB = 1024 * 1024
SIZE = MB + 3


class Box:
    """A local host with a model repo on the stand-in hub."""

    def __init__(self, tmp: Path, hub, **model):
        self.tmp, self.hub = tmp, hub
        prefix = tmp / "prefix"
        (prefix / "hf-venv/bin").mkdir(parents=True)
        (prefix / "hf-venv/bin/python").symlink_to(sys.executable)
        self.s = make_gguf_like_shards(hub, size=SIZE, seed="u0")
        self.repo = self.s.repo_id
        self.rdir = tmp / "models" / self.repo.replace("/", "__")
        self.model = {"dir": str(tmp / "models"), "endpoint": hub.endpoint, "free_space_margin_gb": 0,
                      "token_env": "LLAMA_RIG_TEST_HF_TOKEN", **model}
        self.inv = tmp / "hosts.yaml"
        self.write()

    def write(self, head: str = "") -> None:
        data = {"hosts": {"loc": {"connection": {"type": "local"},
                                  "paths": {"prefix": str(self.tmp / "prefix"), "state_dir": str(self.tmp / "state")},
                                  "model": self.model}}}
        self.inv.write_text(head + yaml.safe_dump(data, sort_keys=False))

    def app(self) -> tuple[App, io.StringIO]:
        out = io.StringIO()
        return App(str(self.inv), env=Environment(out, out, False)), out

    def pull(self) -> str:
        app, out = self.app()
        rc = int(app.provision("loc", only="model"))
        assert rc == 0, out.getvalue()
        return out.getvalue()

    def update(self, **kw) -> tuple[int, str]:
        app, out = self.app()
        opts = U.UpdateOptions(inventory_path=str(self.inv), lock_dir=str(app.lock_dir()), **kw)
        rc = int(app.each_host("loc", lambda ctx: U.task_update(ctx, opts), title="model.update",
                               changes=not opts.check))
        return rc, out.getvalue()

    def state(self) -> dict:
        return json.loads((self.tmp / "state/state.json").read_text())

    def ctx(self) -> Context:
        app, _ = self.app()
        from provision.target import LocalTarget
        host = app.inventory().hosts["loc"]
        return Context(host, LocalTarget(host), app.console)

    def new_commit(self, shard: int, seed: str, message: str) -> str:
        return self.hub.commit(self.repo, {self.s.shards[shard - 1]: GeneratedBlob(SIZE, seed)}, message=message)

    def cdn(self, since: int) -> list[str]:
        return [r.file for r in self.hub.requests[since:] if r.server == "cdn" and r.method == "GET"]

    def current(self) -> str:
        return os.readlink(self.rdir / "current")

    def lock(self) -> dict:
        return yaml.safe_load((self.tmp / "locks/loc.lock.yaml").read_text())["lock"]


@pytest.fixture
def box(tmp_path, hub):
    return Box(tmp_path, hub)


def test_new_commit_fetches_only_the_changed_shard_then_up_to_date(box):
    out = box.pull()
    a = box.s.sha
    assert box.current() == f"commits/{a}" and "switch current → commits/" in out
    assert not (box.rdir / "staging").exists()
    b = box.new_commit(3, "u1", "requant shard 3")
    changed = box.s.shards[2]

    n0 = len(box.hub.requests)
    rc, out = box.update(check=True)
    assert rc == 0, out
    assert f"→ {b[:7]} (main): 1 new commit(s)" in out and f"{b[:7]} 2026-01-01 00:01 requant shard 3" in out
    assert "files: 1 changed, 0 added, 0 removed, 3 unchanged" in out and changed in out
    assert "would change: stage " in out and "link 3 unchanged from current (0 bytes)" in out
    assert "would change: download 1 file (1.0 MB)" in out and f"would change: switch current → commits/{b[:7]} (was {a[:7]})" in out
    assert box.cdn(n0) == [] and box.current() == f"commits/{a}" and not (box.rdir / "staging").exists()

    n1 = len(box.hub.requests)
    rc, out = box.update()
    assert rc == 0, out
    assert box.cdn(n1) == [changed]  # one shard over the wire, nothing else
    assert "model: hashed 1 file(s)" in out and "linked 3 unchanged file(s)" in out
    assert "1 worker(s), plain HTTP (hf_xet installed; the hub offered no Xet)" in out
    assert box.current() == f"commits/{b}" and not (box.rdir / "staging").exists()
    for p in box.s.shards:
        ino_a = (box.rdir / "commits" / a / p).stat().st_ino
        ino_b = (box.rdir / "commits" / b / p).stat().st_ino
        assert (ino_a == ino_b) == (p != changed), p  # unchanged: one inode; changed: two copies
    assert (box.rdir / "commits" / b / ".llama-rig-model.json").exists()
    st = box.state()["model"]
    assert st["commit"] == b and st["previous"] == a and st["branch"] == "main" and "model_staging" not in box.state()
    assert M.shard1_path(box.ctx()) == f"{box.rdir}/current/{box.s.shards[0]}"
    lk = box.lock()
    assert lk["model"]["commit"] == b
    assert [f["sha256"] for f in lk["model"]["files"] if f["path"] == changed] == [box.hub.file_sha256(box.repo, changed)]
    assert "lock: wrote" in out

    n2 = len(box.hub.requests)
    rc, out = box.update()
    assert rc == 0 and f"up to date — {box.repo}@{b[:7]} is the head of main" in out
    assert box.cdn(n2) == []
    assert "model: ok (no change)" in box.pull()  # provision agrees: revision main = b, nothing to do


def test_corrupt_new_shard_stops_before_the_switch_then_resumes(box):
    box.model["max_attempts"] = 2
    box.write()
    box.pull()
    a = box.s.sha
    b = box.new_commit(2, "u2", "fix shard 2")
    bad = box.s.shards[1]
    fid = box.hub.faults.set("*-00002-of-*", "corrupt")
    n0 = len(box.hub.requests)
    try:
        rc, out = box.update()
    finally:
        box.hub.faults.clear(fid)
    assert rc == 1
    assert f"{bad}: sha256 still wrong after 2 download attempt(s)" in out
    assert f"left in staging/{b[:7]}, unverified (the model in service is untouched)" in out
    assert box.cdn(n0) == [bad, bad]
    assert box.current() == f"commits/{a}" and box.state()["model"]["commit"] == a
    assert M.shard1_path(box.ctx()).startswith(f"{box.rdir}/current/")  # still verified, still served
    assert (box.rdir / "staging" / b).is_dir() and box.state()["model_staging"]["commit"] == b

    n1 = len(box.hub.requests)
    rc, out = box.update()
    assert rc == 0, out
    assert box.cdn(n1) == [bad]  # resumed: the linked shards stayed staged
    assert box.current() == f"commits/{b}"


def test_unhealthy_new_model_rolls_back(box, monkeypatch):
    from provision.steps import service
    box.pull()
    a = box.s.sha
    b = box.new_commit(4, "u3", "broken upload")
    served: list[str] = []

    def restart(ctx, api_key=None, model_path=None):
        now = os.readlink(box.rdir / "current").split("/")[-1]
        served.append(now)
        if now == b:
            raise StepError("/health answered 503 (Loading model failed)")
        return {}
    monkeypatch.setattr(service, "unit_installed", lambda ctx: True)
    monkeypatch.setattr(service, "preflight", lambda ctx, path: None)
    monkeypatch.setattr(service, "restart_and_wait", restart)
    before = (box.tmp / "locks/loc.lock.yaml").read_text()
    rc, out = box.update()
    assert rc == 1
    assert served == [b, a]
    assert f"model {b[:7]} failed its health check; rolled back to {a[:7]} (restarted, healthy)" in out
    assert "now resolves to" in out  # the branch still points at the bad upload: say so
    assert box.current() == f"commits/{a}"
    st = box.state()["model"]
    assert st["commit"] == a and st["previous"] == b
    assert (box.tmp / "locks/loc.lock.yaml").read_text() == before


def test_pinned_revision_moves_with_the_rig_and_old_copies_are_pruned(box):
    box.pull()
    a = box.s.sha
    box.model["revision"] = a
    box.write(head="# my rigs (this comment must survive)\n")
    b = box.new_commit(1, "u4", "template fix")
    rc, out = box.update()
    assert rc == 0, out
    text = box.inv.read_text()
    assert text.startswith("# my rigs (this comment must survive)\n") and f"revision: {b}" in text
    assert "the pin moves with the rig" in out
    c = box.new_commit(2, "u5", "second fix")
    rc, out = box.update()  # no branch in hosts.yaml: the one recorded with the pin (main)
    assert rc == 0, out
    assert "asking main (the branch the pin came from)" in out
    assert sorted(os.listdir(box.rdir / "commits")) == sorted([b, c])  # keep_versions 2: a went
    assert f"removed old copies: commits/{a[:7]}" in out
    assert "model: ok (no change)" in box.pull()


def test_refused_on_a_locked_host_and_for_another_repo(box):
    rc, out = box.update()
    assert rc == 1 and "no model on this host yet: run invoke model.pull" in out
    box.pull()
    data = yaml.safe_load(box.inv.read_text())
    data["hosts"]["loc"]["lock"] = "locks/other.lock.yaml"
    box.inv.write_text(yaml.safe_dump(data))
    rc, out = box.update()
    assert rc == 1 and "reproduces the lock locks/other.lock.yaml (its `lock:` key)" in out
    box.model["repo"] = "other/Repo-GGUF"
    box.write()
    n0 = len(box.hub.requests)
    rc, out = box.update()
    assert rc == 1 and "model.update moves the same one to a newer commit" in out
    assert box.hub.requests[n0:] == []  # refused before asking the hub


def test_flat_layout_of_an_earlier_version_migrates_without_download_or_hash(box):
    box.pull()
    a = box.s.sha
    # turn it into the layout earlier versions wrote: files straight in the repo dir, no current
    src = box.rdir / "commits" / a
    for p in box.s.shards:
        (box.rdir / p).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src / p, box.rdir / p)
    (box.rdir / "current").unlink()
    import shutil
    shutil.rmtree(box.rdir / "commits")
    st = box.state()
    del st["model"]["layout"], st["model"]["previous"], st["model"]["branch"]
    st["owed"] = []  # (the first pull's restart, owed to a service this box does not have)
    (box.tmp / "state/state.json").write_text(json.dumps(st))
    inodes = {p: (box.rdir / p).stat().st_ino for p in box.s.shards}

    n0 = len(box.hub.requests)
    out = box.pull()
    assert "link 4 unchanged from the flat layout (0 bytes)" in out and "migrating from the flat layout" in out
    assert "change: download" not in out and "hashed" not in out and "verify sha256" not in out
    assert box.cdn(n0) == []
    assert box.current() == f"commits/{a}"
    for p in box.s.shards:
        assert (box.rdir / "commits" / a / p).stat().st_ino == inodes[p]  # the same bytes, not a copy
        assert (box.rdir / p).is_symlink() and os.readlink(box.rdir / p).endswith(f"current/{p}")
    assert M.shard1_path(box.ctx()) == f"{box.rdir}/current/{box.s.shards[0]}"
    assert "llama-server.restart" not in box.state()["owed"]  # same bytes: no restart owed
    assert "model: ok (no change)" in box.pull()
