"""`provision --from`: the copy helper's stream (send -> recv, resume, refusals), the temporary key,
a real relay through Target.pipe between two `connection: local` hosts, and the decisions as data
(which shards the source offers, the model plan, copy / seed / build and why, the fingerprint with
glibc and the builds made before it)."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision import inventory as inv
from provision import llama_build as lb
from provision.console import Console, Environment
from provision.engine import Context, Run
from provision.remote import rig_copy
from provision.steps import llama as ls
from provision.steps import model as M
from provision.target import connect
from provision.transfer import build_copy as bc
from provision.transfer import copy as tc
from provision.transfer import model_copy as mc
from provision.transfer.source import Cpu, Sessions, parse_cpu

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "provision" / "remote" / "rig_copy.py"
KEYS = REPO / "provision" / "remote" / "rig_keys.py"


def run_helper(*args, stdin: bytes = b"", env=None, script=HELPER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], input=stdin, capture_output=True,
                          timeout=60, env=env)


def events(out: bytes) -> list[dict]:
    return [json.loads(ln) for ln in out.decode().splitlines() if ln.startswith("{")]


def send(items: list[dict], rate: float = 0) -> bytes:
    r = run_helper("send", stdin=json.dumps({"items": items, "rate": rate}).encode() + b"\n")
    assert r.returncode == 0, r.stderr
    return r.stdout


def recv(items: dict, stream: bytes) -> tuple[int, list[dict]]:
    r = run_helper("recv", stdin=json.dumps({"items": items, "progress_s": 0}).encode() + b"\n" + stream)
    return r.returncode, events(r.stdout)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "build" / "bin").mkdir(parents=True)
    (src / "build" / "obj").mkdir()
    (src / "shard.gguf").write_bytes(os.urandom(3_000_000) + b"tail")
    (src / "build" / "bin" / "llama-server").write_bytes(b"\x7fELF" + os.urandom(50_000))
    os.chmod(src / "build" / "bin" / "llama-server", 0o755)
    os.symlink("llama-server", src / "build" / "bin" / "server-link")
    (src / "build" / "obj" / "x.o").write_bytes(b"object")
    (src / "build" / "stats").write_text("3\n")
    return src


# -- the stream ------------------------------------------------------------------------------------


def test_send_recv_file_and_tree(tree, tmp_path):
    dst = tmp_path / "dst"
    stream = send([{"id": "m", "kind": "file", "path": str(tree / "shard.gguf")},
                   {"id": "b", "kind": "tree", "path": str(tree / "build"), "include": ["bin"]}])
    rc, evs = recv({"m": {"kind": "file", "dest": str(dst / "m" / "shard.gguf"),
                          "partial": str(dst / ".stage" / "shard.gguf.partial"), "mode": 0o644},
                    "b": {"kind": "tree", "dest": str(dst / "build")}}, stream)
    assert rc == 0, evs
    assert (dst / "m" / "shard.gguf").read_bytes() == (tree / "shard.gguf").read_bytes()
    assert oct((dst / "m" / "shard.gguf").stat().st_mode & 0o777) == "0o644"
    assert (dst / "build" / "bin" / "llama-server").read_bytes() == (tree / "build" / "bin" / "llama-server").read_bytes()
    assert os.access(dst / "build" / "bin" / "llama-server", os.X_OK)
    assert os.readlink(dst / "build" / "bin" / "server-link") == "llama-server"
    assert not (dst / "build" / "obj").exists()  # only what `include` names
    assert not list((dst / ".stage").iterdir())  # the partial became the final file
    done = {e["id"]: e for e in evs if e["event"] == "done"}
    assert done["m"]["bytes"] == 3_000_004 and done["m"]["resumed_from"] == 0
    assert done["b"]["files"] == 1
    assert evs[-1] == {"event": "summary", "ok": True, "skipped": 0}


def test_interrupted_stream_keeps_only_a_partial_then_resumes(tree, tmp_path):
    dst, stage = tmp_path / "dst" / "shard.gguf", tmp_path / "dst" / ".stage" / "shard.gguf.partial"
    spec = {"m": {"kind": "file", "dest": str(dst), "partial": str(stage)}}
    full = send([{"id": "m", "kind": "file", "path": str(tree / "shard.gguf")}])
    rc, evs = recv(spec, full[:1_500_000])  # the connection drops in the middle of the file
    assert rc == 2
    assert not dst.exists()  # never half a file at the final path
    assert 0 < stage.stat().st_size < 3_000_004
    assert [e for e in evs if e["event"] == "error"][0]["error"].startswith("the stream ended early")
    off = stage.stat().st_size
    rest = send([{"id": "m", "kind": "file", "path": str(tree / "shard.gguf"), "offset": off}])
    assert len(rest) < len(full) - off + 4096  # only the rest travels
    rc, evs = recv(spec, rest)
    assert rc == 0, evs
    assert dst.read_bytes() == (tree / "shard.gguf").read_bytes()
    assert [e for e in evs if e["event"] == "done"][0]["resumed_from"] == off
    assert not stage.exists()


def test_a_source_file_that_cannot_be_read_fails_that_item_only(tree, tmp_path):
    stream = send([{"id": "gone", "kind": "file", "path": str(tree / "nope.gguf")},
                   {"id": "m", "kind": "file", "path": str(tree / "shard.gguf")}])
    rc, evs = recv({"gone": {"kind": "file", "dest": str(tmp_path / "a"), "partial": str(tmp_path / "a.p")},
                    "m": {"kind": "file", "dest": str(tmp_path / "b"), "partial": str(tmp_path / "b.p")}}, stream)
    assert rc == 1
    err = [e for e in evs if e["event"] == "error"]
    assert [e["id"] for e in err] == ["gone"] and "FileNotFoundError" in err[0]["error"]
    assert (tmp_path / "b").read_bytes() == (tree / "shard.gguf").read_bytes() and not (tmp_path / "a").exists()


def test_tree_merge_keeps_existing_files_and_skips_names(tree, tmp_path):
    dst = tmp_path / "cache"
    (dst / "obj").mkdir(parents=True)
    (dst / "obj" / "x.o").write_bytes(b"mine")
    stream = send([{"id": "c", "kind": "tree", "path": str(tree / "build"), "skip_names": ["stats"],
                    "tolerant": True}])
    rc, evs = recv({"c": {"kind": "tree", "dest": str(dst), "skip_existing": True, "tolerant": True}}, stream)
    assert rc == 0, evs
    assert (dst / "obj" / "x.o").read_bytes() == b"mine"
    assert (dst / "bin" / "llama-server").exists() and not (dst / "stats").exists()


@pytest.mark.parametrize("rel", ["../escape", "/etc/passwd", "a/../../b", "bin/./x"])
def test_receiver_refuses_paths_outside_its_tree(tmp_path, rel):
    with pytest.raises(ValueError):
        rig_copy.safe_join(str(tmp_path), rel)


def test_receiver_refuses_writing_through_a_symlink(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(str(tmp_path / "elsewhere"), tmp_path / "root" / "bin")
    with pytest.raises(ValueError, match="outside"):
        rig_copy.safe_join(str(tmp_path / "root"), "bin/llama-server")


def test_token_bucket_paces_to_the_rate(monkeypatch):
    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(rig_copy.time, "monotonic", lambda: clock[0])

    def sleep(s):
        slept.append(s)
        clock[0] += s
    monkeypatch.setattr(rig_copy.time, "sleep", sleep)
    b = rig_copy.TokenBucket(1_000_000, cap=100_000)
    for _ in range(50):
        b.take(100_000)  # 5 MB at 1 MB/s, a burst of 0.1 MB
    assert abs(sum(slept) - 4.9) < 1e-6
    assert rig_copy.TokenBucket(0).take(10**9) == 0.0  # 0 = no limit


def test_serve_sends_only_allowed_items_before_the_deadline(tree, tmp_path):
    allow = tmp_path / "allow.json"
    items = [{"id": "m", "kind": "file", "path": str(tree / "shard.gguf")}]

    def serve(cmd: str, deadline: float):
        allow.write_text(json.dumps({"items": items, "rate": 0, "deadline": deadline}))
        return run_helper("serve", str(allow), env=dict(os.environ, SSH_ORIGINAL_COMMAND=cmd))

    def token(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode()
    r = serve("ping", time.time() + 60)
    assert r.returncode == 0 and r.stdout == b"pong\n"
    r = serve("send " + token({"items": [{"id": "m", "offset": 0}]}), time.time() + 60)
    assert r.returncode == 0
    rc, evs = recv({"m": {"kind": "file", "dest": str(tmp_path / "out"), "partial": str(tmp_path / "out.p")}},
                   r.stdout)
    assert rc == 0 and (tmp_path / "out").read_bytes() == (tree / "shard.gguf").read_bytes()
    r = serve("send " + token({"items": [{"id": "etc-shadow", "offset": 0}]}), time.time() + 60)
    assert r.returncode == 2 and b"not allowed" in r.stderr and not r.stdout
    r = serve("cat /etc/shadow", time.time() + 60)
    assert r.returncode == 2 and b"only copies" in r.stderr
    r = serve("ping", time.time() - 1)
    assert r.returncode == 2 and b"expired" in r.stderr


def test_keys_add_then_remove(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text(
        "ssh-ed25519 AAAAmine me@laptop\n"
        'restrict,expiry-time="200001010000",command="x" ssh-ed25519 AAAAold llama-rig-copy-0123456789ab\n')
    (home / ".cache" / "llama-rig-copy" / "llama-rig-copy-0123456789ab").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home))
    req = {"tag": "llama-rig-copy-aaaaaaaaaaaa", "pubkey": "ssh-ed25519 AAAAC3Nza+/= dest", "from": ["10.0.0.2", "fe80::1"],
           "items": [{"id": "m", "kind": "file", "path": "/x"}], "rate": 5e6, "minutes": 10, "script": "print(1)\n"}
    r = run_helper("add", stdin=json.dumps(req).encode() + b"\n", env=env, script=KEYS)
    assert r.returncode == 0, r.stderr
    lines = (home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAmine me@laptop"
    assert len(lines) == 2  # the expired leftover of a dead run is gone
    new = lines[1]
    assert new.startswith('restrict,from="10.0.0.2,fe80::1",expiry-time="')
    assert 'command="nice -n 10 ' in new and " serve " in new
    assert new.endswith(" ssh-ed25519 AAAAC3Nza+/= llama-rig-copy-aaaaaaaaaaaa")
    d = home / ".cache" / "llama-rig-copy"
    assert sorted(p.name for p in d.iterdir()) == ["llama-rig-copy-aaaaaaaaaaaa"]
    allow = json.loads((d / "llama-rig-copy-aaaaaaaaaaaa" / "allow.json").read_text())
    assert allow["rate"] == 5e6 and allow["items"] == req["items"] and allow["deadline"] > time.time() + 500
    assert oct((home / ".ssh" / "authorized_keys").stat().st_mode & 0o777) == "0o600"
    r = run_helper("remove", stdin=b'{"tag": "llama-rig-copy-aaaaaaaaaaaa"}\n', env=env, script=KEYS)
    assert r.returncode == 0
    assert (home / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAAmine me@laptop\n"
    assert not list(d.iterdir())
    r = run_helper("add", stdin=json.dumps({**req, "pubkey": 'ssh-ed25519 AAAA" evil'}).encode() + b"\n",
                   env=env, script=KEYS)
    assert r.returncode == 2


# -- a real relay between two local hosts -----------------------------------------------------------


def two_local_hosts(tmp_path, rate_mb=0):
    data = {"hosts": {"src": {"connection": {"type": "local"}, "paths": {"prefix": str(tmp_path / "p-src")},
                              "transfer": {"rate_limit_mb": rate_mb}},
                      "dst": {"connection": {"type": "local"},
                              "paths": {"prefix": str(tmp_path / "p-dst"), "state_dir": str(tmp_path / "st-dst")}}}}
    i = inv.from_data(data)
    return i.hosts["src"], i.hosts["dst"]


def test_relay_copy_between_two_local_hosts(tree, tmp_path):
    src_host, dst_host = two_local_hosts(tmp_path)
    out = io.StringIO()
    console = Console(Environment(out, out, False))
    sessions = Sessions(src_host, connect, console)
    ctx = Context(dst_host, connect(dst_host), console)
    src = sessions.for_dest("dst")
    assert src.address is None and src.route_text() == "relayed through this machine"
    dst = tmp_path / "d"
    items = [tc.FileItem("m0", str(tree / "shard.gguf"), str(dst / "shard.gguf"), str(dst / ".s" / "shard.gguf.partial"),
                         3_000_004, "shard.gguf"),
             tc.TreeItem("b", str(tree / "build"), str(dst / "build"), include=["bin", "lib"])]
    try:
        run = tc.copy(ctx, src, items, "model")
    finally:
        sessions.close()
    assert run.route == "relay" and "no address" in run.why
    assert all(r.ok for r in run.results.values()), run.results
    assert run.bytes == 3_000_004 + 50_004
    assert (dst / "shard.gguf").read_bytes() == (tree / "shard.gguf").read_bytes()
    assert (dst / "build" / "bin" / "llama-server").exists()
    text = out.getvalue()
    assert "[dst] model: shard.gguf <- src: copying 3.0 MB" in text
    assert "[dst] model: relaying through this machine" in text
    # the helper was installed on the destination only; nothing written on the source
    assert (tmp_path / "p-dst" / "libexec" / "rig_copy.py").exists()
    assert not (tmp_path / "p-src").exists()


def test_relay_reports_a_failed_item_and_copies_the_rest(tree, tmp_path):
    src_host, dst_host = two_local_hosts(tmp_path, rate_mb=50)
    out = io.StringIO()
    console = Console(Environment(out, out, False))
    sessions = Sessions(src_host, connect, console)
    ctx = Context(dst_host, connect(dst_host), console)
    items = [tc.FileItem("a", str(tree / "missing.gguf"), str(tmp_path / "d" / "a"), str(tmp_path / "d" / "a.p")),
             tc.FileItem("b", str(tree / "shard.gguf"), str(tmp_path / "d" / "b"), str(tmp_path / "d" / "b.p"))]
    try:
        run = tc.copy(ctx, sessions.for_dest("dst"), items, "model")
    finally:
        sessions.close()
    assert not run.results["a"].ok and "FileNotFoundError" in run.results["a"].error
    assert run.results["b"].ok and (tmp_path / "d" / "b").stat().st_size == 3_000_004
    assert run.failed() == {"a": run.results["a"].error}


# -- which shards the source offers (pure) --------------------------------------------------------------


def f(path, sha, size=100):
    return {"path": path, "size": size, "sha256": sha}


def marker(sha, size=100, mtime=7):
    return {"size": size, "mtime_ns": mtime, "sha256": sha}


def test_match_offers_only_verified_unchanged_files_by_content():
    want = [f("Q/a-00001-of-00004.gguf", "a" * 64), f("Q/a-00002-of-00004.gguf", "b" * 64),
            f("Q/a-00003-of-00004.gguf", "c" * 64), f("Q/a-00004-of-00004.gguf", "d" * 64),
            f("Q/new.gguf", "e" * 64)]
    src = {"local_dir": "/m/org__x",
           "files": [f("Q/a-00001-of-00004.gguf", "a" * 64), f("old/renamed.gguf", "b" * 64),
                     f("Q/a-00003-of-00004.gguf", "c" * 64), f("Q/a-00004-of-00004.gguf", "d" * 64)],
           "verified": {"Q/a-00001-of-00004.gguf": marker("a" * 64), "old/renamed.gguf": marker("b" * 64),
                        "Q/a-00003-of-00004.gguf": marker("c" * 64)}}
    stats = {"Q/a-00001-of-00004.gguf": (100, 7), "old/renamed.gguf": (100, 7),
             "Q/a-00003-of-00004.gguf": (100, 8),  # touched after it was hashed there
             "Q/a-00004-of-00004.gguf": (100, 7)}  # never verified there
    files, why = mc.match(want, src, stats, "rig")
    assert files == {"Q/a-00001-of-00004.gguf": "/m/org__x/Q/a-00001-of-00004.gguf",
                     "Q/a-00002-of-00004.gguf": "/m/org__x/old/renamed.gguf"}  # same bytes, other path
    assert why == {"Q/a-00003-of-00004.gguf": "changed on rig since it was verified there",
                   "Q/a-00004-of-00004.gguf": "not verified on rig",
                   "Q/new.gguf": "rig does not have it"}
    # the size counts too, and a file gone from the source is named so
    src["files"][0] = f("Q/a-00001-of-00004.gguf", "a" * 64, 99)
    files, why = mc.match(want, src, {}, "rig")
    assert files == {} and why["Q/a-00002-of-00004.gguf"] == "missing on rig"
    assert why["Q/a-00001-of-00004.gguf"] == "rig does not have it"


def man4():
    files = [f(f"Q/a-0000{i}-of-00004.gguf", str(i) * 64, 1000 * i) for i in range(1, 5)]
    return {"repo": "org/x", "revision": "main", "include": "Q/*", "commit": "c" * 40,
            "local_dir": "/var/lib/llama-rig/models/org__x", "files": files}


def cfg_local(**model):
    return inv.from_data({"hosts": {"r": {"connection": {"type": "local"}, "model": model}}}).hosts["r"].cfg


def test_model_plan_copies_what_the_source_offers_and_downloads_the_rest():
    man = man4()
    rig = M.RigView(free_bytes=10**12, disk_path="/")
    off = mc.Offer("rig", "relayed through this machine",
                   files={"Q/a-00001-of-00004.gguf": "/x/1", "Q/a-00003-of-00004.gguf": "/x/3"})
    ch = M.plan(cfg_local(free_space_margin_gb=0), man, rig, None, source=off)
    kinds = [(isinstance(c, Run), c.description.split(" ")[0]) for c in ch]
    # the copy fills the staging dir of the wanted commit like a download; `current` switches last
    assert kinds == [(False, "stage"), (False, "copy"), (True, "python"), (False, "download"), (False, "verify"),
                     (False, "switch")]
    copy_ch, dl = ch[1], ch[3]
    assert copy_ch.data == {"files": ["Q/a-00001-of-00004.gguf", "Q/a-00003-of-00004.gguf"], "bytes": 4000,
                            "source": "rig", "stale": []}
    assert copy_ch.description.startswith("copy 2 files (4.0 kB) from rig, relayed through this machine; "
                                          "each hashed here before it counts")
    assert copy_ch.notify == ()  # into staging/<sha>: nothing in service changes until the switch
    assert ch[5].notify == ("llama-server.restart",)
    assert dl.data["files"] == ["Q/a-00002-of-00004.gguf", "Q/a-00004-of-00004.gguf"]
    assert ch[4].data["files"] == [x["path"] for x in man["files"][0:1] + man["files"][2:3]
                                   + man["files"][1:2] + man["files"][3:4]]
    s = M.decide(man, rig, None, None, source=off)
    assert s.work.dir == f"{man['local_dir']}/staging/{man['commit']}" and s.work.kind == "staging"
    assert [f["path"] for f in s.copy] == copy_ch.data["files"] and [f["path"] for f in s.fetch] == dl.data["files"]
    # all of it on the source: no venv, no download
    off.files = {x["path"]: "/x" for x in man["files"]}
    ch = M.plan(cfg_local(free_space_margin_gb=0), man, rig, None, source=off)
    assert [c.description.split(" ")[0] for c in ch] == ["stage", "copy", "verify", "switch"]
    assert not any(isinstance(c, Run) for c in ch)
    # the disk preflight counts copies like downloads
    small = M.RigView(free_bytes=5000, disk_path="/")
    with pytest.raises(M.StepError, match="not enough disk space"):
        M.plan(cfg_local(free_space_margin_gb=0), man, small, None, source=off)


def test_model_plan_repairs_current_from_the_source():
    """The commit in service lost a shard: the copy goes into current's dir and owes a restart."""
    man = man4()
    stats = {x["path"]: (x["size"], 5, i) for i, x in enumerate(man["files"]) if not x["path"].startswith("Q/a-00002")}
    stored = {**man, "layout": "commits",
              "verified": {p: {"size": st[0], "mtime_ns": 5, "sha256": next(x["sha256"] for x in man["files"]
                                                                              if x["path"] == p)}
                           for p, st in stats.items()}}
    rig = M.RigView(current=man["commit"], dirs={"current": stats}, free_bytes=10**12, disk_path="/",
                    venv_version="2.4.0")
    off = mc.Offer("rig", "relayed through this machine", files={"Q/a-00002-of-00004.gguf": "/x/2"})
    ch = M.plan(cfg_local(free_space_margin_gb=0), man, rig, stored, source=off)
    assert [c.description.split(" ")[0] for c in ch] == ["copy", "verify"]
    assert ch[0].notify == ("llama-server.restart",)
    s = M.decide(man, rig, stored, None, source=off)
    assert s.work.kind == "current" and s.work.dir == f"{man['local_dir']}/commits/{man['commit']}"


def test_source_versioned_layout_offers_its_commit_dir_then_kept_commits():
    """The source's files are read under commits/<sha> (never through `current`, which may move),
    then from the other good commits it keeps, each with its own markers."""
    want = [f("Q/a.gguf", "a" * 64), f("Q/b.gguf", "b" * 64), f("Q/c.gguf", "c" * 64), f("Q/d.gguf", "d" * 64)]
    ldir = "/m/org__x"
    new, old = "1" * 40, "2" * 40
    st = {"local_dir": ldir, "commit": new, "layout": "commits",
          "files": [f("Q/a.gguf", "a" * 64), f("Q/b.gguf", "9" * 64), f("Q/d.gguf", "d" * 64)],
          "verified": {"Q/a.gguf": marker("a" * 64), "Q/b.gguf": marker("9" * 64), "Q/d.gguf": marker("d" * 64)}}
    old_mark = {"commit": old, "finalized_at": 1.0, "files": [f("Q/a.gguf", "a" * 64), f("Q/b.gguf", "b" * 64)],
                "verified": {"Q/a.gguf": marker("a" * 64), "Q/b.gguf": marker("b" * 64)}}
    view = M.RigView(current=new, dirs={"commit": {"Q/a.gguf": (100, 7, 1), "Q/b.gguf": (100, 7, 2),
                                                   "Q/d.gguf": (100, 8, 4)}},  # d touched since hashed
                     kept={new: {"mark": {**st, "finalized_at": 2.0}, "stats": {}},
                           old: {"mark": old_mark, "stats": {"Q/a.gguf": (100, 7, 1), "Q/b.gguf": (100, 7, 3)}}})
    files, why = mc.match_rig(want, st, view, "rig")
    assert files == {"Q/a.gguf": f"{ldir}/commits/{new}/Q/a.gguf",  # the commit in service first
                     "Q/b.gguf": f"{ldir}/commits/{old}/Q/b.gguf"}  # the previous commit still has it
    assert why == {"Q/c.gguf": "rig does not have it", "Q/d.gguf": "changed on rig since it was verified there"}


def test_source_flat_layout_of_an_older_rig_still_offers_its_files():
    want = [f("Q/a.gguf", "a" * 64), f("Q/b.gguf", "b" * 64)]
    st = {"local_dir": "/m/org__x", "commit": "3" * 40, "files": want,
          "verified": {"Q/a.gguf": marker("a" * 64), "Q/b.gguf": marker("b" * 64)}}  # no "layout"
    view = M.RigView(dirs={"flat": {"Q/a.gguf": (100, 7, 1)}, "commit": {}})
    files, why = mc.match_rig(want, st, view, "old")
    assert files == {"Q/a.gguf": "/m/org__x/Q/a.gguf"} and why == {"Q/b.gguf": "missing on old"}


# -- copy, seed or build (pure) -----------------------------------------------------------------------


SHA = "4341dc8bc0123456789abcdef0123456789abcde"
TREE = lb.TreeFacts(None, frozenset({"llama-server", "llama-fit-params", "llama-bench"}), 6895, False, "4341dc8bc")


def llama_cfg(**lc):
    base = {"cuda": True, "native": False, "targets": ["llama-server", "llama-fit-params"]}
    base.update(lc)
    return inv.from_data({"hosts": {"r": {"connection": {"type": "local"}, "llama_cpp": base}}}).hosts["r"].cfg


def want(caps=("8.6",), glibc="2.36", gcc="12.2.0", **lc):
    return ls.want(llama_cfg(**lc), SHA, TREE, list(caps), gcc, "12.8", glibc=glibc)


def build_of(w, name=None, built_at=1.0, **extra):
    rec = w.record()
    rec.update(extra)
    return lb.BuildInfo(name or w.name, rec["fingerprint"], w.commit, w.build_number, built_at, rec)


def test_decide_copies_a_build_with_the_same_fingerprint():
    w = want()
    d = bc.decide(w.record(), w.fingerprint, w.legacy_fingerprint, [build_of(w)], "rig", src_glibc="2.36",
                  dst_glibc="2.36", src_gcc="12.2.0", dst_gcc="12.2.0", ccache_files=40)
    assert d.action == "copy" and d.build == w.name and d.seed
    assert d.summary("rig").startswith(f"copying build {w.name} from rig: same fingerprint {w.fingerprint[:8]}")


def test_decide_another_gpu_arch_seeds_ccache_and_says_what_differs():
    here, there = want(caps=("8.9",)), want(caps=("8.6",))
    d = bc.decide(here.record(), here.fingerprint, here.legacy_fingerprint, [build_of(there)], "rig",
                  src_glibc="2.36", dst_glibc="2.36", src_gcc="12.2.0", dst_gcc="12.2.0", ccache_files=40)
    assert d.action == "seed" and d.build is None
    assert f"rig has no build with fingerprint {here.fingerprint[:8]} (nearest {there.name}: " in d.why
    assert "archs +89 -86" in d.why and "cmake_args +-DCMAKE_CUDA_ARCHITECTURES=89 -" in d.why
    assert d.summary("rig").startswith("building here with a ccache seeded from rig's: ")


def test_decide_another_cmake_flag_seeds_ccache():
    here, there = want(cmake_options={"GGML_CUDA_GRAPHS": "OFF"}), want()
    d = bc.decide(here.record(), here.fingerprint, here.legacy_fingerprint, [build_of(there)], "rig",
                  src_glibc="2.36", dst_glibc="2.36", src_gcc="12.2.0", dst_gcc="12.2.0", ccache_files=40)
    assert d.action == "seed" and "cmake_args +-DGGML_CUDA_GRAPHS=OFF" in d.why


def test_decide_builds_plainly_when_the_ccache_cannot_help():
    here, there = want(gcc="13.2.0"), want(gcc="12.2.0")
    d = bc.decide(here.record(), here.fingerprint, here.legacy_fingerprint, [build_of(there)], "rig",
                  src_glibc="2.36", dst_glibc="2.36", src_gcc="12.2.0", dst_gcc="13.2.0", ccache_files=40)
    assert d.action == "build" and "gcc 12.2.0 there, 13.2.0 here" in d.why
    assert "rig's gcc 12.2.0 is not 13.2.0: its ccache cannot hit" in d.why
    d = bc.decide(here.record(), here.fingerprint, here.legacy_fingerprint, [], "rig", ccache_files=0)
    assert d.action == "build" and d.why == "rig has no good build, and rig has no ccache"


def test_decide_native_build_on_another_cpu_builds_here():
    w = want(native=True)
    a = Cpu("AMD EPYC 7763", frozenset({"avx2", "fma"}))
    b = Cpu("AMD EPYC 7763", frozenset({"avx2", "fma", "avx512f"}))
    d = bc.decide(w.record(), w.fingerprint, w.legacy_fingerprint, [build_of(w)], "rig", native=True,
                  src_cpu=a, dst_cpu=b, src_glibc="2.36", dst_glibc="2.36", src_gcc="12.2.0", ccache_files=40)
    assert d.action == "build" and "native is on" in d.why and "(same model, other flags)" in d.why
    d = bc.decide(w.record(), w.fingerprint, w.legacy_fingerprint, [build_of(w)], "rig", native=True,
                  src_cpu=a, dst_cpu=a, src_glibc="2.36", dst_glibc="2.36", src_gcc="12.2.0", ccache_files=40)
    assert d.action == "copy"


def test_decide_a_build_from_before_glibc_in_the_fingerprint():
    w = want()
    old = build_of(w, name=lb.build_dir_name(w.build_number, SHA, w.legacy_fingerprint),
                   fingerprint=w.legacy_fingerprint)
    del old.extra["glibc"]
    old = lb.BuildInfo(old.name, w.legacy_fingerprint, SHA, w.build_number, 1.0, old.extra)
    same = bc.decide(w.record(), w.fingerprint, w.legacy_fingerprint, [old], "rig", src_glibc="2.36",
                     dst_glibc="2.36", src_gcc="12.2.0", ccache_files=1)
    assert same.action == "copy" and same.build == old.name
    other = bc.decide(w.record(), w.fingerprint, w.legacy_fingerprint, [old], "rig", src_glibc="2.39",
                      dst_glibc="2.36", src_gcc="12.2.0", ccache_files=1)
    assert other.action == "seed" and "glibc 2.39 there, 2.36 here" in other.why


def test_fingerprint_without_glibc_is_the_old_one_and_old_builds_still_match():
    args = ["-G", "Ninja", "-DGGML_CUDA=OFF"]
    old_formula = __import__("hashlib").sha256(json.dumps(
        {"commit": SHA, "args": args, "gcc": "12.2.0", "nvcc": "", "archs": [], "targets": ["llama-server"]},
        sort_keys=True).encode()).hexdigest()
    assert lb.fingerprint(SHA, args, "12.2.0", None, [], ["llama-server"]) == old_formula
    assert lb.fingerprint(SHA, args, "12.2.0", None, [], ["llama-server"], "2.36") != old_formula
    assert lb.parse_glibc("glibc 2.36\n") == "2.36" and lb.parse_glibc("") is None
    w = want()
    assert w.fingerprint != w.legacy_fingerprint and w.record()["glibc"] == "2.36"
    legacy_rec = {k: v for k, v in w.record().items() if k != "glibc"}
    view = ls.RigView(current="old", builds={"old": lb.BuildInfo("old", w.legacy_fingerprint, SHA, 6895, 1.0, legacy_rec)})
    assert view.match(w).name == "old"  # a build made before glibc joined: no rebuild
    assert ls.plan(llama_cfg(), view, w, SHA) == []
    # but a record WITH another glibc is another build
    view.builds["old"].extra["glibc"] = "2.35"
    assert view.match(w) is None
    # and without a glibc (no getconf) the fingerprint is the old one: plain equality
    w0 = want(glibc=None)
    assert w0.fingerprint == w0.legacy_fingerprint == w.legacy_fingerprint


def test_parse_cpu():
    c = parse_cpu("model name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse2 avx2\n")
    assert c == Cpu("AMD EPYC 7763 64-Core Processor", frozenset({"fpu", "sse2", "avx2"}))


# -- the command line --------------------------------------------------------------------------------


def invoke(tmp_path, *args):
    inv_path = tmp_path / "hosts.yaml"
    inv_path.write_text("hosts:\n  rig:\n    connection: {address: 10.0.0.1}\n"
                        "  rig2:\n    connection: {address: 10.0.0.2}\n")
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "provision",
                           "--inventory", str(inv_path), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,msg", [
    (("--host", "rig2", "--from", "rgi"), "command line: --from: unknown host 'rgi' (did you mean 'rig'?)"),
    (("--host", "rig,rig2", "--from", "rig"), "command line: --from rig: the source cannot be one of the hosts"),
])
def test_bad_from_is_one_line_exit_2_before_any_host(tmp_path, args, msg):
    r = invoke(tmp_path, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(err) == 1 and msg in err[0], err
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("key,val,msg", [
    ("mode", "sideways", "transfer.mode: must be one of auto, direct, relay"),
    ("rate_limit_mb", -1, "transfer.rate_limit_mb: must be a number between 0 and"),
])
def test_transfer_keys_are_validated(key, val, msg):
    with pytest.raises(inv.InventoryError, match=msg.replace(".", r"\.")):
        inv.from_data({"hosts": {"rig": {"connection": {"type": "local"}, "transfer": {key: val}}}})
