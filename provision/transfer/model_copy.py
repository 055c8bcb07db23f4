"""The model step's part of `provision --from SOURCE`: shards from the source rig, not the hub.

* `offer(ctx, files)` (plan, read-only on both rigs): which of the files this rig has to fetch --
  the manifest's sha256, i.e. the hub's or the lock's -- the source has VERIFIED (its marker valid:
  same sha256 and size, file untouched since it was hashed there), and why not for the others. The
  source is read in its versioned layout (the commit in service under commits/<sha>, then the other
  good copies it keeps) or, from a rig of an earlier version, its flat layout. The model plan then
  says `copy N files from SOURCE` for those and `download` for the rest.
* `apply(ctx, step, staging)` (the copy change): copy them into the dir where the wanted commit is
  made complete (staging/<sha>, a kept commits/<sha>, or current when repairing it), hash each one
  HERE against the manifest before it is marked verified (model/transfer.py's verify_files), and
  take every shard that could not be copied or does not match from the hub instead. The switch of
  `current` happens later, as for a download, only once every file is verified.
* `report(ctx, man, attempts)` (after the model step verified everything): which shard came from where.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import Call, Context
from ..errors import ConnectError, StepError
from ..model import store, transfer
from ..model.store import marker_valid
from ..progress import human
from ..target import quote
from .copy import FileItem, copy, probe, run_input
from .source import SourceUnavailable, source_of

OFFER = "transfer.model_offer"
ORIGIN = "transfer.model_origin"
VERIFIED = "transfer.model_verified"  # paths copied and hashed here in this run (not hashed again)
STAGE = ".cache/llama-rig-copy"  # partial files, under the work dir (same filesystem; gone at finalize)


@dataclass
class Offer:
    source: str
    route: str
    local_dir: str = ""  # the source's model directory
    files: dict[str, str] = field(default_factory=dict)  # repo path here -> absolute path there
    why_not: dict[str, str] = field(default_factory=dict)  # repo path here -> why not copied
    error: str = ""  # the source could not be read at all


def match(want: list[dict], src_model: dict[str, Any], src_stats: dict[str, tuple], source: str
          ) -> tuple[dict[str, str], dict[str, str]]:
    """Pure: which wanted files (path, size, sha256) one copy on the source can give, by content: a
    file of it with the same sha256 and size whose verified marker is still valid (any path).
    `src_model`: a state record or a commit's marker (local_dir, commit, layout, files, verified);
    `src_stats`: repo path -> stat of that copy's files. Returns (repo path -> absolute path on the
    source, repo path -> why not)."""
    base = store.files_dir(src_model) if store.versioned(src_model) else str(src_model.get("local_dir") or "")
    verified = src_model.get("verified") or {}
    by_content: dict[tuple[str, int], list[dict]] = {}
    for f in src_model.get("files") or []:
        by_content.setdefault((f.get("sha256"), int(f["size"])), []).append(f)
    files: dict[str, str] = {}
    why: dict[str, str] = {}
    for w in want:
        cands = by_content.get((w["sha256"], int(w["size"])), [])
        good = [c for c in cands if marker_valid(verified.get(c["path"]), c, src_stats.get(c["path"]))]
        if good:
            files[w["path"]] = f"{base}/{good[0]['path']}"
        elif not cands:
            why[w["path"]] = f"{source} does not have it"
        elif all(c["path"] not in src_stats for c in cands):
            why[w["path"]] = f"missing on {source}"
        elif any(c["path"] in verified for c in cands):
            why[w["path"]] = f"changed on {source} since it was verified there"
        else:
            why[w["path"]] = f"not verified on {source}"
    return files, why


def source_copies(st: dict, view: store.RigView) -> list[tuple[dict, dict]]:
    """Pure: the copies on the source to take files from, best first, as (record, stats): the model
    in service (commits/<sha> of the versioned layout, or the flat layout of an earlier version),
    then the other good commits it keeps (newest first) with their own markers."""
    out: list[tuple[dict, dict]] = []
    if store.versioned(st):
        out.append((st, view.stats("commit")))
    else:
        out.append(({**st, "commit": None}, view.stats("flat")))
    kept = sorted(view.good().items(), key=lambda kv: -float(kv[1]["mark"].get("finalized_at") or 0))
    for c, k in kept:
        if c == st.get("commit") and store.versioned(st):
            continue
        mark = k["mark"]
        if mark.get("commit") != c:
            continue
        out.append(({"local_dir": st["local_dir"], "commit": c, "layout": store.LAYOUT,
                     "files": mark.get("files") or [], "verified": mark.get("verified") or {}}, k["stats"]))
    return out


def match_rig(want: list[dict], st: dict, view: store.RigView, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Pure: `match` over every copy on the source (the first that has a file wins; the reason a
    file is not offered is the one of the model in service)."""
    files: dict[str, str] = {}
    why: dict[str, str] = {}
    for i, (rec, stats) in enumerate(source_copies(st, view)):
        got, no = match([w for w in want if w["path"] not in files], rec, stats, source)
        files.update(got)
        if i == 0:
            why = no
    return files, {p: r for p, r in why.items() if p not in files}


def read_source(src: Any, st: dict) -> store.RigView:
    """The source's copies of its model: model_probe.py there (read-only, `python3 -c`), its
    input through a pipe (no slow stdin over SSH)."""
    ctx = src.ctx()
    data = json.dumps({"repo_dir": st["local_dir"], "venv": transfer.venv_dir(src.cfg),
                       "paths": [f["path"] for f in st["files"]], "current_paths": [],
                       "target": st.get("commit")}) + "\n"
    try:
        rc, out, err = run_input(ctx.target, store.probe_command(), data, sudo=True)
    except ConnectError as e:
        raise src.lost(e) from None
    if "{" not in out:
        raise StepError(f"cannot read the model files on {src.name} (exit {rc}): {(err.strip() or out.strip())[-300:]}")
    return store.parse_probe(out)


def offer(ctx: Context, fetch: list[dict]) -> Offer | None:
    """What the source can give of the files this rig has to fetch (None without --from, or when
    nothing is to be fetched: then the source is not even contacted). Reads the source only."""
    src = source_of(ctx)
    if src is None or not fetch:
        return None
    off = Offer(src.name, src.route_text())
    try:
        st = src.state(store.STATE_KEY)
        if not st.get("files") or not st.get("local_dir"):
            off.error = f"{src.name} has no model yet"
        else:
            view = read_source(src, st)
            off.local_dir = st["local_dir"]
            off.files, off.why_not = match_rig(fetch, st, view, src.name)
    except (SourceUnavailable, StepError) as e:
        off.error = str(e)
    if off.error:
        off.files = {}
        off.why_not = {f["path"]: off.error for f in fetch}
        ctx.warn(f"model: {off.error}: the shards come from the hub")
    ctx.facts[OFFER] = off
    return off


def change(off: Offer, files: list[dict], stale: list[str], fn: Callable[[Context], None] | None,
           notify: tuple[str, ...]) -> Call:
    """The plan's copy change (pure)."""
    total = sum(f["size"] for f in files)
    n = len(files)
    st = f" (replacing {len(stale)} stale)" if stale else ""
    return Call(f"copy {n} file{'s' if n != 1 else ''} ({human(total)}) from {off.source}{st}, "
                f"{off.route}; each hashed here before it counts", fn=fn,
                data={"files": [f["path"] for f in files], "bytes": total, "source": off.source,
                      "stale": stale}, notify=notify)


def apply(ctx: Context, step: Any, s: Any) -> None:
    """Copy what the source offers into the work dir, verify it here, take the rest of those files
    from the hub (`s`: the model step's Staging)."""
    off: Offer = ctx.facts[OFFER]
    src = source_of(ctx)
    todo = list(s.copy)
    if not todo or src is None:
        return
    w = s.work
    if s.copy_stale:
        transfer.remove_files(ctx, w.dir, [f["path"] for f in s.copy_stale])
    transfer.drop_markers(ctx, w, [f["path"] for f in todo])
    stage = f"{w.dir}/{STAGE}"
    items = [FileItem(f"m{i}", off.files[f["path"]], f"{w.dir}/{f['path']}", f"{stage}/{f['path']}.partial",
                      int(f["size"]), os.path.basename(f["path"])) for i, f in enumerate(todo)]
    sizes, _free = probe(ctx, [it.partial for it in items], w.dir)
    offsets = {it.id: int(sizes[it.partial]) for it in items
               if sizes.get(it.partial) and 0 < int(sizes[it.partial]) <= it.size}
    run = copy(ctx, src, items, "model", offsets)
    origin: dict[str, tuple[str, str]] = ctx.facts.setdefault(ORIGIN, {})
    failed: dict[str, str] = {}
    copied: list[dict] = []
    for f, it in zip(todo, items):
        r = run.results[it.id]
        if r.ok:
            copied.append(f)
        else:
            failed[f["path"]] = f"the copy from {src.name} failed: {r.error}"
    # the hub's (or the lock's) sha256 decides, here, before anything counts as verified
    bad = transfer.verify_files(ctx, w, copied, {}, refetch=False) if copied else []
    for p in bad:
        failed[p] = f"the copy from {src.name} does not match the sha256 this rig wants"
    done: set[str] = ctx.facts.setdefault(VERIFIED, set())
    n_ok = 0
    for f in copied:
        if f["path"] not in failed:
            origin[f["path"]] = (src.name, "")
            done.add(f["path"])
            n_ok += 1
    ok_bytes = sum(f["size"] for f in copied if f["path"] not in failed)
    ctx.facts["transfer.bytes"] = ctx.facts.get("transfer.bytes", 0) + run.bytes
    ctx.say(f"model: {n_ok} of {len(todo)} file(s) from {src.name} ({human(ok_bytes)}, "
            f"{run.route}; {human(run.bytes)} moved in {run.seconds:.1f}s) into {w.label}")
    ctx.target.run(f"rm -rf {quote(stage)}", sudo=True, check=False)  # what failed comes from the hub
    hub = [f for f in todo if f["path"] in failed]
    if hub:
        for f in hub:
            origin[f["path"]] = ("hub", failed[f["path"]])
            ctx.warn(f"model: {os.path.basename(f['path'])}: from the hub instead ({failed[f['path']]})")
        transfer.remove_files(ctx, w.dir, [f["path"] for f in hub])
        transfer.venv_change(ctx.cfg).apply(ctx)
        transfer.run_pull(ctx, w, hub, step.token(ctx))  # hashed by the verify change that follows
        attempts = ctx.facts.setdefault("model.attempts", {})
        for f in hub:
            attempts[f["path"]] = attempts.get(f["path"], 0) + 1


def report(ctx: Context, man: dict, attempts: dict[str, int]) -> None:
    """After the model step verified everything: where each shard of this run came from."""
    off: Offer | None = ctx.facts.get(OFFER)
    if off is None:
        return
    origin: dict[str, tuple[str, str]] = ctx.facts.get(ORIGIN, {})
    size = {f["path"]: int(f["size"]) for f in man["files"]}
    from_src = sorted(p for p, (o, _) in origin.items() if o != "hub" and not attempts.get(p))
    from_hub = sorted(p for p, a in attempts.items() if a)
    names = lambda ps: ", ".join(os.path.basename(p) for p in ps)  # noqa: E731
    if from_src:
        ctx.say(f"model: from {off.source}: {len(from_src)} file(s), {human(sum(size.get(p, 0) for p in from_src))}: "
                f"{names(from_src)}")
    if from_hub:
        by_why: dict[str, list[str]] = {}
        for p in from_hub:
            why = origin[p][1] if p in origin and origin[p][0] == "hub" else off.why_not.get(p, "")
            by_why.setdefault(why or "not offered", []).append(p)
        ctx.say(f"model: from the hub: {len(from_hub)} file(s), {human(sum(size.get(p, 0) for p in from_hub))}: "
                + "; ".join(f"{names(ps)} ({why})" for why, ps in by_why.items()))
    if not from_src and not from_hub:
        ctx.say("model: nothing to fetch (all verified here already)")
    ctx.facts["transfer.model_report"] = {"source": from_src, "hub": from_hub, "at": time.time()}
