"""The model step's part of `provision --from SOURCE`: shards from the source rig, not the hub.

* `offer(ctx, man)` (plan, read-only on both rigs): which of the files this rig wants -- the
  manifest's sha256, i.e. the hub's or the lock's -- the source has VERIFIED (its marker valid:
  same sha256 and size, file untouched since it was hashed there), and why not for the others.
  The model plan then says `copy N files from SOURCE` for those and `download` for the rest.
* `apply(ctx, step, man)` (the copy change): copy them (provision/transfer/copy.py), hash each one
  HERE against the manifest before it is marked verified (the model step's own verify_files), and
  take every shard that could not be copied or does not match from the hub instead.
* `report(ctx, attempts)` (after the model step verified everything): which shard came from where.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import Call, Context
from ..errors import ConnectError, StepError
from ..target import quote
from .copy import FileItem, copy, human, probe
from .source import SourceUnavailable, source_of

OFFER = "transfer.model_offer"
ORIGIN = "transfer.model_origin"
STAGE = ".cache/llama-rig-copy"  # partial files, under the model's local dir (same filesystem)


def _model():
    from ..steps import model  # imported here: the model step imports this module
    return model


@dataclass
class Offer:
    source: str
    route: str
    local_dir: str = ""  # the source's model directory
    files: dict[str, str] = field(default_factory=dict)  # repo path here -> absolute path there
    why_not: dict[str, str] = field(default_factory=dict)  # repo path here -> why not copied
    error: str = ""  # the source could not be read at all


def match(want: list[dict], src_model: dict[str, Any], src_stats: dict[str, tuple[int, int]],
          source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Pure: which wanted files (path, size, sha256) the source can give, by content: a file of its
    model with the same sha256 and size whose verified marker is still valid (any path, any commit).
    Returns (repo path -> absolute path on the source, repo path -> why not)."""
    marker_valid = _model().marker_valid
    ldir = str(src_model.get("local_dir") or "")
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
            files[w["path"]] = f"{ldir}/{good[0]['path']}"
        elif not cands:
            why[w["path"]] = f"{source} does not have it"
        elif all(c["path"] not in src_stats for c in cands):
            why[w["path"]] = f"missing on {source}"
        elif any(c["path"] in verified for c in cands):
            why[w["path"]] = f"changed on {source} since it was verified there"
        else:
            why[w["path"]] = f"not verified on {source}"
    return files, why


def offer(ctx: Context, man: dict, rig: Any, stored: dict | None, full: bool = False) -> Offer | None:
    """What the source can give of the files this rig has to fetch (None without --from, or when
    nothing is to be fetched: then the source is not even contacted). Reads the source only."""
    src = source_of(ctx)
    if src is None:
        return None
    M = _model()
    groups = M.classify(man, rig, dict((stored or {}).get("verified") or {}), full)
    if not groups["fetch"] + groups["stale"]:
        return None
    off = Offer(src.name, src.route_text())
    try:
        st = src.state(M.STATE_KEY)
        if not st.get("files"):
            off.error = f"{src.name} has no model yet"
        else:
            try:
                view = M.read_rig(src.ctx(), st)
            except ConnectError as e:
                raise src.lost(e) from None
            off.local_dir = st.get("local_dir") or ""
            off.files, off.why_not = match(man["files"], st, view.files, src.name)
    except (SourceUnavailable, StepError) as e:
        off.error = str(e)
    if off.error:
        off.why_not = {f["path"]: off.error for f in man["files"]}
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


def apply(ctx: Context, step: Any, man: dict) -> None:
    """Copy what the source offers, verify it here, take the rest of those files from the hub."""
    M = _model()
    off: Offer = ctx.facts[OFFER]
    src = source_of(ctx)
    rig = ctx.facts["model.rig"]
    groups = M.classify(man, rig, step._state(ctx)["verified"], step.full)
    todo = [f for f in groups["stale"] + groups["fetch"] if f["path"] in off.files]
    if not todo or src is None:
        return
    stale = [f["path"] for f in groups["stale"] if f in todo]
    if stale:
        M.remove_files(ctx, stale)
    step._drop_markers(ctx, [f["path"] for f in todo])
    ldir = man["local_dir"]
    stage = f"{ldir}/{STAGE}"
    items = [FileItem(f"m{i}", off.files[f["path"]], f"{ldir}/{f['path']}", f"{stage}/{f['path']}.partial",
                      int(f["size"]), os.path.basename(f["path"])) for i, f in enumerate(todo)]
    sizes, _free = probe(ctx, [it.partial for it in items], ldir)
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
    bad = M.verify_files(ctx, step, man, copied, {}, refetch=False) if copied else []
    for p in bad:
        failed[p] = f"the copy from {src.name} does not match the sha256 this rig wants"
    n_ok = 0
    for f in copied:
        if f["path"] not in failed:
            origin[f["path"]] = (src.name, "")
            n_ok += 1
    ok_bytes = sum(f["size"] for f in copied if f["path"] not in failed)
    ctx.facts["transfer.bytes"] = ctx.facts.get("transfer.bytes", 0) + run.bytes
    ctx.say(f"model: {n_ok} of {len(todo)} file(s) from {src.name} ({human(ok_bytes)}, {run.route}; "
            f"{human(run.bytes)} moved in {run.seconds:.1f}s)")
    ctx.target.run(f"rm -rf {quote(stage)}", sudo=True, check=False)  # what failed comes from the hub
    hub = [f for f in todo if f["path"] in failed]
    if hub:
        for f in hub:
            origin[f["path"]] = ("hub", failed[f["path"]])
            ctx.warn(f"model: {os.path.basename(f['path'])}: from the hub instead ({failed[f['path']]})")
        M.remove_files(ctx, [f["path"] for f in hub])
        cfg = ctx.cfg
        M.PipVenv(f"python venv {M.venv_dir(cfg)}", commands=M.venv_commands(cfg), timeout=1800,
                  pip={k: cfg["model"][k] for k in ("pip_index_url", "pip_find_links")}).apply(ctx)
        M.run_pull(ctx, man, hub, step.token(ctx))
        attempts = ctx.facts.setdefault("model.attempts", {})
        for f in hub:
            attempts[f["path"]] = attempts.get(f["path"], 0) + 1
    ctx.facts["model.rig"] = M.read_rig(ctx, man)  # the copied files are here now (and verified)


def report(ctx: Context, attempts: dict[str, int]) -> None:
    """After the model step verified everything: where each shard of this run came from."""
    off: Offer | None = ctx.facts.get(OFFER)
    if off is None:
        return
    origin: dict[str, tuple[str, str]] = ctx.facts.get(ORIGIN, {})
    man = _model().manifest(ctx)
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
