"""The stand-in Hub, driven by the REAL huggingface_hub client in a subprocess.

These tests double as a record of what the 2.4.x client does on faults (see the asserts with
"OBSERVED" comments): it checks sizes only, never sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.hub.fixtures import hf_env, make_gguf_like_shards, run_hf
from tests.hub.server import GeneratedBlob, _parse_range

REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
SHARD_GLOB = "UD-Q6_K_XL/*"


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for c in iter(lambda: f.read(1 << 20), b""):
            h.update(c)
    return h.hexdigest()


def snapshot(repo: str, sha: str, dest: Path, patterns=(SHARD_GLOB,), **kw) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    return f"""
import os
from huggingface_hub import snapshot_download
d = snapshot_download({repo!r}, revision={sha!r}, local_dir={str(dest)!r}, allow_patterns={list(patterns)!r}{extra})
OUT["dir"] = d
OUT["files"] = sorted(os.path.relpath(os.path.join(a, f), d) for a, _, fs in os.walk(d) for f in fs)
"""


def content_files(out: dict) -> list[str]:
    return [f for f in out["files"] if not f.startswith(".cache/")]


@pytest.fixture
def shards(hub):
    return make_gguf_like_shards(hub)


@pytest.fixture
def env(hub, tmp_path):
    return hf_env(hub.endpoint, tmp_path / "hf-home")


# ----------------------------------------------------------------------------------------------- metadata


def test_model_info_tree_paths_info(hub, shards, env):
    out = run_hf(f"""
from huggingface_hub import HfApi
api = HfApi()
mi = api.model_info({REPO!r}, files_metadata=True)
OUT["sha"] = mi.sha
OUT["sib"] = {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in mi.siblings}}
mi2 = api.model_info({REPO!r}, revision=mi.sha, files_metadata=True)
OUT["sha2"] = mi2.sha
OUT["tree"] = [[f.path, type(f).__name__, f.size, f.lfs.sha256 if f.lfs else None, f.xet_hash]
               for f in api.list_repo_tree({REPO!r}, path_in_repo="UD-Q6_K_XL", recursive=True, revision=mi.sha)]
OUT["top"] = sorted([f.path, type(f).__name__] for f in api.list_repo_tree({REPO!r}, revision=mi.sha))
OUT["pi"] = [[f.path, type(f).__name__, getattr(f, "size", None), f.lfs.sha256 if getattr(f, "lfs", None) else None]
             for f in api.get_paths_info({REPO!r}, {shards.shards[:2] + ["UD-Q6_K_XL", "missing.gguf"]!r},
                                         revision=mi.sha)]
""", env)
    assert out["ok"], out
    assert out["sha"] == out["sha2"] == shards.sha
    for p in shards.shards:
        assert out["sib"][p] == [shards.sizes[p], shards.sha256[p]]
    assert out["sib"]["README.md"][1] is None  # not LFS
    assert [t[0] for t in out["tree"]] == shards.shards
    for path, kind, size, lfs, xet in out["tree"]:
        assert kind == "RepoFile" and size == shards.sizes[path] and lfs == shards.sha256[path] and xet is None
    assert ["UD-Q6_K_XL", "RepoFolder"] in out["top"] and ["Q8_0", "RepoFolder"] in out["top"]
    assert ["mmproj-BF16.gguf", "RepoFile"] in out["top"]
    assert out["pi"][0] == [shards.shards[0], "RepoFile", shards.sizes[shards.shards[0]], shards.sha256[shards.shards[0]]]
    assert out["pi"][2][:2] == ["UD-Q6_K_XL", "RepoFolder"]
    assert len(out["pi"]) == 3  # missing paths are skipped, like the real Hub


def test_resolve_headers_and_cdn_range(hub, shards):
    p = shards.shards[1]
    url = f"{hub.endpoint}/{REPO}/resolve/{shards.sha}/{p}"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    op = urllib.request.build_opener(NoRedirect)
    try:
        op.open(urllib.request.Request(url, method="HEAD"))
        raise AssertionError("expected a 302")
    except urllib.error.HTTPError as e:
        assert e.code == 302
        h = e.headers
    assert h["X-Repo-Commit"] == shards.sha
    assert h["X-Linked-Etag"] == f'"{shards.sha256[p]}"'
    assert int(h["X-Linked-Size"]) == shards.sizes[p]
    assert h["Content-Length"] == "0" and h["ETag"]
    assert not any(k.lower().startswith("x-xet") for k in h.keys())
    loc = h["Location"]
    assert loc.startswith(hub.cdn_endpoint)
    req = urllib.request.Request(loc, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes 100-199/{shards.sizes[p]}"
        part = r.read()
    whole = GeneratedBlob(shards.sizes[p], f"0:{p}").read_all()
    assert part == whole[100:200]
    # a tampered CDN url is refused (signed URLs, like the real CDN)
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(loc.replace("sig=", "sig=0"))
    assert ei.value.code == 403
    # errors carry X-Error-Code
    for u, code in [(f"{hub.endpoint}/{REPO}/resolve/nope/{p}", "RevisionNotFound"),
                    (f"{hub.endpoint}/{REPO}/resolve/main/nope.gguf", "EntryNotFound"),
                    (f"{hub.endpoint}/org/nope/resolve/main/x", "RepoNotFound")]:
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(urllib.request.Request(u, method="HEAD"))
        assert ei.value.headers["X-Error-Code"] == code
    # rev as URL-quoted branch name with a slash
    hub.create_branch(REPO, "refs/pr/1")
    with urllib.request.urlopen(f"{hub.endpoint}/{REPO}/resolve/refs%2Fpr%2F1/README.md") as r:
        assert r.headers["X-Repo-Commit"] == shards.sha and b"stand-in" in r.read()


def test_parse_range():
    assert _parse_range("bytes=0-", 10) == (0, 10)
    assert _parse_range("bytes=3-5", 10) == (3, 6)
    assert _parse_range("bytes=-4", 10) == (6, 10)
    assert _parse_range("bytes=3-100", 10) == (3, 10)
    assert _parse_range("bytes=10-", 10) is None


# ----------------------------------------------------------------------------------------------- downloads


def test_snapshot_download_pinned(hub, shards, env, tmp_path):
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, shards.sha, dest), env)
    assert out["ok"], out
    assert content_files(out) == shards.shards  # exactly the 4 shards, no decoys
    for p in shards.shards:
        assert sha256_file(dest / p) == shards.sha256[p]
        meta = (dest / ".cache/huggingface/download" / (p + ".metadata")).read_text().splitlines()
        assert meta[0] == shards.sha and meta[1] == shards.sha256[p]  # etag line is the LFS sha256
    gets = hub.requests.downloads()
    assert sorted(r.file for r in gets) == shards.shards
    assert all(not r.auth for r in gets)  # no Authorization to the CDN origin
    assert not [r for r in hub.requests if r.status >= 400]

    # re-run: completed shards are skipped (no byte GETs at all)
    hub.clear_requests()
    out = run_hf(snapshot(REPO, shards.sha, dest), env)
    assert out["ok"], out
    assert hub.requests.downloads() == []


def test_corrupt_same_size_is_accepted_by_client(hub, shards, env, tmp_path):
    bad = shards.shards[2]
    hub.faults.set(bad, "corrupt")
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, shards.sha, dest), env)
    # OBSERVED: no error; the client only checks the byte count
    assert out["ok"], out
    assert (dest / bad).stat().st_size == shards.sizes[bad]
    assert sha256_file(dest / bad) != shards.sha256[bad]
    meta = (dest / ".cache/huggingface/download" / (bad + ".metadata")).read_text().splitlines()
    assert meta[1] == shards.sha256[bad]  # metadata records the true sha256 for the wrong bytes
    for p in shards.shards:
        if p != bad:
            assert sha256_file(dest / p) == shards.sha256[p]
    # OBSERVED: a plain re-run (fault healed) does not repair it ...
    hub.faults.clear()
    hub.clear_requests()
    out = run_hf(snapshot(REPO, shards.sha, dest), env)
    assert out["ok"] and hub.requests.downloads() == []
    assert sha256_file(dest / bad) != shards.sha256[bad]
    # ... force_download=True does; and only that shard is re-fetched when we ask only for it.
    out = run_hf(snapshot(REPO, shards.sha, dest, patterns=[bad], force_download=True), env)
    assert out["ok"], out
    assert sha256_file(dest / bad) == shards.sha256[bad]
    assert [r.file for r in hub.requests.downloads()] == [bad]


MiB = 1024 * 1024
CLIENT_CHUNK = 10 * MiB  # huggingface_hub DOWNLOAD_CHUNK_SIZE: the granularity of in-process resume


@pytest.fixture
def big(hub):
    """Shards large enough (24 MiB) for the client's 10 MiB resume granularity to show."""
    return make_gguf_like_shards(hub, n=2, size=24 * MiB + 7, decoys=False)


def test_drop_once_below_10mib_restarts_from_zero(hub, shards, env, tmp_path):
    p = shards.shards[0]
    hub.faults.set(p, "drop_after", bytes=1_000_000, count=1)
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, shards.sha, dest, patterns=[p]), env)
    assert out["ok"], out
    assert sha256_file(dest / p) == shards.sha256[p]
    gets = hub.requests.downloads(p)
    # OBSERVED: bytes are handed over in 10 MiB chunks; a break before the first chunk completes
    # loses everything, so the in-process retry asks again for the whole file (no Range)
    assert [(g.status, g.range, g.bytes_sent) for g in gets] == [
        (200, None, 1_000_000), (200, None, shards.sizes[p])]
    assert "Trying to resume download" in out["stderr"]
    assert not list(dest.rglob("*.incomplete"))


def test_drop_once_after_10mib_resumes_with_range(hub, big, env, tmp_path):
    p = big.shards[0]
    hub.faults.set(p, "drop_after", bytes=15 * MiB, count=1)
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, big.sha, dest, patterns=[p]), env)
    assert out["ok"], out
    assert sha256_file(dest / p) == big.sha256[p]
    gets = hub.requests.downloads(p)
    # OBSERVED: resumes in-process from the last complete 10 MiB chunk with a Range request
    assert [(g.status, g.range, g.bytes_sent) for g in gets] == [
        (200, None, 15 * MiB), (206, f"bytes={CLIENT_CHUNK}-", big.sizes[p] - CLIENT_CHUNK)]


def test_drop_every_time_gives_up_and_cleans_incomplete(hub, shards, env, tmp_path):
    p = shards.shards[0]
    hub.faults.set(p, "drop_after", bytes=1_000_000)  # every GET breaks after 1 MB (< one client chunk)
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, shards.sha, dest, patterns=[p]), env)
    # OBSERVED: 1 + 5 retries without a completed chunk, then httpx's RemoteProtocolError propagates
    # out of snapshot_download (1 s sleep between tries)
    assert not out["ok"]
    assert out["error_type"] == "RemoteProtocolError", out["error"]
    assert len([r for r in hub.requests if r.server == "cdn" and r.method == "GET"]) == 6
    # OBSERVED: the process-unique *.incomplete is deleted on error (only SIGKILL leaves one)
    assert not list(dest.rglob("*.incomplete"))
    assert not (dest / p).exists()


def test_drop_every_time_after_10mib_still_completes(hub, big, env, tmp_path):
    p = big.shards[0]
    hub.faults.set(p, "drop_after", bytes=11 * MiB)  # every GET breaks after 11 MiB
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, big.sha, dest, patterns=[p]), env)
    # OBSERVED: each completed 10 MiB chunk resets the retry budget, so it crawls to the end
    assert out["ok"], out
    assert sha256_file(dest / p) == big.sha256[p]
    assert [g.range for g in hub.requests.downloads(p)] == [None, f"bytes={CLIENT_CHUNK}-", f"bytes={2 * CLIENT_CHUNK}-"]


def test_ignore_range_on_resume(hub, big, env, tmp_path):
    p = big.shards[1]
    hub.faults.set(p, "drop_after", bytes=12 * MiB, count=1)
    hub.faults.set(p, "ignore_range", count=5)
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, big.sha, dest, patterns=[p]), env)
    # OBSERVED: a 200 answer to a Range request makes the client rewind and take the whole body
    assert out["ok"], out
    assert sha256_file(dest / p) == big.sha256[p]
    gets = hub.requests.downloads(p)
    assert [(g.status, g.range, g.bytes_sent) for g in gets] == [
        (200, None, 12 * MiB), (200, f"bytes={CLIENT_CHUNK}-", big.sizes[p])]


def test_stall_longer_than_read_timeout_resumes(hub, big, env, tmp_path):
    p = big.shards[1]
    hub.faults.set(p, "stall", seconds=4, after=12 * MiB, count=1)
    dest = tmp_path / "models"
    out = run_hf(snapshot(REPO, big.sha, dest, patterns=[p]), dict(env, HF_HUB_DOWNLOAD_TIMEOUT="1"))
    # OBSERVED: read timeout -> same in-process resume path as a drop
    assert out["ok"], out
    assert sha256_file(dest / p) == big.sha256[p]
    gets = hub.requests.downloads(p)
    assert [(g.range, g.faults) for g in gets] == [(None, ["stall"]), (f"bytes={CLIENT_CHUNK}-", [])]
    assert "Trying to resume download" in out["stderr"]


def test_sigkill_leaves_incomplete_and_rerun_restarts_from_zero(hub, big, env, tmp_path):
    import subprocess
    import sys
    import time

    p = big.shards[0]
    hub.faults.set(p, "stall", seconds=30, after=12 * MiB, count=1)
    dest = tmp_path / "models"
    code = snapshot(REPO, big.sha, dest, patterns=[p])
    proc = subprocess.Popen([sys.executable, "-c", "OUT = {}\n" + code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(r.faults == ["stall"] and r.bytes_sent >= 12 * MiB for r in hub.requests):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        # let the client write its first 10 MiB chunk to the *.incomplete file
        dl = dest / ".cache/huggingface/download"
        while not any(x.stat().st_size >= CLIENT_CHUNK for x in dl.rglob("*.incomplete")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait()
    left = list((dest / ".cache/huggingface/download").rglob("*.incomplete"))
    # OBSERVED: SIGKILL leaves <dir>/.cache/huggingface/download/<folder>/<name>.<8 hex>.incomplete
    assert len(left) == 1 and left[0].stat().st_size == CLIENT_CHUNK, left
    assert not (dest / p).exists()
    hub.faults.clear()
    hub.clear_requests()
    out = run_hf(code, env)
    assert out["ok"], out
    assert sha256_file(dest / p) == big.sha256[p]
    # OBSERVED: a new process starts that file again from byte 0 and does not clean up the leftover
    assert [g.range for g in hub.requests.downloads(p)] == [None]
    assert [x.name for x in (dest / ".cache/huggingface/download").rglob("*.incomplete")] == [left[0].name]


def test_gated_files_only(hub, shards, tmp_path):
    hub.gated(REPO, "hf_tok", files_only=True)
    env_no = hf_env(hub.endpoint, tmp_path / "h")
    out = run_hf(f"from huggingface_hub import HfApi\nOUT['sha'] = HfApi().model_info({REPO!r}).sha", env_no)
    assert out["ok"] and out["sha"] == shards.sha  # metadata public, like the real Hub
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "a"), env_no)
    assert out["error_type"] == "GatedRepoError"


def test_file_blob_served_from_disk_with_ranges(hub, tmp_path):
    f = tmp_path / "disk.gguf"
    data = os.urandom(3 * MiB + 5)
    f.write_bytes(data)
    sha = hub.commit("org/disk", {"m.gguf": f})
    url = f"{hub.endpoint}/org/disk/resolve/{sha}/m.gguf"
    with urllib.request.urlopen(url) as r:  # urllib follows the 302 to the CDN
        assert r.read() == data
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={MiB}-"})) as r:
        assert r.status == 206 and r.read() == data[MiB:]
    hub.faults.set("m.gguf", "corrupt", offset=10, count=1)
    with urllib.request.urlopen(url) as r:
        got = r.read()
    assert len(got) == len(data) and got[10] == data[10] ^ 0xFF and got[:10] == data[:10]


def test_short_stall_is_just_slow(hub, shards, env, tmp_path):
    p = shards.shards[3]
    hub.faults.set(p, "stall", seconds=1, after=100, count=1)
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "m", patterns=[p]), env)
    assert out["ok"], out
    assert len(hub.requests.downloads(p)) == 1


@pytest.mark.parametrize("code,where,ok,seq", [
    # OBSERVED: one 5xx from the CDN is fatal (the byte GET retries only 408/429 and transport errors)
    (503, "cdn", False, [("hub", "HEAD", 302), ("cdn", "GET", 503)]),
    (429, "cdn", True, [("hub", "HEAD", 302), ("cdn", "GET", 429), ("cdn", "GET", 200)]),
    # OBSERVED: a failed HEAD /resolve with no local copy is retried once with backoff
    (503, "resolve", True, [("hub", "HEAD", 503), ("hub", "HEAD", 302), ("cdn", "GET", 200)]),
])
def test_status_fault_once(hub, shards, env, tmp_path, code, where, ok, seq):
    p = shards.shards[0]
    hub.faults.set(p, "status", code=code, where=where, count=1)
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "m", patterns=[p]), env)
    assert out["ok"] is ok, out
    if not ok:
        assert out["error_type"] == "HfHubHTTPError"
    assert [(r.server, r.method, r.status) for r in hub.requests if r.file] == seq


def test_branch_moves_pinned_download_gets_old_bytes(hub, shards, env, tmp_path):
    old = shards.sha
    new = make_gguf_like_shards(hub, seed="v2", message="re-upload")
    assert new.sha != old and hub.sha(REPO) == new.sha
    p = shards.shards[0]
    assert new.sha256[p] != shards.sha256[p]
    out = run_hf(snapshot(REPO, old, tmp_path / "old"), env)
    assert out["ok"], out
    for q in shards.shards:
        assert sha256_file(tmp_path / "old" / q) == shards.sha256[q]
    out = run_hf(f"""
from huggingface_hub import HfApi
OUT["main"] = HfApi().model_info({REPO!r}).sha
OUT["old"] = HfApi().model_info({REPO!r}, revision={old!r}).sha
""", env)
    assert out["main"] == new.sha and out["old"] == old
    out = run_hf(snapshot(REPO, "main", tmp_path / "new"), env)
    assert out["ok"], out
    assert sha256_file(tmp_path / "new" / p) == new.sha256[p]


def test_commit_inherits_and_deletes(hub, shards):
    s2 = hub.commit(REPO, {"extra.txt": b"x", "README.md": None})
    files = hub.files(REPO, s2)
    assert "extra.txt" in files and "README.md" not in files
    assert set(shards.shards) <= set(files)
    assert "README.md" in hub.files(REPO, shards.sha)


def test_gated_repo(hub, shards, tmp_path):
    token = "hf_standin_" + "s3cr3t" * 4
    hub.gated(REPO, token)
    env_no = hf_env(hub.endpoint, tmp_path / "h1")
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "a"), env_no)
    assert not out["ok"] and out["error_type"] == "GatedRepoError", out
    out = run_hf(f"from huggingface_hub import HfApi\nHfApi().model_info({REPO!r})", env_no)
    assert out["error_type"] == "GatedRepoError"
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "a"), hf_env(hub.endpoint, tmp_path / "h1", token="hf_wrong"))
    assert not out["ok"] and out["error_type"] == "GatedRepoError"

    hub.clear_requests()
    out = run_hf(snapshot(REPO, shards.sha, tmp_path / "b"), hf_env(hub.endpoint, tmp_path / "h2", token=token))
    assert out["ok"], out
    for p in shards.shards:
        assert sha256_file(tmp_path / "b" / p) == shards.sha256[p]
    recs = hub.requests
    assert all(r.auth for r in recs if r.server == "hub")
    assert all(not r.auth for r in recs if r.server == "cdn")  # the client drops it for another origin
    assert token not in repr(recs) and token not in json.dumps([r.__dict__ for r in recs])


def test_unknown_repo_and_revision(hub, shards, env, tmp_path):
    out = run_hf("from huggingface_hub import HfApi\nHfApi().model_info('nobody/nothing')", env)
    assert out["error_type"] == "RepositoryNotFoundError"
    out = run_hf(snapshot("nobody/nothing", "main", tmp_path / "x"), env)
    assert out["error_type"] == "RepositoryNotFoundError"
    out = run_hf(f"from huggingface_hub import HfApi\nHfApi().model_info({REPO!r}, revision='nope')", env)
    assert out["error_type"] == "RevisionNotFoundError"
    out = run_hf(f"""
from huggingface_hub import hf_hub_download
hf_hub_download({REPO!r}, 'nope.gguf', revision={shards.sha!r}, local_dir={str(tmp_path / 'y')!r})
""", env)
    assert out["error_type"] == "RemoteEntryNotFoundError"


def test_real_tiny_gguf_as_shard_one(hub, env, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = make_gguf_like_shards(hub, shard_bytes={1: path}, size=4096)
    out = run_hf(snapshot(REPO, s.sha, tmp_path / "d", patterns=[s.shards[0]]), env)
    assert out["ok"], out
    got = (tmp_path / "d" / s.shards[0]).read_bytes()
    assert got == path.read_bytes() and got[:4] == b"GGUF"


# ----------------------------------------------------------------------------------------------- modes / binding


def test_subprocess_mode(hub_factory, tmp_path):
    h = hub_factory(mode="process")
    s = make_gguf_like_shards(h)
    h.faults.set(s.shards[1], "corrupt", count=1)
    out = run_hf(snapshot(REPO, s.sha, tmp_path / "d"), hf_env(h.endpoint, tmp_path / "home"))
    assert out["ok"], out
    assert sha256_file(tmp_path / "d" / s.shards[1]) != s.sha256[s.shards[1]]
    assert sha256_file(tmp_path / "d" / s.shards[0]) == s.sha256[s.shards[0]]
    assert sorted(r.file for r in h.requests.__iter__() if r.server == "cdn") == s.shards
    assert h.faults.list() == []  # count=1 healed


def test_standalone_cli_with_config(hub_factory, tmp_path):
    blob = tmp_path / "a.gguf"
    blob.write_bytes(os.urandom(10_000))
    cfg = {"repos": [{"repo_id": "org/m", "commits": [
        {"files": {"a.gguf": {"path": str(blob)}, "notes.txt": {"text": "hi"},
                   "big.gguf": {"random": {"size": 50_000, "seed": 1}}}}]}]}
    h = hub_factory(mode="process", config=cfg)
    out = run_hf(snapshot("org/m", "main", tmp_path / "d", patterns=["*"]), hf_env(h.endpoint, tmp_path / "home"))
    assert out["ok"], out
    assert (tmp_path / "d" / "a.gguf").read_bytes() == blob.read_bytes()
    assert (tmp_path / "d" / "notes.txt").read_text() == "hi"
    meta = (tmp_path / "d/.cache/huggingface/download/notes.txt.metadata").read_text().splitlines()
    assert len(meta[1]) == 40  # non-LFS: etag is the git blob sha1


def _other_local_ipv4() -> str | None:
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("10.255.255.255", 1))
        ip = s.getsockname()[0]
        s.close()
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_bind_to_given_host(hub_factory, tmp_path):
    ip = _other_local_ipv4() or "127.0.0.2"
    try:
        h = hub_factory(host=ip)
    except OSError:  # an address the box has but cannot bind: any other loopback address will do
        ip = "127.0.0.2"
        h = hub_factory(host=ip)
    assert h.endpoint.startswith(f"http://{ip}:") and h.cdn_endpoint.startswith(f"http://{ip}:")
    s = make_gguf_like_shards(h, n=2, size=10_000)
    out = run_hf(snapshot(REPO, s.sha, tmp_path / "d"), hf_env(h.endpoint, tmp_path / "home"))
    assert out["ok"], out
    assert content_files(out) == s.shards


def test_agent_harnesses(hub):
    with urllib.request.urlopen(hub.endpoint + "/api/agent-harnesses") as r:
        assert json.loads(r.read()) == {"standardEnvVars": [], "harnesses": {}}


def test_large_generated_file_streams_without_ram(hub, env, tmp_path):
    size = 64 * 1024 * 1024 + 3
    hub.commit("org/big", {"big.gguf": GeneratedBlob(size, "big")})
    out = run_hf(snapshot("org/big", hub.sha("org/big"), tmp_path / "d", patterns=["*"]), env)
    assert out["ok"], out
    assert sha256_file(tmp_path / "d" / "big.gguf") == hub.file_sha256("org/big", "big.gguf")


def test_hf_cli_download_and_cache_verify(hub, shards, env, tmp_path):
    import shutil
    import subprocess

    import sys
    from pathlib import Path

    # huggingface-hub installs the `hf` console script next to the interpreter
    hf = shutil.which("hf") or str(Path(sys.executable).with_name("hf"))
    assert Path(hf).exists(), "the hf CLI (huggingface-hub's console script) is not installed"
    bad = shards.shards[2]
    hub.faults.set(bad, "corrupt")
    dest = tmp_path / "cli"
    p = subprocess.run([hf, "download", REPO, "--include", "UD-Q6_K_XL/*", "--local-dir", str(dest),
                        "--revision", shards.sha, "--format", "json"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"path": str(dest)}
    assert sorted(str(x.relative_to(dest)) for x in dest.rglob("*.gguf")) == shards.shards
    # OBSERVED: `hf cache verify` (and HfApi.verify_repo_checksums) do catch it, exit 1
    p = subprocess.run([hf, "cache", "verify", REPO, "--local-dir", str(dest), "--revision", shards.sha],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and bad in p.stdout + p.stderr


def test_tree_pagination(hub, env):
    hub.commit("org/many", {f"d/f{i:04d}.txt": f"{i}" for i in range(1203)})
    out = run_hf("""
from huggingface_hub import HfApi
OUT["n"] = len(list(HfApi().list_repo_tree("org/many", path_in_repo="d", recursive=True)))
""", env)
    assert out["ok"] and out["n"] == 1203, out
    assert len([r for r in hub.requests if "/tree/" in r.path]) == 2  # Link: rel="next" followed


def test_list_repo_commits_walks_the_history(hub, shards, env):
    s2 = hub.commit(REPO, {"extra.txt": b"x"}, message="add extra")
    s3 = hub.commit(REPO, {"extra.txt": b"y"}, message="fix extra")
    out = run_hf(f"""
from huggingface_hub import HfApi
OUT["main"] = [(c.commit_id, c.title) for c in HfApi().list_repo_commits({REPO!r})]
OUT["mid"] = [c.commit_id for c in HfApi().list_repo_commits({REPO!r}, revision={s2!r})]
""", env)
    assert out["ok"], out
    assert [tuple(x) for x in out["main"][:3]] == [(s3, "fix extra"), (s2, "add extra"), (shards.sha, "upload UD-Q6_K_XL")]
    assert out["mid"] == [s2, shards.sha]
