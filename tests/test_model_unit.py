"""Unit tests of the model step: include matching, the one-quant rule, preflight arithmetic, plan as
data, verified markers, progress lines, the remote scripts, and the token's path (stdin only).

The last group runs the whole step through a LocalTarget against the in-process stand-in hub, with
the control machine's own Python (which has huggingface_hub) standing in for the rig's venv."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.console import Console, Environment
from provision.engine import Call, Run
from provision.errors import StepError
from provision.remote import sha256_files
from provision.model import hub, store, transfer
from provision.steps import model as M
from provision.target import LocalTarget

REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
Q = "UD-Q6_K_XL/Qwen3.5-122B-A10B-UD-Q6_K_XL"
SHA = "a" * 40


def cfg_of(**model) -> dict:
    data = {"hosts": {"rig": {"connection": {"address": "10.0.0.2"}, "model": model}}}
    return inv.from_data(data).hosts["rig"].cfg


def entries() -> list[M.RepoEntry]:
    e = [M.RepoEntry(f"{Q}-{i:05d}-of-00004.gguf", 100 + i, f"{i:064x}") for i in range(1, 5)]
    e += [M.RepoEntry(f"Q8_0/Qwen3.5-122B-A10B-Q8_0-{i:05d}-of-00002.gguf", 50, f"{10 + i:064x}") for i in (1, 2)]
    e += [M.RepoEntry("UD-Q8_K_XL/Qwen3.5-122B-A10B-UD-Q8_K_XL-00001-of-00001.gguf", 70, "c" * 64),
          M.RepoEntry("mmproj-BF16.gguf", 30, "d" * 64),
          M.RepoEntry("README.md", 10, None), M.RepoEntry(".gitattributes", 5, None)]
    return e


# --------------------------------------------------------------------------------------------- include


def test_include_picks_one_quant_sorted():
    got = M.match_files(entries(), "UD-Q6_K_XL/*", "repo@abc")
    assert [e.path for e in got] == [f"{Q}-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert got[0].sha256 == f"{1:064x}" and got[0].size == 101


def test_include_single_file_and_shard1():
    got = M.match_files(entries(), "mmproj-BF16.gguf", "r")
    assert [e.path for e in got] == ["mmproj-BF16.gguf"]
    files = [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in got]
    assert M.shard1(files)["path"] == "mmproj-BF16.gguf"
    four = [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in M.match_files(entries(), "UD-Q6_K_XL/*", "r")]
    assert M.shard1(list(reversed(four)))["path"] == f"{Q}-00001-of-00004.gguf"


def test_include_nothing_matched_lists_folders_and_guesses():
    with pytest.raises(StepError) as e:
        M.match_files(entries(), "UD-Q6_K_XXL/*", "unsloth/x@abc1234")
    msg = str(e.value)
    assert "matches nothing in unsloth/x@abc1234" in msg
    assert "top-level folders: Q8_0, UD-Q6_K_XL, UD-Q8_K_XL" in msg
    assert "did you mean 'UD-Q6_K_XL/*'?" in msg
    assert "mmproj-BF16.gguf" in msg


def test_include_two_quant_folders_refused_naming_both():
    with pytest.raises(StepError) as e:
        M.match_files(entries(), "*-0000?-of-*", "r@abc")
    msg = str(e.value)
    assert "more than one quant" in msg
    assert "UD-Q6_K_XL/Qwen3.5-122B-A10B-UD-Q6_K_XL-*-of-00004.gguf (4 files)" in msg
    assert "Q8_0/Qwen3.5-122B-A10B-Q8_0-*-of-00002.gguf (2 files)" in msg


def test_include_quant_plus_mmproj_refused():
    with pytest.raises(StepError, match=r"more than one quant.*mmproj-BF16.gguf \(1 file\)"):
        M.match_files(entries(), "UD-Q6_K_XL/*,mmproj-BF16.gguf", "r")


def test_include_different_of_sets_in_one_folder_refused():
    e = [M.RepoEntry(f"F/m-{i:05d}-of-00002.gguf", 1, "a" * 64) for i in (1, 2)]
    e += [M.RepoEntry(f"F/m-{i:05d}-of-00003.gguf", 1, "b" * 64) for i in (1, 2, 3)]
    with pytest.raises(StepError) as err:
        M.match_files(e, "F/*", "r")
    assert "F/m-*-of-00002.gguf (2 files)" in str(err.value) and "F/m-*-of-00003.gguf (3 files)" in str(err.value)


def test_include_incomplete_set_and_non_lfs_refused():
    e = [M.RepoEntry(f"F/m-{i:05d}-of-00004.gguf", 1, "a" * 64) for i in (1, 2, 4)]
    with pytest.raises(StepError, match=r"incomplete shard set F/m-\*-of-00004.gguf .* has part\(s\) 1,2,4 of 4"):
        M.match_files(e, "F/*", "r")
    e = [M.RepoEntry("F/m.gguf", 1, "a" * 64), M.RepoEntry("F/notes.txt", 1, None)]
    with pytest.raises(StepError, match=r"without an lfs.sha256 .*F/notes.txt"):
        M.match_files(e, "F/*", "r")
    with pytest.raises(StepError, match="matches no .gguf file"):
        M.match_files(entries(), "README.md", "r")


# --------------------------------------------------------------------------------------------- preflight


def test_preflight_arithmetic():
    GB = 1_000_000_000
    M.preflight(free_bytes=15 * GB, need_bytes=10 * GB, margin_gb=5)  # exactly enough
    M.preflight(free_bytes=0, need_bytes=0, margin_gb=5)  # nothing to download: never refused
    with pytest.raises(StepError) as e:
        M.preflight(free_bytes=15 * GB - 1, need_bytes=10 * GB, margin_gb=5, where="/models")
    msg = str(e.value)
    assert "not enough disk space at /models" in msg
    assert f"free ({15 * GB - 1} bytes)" in msg and f"({10 * GB} bytes) to download" in msg
    assert "model.free_space_margin_gb = 5" in msg and "short by 1 B" in msg


def test_need_bytes_counts_freed_stale_files():
    groups = {"fetch": [{"path": "b", "size": 100}], "stale": [{"path": "a", "size": 100}]}
    assert store.need_bytes(groups, {"a": (40, 1, 7)}) == 160


# --------------------------------------------------------------------------------------------- plan as data


def man(n: int = 4, commit: str = SHA, cfg=None, sha3: str | None = None) -> dict:
    cfg = cfg or cfg_of()
    es = [M.RepoEntry(f"{Q}-{i:05d}-of-{n:05d}.gguf", 1000 * i, hashlib.sha256(b"%d" % i).hexdigest())
          for i in range(1, n + 1)]
    if sha3:
        es[2] = M.RepoEntry(es[2].path, es[2].size, sha3)
    return M.make_manifest(cfg, commit, es)


def stats_of(m: dict, mtime: int = 111) -> dict:
    return {f["path"]: (f["size"], mtime, i + 1) for i, f in enumerate(m["files"])}


def verified_state(m: dict, stats: dict, layout: bool = True) -> dict:
    st = {**m, "verified": {f["path"]: {"size": f["size"], "mtime_ns": stats[f["path"]][1], "sha256": f["sha256"]}
                            for f in m["files"]}}
    if layout:
        st["layout"] = "commits"
    return st


def current_rig(m: dict, stats: dict, **kw) -> M.RigView:
    """A rig whose `current` is m's commit, with m's files at `stats`."""
    mark = {"commit": m["commit"], "files": m["files"], "finalized_at": 1.0,
            "verified": {f["path"]: {"size": f["size"], "mtime_ns": stats[f["path"]][1], "sha256": f["sha256"]}
                         for f in m["files"] if f["path"] in stats}}
    kw.setdefault("free_bytes", 10**9)
    kw.setdefault("venv_version", "2.4.0")
    return M.RigView(current=m["commit"], kept={m["commit"]: {"mark": mark, "stats": stats}},
                     dirs={"current": stats}, **kw)


def kinds(changes) -> list[str]:
    return [c.description.split(" ")[0] for c in changes]


def test_plan_current_and_verified_is_no_change():
    cfg = cfg_of()
    m = man(cfg=cfg)
    stats = stats_of(m)
    rig = current_rig(m, stats, venv_version=None, free_bytes=0)  # no venv, no space: not needed
    assert M.plan(cfg, m, rig, verified_state(m, stats)) == []


def test_plan_fresh_rig_stages_then_switches():
    cfg = cfg_of(free_space_margin_gb=0)
    m = man(cfg=cfg)
    ch = M.plan(cfg, m, M.RigView(free_bytes=10**9), None)
    assert [type(c) for c in ch] == [Call, M.PipVenv, Call, Call, Call] and isinstance(ch[1], Run)
    assert ch[0].description == f"stage {REPO}@aaaaaaa (main) in staging/aaaaaaa: 4 files, 10.0 kB"
    assert ch[0].data["dir"] == f"/var/lib/llama-rig/models/{REPO.replace('/', '__')}/staging/{SHA}"
    assert ch[1].description == "python venv /opt/llama-rig/hf-venv with huggingface-hub>=2.4,<3"
    assert ch[2].description == f"download 4 files (10.0 kB) from {REPO}@aaaaaaa"
    assert ch[2].data["files"] == [f["path"] for f in m["files"]] and ch[2].data["bytes"] == 10000
    assert ch[2].notify == ()  # nothing in service changes while staging
    assert ch[3].description == "verify sha256 of 4 files (10.0 kB)" and ch[3].notify == ()
    assert ch[4].description == "switch current → commits/aaaaaaa"
    assert ch[4].notify == ("llama-server.restart",)


def test_plan_refuses_before_download_when_disk_too_small():
    cfg = cfg_of(free_space_margin_gb=1)
    with pytest.raises(StepError, match="not enough disk space"):
        M.plan(cfg, man(cfg=cfg), M.RigView(free_bytes=10**9), None)


def test_plan_good_venv_is_kept_and_bad_one_rebuilt():
    cfg = cfg_of(free_space_margin_gb=0)
    m = man(cfg=cfg)
    ok = M.plan(cfg, m, M.RigView(free_bytes=10**9, venv_version="2.4.0"), None)
    assert not any(isinstance(c, Run) for c in ok)
    old = M.plan(cfg, m, M.RigView(free_bytes=10**9, venv_version="1.3.0"), None)
    assert any(isinstance(c, Run) for c in old)


def test_plan_in_service_copy_one_missing_one_unmarked_one_touched_is_repaired_in_place():
    cfg = cfg_of(free_space_margin_gb=0)
    m = man(cfg=cfg)
    p = [f["path"] for f in m["files"]]
    stats = stats_of(m)
    st = verified_state(m, stats)
    del st["verified"][p[1]]  # present, never verified
    rig_stats = dict(stats)
    rig_stats[p[2]] = (stats[p[2]][0], 6, 3)  # touched since verified (mtime)
    del rig_stats[p[3]]  # gone
    ch = M.plan(cfg, m, current_rig(m, rig_stats), st)
    assert kinds(ch) == ["download", "verify"]
    assert ch[0].data["files"] == [p[3]] and ch[0].notify == ("llama-server.restart",)
    assert ch[1].data["files"] == [p[3], p[1], p[2]]


def test_plan_full_rehashes_everything_and_debris_is_cleaned():
    cfg = cfg_of()
    m = man(cfg=cfg)
    stats = stats_of(m)
    rig = current_rig(m, stats, debris=["/x/.cache/huggingface/download/a.b.incomplete"])
    ch = M.plan(cfg, m, rig, verified_state(m, stats), full=True)
    assert ch[0].description == "remove 1 *.incomplete leftover(s) of interrupted downloads"
    assert ch[1].description == "verify sha256 of 4 files (10.0 kB)"
    assert len(ch) == 2


def test_plan_new_commit_links_unchanged_fetches_only_the_changed_shard():
    cfg = cfg_of(free_space_margin_gb=0)
    old = man(cfg=cfg, commit="b" * 40)
    stats = stats_of(old)
    st = verified_state(old, stats)
    new = man(cfg=cfg, sha3="e" * 64)
    changed = new["files"][2]
    rig = current_rig(old, stats, free_bytes=3000 + 1)
    ch = M.plan(cfg, new, rig, st)
    assert kinds(ch) == ["stage", "download", "verify", "switch"]
    assert ch[0].description.endswith("in staging/aaaaaaa: 4 files, 10.0 kB; link 3 unchanged from current (0 bytes)")
    assert ch[0].data["link"] == [f["path"] for f in new["files"] if f is not changed]
    assert ch[1].data["files"] == [changed["path"]] and ch[1].data["bytes"] == 3000
    assert ch[2].data["files"] == [changed["path"]]  # the links keep their markers: no re-hash
    assert ch[3].description == "switch current → commits/aaaaaaa (was bbbbbbb)"
    assert ch[3].notify == ("llama-server.restart",) and ch[3].data["previous"] == "b" * 40
    # the disk preflight counts the changed shard on top of the copy in service
    with pytest.raises(StepError, match="need 3.0 kB .* to download .the copy in service stays until the switch: both count."):
        M.plan(cfg, new, current_rig(old, stats, free_bytes=2999), st)


def test_plan_kept_copy_is_switched_to_without_download():
    cfg = cfg_of()
    old, new = man(cfg=cfg, commit="b" * 40), man(cfg=cfg)
    so, sn = stats_of(old), stats_of(new, mtime=222)
    rig = current_rig(old, so)
    rig.kept[new["commit"]] = {"mark": {"commit": new["commit"], "files": new["files"], "finalized_at": 0.5,
                                        "verified": verified_state(new, sn)["verified"]}, "stats": sn}
    rig.dirs["commit"] = sn
    ch = M.plan(cfg, new, rig, verified_state(old, so))
    assert kinds(ch) == ["switch"] and ch[0].notify == ("llama-server.restart",)
    sn[new["files"][0]["path"]] = (1000, 999, 1)  # touched since: hashed again before the switch
    ch = M.plan(cfg, new, rig, verified_state(old, so))
    assert kinds(ch) == ["stage", "verify", "switch"] and ch[0].description.split(" in ")[1].startswith("commits/aaaaaaa")


def test_plan_flat_layout_is_migrated_by_links_no_download_no_rehash_no_restart():
    cfg = cfg_of()
    m = man(cfg=cfg)
    stats = stats_of(m)
    st = verified_state(m, stats, layout=False)  # an earlier version's state: files straight in the repo dir
    rig = M.RigView(dirs={"flat": stats}, free_bytes=0)
    ch = M.plan(cfg, m, rig, st)
    assert kinds(ch) == ["stage", "switch"]
    assert ch[0].description.endswith("link 4 unchanged from the flat layout (0 bytes)")
    assert ch[1].description == ("switch current → commits/aaaaaaa — migrating from the flat layout "
                                 "(hard links: no byte copied)")
    assert ch[1].notify == ()  # the same bytes: the server needs no restart for this


def test_plan_staging_resumes_and_wrong_size_is_stale():
    cfg = cfg_of(free_space_margin_gb=0)
    m = man(cfg=cfg)
    p = [f["path"] for f in m["files"]]
    stats = stats_of(m)
    staged = {**verified_state(m, stats, layout=False)}
    staged["verified"] = {p[0]: staged["verified"][p[0]]}
    rig = M.RigView(free_bytes=10**9, venv_version="2.4.0",
                    dirs={"staging": {p[0]: stats[p[0]], p[1]: (7, 9, 2)}}, staging=[SHA])
    ch = M.plan(cfg, m, rig, None, staged=staged)
    assert kinds(ch) == ["stage", "download", "verify", "switch"]
    assert ch[1].data["stale"] == [p[1]] and ch[1].data["files"] == [p[1], p[2], p[3]]
    assert "(replacing 1 stale)" in ch[1].description


def test_prune_keeps_newest_and_never_current_or_previous():
    mk = lambda t: {"mark": {"finalized_at": t}, "stats": {}}  # noqa: E731
    rig = M.RigView(kept={"a": mk(1), "b": mk(2), "c": mk(3), "d": mk(4), "x": {"mark": None, "stats": {}}})
    assert store.prune_list(rig, 2, {"d", "c"}) == ["b", "a"]
    assert store.prune_list(rig, 2, {"d", "a"}) == ["b"]  # a is the previous one: kept
    assert store.prune_list(rig, 5, set()) == []


def test_diff_files_names_changed_added_removed():
    a = [{"path": "x", "size": 1, "sha256": "1"}, {"path": "y", "size": 2, "sha256": "2"},
         {"path": "z", "size": 3, "sha256": "3"}]
    b = [{"path": "x", "size": 1, "sha256": "1"}, {"path": "y", "size": 2, "sha256": "9"},
         {"path": "w", "size": 4, "sha256": "4"}]
    d = hub.diff_files(a, b)
    assert [x["path"] for x in d["same"]] == ["x"] and [(o["sha256"], n["sha256"]) for o, n in d["changed"]] == [("2", "9")]
    assert [x["path"] for x in d["added"]] == ["w"] and [x["path"] for x in d["removed"]] == ["z"]


# --------------------------------------------------------------------------------------------- markers / pins


def test_marker_valid_needs_same_sha_size_and_mtime():
    f = {"path": "a", "size": 10, "sha256": "a" * 64}
    mk = {"size": 10, "mtime_ns": 5, "sha256": "a" * 64}
    assert M.marker_valid(mk, f, (10, 5))
    assert not M.marker_valid(mk, f, (10, 6))
    assert not M.marker_valid(mk, f, (11, 5))
    assert not M.marker_valid(mk, f, None)
    assert not M.marker_valid(None, f, (10, 5))
    assert not M.marker_valid({**mk, "sha256": "b" * 64}, f, (10, 5))


def test_pinned_sha_reused_without_asking_the_hub_branch_is_not():
    cfg = cfg_of(revision=SHA)
    stored = {**man(cfg=cfg), "revision": SHA, "verified": {}}
    assert M.reuse_pin(cfg, stored)["commit"] == SHA
    assert M.reuse_pin(cfg_of(revision="main"), {**man(), "verified": {}}) is None
    assert M.reuse_pin(cfg_of(revision="b" * 40), stored) is None
    assert M.reuse_pin(cfg_of(revision=SHA, include="Q8_0/*"), stored) is None


def test_local_dir_layout_and_venv_commands():
    cfg = cfg_of(dir="/models", pip_find_links="http://10.250.3.1:8000/")
    assert M.local_dir(cfg) == "/models/unsloth__Qwen3.5-122B-A10B-GGUF"
    cmds = transfer.venv_commands(cfg)
    assert cmds[0].startswith("test -x /opt/llama-rig/hf-venv/bin/python || python3 -m venv /opt/llama-rig/hf-venv")
    assert "--find-links http://10.250.3.1:8000/ --no-index --trusted-host 10.250.3.1 'huggingface-hub>=2.4,<3'" in cmds[1]
    cfg = cfg_of(pip_index_url="http://mirror/simple")
    assert "--index-url http://mirror/simple --trusted-host mirror 'huggingface-hub" in transfer.venv_commands(cfg)[1]
    cfg = cfg_of(pip_index_url="https://mirror/simple")
    assert "--index-url https://mirror/simple 'huggingface-hub" in transfer.venv_commands(cfg)[1]


def test_load_token_env_file_and_registration(tmp_path):
    from provision.secrets import redact
    assert M.load_token({"token_env": "X_TOK", "token_file": None}, {"X_TOK": " hf_envtoken1 \n"}) == "hf_envtoken1"
    assert redact("a hf_envtoken1 b") == "a ******** b"
    f = tmp_path / "tok"
    f.write_text("hf_filetoken2\n")
    assert M.load_token({"token_env": "X_TOK", "token_file": str(f)}, {"X_TOK": "other"}) == "hf_filetoken2"
    assert M.load_token({"token_env": "X_TOK", "token_file": None}, {}) is None
    with pytest.raises(StepError, match="cannot read"):
        M.load_token({"token_env": "X", "token_file": str(tmp_path / "nope")}, {})


# --------------------------------------------------------------------------------------------- progress


class _Ctx:
    def __init__(self, fancy=False):
        self.out = io.StringIO()
        self.console = Console(Environment(self.out, self.out, fancy))
        self.host = type("H", (), {"name": "rig"})()

    def say(self, t):
        self.console.host_line("rig", t)


def test_progress_plain_lines_are_throttled_with_rate_and_eta(monkeypatch):
    from provision import progress
    ctx = _Ctx()
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with progress.Progress(ctx, "model", "bytes", every_s=5) as p:
        feed = transfer.EventFeed(p, "downloading")
        feed(json.dumps({"event": "start", "path": "F/a.gguf", "size": 10_000_000}))
        for t in range(1, 11):
            clock[0] = 100.0 + t
            feed(json.dumps({"event": "progress", "path": "F/a.gguf", "bytes": t * 1_000_000, "total": 10_000_000}))
        feed(json.dumps({"event": "done", "path": "F/a.gguf", "size": 10_000_000, "fetched": 10_000_000, "seconds": 10}))
        feed(json.dumps({"event": "done", "path": "F/b.gguf", "size": 10_000_000, "fetched": 2_000_000,
                         "seconds": 1, "xet": True}))
    lines = ctx.out.getvalue().splitlines()
    assert lines[0] == "[rig] model: downloading a.gguf (10.0 MB)"
    assert lines[1] == "[rig] model: a.gguf: 5.0 MB / 10.0 MB (50%), 1.0 MB/s, ETA 5s"
    assert lines[2] == "[rig] model: a.gguf: 10.0 MB / 10.0 MB (100%), 1.0 MB/s, ETA 0s"
    assert lines[3] == "[rig] model: fetched a.gguf: 10.0 MB in 10.0s (1.0 MB/s)"
    assert lines[4] == "[rig] model: fetched b.gguf: 2.0 MB in 1.0s (2.0 MB/s) via Xet (10.0 MB file)"
    assert len(lines) == 5


def test_progress_rich_on_a_tty():
    from provision.progress import Progress
    ctx = _Ctx(fancy=True)
    with Progress(ctx, "model", "bytes") as p:
        feed = transfer.EventFeed(p, "downloading")
        feed(json.dumps({"event": "start", "path": "F/a.gguf", "size": 1000}))
        feed(json.dumps({"event": "progress", "path": "F/a.gguf", "bytes": 500, "total": 1000}))
        feed(json.dumps({"event": "done", "path": "F/a.gguf", "size": 1000, "fetched": 1000, "seconds": 1}))
        assert p.bar is not None and p.bar.tasks[0].completed == 1000
    assert "a.gguf" in ctx.out.getvalue()


def test_progress_is_the_one_the_llama_build_uses():
    """The llama build's [n/N] from ninja goes through the same display: a line every 10 %."""
    from provision.steps import llama
    ctx = _Ctx()
    prog = llama.Progress(ctx, "b2-abc")
    for n in range(1, 21):
        prog(f"[{n}/20] Building CXX object src/x{n}.o")
    prog.close()
    lines = ctx.out.getvalue().splitlines()
    assert lines[0] == "[rig] llama: b2-abc: [1/20] 0%" and lines[1] == "[rig] llama: b2-abc: [2/20] 10%"
    assert lines[-1] == "[rig] llama: b2-abc: [20/20] 100%" and len(lines) == 11 and prog.compiled == 20
    fancy = _Ctx(fancy=True)
    prog = llama.Progress(fancy, "b2-abc")
    prog("[5/20] Building CXX object src/x.o")
    assert prog.display.bar.tasks[0].completed == 5 and prog.display.bar.tasks[0].total == 20
    prog.close()


def test_hf_pull_bar_counts_network_bytes_apart_from_file_bytes_and_knows_xet(capsys, monkeypatch):
    """The bar hf_pull gives the client, driven by the client's own Xet progress reporter (what
    xet_get does): file bytes and network bytes apart, no missing method; and the client's xet_get,
    traced, marks the file as carried by Xet."""
    import importlib.util
    from huggingface_hub import file_download
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter
    from provision.remote import hf_pull
    counter = {"fetched": 0, "net": 0, "transfer": False, "xet": False}
    bar = hf_pull.make_bar_class("F/a.gguf", 0.0, counter)
    with XetDownloadProgressReporter(reconstruction_desc="a", total=1000, log_level=30, tqdm_class=bar) as rep:
        for done, net in ((300, 100), (1000, 400)):
            r = type("R", (), {"total_bytes_completed": done, "total_transfer_bytes_completed": net,
                               "total_bytes": 1000, "total_bytes_completion_rate": 1.0,
                               "total_transfer_bytes_completion_rate": 2.0})()
            rep.update_progress(r)
    assert counter == {"fetched": 1000, "net": 400, "transfer": True, "xet": False}
    assert hf_pull.net_bytes(counter) == 400
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last == {"event": "progress", "path": "F/a.gguf", "bytes": 1000, "total": 1000, "net": 400}
    assert importlib.util.find_spec("hf_xet") is not None
    seen = []
    monkeypatch.setattr(file_download, "xet_get", lambda **kw: seen.append(kw))
    assert hf_pull.trace_xet() is True
    file_download.xet_get(tqdm_class=bar, expected_size=1000)
    assert counter["xet"] is True and seen == [{"tqdm_class": bar, "expected_size": 1000}]
    assert transfer.transport({"xet": False, "xet_available": True}) == \
        ", plain HTTP (hf_xet installed; the hub offered no Xet)"
    assert transfer.transport({"xet": True}) == ", over Xet"


def test_hf_pull_never_switches_xet_off_and_workers_follow_the_shards():
    import re
    import provision
    named = re.compile(r"[\"']HF_HUB_DISABLE_XET[\"']")  # the env var's name as a string: set or passed on
    for p in Path(provision.__file__).parent.rglob("*.py"):
        assert not named.search(p.read_text()), p
    cfg = cfg_of(xet_high_performance=True, xet_chunk_cache_gb=2.5)
    workers, env = transfer.download_settings(cfg, 4)
    assert workers == 4 and env["HF_XET_HIGH_PERFORMANCE"] == "1"
    assert env["HF_XET_CHUNK_CACHE_SIZE_BYTES"] == "2500000000"
    assert transfer.download_settings(cfg_of(download_workers=2), 4)[0] == 2
    assert transfer.download_settings(cfg_of(), 1) == (1, {"HF_HOME": "/opt/llama-rig/hf-home",
                                                            "HF_XET_CHUNK_CACHE_SIZE_BYTES": "0"})


# --------------------------------------------------------------------------------------------- remote scripts


def test_sha256_files_matches_sha256sum_in_parallel(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(3 * 1024 * 1024 + i))
        paths.append(str(p))
    r = subprocess.run([sys.executable, sha256_files.__file__], input=json.dumps({"paths": paths + [str(tmp_path / "no")], "workers": 3}) + "\n",
                       capture_output=True, text=True)
    evs = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1
    by = {e["path"]: e for e in evs if e["event"] in ("hashed", "error")}
    for p in paths:
        want = subprocess.run(["sha256sum", p], capture_output=True, text=True).stdout.split()[0]
        assert by[p]["sha256"] == want and by[p]["size"] == os.path.getsize(p)
        assert by[p]["mtime_ns"] == os.stat(p).st_mtime_ns
    assert by[str(tmp_path / "no")]["event"] == "error"
    assert evs[-1] == {**evs[-1], "event": "summary", "files": 4, "errors": 1}


def test_remote_scripts_are_stdlib_only():
    import ast
    from provision import remote
    allowed = set(sys.stdlib_module_names) | {"huggingface_hub"}
    for name in remote.SCRIPTS:
        if name.endswith(".sh"):  # a shell program: POSIX sh must read it
            import subprocess
            assert subprocess.run(["sh", "-n", "-c", remote.source(name)]).returncode == 0, name
            continue
        tree = ast.parse(remote.source(name))
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert mods <= allowed, (name, mods - allowed)
        assert remote.sha(name) == hashlib.sha256(remote.source(name).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- whole step, local


class RecordingTarget(LocalTarget):
    """LocalTarget that records every command line and stdin it sends."""

    log: list[tuple[str, str | None]] = []

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr):
        RecordingTarget.log.append((command, stdin))
        return super()._exec(command, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr)


@pytest.fixture
def local_rig(tmp_path, hub):
    """A `connection: local` host whose 'venv' is this Python (it has huggingface_hub)."""
    prefix = tmp_path / "prefix"
    (prefix / "hf-venv/bin").mkdir(parents=True)
    (prefix / "hf-venv/bin/python").symlink_to(sys.executable)
    shards = __import__("tests.hub.fixtures", fromlist=["x"]).make_gguf_like_shards(hub, size=1024 * 1024 + 3)
    data = {"hosts": {"loc": {"connection": {"type": "local"},
                              "paths": {"prefix": str(prefix), "state_dir": str(tmp_path / "state")},
                              "model": {"dir": str(tmp_path / "models"), "endpoint": hub.endpoint,
                                        "token_env": "LLAMA_RIG_TEST_HF_TOKEN", "free_space_margin_gb": 0}}}}
    path = tmp_path / "hosts.yaml"
    import yaml
    path.write_text(yaml.safe_dump(data))
    RecordingTarget.log = []
    return path, shards, tmp_path


def _provision(path, steps=None, check=False):
    from provision.app import App
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False), target_factory=RecordingTarget)
    rc = app.provision("loc", steps=steps or [M.ModelStep()], check=check)
    return int(rc), out.getvalue(), app


def test_local_pull_token_only_on_stdin_then_no_change(local_rig, hub, monkeypatch):
    path, shards, tmp = local_rig
    token = "hf_unitTOKEN_5f3c9a1b"
    hub.gated(shards.repo_id, token)
    monkeypatch.delenv("LLAMA_RIG_TEST_HF_TOKEN", raising=False)
    rc, out, _ = _provision(path)
    assert rc == 1 and "gated or private repo" in out and "LLAMA_RIG_TEST_HF_TOKEN" in out

    # the failed run left only its run lock (a run that changes a host takes it first)
    assert sorted(p.name for p in (tmp / "state").iterdir()) == ["run.lock"]
    assert not (tmp / "models").exists()

    monkeypatch.setenv("LLAMA_RIG_TEST_HF_TOKEN", token)
    rc, out, _ = _provision(path, check=True)
    assert rc == 0 and "would change: download 4 files" in out
    # --check changed nothing
    assert not (tmp / "models").exists() and sorted(p.name for p in (tmp / "state").iterdir()) == ["run.lock"]

    RecordingTarget.log = []
    n0 = len(hub.requests)
    rc, out, _ = _provision(path)
    assert rc == 0, out
    assert "model: hashed 4 file(s), 4194316 bytes" in out
    cmds = [c for c, _ in RecordingTarget.log]
    assert cmds and not any(token in c for c in cmds)
    with_token = [(c, s) for c, s in RecordingTarget.log if s and token in s]
    assert len(with_token) == 1 and "hf_pull.py" in with_token[0][0]
    assert token not in out
    for p in tmp.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert token.encode() not in p.read_bytes(), p
    state = json.loads((tmp / "state/state.json").read_text())["model"]
    assert state["commit"] == shards.sha and len(state["verified"]) == 4
    hub_reqs = [r for r in hub.requests[n0:] if r.server == "hub"]
    assert hub_reqs and all(r.auth for r in hub_reqs)  # the token was used, on the control and the rig

    # second run: no change, nothing fetched, nothing hashed
    RecordingTarget.log = []
    n = len(hub.requests)
    rc, out, _ = _provision(path)
    assert rc == 0 and "model: ok (no change)" in out and "(0 bytes hashed, 0 bytes fetched)" in out
    assert not [r for r in hub.requests[n:] if r.server == "cdn"]
    assert not any("sha256_files" in c or "hf_pull" in c for c, _ in RecordingTarget.log)


def test_local_shard1_path_only_when_verified(local_rig, hub):
    path, shards, tmp = local_rig
    from provision.engine import Context
    from provision.app import App
    rc, out, app = _provision(path)
    assert rc == 0, out
    host = app.inventory().hosts["loc"]
    ctx = Context(host, RecordingTarget(host), app.console)
    want = f"{tmp}/models/{shards.repo_id.replace('/', '__')}/current/{shards.shards[0]}"
    assert M.shard1_path(ctx) == want
    assert M.manifest(ctx)["commit"] == shards.sha
    # touch shard 3: the marker no longer holds, so the service must not get shard 1
    p3 = Path(f"{tmp}/models/{shards.repo_id.replace('/', '__')}/current/{shards.shards[2]}")
    os.utime(p3, ns=(1, 1))
    ctx = Context(host, RecordingTarget(host), app.console)
    with pytest.raises(StepError, match="not verified: .*00003-of-00004.gguf"):
        M.shard1_path(ctx)
    # verify (not --full) hashes only that one, finds it good, and shard1_path works again
    out = io.StringIO()
    ctx = Context(host, RecordingTarget(host), Console(Environment(out, out, False)))
    M.verify_action(ctx)
    assert "hashed 1 file(s), 1048579 bytes" in out.getvalue()
    ctx = Context(host, RecordingTarget(host), app.console)
    assert M.shard1_path(ctx) == want
    # status reads only
    out = io.StringIO()
    ctx = Context(host, RecordingTarget(host), Console(Environment(out, out, False)))
    M.status_action(ctx)
    text = out.getvalue()
    assert shards.sha in text and text.count("verified") >= 4 and "disk free" in text


def test_model_tasks_are_thin_and_registered():
    import tasks
    from provision.steps import step_names
    col = tasks.ns.collections["model"]
    assert sorted(col.tasks) == ["pull", "status", "update", "verify"]
    for t in col.tasks.values():
        assert t.auto_shortflags is False
        assert len(t.__doc__.strip().splitlines()) == 1
    assert "full" in [a.name for a in col.tasks["verify"].get_arguments()]
    assert {"revision", "check"} <= {a.name for a in col.tasks["update"].get_arguments()}
    names = step_names()
    assert names.index("model") == names.index("llama") + 1
