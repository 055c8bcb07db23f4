"""`model`: the GGUF shards of one quant, pinned to a commit, downloaded ON the rig, sha256-verified,
one directory per commit with an atomic `current` link (layout: `provision/model/store.py`).

Flow (facts -> plan -> apply):

* resolve on the control machine (`model/hub.py`): `model.revision` -> a 40-hex commit sha and the
  files matching `model.include` with size and lfs.sha256. A 40-hex revision is a pin: once
  recorded in host state it is never re-resolved (no hub call at all).
* read the rig (one command): `current`, the kept commits, the staging dir, size + mtime_ns of
  every file, `*.incomplete` debris, the hub venv.
* plan (pure, `plan()`): facts in -> changes out. The wanted commit current and every file
  carrying a valid verified marker -> [] (0 bytes hashed). Another commit: stage it in
  `staging/<sha>` while the current copy keeps serving -- files with the same sha256 already on
  the rig are hard-linked (0 bytes), only the others are downloaded --, verify, then switch
  `current` (llama-server owes a restart). A kept copy is switched to without a download.
* apply (`model/transfer.py`): venv with huggingface-hub, `hf_pull.py` (token on stdin only),
  `sha256_files.py` in parallel, re-fetch only a shard whose sha256 is wrong, up to
  `model.max_attempts`, then stop with a clear error. Old copies beyond `model.keep_versions` go.
* [--from SOURCE] (`transfer/model_copy.py`): shards the source rig has verified with the wanted
  sha256 are copied from it into the same work dir (staging/<sha> or current) instead of
  downloaded, hashed here before they count, and the rest comes from the hub as above.

For the service step and the tasks: `shard1_path(ctx)` (never an unverified file) and `manifest(ctx)`.
"""
from __future__ import annotations

from typing import Any, Callable

from ..engine import Call, Change, Context, Step
from ..errors import StepError
from ..model import hub, store, transfer
from ..model.transfer import PipVenv, venv_commands, venv_dir  # noqa: F401
from ..model.hub import (HEX40, RepoEntry, load_token, make_manifest, match_files,  # noqa: F401
                         resolve, reuse_pin, shard1)
from ..model.hub import repo_dir as local_dir  # noqa: F401
from ..model.store import (RESTART, STAGING_KEY, STATE_KEY, RigView, Work, classify,  # noqa: F401
                           marker_valid, preflight, read_rig, versioned)
from ..progress import human
from ..transfer import model_copy

RESERVED = ("commits", "staging", "current")


# ---------------------------------------------------------------------------------------------
# the plan (pure)


class Staging:
    """What the plan decided for the wanted commit (kept for the apply functions)."""

    def __init__(self, work: Work, link: list[tuple[dict, store.Seed]], fetch: list[dict],
                 stale: list[dict], verify: list[dict], debris: list[str],
                 copy: list[dict] | None = None, copy_stale: list[dict] | None = None):
        self.work, self.link, self.fetch, self.stale, self.verify, self.debris = \
            work, link, fetch, stale, verify, debris
        self.copy = copy or []  # [--from] copied from the source rig instead of downloaded
        self.copy_stale = copy_stale or []  # those of them present here with other content


def decide(man: dict, rig: RigView, stored: dict | None, staged: dict | None, full: bool = False,
           source: Any = None) -> Staging:
    """Where the wanted commit is made complete and how each file gets there: hard-linked from a
    copy on the rig, [--from] copied from the source rig (`source`: a model_copy.Offer), or
    downloaded; and which files are hashed."""
    w = store.work_for(man, rig, stored, staged)
    groups = classify(man["files"], w.stats, w.verified, full)
    seeds = store.seeds(man, rig, stored) if w.kind != "current" else {}
    link = [(f, seeds[f["sha256"]]) for f in groups["fetch"] if f["sha256"] in seeds]
    fetch = [f for f in groups["fetch"] if f["sha256"] not in seeds]
    offered = set(source.files) if source is not None else set()
    copy = [f for f in groups["stale"] + fetch if f["path"] in offered]
    copy_stale = [f for f in groups["stale"] if f["path"] in offered]
    stale = [f for f in groups["stale"] if f["path"] not in offered]
    fetch = [f for f in fetch if f["path"] not in offered]
    verify = copy + stale + fetch + groups["verify"] + [f for f, s in link if s.marker is None]
    return Staging(w, link, fetch, stale, verify, list(rig.debris), copy, copy_stale)


def plan(cfg: dict, man: dict, rig: RigView, state_model: dict | None, *, staged: dict | None = None,
         full: bool = False, fns: dict[str, Callable] | None = None, source: Any = None) -> list[Change]:
    """Manifest + rig facts + host state in -> changes out (pure; `fns` are the apply functions).
    `source`: with `--from`, what the source rig offers (a transfer.model_copy.Offer)."""
    fns = fns or {}
    stored = state_model or None
    s = decide(man, rig, stored, staged, full, source)
    w = s.work
    where = f"{man['repo']}@{man['commit'][:7]}"
    n = len(man["files"])
    total = sum(f["size"] for f in man["files"])
    changes: list[Change] = []
    if stored and not versioned(stored) and w.kind != "current":
        clash = [f["path"] for f in stored.get("files") or [] if f["path"].split("/", 1)[0] in RESERVED]
        if clash:
            raise StepError(f"{stored['repo']}: repo path {clash[0]} collides with the versioned layout's "
                            f"names ({', '.join(RESERVED)}): move {stored['local_dir']} away by hand")
    if w.kind == "current":
        if not hub.same_manifest(stored, man) or (man.get("branch") and stored.get("branch") != man.get("branch")):
            changes.append(Call(f"pin {where} ({man['revision']}): {n} file{'s' if n != 1 else ''}, {human(total)}",
                                fn=fns.get("pin"), data={"commit": man["commit"], "files": [f["path"] for f in man["files"]]}))
    elif s.link or s.copy or s.fetch or s.stale or s.verify or w.kind == "staging":
        src = sorted({sd.where for _, sd in s.link})
        linked = (f"; link {len(s.link)} unchanged from {', '.join(src)} (0 bytes)" if s.link else "")
        changes.append(Call(f"stage {where} ({man['revision']}) in {w.label}: {n} file{'s' if n != 1 else ''}, "
                            f"{human(total)}{linked}", fn=fns.get("stage"),
                            data={"commit": man["commit"], "dir": w.dir,
                                  "link": [f["path"] for f, _ in s.link], "files": [f["path"] for f in man["files"]]}))
    if s.debris:
        changes.append(Call(f"remove {len(s.debris)} *.incomplete leftover(s) of interrupted downloads",
                            fn=fns.get("clean"), data={"paths": sorted(s.debris)}))
    get = s.stale + s.fetch
    if get or s.copy:  # a copy from the source rig needs the room a download would
        need = store.need_bytes({"fetch": [f for f in s.copy if f not in s.copy_stale] + s.fetch,
                                 "stale": s.copy_stale + s.stale}, w.stats)
        both = " (the copy in service stays until the switch: both count)" if stored and w.kind != "current" else ""
        preflight(rig.free_bytes, need, float(cfg["model"]["free_space_margin_gb"]),
                  rig.disk_path or cfg["model"]["dir"], both)
    if s.copy:  # [--from SOURCE] what the source rig has verified is copied from it (provision/transfer/)
        changes.append(model_copy.change(source, s.copy, [f["path"] for f in s.copy_stale], fns.get("copy"),
                                         RESTART if w.kind == "current" else ()))
    if get:
        if not transfer.venv_ok(rig.venv_version, cfg["model"]["hub_requirement"]):
            changes.append(transfer.venv_change(cfg))
        size = sum(f["size"] for f in get)
        stale = f" (replacing {len(s.stale)} stale)" if s.stale else ""
        changes.append(Call(f"download {len(get)} file{'s' if len(get) != 1 else ''} "
                            f"({human(size)}) from {where}{stale}", fn=fns.get("download"),
                            data={"files": [f["path"] for f in get], "bytes": size,
                                  "stale": [f["path"] for f in s.stale]},
                            notify=RESTART if w.kind == "current" else ()))
    if s.verify:
        changes.append(Call(f"verify sha256 of {len(s.verify)} file{'s' if len(s.verify) != 1 else ''} "
                            f"({human(sum(f['size'] for f in s.verify))})", fn=fns.get("verify"),
                            data={"files": [f["path"] for f in s.verify]}))
    if w.kind != "current":
        old = (stored or {}).get("commit")
        serving_changes = not stored or old != man["commit"] or (versioned(stored) and rig.current not in (None, man["commit"]))
        was = (f" (was {old[:7]})" if old and old != man["commit"] else "")
        mig = " — migrating from the flat layout (hard links: no byte copied)" if stored and not versioned(stored) else ""
        changes.append(Call(f"switch current → commits/{man['commit'][:7]}{was}{mig}", fn=fns.get("switch"),
                            data={"commit": man["commit"], "previous": old, "migrate": bool(mig)},
                            notify=RESTART if serving_changes else ()))
    return changes


# ---------------------------------------------------------------------------------------------
# the step


class ModelStep(Step):
    name = "model"
    title = "GGUF shards: resolve, download on the rig, verify sha256"

    def __init__(self, full: bool = False):
        self.full = full

    # -- resolve ----------------------------------------------------------------------------
    def manifest(self, ctx: Context) -> dict:
        def get() -> dict:
            pinned = reuse_pin(ctx.cfg, ctx.state.get(STATE_KEY))
            if pinned is not None:
                return pinned
            return resolve(ctx.cfg, self.token(ctx))
        return ctx.fact("model.manifest", get)

    def token(self, ctx: Context) -> str | None:
        return ctx.fact("model.token", lambda: load_token(ctx.cfg["model"]))

    # -- plan -------------------------------------------------------------------------------
    def plan(self, ctx: Context) -> list[Change]:
        if (ctx.cfg.get("rpc") or {}).get("bind"):
            return []  # an RPC worker holds no model and serves no API (steps/rpc.py)
        man = self.manifest(ctx)
        stored = ctx.state.get(STATE_KEY)
        rig = read_rig(ctx, man, stored)
        staged = ctx.state.get(STAGING_KEY)
        pre = decide(man, rig, stored, staged, self.full)
        source = model_copy.offer(ctx, pre.stale + pre.fetch)  # [--from] None without it / nothing to fetch
        ctx.facts["model.staging"] = decide(man, rig, stored, staged, self.full, source)
        ctx.facts["model.rig"] = rig
        ctx.facts["model.hashed_bytes"] = 0
        changes = plan(ctx.cfg, man, rig, stored, staged=staged, full=self.full, fns=self.fns(), source=source)
        if ctx.check and any(isinstance(c, PipVenv) for c in changes):
            transfer.pip_probe(ctx)  # --check: the venv would be made: can the rig reach pip's index?
        if not changes:
            ctx.say(f"model: {man['repo']}@{man['commit'][:7]}: {len(man['files'])} file(s), "
                    f"{human(sum(f['size'] for f in man['files']))}, all verified (0 bytes hashed, 0 bytes fetched)")
        return changes

    def fns(self) -> dict[str, Callable[[Context], None]]:
        return {"pin": self._pin, "stage": stage, "clean": clean, "copy": self._copy,
                "download": self._download, "verify": self._verify, "switch": switch}

    # -- apply ------------------------------------------------------------------------------
    def _pin(self, ctx: Context) -> None:
        man = self.manifest(ctx)
        st = dict(ctx.state.get(STATE_KEY) or {})
        st.update(man)
        ctx.state.set(STATE_KEY, st)

    def _download(self, ctx: Context) -> None:
        s: Staging = ctx.facts["model.staging"]
        if s.stale:
            transfer.remove_files(ctx, s.work.dir, [f["path"] for f in s.stale])
        get = s.stale + s.fetch
        transfer.drop_markers(ctx, s.work, [f["path"] for f in get])
        transfer.clean_debris(ctx, [s.work.dir])
        transfer.run_pull(ctx, s.work, get, self.token(ctx))
        ctx.facts.setdefault("model.attempts", {}).update({f["path"]: 1 for f in get})

    def _copy(self, ctx: Context) -> None:
        """[--from SOURCE] copy into the work dir, verify here, fall back to the hub
        (provision/transfer/model_copy.py)."""
        model_copy.apply(ctx, self, ctx.facts["model.staging"])

    def _verify(self, ctx: Context) -> None:
        s: Staging = ctx.facts["model.staging"]
        attempts: dict[str, int] = dict(ctx.facts.get("model.attempts") or {})
        done = ctx.facts.get(model_copy.VERIFIED) or set()  # [--from] copied and hashed here already
        transfer.verify_files(ctx, s.work, [f for f in s.verify if f["path"] not in done], attempts,
                              refetch=True, token=lambda: self.token(ctx))
        model_copy.report(ctx, s.work.man, attempts)  # [--from] which shard came from where

    def verify(self, ctx: Context) -> None:
        """After applying: `current` is the wanted commit, every file present with a valid marker."""
        man = self.manifest(ctx)
        st = ctx.state.get(STATE_KEY) or {}
        rig = read_rig(ctx, man, st)
        ctx.facts["model.rig"] = rig
        if st.get("commit") != man["commit"] or rig.current != man["commit"]:
            raise StepError(f"after applying, current is {(rig.current or 'nothing')[:7]} (recorded "
                            f"{str(st.get('commit'))[:7]}), not {man['commit'][:7]}")
        groups = classify(man["files"], rig.stats("current"), st.get("verified") or {})
        bad = [f["path"] for f in groups["fetch"] + groups["stale"] + groups["verify"]]
        if bad:
            raise StepError(f"after applying, {len(bad)} file(s) are still not verified: {', '.join(bad[:4])}")
        if rig.debris:
            raise StepError(f"after applying, {len(rig.debris)} *.incomplete file(s) are left: {rig.debris[0]}")


# ---------------------------------------------------------------------------------------------
# apply functions that model.update shares


def stage(ctx: Context) -> None:
    """Start (or resume) the staging record and hard-link what the rig already has."""
    s: Staging = ctx.facts["model.staging"]
    w = s.work
    st = dict(ctx.state.get(STAGING_KEY) or {})
    if st.get("commit") != w.man["commit"] or st.get("local_dir") != w.man["local_dir"]:
        st = {}
    verified = {**w.verified, **(st.get("verified") or {})}
    for f, seed in s.link:
        if seed.marker:
            verified[f["path"]] = seed.marker  # a hard link: same inode, same size and mtime
    ctx.state.set(STAGING_KEY, {**w.man, "verified": verified})
    store.link_files(ctx, [(seed.src, f"{w.dir}/{f['path']}") for f, seed in s.link])
    if s.link:
        ctx.say(f"model: linked {len(s.link)} unchanged file(s) into {w.label} "
                f"({human(sum(f['size'] for f, _ in s.link))} not downloaded)")


def clean(ctx: Context) -> None:
    s: Staging = ctx.facts["model.staging"]
    if s.debris:
        from ..target import quote
        ctx.target.run("rm -f -- " + " ".join(quote(p) for p in s.debris), sudo=True)
    ctx.say(f"model: removed {len(s.debris)} *.incomplete file(s)")


def switch(ctx: Context) -> None:
    """The step's switch: promote the staged commit, then prune old copies."""
    man, previous = promote(ctx)
    prune(ctx, man, previous)


def promote(ctx: Context) -> tuple[dict, str | None]:
    """Mark the staged commit good, switch `current` to it and record it. Returns (its manifest,
    the commit it replaced that is kept to go back to)."""
    s: Staging = ctx.facts["model.staging"]
    w, man = s.work, s.work.man
    rec = ctx.state.get(STAGING_KEY) or {}
    verified = dict(w.verified)
    if rec.get("commit") == man["commit"]:
        verified.update(rec.get("verified") or {})
    missing = [f["path"] for f in man["files"] if (verified.get(f["path"]) or {}).get("sha256") != f["sha256"]]
    if missing:
        raise StepError(f"not switching to {man['commit'][:7]}: {len(missing)} file(s) not verified: "
                        f"{', '.join(missing[:3])}")
    old = dict(ctx.state.get(STATE_KEY) or {})
    store.finalize(ctx, w, verified)
    previous = old.get("commit") if old.get("commit") != man["commit"] else old.get("previous")
    migrating = bool(old) and not versioned(old) and old.get("local_dir") == man["local_dir"]
    if migrating and previous:
        rig: RigView = ctx.facts["model.rig"]
        previous = store.keep_flat_copy(ctx, old, rig.stats("flat"))  # so there is a way back
    store.switch(ctx, man["local_dir"], man["commit"])
    if migrating:
        rig = ctx.facts["model.rig"]
        store.flat_to_links(ctx, man["local_dir"], [f["path"] for f in old.get("files") or []
                                                    if f["path"] in rig.stats("flat")])
    ctx.state.data.pop(STAGING_KEY, None)
    ctx.state.set(STATE_KEY, {**man, "verified": {f["path"]: verified[f["path"]] for f in man["files"]},
                              "layout": store.LAYOUT, "previous": previous,
                              "branch": man.get("branch") or old.get("branch")})
    ctx.say(f"model: current → commits/{man['commit'][:7]}"
            + (f" (previous {previous[:7]})" if previous else ""))
    return man, previous


def prune(ctx: Context, man: dict, previous: str | None) -> list[str]:
    """Delete good copies beyond model.keep_versions (never current or previous) and abandoned
    staging dirs of other commits."""
    rig = read_rig(ctx, None, None)
    gone = store.prune_list(rig, int(ctx.cfg["model"]["keep_versions"]), {man["commit"], previous or ""})
    stale = [c for c in rig.staging if c != man["commit"]]
    store.remove_commits(ctx, man["local_dir"], gone, stale)
    if gone or stale:
        ctx.say("model: removed old copies: " + ", ".join([f"commits/{c[:7]}" for c in gone]
                                                            + [f"staging/{c[:7]}" for c in stale]))
    return gone


# ---------------------------------------------------------------------------------------------
# for the service step and the tasks


def manifest(ctx: Context) -> dict:
    """The pinned manifest recorded on the host (repo, revision, commit, local_dir, files)."""
    st = ctx.state.get(STATE_KEY)
    if not st or not st.get("files"):
        raise StepError("no model manifest on this host yet (run the model step: invoke model.pull)")
    return st


def served_stats(st: dict, rig: RigView) -> dict:
    """Stats of the files llama-server would load: current/ (checked to be the recorded commit)."""
    if not versioned(st):
        return rig.stats("flat")
    if rig.current != st["commit"]:
        raise StepError(f"{st['local_dir']}/current points at {(rig.current or 'nothing')[:7]}, but the model "
                        f"recorded on this host is {st['commit'][:7]} — run invoke model.pull")
    return rig.stats("current")


def shard1_path(ctx: Context) -> str:
    """Absolute path on the rig of the file llama-server loads (-m): through `current/` once the
    layout is versioned. Raises StepError unless EVERY file of the model is verified and unchanged
    since (size + mtime as when hashed)."""
    st = manifest(ctx)
    first = shard1(st["files"])
    rig = read_rig(ctx, None, st)
    stats = served_stats(st, rig)
    verified = st.get("verified") or {}
    bad = [f["path"] for f in st["files"] if not marker_valid(verified.get(f["path"]), f, stats.get(f["path"]))]
    if bad:
        raise StepError(f"model file(s) not verified: {', '.join(p.rsplit('/', 1)[-1] for p in bad[:4])}"
                        f" — run invoke model.pull (the service is never pointed at an unverified file)")
    return f"{store.served_dir(st)}/{first['path']}"


def verify_action(ctx: Context, full: bool = False) -> bool:
    from ..model.tasks import verify_action as act
    return act(ctx, full)


def status_action(ctx: Context) -> bool:
    from ..model.tasks import status_action as act
    return act(ctx)
