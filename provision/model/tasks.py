"""`invoke model.verify` and `invoke model.status` (read the rig; verify hashes, repairs nothing)."""
from __future__ import annotations

import time
from typing import Any

from ..errors import StepError
from ..progress import human
from . import store, transfer
from .store import STAGING_KEY, STATE_KEY, Work, classify, marker_valid, read_rig


def verify_action(ctx: Any, full: bool = False) -> bool:
    """`model.verify`: hash files of the copy in service whose marker is missing/stale (all with
    --full); report, repair nothing."""
    from ..steps.model import manifest, served_stats
    st = manifest(ctx)
    rig = read_rig(ctx, None, st)
    stats = served_stats(st, rig)
    groups = classify(st["files"], stats, st.get("verified") or {}, full)
    missing = [f["path"] for f in groups["fetch"]]
    todo = groups["verify"] + groups["stale"]
    ctx.facts["model.hashed_bytes"] = 0
    work = Work(st, store.files_dir(st), STATE_KEY, "current", stats, dict(st.get("verified") or {}))
    bad = transfer.verify_files(ctx, work, todo, {}, refetch=False) if todo else []
    if not todo:
        ctx.say(f"model: {len(groups['ok'])} file(s) verified earlier and unchanged (0 bytes hashed)"
                + ("; use --full to re-hash them" if groups["ok"] else ""))
    if missing or bad:
        raise StepError(f"{len(missing)} file(s) missing, {len(bad)} with a wrong sha256: "
                        f"{', '.join(p.rsplit('/', 1)[-1] for p in (missing + bad)[:4])} — run invoke model.pull")
    return False


def _file_state(f: dict, stt: Any, verified: dict) -> str:
    if stt is None:
        return "missing"
    if marker_valid(verified.get(f["path"]), f, stt):
        return "verified"
    if stt[0] != f["size"]:
        return f"wrong size ({stt[0]})"
    if f["path"] in verified:
        return "changed since verified"
    return "not verified"


def status_action(ctx: Any) -> bool:
    """`model.status`: repo, pinned sha, kept copies, files with size and verified state, disk free."""
    from ..facts import host as hostfacts
    st = ctx.state.get(STATE_KEY)
    cfg_m = ctx.cfg["model"]
    if not st or not st.get("files"):
        hf = hostfacts.host_facts(ctx)
        ctx.console.table(f"model: {ctx.host.name}", ["key", "value"], [
            ["repo", f"{cfg_m['repo']} (not pulled yet)"], ["revision", cfg_m["revision"]],
            ["include", cfg_m["include"]], ["disk free", f"{human(hf.disk_free_bytes)} at {hf.disk_path}"]])
        return False
    rig = read_rig(ctx, None, st)
    verified = st.get("verified") or {}
    layout = ("versioned: current → commits/" + (rig.current or "?")[:7]) if store.versioned(st) else "flat (migrated by the next model.pull)"
    rows = [["repo", st["repo"]], ["revision", f"{st['revision']} -> {st['commit']}"
                                   + (f" (branch {st['branch']})" if st.get("branch") else "")],
            ["include", st["include"]], ["dir", st["local_dir"]], ["layout", layout],
            ["disk free", f"{human(rig.free_bytes)} at {rig.disk_path}"],
            ["files", f"{len(st['files'])}, {human(sum(f['size'] for f in st['files']))}"]]
    kept = []
    for c, k in sorted(rig.good().items(), key=lambda kv: -float(kv[1]["mark"].get("finalized_at") or 0)):
        tag = "current" if c == rig.current else ("previous" if c == st.get("previous") else "kept")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(k["mark"].get("finalized_at") or 0)))
        kept.append(f"{c[:7]} ({tag}, {when})")
    if kept:
        rows.append(["copies", ", ".join(kept) + f" — keep {cfg_m['keep_versions']}"])
    staged = ctx.state.get(STAGING_KEY) or {}
    if rig.staging:
        rows.append(["staging", ", ".join(c[:7] for c in rig.staging)
                     + (f" ({len(staged.get('verified') or {})}/{len(staged.get('files') or [])} verified)"
                        if staged.get("commit") in rig.staging else "")])
    if rig.debris:
        rows.append(["debris", f"{len(rig.debris)} *.incomplete file(s)"])
    ctx.console.table(f"model: {ctx.host.name}", ["key", "value"], rows)
    try:
        from ..steps.model import served_stats
        stats = served_stats(st, rig)
    except StepError as e:
        ctx.warn(f"model: {e}")
        stats = {}
    frows = [[f["path"], f["size"], f["sha256"][:16], _file_state(f, stats.get(f["path"]), verified)]
             for f in st["files"]]
    ctx.console.table("files", ["path", "size", "sha256", "state"], frows)
    return False
