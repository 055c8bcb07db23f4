"""The model's copies on a rig: a versioned layout, read in one command, and the few atomic moves
that change it.

    <model.dir>/<org>__<name>/
        commits/<sha40>/<repo path>        one complete, verified copy per commit; a file that did
                                           not change between commits is ONE inode (hard links)
        commits/<sha40>/.llama-rig-model.json   its manifest + verified markers (= "good")
        staging/<sha40>/<repo path>        a commit being downloaded/verified (huggingface_hub's
                                           local_dir, with its .cache/huggingface/download/)
        current -> commits/<sha40>         what llama-server loads (-m current/<shard 1>)

A staging dir becomes a commit dir by one rename once every file is verified (the marker file is
written into it first), and `current` is switched by one rename of a new symlink: the service
never sees a half-written model, and going back is one more rename. Copies beyond
`model.keep_versions` are pruned like llama.cpp builds (never the current or previous one).

The flat layout of earlier versions (files straight under <org>__<name>/) is migrated by hard
links (no byte copied, no re-hash: a link has the same size and mtime, so its marker holds); the
old paths become symlinks into current/, so a unit that still names them keeps working.

State on the host (`state.json`): "model" is the current copy (manifest, verified markers,
layout, previous); "model_staging" the commit being staged, with its markers.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .. import remote
from ..errors import StepError
from ..target import quote
from .hub import repo_dir
from ..progress import human

MARK = ".llama-rig-model.json"
STATE_KEY = "model"
STAGING_KEY = "model_staging"
RESTART = ("llama-server.restart",)
GB = 1_000_000_000
LAYOUT = "commits"


# ---------------------------------------------------------------------------------------------
# paths


def commit_dir(rdir: str, sha: str) -> str:
    return f"{rdir}/commits/{sha}"


def staging_dir(rdir: str, sha: str) -> str:
    return f"{rdir}/staging/{sha}"


def current_link(rdir: str) -> str:
    return f"{rdir}/current"


def download_cache(d: str) -> str:
    """huggingface_hub's local_dir metadata and *.incomplete files for downloads into `d`."""
    return f"{d}/.cache/huggingface/download"


def versioned(rec: dict | None) -> bool:
    return bool(rec) and rec.get("layout") == LAYOUT


def files_dir(rec: dict) -> str:
    """The directory that holds the files of a state record (its commit dir, or the flat dir)."""
    return commit_dir(rec["local_dir"], rec["commit"]) if versioned(rec) else rec["local_dir"]


def served_dir(rec: dict) -> str:
    """The directory llama-server's -m goes through: current/ (or the flat dir, not migrated yet)."""
    return current_link(rec["local_dir"]) if versioned(rec) else rec["local_dir"]


# ---------------------------------------------------------------------------------------------
# the rig as data


Stat = tuple  # (size, mtime_ns, inode)


@dataclass
class RigView:
    """What is on the rig for one repo (one command: remote/model_probe.py)."""

    current: str | None = None  # commit `current` points at
    kept: dict[str, dict] = field(default_factory=dict)  # commit -> {"mark": {...}|None, "stats": {path: Stat}}
    staging: list[str] = field(default_factory=list)
    dirs: dict[str, dict[str, Stat]] = field(default_factory=dict)  # current / flat / commit / staging
    debris: list[str] = field(default_factory=list)
    venv_version: str | None = None
    free_bytes: int = 0
    disk_path: str = ""

    def stats(self, name: str) -> dict[str, Stat]:
        return self.dirs.get(name) or {}

    def good(self) -> dict[str, dict]:
        """Kept commits with a marker file (complete and verified when they were made)."""
        return {c: k for c, k in self.kept.items() if k.get("mark")}


def probe_input(cfg: dict, man: dict | None, stored: dict | None) -> str:
    from .transfer import venv_dir
    return json.dumps({"repo_dir": repo_dir(cfg), "venv": venv_dir(cfg),
                       "paths": [f["path"] for f in (man or {}).get("files") or []],
                       "current_paths": [f["path"] for f in (stored or {}).get("files") or []],
                       "target": (man or {}).get("commit")})


def probe_command() -> str:
    return remote.command("model_probe.py")


def parse_probe(output: str, free_bytes: int = 0, disk_path: str = "") -> RigView:
    line = [ln for ln in output.splitlines() if ln.startswith("{")][-1:]
    if not line:
        raise StepError(f"cannot read the model files on the rig: {output.strip()[-300:] or 'no output'}")
    d = json.loads(line[0])

    def st(m: dict) -> dict[str, Stat]:
        return {p: tuple(int(x) for x in v) for p, v in (m or {}).items()}
    return RigView(current=d.get("current"),
                   kept={c: {"mark": k.get("mark"), "stats": st(k.get("stats"))} for c, k in (d.get("kept") or {}).items()},
                   staging=list(d.get("staging") or []),
                   dirs={n: st(v) for n, v in (d.get("dirs") or {}).items()},
                   debris=list(d.get("debris") or []), venv_version=d.get("venv"),
                   free_bytes=free_bytes, disk_path=disk_path)


def read_rig(ctx: Any, man: dict | None, stored: dict | None = None) -> RigView:
    """The rig's copies of the repo, the files of `man` (wanted) and `stored` (current) in them."""
    from ..facts import host as hostfacts
    hostfacts.invalidate(ctx, "host")
    hf = hostfacts.host_facts(ctx)
    r = ctx.target.run(probe_command(), sudo=True, stdin=probe_input(ctx.cfg, man, stored) + "\n", check=False)
    if not r.ok and "{" not in r.stdout:
        raise StepError(f"cannot read the model files on the rig (python3 missing?): "
                        f"{(r.stderr.strip() or r.stdout.strip())[-300:]}")
    return parse_probe(r.stdout, hf.disk_free_bytes, hf.disk_path)


# ---------------------------------------------------------------------------------------------
# verified markers (pure)


def marker_valid(marker: dict | None, f: dict, stat: Stat | None) -> bool:
    """A marker counts only if it is for this content (sha256) and the file is untouched since."""
    if not marker or stat is None:
        return False
    return (marker.get("sha256") == f["sha256"] and int(marker.get("size", -1)) == f["size"] == stat[0]
            and int(marker.get("mtime_ns", -1)) == stat[1])


def classify(files: list[dict], stats: dict[str, Stat], verified: dict, full: bool = False) -> dict[str, list[dict]]:
    """Sort files: ok / verify (present, not known good) / fetch (missing) / stale (present but
    known to be other content or the wrong size: delete, then fetch)."""
    out: dict[str, list[dict]] = {"ok": [], "verify": [], "fetch": [], "stale": []}
    for f in files:
        st = stats.get(f["path"])
        mk = verified.get(f["path"])
        if st is None:
            out["fetch"].append(f)
        elif st[0] != f["size"]:
            out["stale"].append(f)
        elif mk and mk.get("sha256") != f["sha256"] and (int(mk.get("size", -1)), int(mk.get("mtime_ns", -1))) == tuple(st[:2]):
            out["stale"].append(f)  # we hashed exactly this file before: it is other content
        elif full or not marker_valid(mk, f, st):
            out["verify"].append(f)
        else:
            out["ok"].append(f)
    return out


def all_valid(files: list[dict], stats: dict[str, Stat], verified: dict) -> bool:
    return all(marker_valid(verified.get(f["path"]), f, stats.get(f["path"])) for f in files)


def preflight(free_bytes: int, need_bytes: int, margin_gb: float, where: str = "", note: str = "") -> None:
    margin = int(margin_gb * GB)
    if need_bytes > 0 and free_bytes < need_bytes + margin:
        raise StepError(f"not enough disk space{(' at ' + where) if where else ''}: {human(free_bytes)} free "
                        f"({free_bytes} bytes), need {human(need_bytes)} ({need_bytes} bytes) to download"
                        f"{note} + {human(margin)} margin (model.free_space_margin_gb = {margin_gb:g}) = "
                        f"{human(need_bytes + margin)}; short by {human(need_bytes + margin - free_bytes)}")


def need_bytes(groups: dict[str, list[dict]], stats: dict[str, Stat]) -> int:
    """Bytes to download into a dir minus what deleting its stale files frees. Nothing else is
    freed first: the copy in service stays until the switch, so both copies count."""
    fetch = groups["fetch"] + groups["stale"]
    return max(0, sum(f["size"] for f in fetch) - sum(stats[f["path"]][0] for f in groups["stale"]))


# ---------------------------------------------------------------------------------------------
# where a commit is made complete, and what can be linked into it (pure)


@dataclass
class Work:
    """Where the files of one commit are made complete and verified."""

    man: dict
    dir: str
    key: str  # state key that holds its markers: "model" (in service) or "model_staging"
    kind: str  # "current" (repair in place), "kept" (commits/<sha>, not current), "staging"
    stats: dict[str, Stat] = field(default_factory=dict)
    verified: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return {"current": "current", "kept": f"commits/{self.man['commit'][:7]}",
                "staging": f"staging/{self.man['commit'][:7]}"}[self.kind]


def work_for(man: dict, rig: RigView, stored: dict | None, staged: dict | None) -> Work:
    rdir, sha = man["local_dir"], man["commit"]
    if versioned(stored) and stored.get("commit") == sha and rig.current == sha:
        return Work(man, commit_dir(rdir, sha), STATE_KEY, "current", rig.stats("current"),
                    dict(stored.get("verified") or {}))
    verified: dict = {}
    if staged and staged.get("commit") == sha and staged.get("local_dir") == rdir:
        verified.update(staged.get("verified") or {})
    if sha in rig.kept:
        mark = rig.kept[sha].get("mark") or {}
        if mark.get("commit") == sha:
            verified = {**(mark.get("verified") or {}), **verified}
        return Work(man, commit_dir(rdir, sha), STAGING_KEY, "kept", rig.stats("commit"), verified)
    return Work(man, staging_dir(rdir, sha), STAGING_KEY, "staging", rig.stats("staging"), verified)


@dataclass(frozen=True)
class Seed:
    src: str  # absolute path of a copy on the rig with the same content
    marker: dict | None  # its verified marker, when it still holds (a hard link keeps it valid)
    where: str  # "current", "commits/abc1234", "the flat layout"


def seeds(man: dict, rig: RigView, stored: dict | None) -> dict[str, Seed]:
    """sha256 -> a copy of that content already on the rig (the current copy first, then kept
    commits, then the flat layout) that a new commit can hard-link instead of downloading."""
    rdir = man["local_dir"]
    out: dict[str, Seed] = {}

    def offer(files: list[dict], base: str, stats: dict, verified: dict, where: str) -> None:
        for f in files:
            st = stats.get(f["path"])
            if not f.get("sha256") or f["sha256"] in out or st is None or st[0] != f["size"]:
                continue
            mk = verified.get(f["path"])
            out[f["sha256"]] = Seed(f"{base}/{f['path']}", mk if marker_valid(mk, f, st) else None, where)

    if stored and stored.get("local_dir") == rdir:
        if versioned(stored) and rig.current == stored.get("commit"):
            offer(stored["files"], commit_dir(rdir, stored["commit"]), rig.stats("current"),
                  stored.get("verified") or {}, "current")
    for c, k in sorted(rig.good().items(), key=lambda kv: -float(kv[1]["mark"].get("finalized_at") or 0)):
        mark = k["mark"]
        offer(mark.get("files") or [], commit_dir(rdir, c), k["stats"], mark.get("verified") or {},
              f"commits/{c[:7]}")
    if stored and stored.get("local_dir") == rdir and not versioned(stored):
        offer(stored.get("files") or [], rdir, rig.stats("flat"), stored.get("verified") or {}, "the flat layout")
    elif not stored:
        offer(man["files"], rdir, rig.stats("flat"), {}, "the flat layout")
    return out


def prune_list(rig: RigView, keep: int, protect: set[str]) -> list[str]:
    """Good commits to delete: all but the newest `keep`; never one in `protect`."""
    ordered = sorted(rig.good().items(), key=lambda kv: -float(kv[1]["mark"].get("finalized_at") or 0))
    keep_names = {c for c, _ in ordered[:keep]}
    return [c for c, _ in ordered if c not in keep_names and c not in protect]


def mark_doc(man: dict, verified: dict) -> dict:
    """What a good commit dir carries: its manifest and the markers of its files."""
    return {**{k: man[k] for k in ("repo", "revision", "include", "commit", "files")},
            "branch": man.get("branch"), "verified": {f["path"]: verified[f["path"]] for f in man["files"]},
            "finalized_at": time.time()}


# ---------------------------------------------------------------------------------------------
# moves on the rig (each one command)


def link_files(ctx: Any, pairs: list[tuple[str, str]]) -> None:
    """Hard-link existing copies into a dir (no byte copied); `cp -p` where links cannot be made."""
    if not pairs:
        return
    dirs = sorted({d.rsplit("/", 1)[0] for _, d in pairs})
    cmds = [f"mkdir -p {' '.join(quote(d) for d in dirs)}"]
    cmds += [f"{{ ln -f {quote(s)} {quote(d)} 2>/dev/null || cp -p {quote(s)} {quote(d)}; }}" for s, d in pairs]
    ctx.target.run(" && ".join(cmds), sudo=True)


def finalize(ctx: Any, work: Work, verified: dict) -> None:
    """Write the marker into the work dir, drop huggingface_hub's metadata, and move a staging dir
    to commits/<sha> (one rename)."""
    rdir, sha = work.man["local_dir"], work.man["commit"]
    doc = json.dumps(mark_doc(work.man, verified), indent=1, sort_keys=True) + "\n"
    ctx.target.write_file(f"{work.dir}/{MARK}", doc, mode=0o644)
    cmd = f"rm -rf {quote(work.dir + '/.cache')}"
    if work.kind == "staging":
        dest = commit_dir(rdir, sha)
        cmd += (f" && mkdir -p {quote(rdir + '/commits')} && rm -rf {quote(dest)}"
                f" && mv -T {quote(work.dir)} {quote(dest)} && rmdir {quote(rdir + '/staging')} 2>/dev/null; true")
    ctx.target.run(cmd, sudo=True)


def switch(ctx: Any, rdir: str, sha: str) -> None:
    """`current` -> commits/<sha>, atomically (a new link renamed over the old one)."""
    tmp = f".current.llama-rig-{int(time.time() * 1000)}"
    ctx.target.run(f"cd {quote(rdir)} && test -f {quote(f'commits/{sha}/{MARK}')} && "
                   f"ln -sfn {quote('commits/' + sha)} {quote(tmp)} && mv -T {quote(tmp)} current", sudo=True)


def flat_to_links(ctx: Any, rdir: str, paths: list[str]) -> None:
    """After migrating: each old flat path becomes a symlink into current/ (atomically each)."""
    if not paths:
        return
    cmds = []
    for p in paths:
        target = "../" * p.count("/") + f"current/{p}"
        tmp = f"{rdir}/{p}.llama-rig-link"
        cmds.append(f"ln -sfn {quote(target)} {quote(tmp)} && mv -T {quote(tmp)} {quote(rdir + '/' + p)}")
    ctx.target.run(" && ".join(cmds) + f" && rm -rf {quote(rdir + '/.cache')}", sudo=True)


def keep_flat_copy(ctx: Any, old: dict, flat: dict[str, Stat]) -> str | None:
    """Before a flat layout's paths become links: hard-link its verified files into
    commits/<old commit> (marked good) so the switch can be undone. None if it was incomplete."""
    rdir, sha = old["local_dir"], old["commit"]
    verified = old.get("verified") or {}
    if not all(marker_valid(verified.get(f["path"]), f, flat.get(f["path"])) for f in old["files"]):
        return None
    d = commit_dir(rdir, sha)
    link_files(ctx, [(f"{rdir}/{f['path']}", f"{d}/{f['path']}") for f in old["files"]])
    man = {k: old[k] for k in ("repo", "revision", "include", "commit", "files", "local_dir")}
    man["branch"] = old.get("branch")
    ctx.target.write_file(f"{d}/{MARK}", json.dumps(mark_doc(man, verified), indent=1, sort_keys=True) + "\n",
                          mode=0o644)
    return sha


def remove_commits(ctx: Any, rdir: str, commits: list[str], staging: list[str] = ()) -> None:
    paths = [commit_dir(rdir, c) for c in commits] + [staging_dir(rdir, c) for c in staging]
    if paths:
        ctx.target.run("rm -rf -- " + " ".join(quote(p) for p in paths), sudo=True)
