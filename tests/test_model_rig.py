"""The model step on a Tier B rig: the REAL huggingface_hub client (installed in a venv on the rig from
a wheelhouse served on the rig's host-side address) against the stand-in hub bound there too.

One rig and one hub for the whole module (2-core box); each test uses its own repo and its own
state_dir, so tests do not see each other's state. The venv is made by the first test and kept.
"""
from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from provision.engine import Context
from provision.steps import model as M
from provision.target import connect
from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub

pytestmark = pytest.mark.rig

MB = 1024 * 1024
MODELS = "/var/lib/llama-rig/models"


@pytest.fixture(scope="module")
def mrig(rig_factory):
    r = rig_factory()
    # python3-venv comes with the system step on a real rig; here only the model step runs
    r.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv",
         timeout=900)
    try:
        yield r
    finally:
        rig_factory.stop(r)


@pytest.fixture(scope="module")
def mhub(mrig):
    h = StandInHub(mrig.host_side).start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def wheels_url(mrig, wheelhouse_dir):
    s = WheelServer(wheelhouse_dir, mrig.host_side)
    try:
        yield s.url
    finally:
        s.stop()


class Env:
    """Write hosts.yaml for this rig and run the model step / tasks, capturing all output."""

    def __init__(self, rig, hub, wheels_url, tmp: Path, name: str, **model):
        self.rig, self.hub, self.tmp = rig, hub, tmp
        self.state_dir = f"/var/lib/llama-rig-test/{name}"
        self.model = {"endpoint": hub.endpoint, "pip_find_links": wheels_url, "free_space_margin_gb": 0,
                      "token_env": "LLAMA_RIG_TEST_HF_TOKEN", **model}
        self.outputs: list[str] = []

    def write(self, **model) -> Path:
        self.model.update(model)
        entry = self.rig.inventory_entry(paths={"state_dir": self.state_dir}, model=self.model)
        p = self.tmp / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": {"rig": entry}}))
        return p

    def app(self) -> tuple[App, io.StringIO]:
        out = io.StringIO()
        return App(str(self.write()), env=Environment(out, out, False)), out

    def pull(self, check: bool = False, **model) -> tuple[int, str]:
        self.model.update(model)
        app, out = self.app()
        rc = int(app.provision("rig", only="model", check=check))
        self.outputs.append(out.getvalue())
        return rc, out.getvalue()

    def ctx(self) -> Context:
        app, out = self.app()
        host = app.inventory().hosts["rig"]
        return Context(host, connect(host), app.console)

    def state(self) -> dict:
        r = self.rig.sh(f"cat {self.state_dir}/state.json", check=False)
        return json.loads(r.stdout).get("model", {}) if r.returncode == 0 else {}

    def staged(self) -> dict:
        r = self.rig.sh(f"cat {self.state_dir}/state.json", check=False)
        return json.loads(r.stdout).get("model_staging", {}) if r.returncode == 0 else {}

    def ldir(self, repo: str) -> str:
        return f"{MODELS}/{repo.replace('/', '__')}"

    def cur(self, repo: str) -> str:
        """The copy in service (the versioned layout's `current` link)."""
        return f"{self.ldir(repo)}/current"


def cdn_gets(hub, since: int, glob: str = "*") -> list:
    import fnmatch
    return [r for r in hub.requests[since:] if r.server == "cdn" and r.method == "GET"
            and fnmatch.fnmatchcase(r.file or "", glob)]


def rig_sha256(rig, path: str) -> str:
    return rig.sh(f"sha256sum '{path}'").stdout.split()[0]


# --------------------------------------------------------------------------------------------------


def test_happy_path_then_second_run_changes_nothing(mrig, mhub, wheels_url, tmp_path):
    gg = write_tiny_qwen35moe(tmp_path / "gguf", n_shards=4)
    s = make_gguf_like_shards(mhub, "rigtest/happy-GGUF", size=2 * MB + 5,
                              shard_bytes={1: gg[0]})
    env = Env(mrig, mhub, wheels_url, tmp_path, "happy", repo=s.repo_id)

    n0 = len(mhub.requests)
    rc, out = env.pull(check=True)
    assert rc == 0, out
    assert "would change: download 4 files" in out and "would change: verify sha256 of 4 files" in out
    assert mrig.sh(f"test -e {env.ldir(s.repo_id)}", check=False).returncode != 0
    assert mrig.sh(f"test -e {env.state_dir}/state.json", check=False).returncode != 0
    assert not cdn_gets(mhub, n0)

    rc, out = env.pull()
    assert rc == 0, out
    assert "model: hashed 4 file(s), " in out
    assert "model: downloading Qwen3.5-122B-A10B-UD-Q6_K_XL-00001-of-00004.gguf" in out  # progress lines
    assert "model: fetched Qwen3.5-122B-A10B-UD-Q6_K_XL-00004-of-00004.gguf" in out
    for p in s.shards:
        assert rig_sha256(mrig, f"{env.cur(s.repo_id)}/{p}") == s.sha256[p]
        assert len(cdn_gets(mhub, n0, p)) == 1
    assert not cdn_gets(mhub, n0, "Q8_0/*") and not cdn_gets(mhub, n0, "mmproj*")
    head = mrig.sh(f"head -c 4 {env.cur(s.repo_id)}/{s.shards[0]}").stdout
    assert head == "GGUF"
    st = env.state()
    assert st["commit"] == s.sha and sorted(st["verified"]) == sorted(s.shards)
    assert all(st["verified"][p]["sha256"] == s.sha256[p] for p in s.shards)
    assert mrig.sh(f"find {env.ldir(s.repo_id)} -name '*.incomplete'").stdout == ""
    assert M.shard1_path(env.ctx()) == f"{env.cur(s.repo_id)}/{s.shards[0]}"
    assert mrig.sh(f"readlink {env.cur(s.repo_id)}").stdout.strip() == f"commits/{s.sha}"
    assert mrig.sh(f"test -e {env.ldir(s.repo_id)}/staging", check=False).returncode != 0

    # second run: 0 changes, 0 bytes fetched, 0 bytes hashed
    n1 = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 0, out
    assert "model: ok (no change)" in out and "(0 bytes hashed, 0 bytes fetched)" in out
    assert "change:" not in out and "hashed 4" not in out
    assert not cdn_gets(mhub, n1)
    assert not [r for r in mhub.requests[n1:] if "/resolve/" in r.path]  # only the branch re-resolution
    assert env.state()["verified"] == st["verified"]

    # model.verify without --full hashes nothing; with --full, everything
    app, vout = env.app()
    assert int(app.each_host("rig", lambda c: M.verify_action(c), title="model.verify")) == 0
    assert "0 bytes hashed" in vout.getvalue()
    app, vout = env.app()
    assert int(app.each_host("rig", lambda c: M.verify_action(c, True), title="model.verify")) == 0
    assert f"hashed 4 file(s), {sum(s.sizes[p] for p in s.shards)} bytes" in vout.getvalue()
    app, sout = env.app()
    assert int(app.each_host("rig", M.status_action, title="model.status")) == 0
    assert s.sha in sout.getvalue() and sout.getvalue().count(" verified") >= 4


def test_same_size_corruption_detected_and_only_that_shard_refetched(mrig, mhub, wheels_url, tmp_path):
    s = make_gguf_like_shards(mhub, "rigtest/corrupt-GGUF", size=2 * MB + 11, seed="c")
    env = Env(mrig, mhub, wheels_url, tmp_path, "corrupt", repo=s.repo_id)
    mhub.faults.set("*-00003-of-*", "corrupt", count=1)
    n0 = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 0, out
    bad = s.shards[2]
    assert f"{bad}: MISMATCH" in out
    assert "re-fetching 1 file(s): Qwen3.5-122B-A10B-UD-Q6_K_XL-00003-of-00004.gguf (attempt 2)" in out
    assert len(cdn_gets(mhub, n0, bad)) == 2
    for p in s.shards:
        if p != bad:
            assert len(cdn_gets(mhub, n0, p)) == 1, p
        assert rig_sha256(mrig, f"{env.cur(s.repo_id)}/{p}") == s.sha256[p]
    assert sorted(env.state()["verified"]) == sorted(s.shards)
    # the re-fetch changed a shard: llama-server owes a restart (its step did not run here)
    assert "llama-server.restart" in json.loads(mrig.sh(f"cat {env.state_dir}/state.json").stdout)["owed"]


def test_corrupt_every_time_stops_after_max_attempts(mrig, mhub, wheels_url, tmp_path):
    s = make_gguf_like_shards(mhub, "rigtest/always-bad-GGUF", n=2, size=1 * MB + 3, seed="b", decoys=False)
    env = Env(mrig, mhub, wheels_url, tmp_path, "alwaysbad", repo=s.repo_id, max_attempts=2)
    fid = mhub.faults.set("*-00002-of-*", "corrupt")
    n0 = len(mhub.requests)
    try:
        rc, out = env.pull()
    finally:
        mhub.faults.clear(fid)
    assert rc == 1
    assert "sha256 still wrong after 2 download attempt(s) (model.max_attempts = 2)" in out
    assert len(cdn_gets(mhub, n0, s.shards[1])) == 2 and len(cdn_gets(mhub, n0, s.shards[0])) == 1
    assert env.state() == {}  # nothing was ever switched to: no model in service
    assert list(env.staged()["verified"]) == [s.shards[0]]  # the good shard stays staged
    with pytest.raises(Exception, match="no model manifest"):
        M.shard1_path(env.ctx())


def test_connection_dropped_mid_shard(mrig, mhub, wheels_url, tmp_path):
    s = make_gguf_like_shards(mhub, "rigtest/drop-GGUF", size=3 * MB + 1, seed="d")
    env = Env(mrig, mhub, wheels_url, tmp_path, "drop", repo=s.repo_id)

    # 1. the CDN drops shard 2 once after 1 MB: the client retries in-process and completes
    mhub.faults.set("*-00002-of-*", "drop_after", count=1, bytes=MB)
    n0 = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 0, out
    gets = cdn_gets(mhub, n0, s.shards[1])
    assert [g.bytes_sent for g in gets] == [MB, s.sizes[s.shards[1]]]
    assert gets[0].error == "dropped"
    assert mrig.sh(f"find {env.ldir(s.repo_id)} -name '*.incomplete'").stdout == ""
    # (the copy in service is repaired in place: its commit dir holds huggingface_hub's cache)
    cache = f"{env.ldir(s.repo_id)}/commits/{s.sha}/.cache/huggingface/download"

    # 2. the download process dies mid-shard (SIGKILL while the CDN stalls): debris is left;
    #    the re-run cleans it and completes, fetching only that shard
    mrig.sh(f"rm -f {env.cur(s.repo_id)}/{s.shards[3]}")
    mhub.faults.set("*-00004-of-*", "stall", count=1, seconds=40, after=MB)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(zip(("rc", "out"), env.pull())))
    t.start()
    deadline = time.monotonic() + 180
    debris = ""
    while time.monotonic() < deadline and not debris:
        # (empty for now: the client writes in 10 MiB chunks and holds the first MB in memory)
        debris = mrig.sh(f"find {cache} -name '*.incomplete'", check=False).stdout.strip()
        time.sleep(0.2)
    assert debris, "the download never started"
    pids = mrig.sh("pgrep -f 'python libexec/[h]f_pull.py|/libexec/[h]f_pull.py'", check=False).stdout.split()
    assert pids
    mrig.sh(f"kill -9 {' '.join(pids)}")
    t.join(120)
    assert result["rc"] == 1 and "download of 1 file(s) failed" in result["out"]
    assert mrig.sh(f"find {cache} -name '*.incomplete'").stdout.strip() == debris  # SIGKILL left it

    n1 = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 0, out
    assert "change: remove 1 *.incomplete leftover(s)" in out
    assert "download 1 file " in out
    assert mrig.sh(f"find {env.ldir(s.repo_id)} -name '*.incomplete'").stdout == ""
    assert [g.file for g in cdn_gets(mhub, n1)] == [s.shards[3]]
    assert rig_sha256(mrig, f"{env.cur(s.repo_id)}/{s.shards[3]}") == s.sha256[s.shards[3]]
    rc, out = env.pull()
    assert rc == 0 and "model: ok (no change)" in out


def test_pinned_sha_does_not_move_with_the_branch(mrig, mhub, wheels_url, tmp_path):
    s = make_gguf_like_shards(mhub, "rigtest/pinned-GGUF", size=1 * MB + 9, seed="p1")
    env = Env(mrig, mhub, wheels_url, tmp_path, "pinned", repo=s.repo_id, revision=s.sha)
    rc, out = env.pull()
    assert rc == 0, out
    # the branch moves: shard 2 gets new content
    from tests.hub.server import GeneratedBlob
    new_sha = mhub.commit(s.repo_id, {s.shards[1]: GeneratedBlob(1 * MB + 9, "p2")}, message="requant")
    assert new_sha != s.sha and mhub.sha(s.repo_id, "main") == new_sha
    n = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 0 and "model: ok (no change)" in out, out
    assert len(mhub.requests) == n  # a pin is never re-resolved: not one request to the hub
    assert env.state()["commit"] == s.sha
    assert rig_sha256(mrig, f"{env.cur(s.repo_id)}/{s.shards[1]}") == s.sha256[s.shards[1]]
    # the branch, by contrast, would stage the new commit: that one shard downloaded, 3 linked
    rc, out = env.pull(check=True, revision="main")
    assert rc == 0
    assert f"stage {s.repo_id}@{new_sha[:7]} (main) in staging/{new_sha[:7]}" in out
    assert "link 3 unchanged from current (0 bytes)" in out
    assert "would change: download 1 file (1.0 MB)" in out
    assert f"would change: switch current → commits/{new_sha[:7]} (was {s.sha[:7]})" in out
    assert env.state()["commit"] == s.sha  # --check wrote nothing


def test_disk_too_small_refused_before_any_download(mrig, mhub, wheels_url, tmp_path):
    s = make_gguf_like_shards(mhub, "rigtest/bigdisk-GGUF", n=2, size=1 * MB, seed="z", decoys=False)
    env = Env(mrig, mhub, wheels_url, tmp_path, "disk", repo=s.repo_id, free_space_margin_gb=100000)
    n0 = len(mhub.requests)
    rc, out = env.pull()
    assert rc == 1
    assert "not enough disk space at " in out and "model.free_space_margin_gb = 100000" in out
    assert "need 2.1 MB (2097152 bytes) to download" in out
    assert not [r for r in mhub.requests[n0:] if r.server == "cdn" or "/resolve/" in r.path]
    assert mrig.sh(f"test -e {env.ldir(s.repo_id)}", check=False).returncode != 0
    assert env.state() == {}

    # a real small disk: a 1 MiB tmpfs at the models dir, margin 0 -> the facts' df number refuses it
    mrig.sh(f"mkdir -p {MODELS} && mount -t tmpfs -o size=1m tmpfs {MODELS}")
    try:
        n1 = len(mhub.requests)
        rc, out = env.pull(free_space_margin_gb=0)
        assert rc == 1
        assert f"not enough disk space at {MODELS}: 1.0 MB free (1048576 bytes), need 2.1 MB" in out
        assert not [r for r in mhub.requests[n1:] if r.server == "cdn" or "/resolve/" in r.path]
        assert mrig.sh(f"ls -A {MODELS}").stdout == ""
    finally:
        mrig.sh(f"umount {MODELS}")


def test_gated_repo_token_never_leaks(mrig, mhub, wheels_url, tmp_path, monkeypatch):
    token = "hf_rigTEST_9c1e5d7a3b"
    s = make_gguf_like_shards(mhub, "rigtest/gated-GGUF", size=2 * MB + 3, seed="g")
    mhub.gated(s.repo_id, token)
    env = Env(mrig, mhub, wheels_url, tmp_path, "gated", repo=s.repo_id)

    monkeypatch.delenv("LLAMA_RIG_TEST_HF_TOKEN", raising=False)
    rc, out = env.pull()
    assert rc == 1 and "gated or private repo" in out and "LLAMA_RIG_TEST_HF_TOKEN" in out

    monkeypatch.setenv("LLAMA_RIG_TEST_HF_TOKEN", token)
    mhub.faults.set("*-00002-of-*", "stall", count=1, seconds=3, after=MB)  # keep hf_pull alive a while
    samples: list[str] = []
    stop = threading.Event()

    def sample_ps():
        while not stop.is_set():
            samples.append(mrig.sh("ps -eww -o pid,args", check=False).stdout)
            samples.append(mrig.sh("cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'", check=False).stdout)
            time.sleep(0.1)

    th = threading.Thread(target=sample_ps)
    n0 = len(mhub.requests)
    th.start()
    try:
        rc, out = env.pull()
    finally:
        stop.set()
        th.join()
    assert rc == 0, out
    assert any("hf_pull.py" in x for x in samples), "the sampler never saw the download running"
    assert not any(token in x for x in samples)
    hub_reqs = [r for r in mhub.requests[n0:] if r.server == "hub"]
    assert hub_reqs and all(r.auth for r in hub_reqs)  # the token did reach the hub, from both sides
    assert any("/resolve/" in r.path for r in hub_reqs)
    for text in env.outputs:
        assert token not in text
    journal = mrig.sh("journalctl --no-pager -a -o verbose", check=False).stdout
    assert journal and token not in journal
    for where in ("/root/.bash_history", "/root/.python_history", "/var/log"):
        r = mrig.sh(f"grep -rFl -- '{token}' {where} 2>/dev/null", check=False)
        assert r.stdout == "", where
    r = mrig.sh(f"grep -rFl -- '{token}' {MODELS} /opt/llama-rig /var/lib/llama-rig-test /tmp /root",
                check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout  # 1 = searched, found nothing
    for p in s.shards:
        assert rig_sha256(mrig, f"{env.cur(s.repo_id)}/{p}") == s.sha256[p]
