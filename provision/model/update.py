"""`invoke model.update --host X [--revision R] [--check]`: move a rig's model to the newest commit
of the branch its pin came from, without ever leaving it unserved.

1. resolve `model.include` at the branch head (default: the branch recorded with the pin; else a
   branch in model.revision; else `main`);
2. list the hub commits since the pin and the files that changed (size, sha256);
3. stage the new commit in staging/<sha> while the old copy keeps serving: unchanged files are
   hard-linked, only changed ones are downloaded (disk preflight: both copies count), every file is
   sha256-verified (a bad download is fetched again, up to model.max_attempts);
4. VRAM preflight with the new model, then switch `current` atomically and restart llama-server
   behind its health gate with one real completion;
5. on any failure there (or Ctrl-C): `current` goes back to the previous commit, llama-server is
   restarted on it and checked, and the update fails with one line saying so;
6. on success: prune old copies (keep model.keep_versions), rewrite a 40-hex model.revision in
   hosts.yaml to the new commit (else the next provision would go back), write locks/<host>.lock.yaml.

`--check` prints steps 1-3 as a plan and changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StepError
from ..progress import human
from . import hub, store
from .hub import HEX40, load_token
from .store import STAGING_KEY, STATE_KEY, read_rig, versioned


@dataclass
class UpdateOptions:
    revision: str | None = None  # branch/tag/commit to move to (default: the pin's branch)
    check: bool = False
    inventory_path: str | None = None  # hosts.yaml to rewrite a 40-hex pin in
    lock_dir: str | None = None  # where locks/<host>.lock.yaml is written


def pick_branch(asked: str | None, stored: dict, cfg_revision: str) -> tuple[str, str]:
    """(revision to resolve, why) -- pure."""
    if asked:
        return asked, "--revision"
    if stored.get("branch"):
        return stored["branch"], "the branch the pin came from"
    if not HEX40.match(str(cfg_revision).lower()):
        return str(cfg_revision), "model.revision"
    return "main", "no branch recorded for the pin; --revision to choose another"


def check_host(ctx: Any) -> dict:
    """What model.update needs before it asks anything: the model in service, the same repo."""
    cfg, m = ctx.cfg, ctx.cfg["model"]
    if cfg.get("lock"):
        raise StepError(f"host {ctx.host.name!r} reproduces the lock {cfg['lock']} (its `lock:` key): "
                        "update the rig that lock came from, then provision this one from its new lock")
    st = ctx.state.get(STATE_KEY)
    if not st or not st.get("files"):
        raise StepError("no model on this host yet: run invoke model.pull (or provision) first")
    if (st["repo"], st["include"]) != (m["repo"], m["include"]):
        raise StepError(f"hosts.yaml asks for {m['repo']} {m['include']!r} but the rig serves {st['repo']} "
                        f"{st['include']!r}: `invoke provision --only model,service` pulls the other model; "
                        "model.update moves the same one to a newer commit")
    return st


def show_changes(ctx: Any, st: dict, new: dict, branch: str, token: str | None) -> None:
    """The hub commits since the pin and the files they changed."""
    commits, found = hub.commits_between(ctx.cfg, token, st["commit"], new["commit"])
    ctx.say(f"model: {st['repo']}@{st['commit'][:7]} → {new['commit'][:7]} ({branch}): "
            f"{len(commits)} new commit(s)" + ("" if found else
                                              f" (the pin {st['commit'][:7]} is not in {branch}'s history: "
                                              "rewritten, or another branch)"))
    for c in commits[:30]:
        ctx.say(f"model:   {c['id'][:7]} {c['date']} {c['title']}")
    if len(commits) > 30:
        ctx.say(f"model:   … and {len(commits) - 30} more")
    d = hub.diff_files(st["files"], new["files"])
    rows = [[o["path"], "changed", f"{human(o['size'])} {o['sha256'][:12]}", f"{human(n['size'])} {n['sha256'][:12]}"]
            for o, n in d["changed"]]
    rows += [[n["path"], "added", "-", f"{human(n['size'])} {n['sha256'][:12]}"] for n in d["added"]]
    rows += [[o["path"], "removed", f"{human(o['size'])} {o['sha256'][:12]}", "-"] for o in d["removed"]]
    ctx.say(f"model: files: {len(d['changed'])} changed, {len(d['added'])} added, {len(d['removed'])} removed, "
            f"{len(d['same'])} unchanged ({human(sum(f['size'] for f in d['same']))}, hard-linked, not downloaded)")
    if rows:
        ctx.console.table(f"model.update: {ctx.host.name}", ["file", "what", "was (size sha256)", "now (size sha256)"], rows)


def task_update(ctx: Any, opts: UpdateOptions) -> bool:
    from ..steps import model as step
    st = check_host(ctx)
    m = ctx.cfg["model"]
    branch, why = pick_branch(opts.revision, st, m["revision"])
    token = load_token(m)
    ctx.facts["model.token"] = token
    pinned = bool(HEX40.match(str(m["revision"]).lower()))
    new = hub.resolve(ctx.cfg, token, revision=branch)
    new["revision"] = new["commit"] if pinned else branch
    if not HEX40.match(branch.lower()):
        new["branch"] = branch
    ctx.say(f"model: {st['repo']}: asking {branch} ({why})")
    if not pinned and branch != str(m["revision"]):
        ctx.warn(f"model: hosts.yaml has model.revision {m['revision']!r}: the next provision goes back to "
                 f"its head unless you set model.revision: {branch}")
    rig = read_rig(ctx, new, st)
    if new["commit"] == st["commit"]:
        ctx.say(f"model: up to date — {st['repo']}@{st['commit'][:7]} is the head of {branch}"
                + ("" if versioned(st) and rig.current == st["commit"] else
                   " (`invoke model.pull` checks and migrates the copy in service)"))
        return False
    show_changes(ctx, st, new, branch, token)
    staged = ctx.state.get(STAGING_KEY)
    ms = step.ModelStep()
    ctx.facts["model.manifest"] = new
    ctx.facts["model.staging"] = step.decide(new, rig, st, staged)
    ctx.facts["model.rig"] = rig
    ctx.facts["model.hashed_bytes"] = 0
    changes = step.plan(ctx.cfg, new, rig, st, staged=staged, fns=ms.fns())
    assert changes and changes[-1].data.get("commit") == new["commit"], "the plan ends with the switch"
    restart = "restart llama-server, check /health and one completion; roll back on failure"
    if opts.check:
        for c in changes:
            ctx.say(f"model: would change: {c.description}")
        ctx.say(f"model: would then {restart}; keep {m['keep_versions']} copies"
                + (f"; set model.revision: {new['commit']} in {opts.inventory_path}" if pinned else ""))
        return True
    for c in changes[:-1]:
        ctx.say(f"model: change: {c.description}")
        c.apply(ctx)
    ctx.say(f"model: change: {changes[-1].description}, then {restart}")
    switch_and_restart(ctx, new, st)
    after_success(ctx, new, opts, pinned)
    return True


def switch_and_restart(ctx: Any, new: dict, old: dict) -> None:
    """Promote the staged commit and restart llama-server on it; on failure (or Ctrl-C) go back to
    the old commit and restart on that."""
    from ..bench.guard import shielded
    from ..steps import model as step
    from ..steps import service
    unit = service.unit_installed(ctx)
    s = ctx.facts["model.staging"]
    first = hub.shard1(new["files"])
    if unit:
        service.preflight(ctx, f"{s.work.dir}/{first['path']}")  # before anything switches
    with shielded():
        _, previous = step.promote(ctx)
    if not unit:
        ctx.say("model: llama-server is not installed here: nothing to restart")
        return
    model_path = f"{store.served_dir(ctx.state.get(STATE_KEY))}/{first['path']}"
    try:
        service.restart_and_wait(ctx, model_path=model_path)
    except (StepError, KeyboardInterrupt) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        with shielded():
            rollback(ctx, old, new, why)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise StepError(f"model {new['commit'][:7]} failed its health check; rolled back to "
                        f"{old['commit'][:7]} (restarted, healthy). {why[:300]}") from None
    ctx.say(f"model: llama-server serves {new['repo']}@{new['commit'][:7]}, healthy")


def rollback(ctx: Any, old: dict, new: dict, why: str) -> None:
    from ..steps import service
    ctx.console.error(f"[{ctx.host.name}] model: {new['commit'][:7]} did not come up: {why.splitlines()[0][:300]}"
                      f" — rolling back to {old['commit'][:7]}")
    rdir = old["local_dir"]
    store.switch(ctx, rdir, old["commit"])
    rec = dict(old)
    rec.update({"layout": store.LAYOUT, "previous": new["commit"]})
    ctx.state.set(STATE_KEY, rec)
    first = hub.shard1(old["files"])
    try:
        service.restart_and_wait(ctx, model_path=f"{store.served_dir(rec)}/{first['path']}")
    except StepError as e:
        ctx.state.owe(store.RESTART)
        raise StepError(f"model {new['commit'][:7]} failed ({why[:200]}) and llama-server did not come back "
                        f"on {old['commit'][:7]} either: {e}") from None
    if not HEX40.match(str(ctx.cfg["model"]["revision"]).lower()):
        ctx.warn(f"model: hosts.yaml's model.revision {ctx.cfg['model']['revision']!r} now resolves to "
                 f"{new['commit'][:7]}: the next provision would switch to it again -- pin "
                 f"model.revision: {old['commit']} until a fixed upload")


def after_success(ctx: Any, new: dict, opts: UpdateOptions, pinned: bool) -> None:
    from ..steps import model as step
    st = ctx.state.get(STATE_KEY) or {}
    step.prune(ctx, new, st.get("previous"))
    if pinned and opts.inventory_path:
        from ..tune.inventory_edit import apply_to_inventory
        diff = apply_to_inventory(opts.inventory_path, ctx.host.name, {"revision": new["commit"]}, section="model")
        if diff:
            ctx.say(f"model: {opts.inventory_path}: model.revision → {new['commit']} (the pin moves with the rig)")
    if opts.lock_dir:
        from .. import lock as lk
        out = lk.lock_path(ctx.host.name, opts.lock_dir)
        if lk.write(lk.from_rig(ctx), out):
            ctx.say(f"lock: wrote {out}")
        else:
            ctx.say(f"lock: {out} unchanged")


def lock_dir_of(inventory_path: str) -> str:
    return str(Path(inventory_path).resolve().parent / "locks")
