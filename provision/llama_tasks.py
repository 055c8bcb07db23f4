"""`invoke llama.build|update|rollback|status` (called through App.each_host): the versioned
builds of the llama step (provision/steps/llama.py) as tasks -- build and switch, update from
upstream with a health check and roll back, switch back to the previous build, show the builds.
llama-server is restarted through the service step (provision/steps/service.py)."""
from __future__ import annotations

import time

from . import llama_build as lb
from .engine import Context
from .errors import CommandError, StepError
from .steps.llama import GOOD_MARK, NOTIFY, Llama, RigView
from .target import quote


def unit_installed(ctx: Context) -> bool:
    from .steps import service
    try:
        return bool(service.unit_installed(ctx))
    except CommandError:
        return False


def restart_and_wait(ctx: Context) -> None:
    from .steps import service
    service.restart_and_wait(ctx)
    ctx.state.paid("llama-server.restart")


def task_build(ctx: Context) -> bool:
    out = Llama(ctx).ensure()
    if not out.switched:
        ctx.say(f"llama: ok — {out.name} is current (same fingerprint, nothing to build)")
        return False
    if unit_installed(ctx):
        ctx.state.owe(NOTIFY)
        ctx.say("llama: llama-server still runs the old build; `invoke llama.update` or "
                "`invoke provision` restarts it")
    return True


def task_update(ctx: Context, max_log: int = 30) -> bool:
    ll = Llama(ctx)
    view = ll.view()
    old = view.builds.get(view.current) if view.current else None
    sha = ll.sync(view)
    if old and old.commit and lb.SHA_RE.fullmatch(old.commit) and old.commit != sha:
        span = quote(f"{old.commit}..{sha}")  # the old commit comes from the rig: checked, quoted
        r = ll.git(f"rev-list --count {span}", check=False)
        n = r.stdout.strip() if r.ok else "?"
        lg = ll.git(f"log --oneline --no-decorate -n {max_log} {span}", check=False)
        ctx.say(f"llama: {n} new commit(s) {old.commit[:9]}..{sha[:9]}:")
        for ln in lg.stdout.splitlines():
            ctx.say(f"llama:   {ln}")
        if n.isdigit() and int(n) > max_log:
            ctx.say(f"llama:   … and {int(n) - max_log} more")
    elif old:
        ctx.say(f"llama: upstream {ll.lc['ref']} is still {sha[:9]}")
    out = ll.ensure(view, sha)
    if not out.switched:
        ctx.say(f"llama: ok — {out.name} is current (same fingerprint, nothing to build)")
        return False
    if unit_installed(ctx):
        try:
            restart_and_wait(ctx)
        except StepError as e:
            prev = out.previous
            if not prev or prev not in ll.view().builds:
                raise StepError(f"new build {out.name} failed its health check ({e}) and there is "
                                "no previous build to roll back to") from None
            ctx.console.error(f"[{ctx.host.name}] llama: {out.name} failed its health check: {e}")
            ll.switch(prev)
            ll.record(prev, out.name)
            restart_and_wait(ctx)
            raise StepError(f"new build {out.name} failed its health check; rolled back to {prev} "
                            "(restarted, healthy)") from None
        ctx.say(f"llama: llama-server restarted on {out.name}, healthy")
    return True


def previous_build(view: RigView, state_prev: str | None) -> str | None:
    """The build to roll back to: the recorded previous one, else the newest other good build."""
    if state_prev and state_prev in view.builds and state_prev != view.current:
        return state_prev
    others = sorted((b for b in view.builds.values() if b.name != view.current),
                    key=lambda b: b.built_at, reverse=True)
    return others[0].name if others else None


def task_rollback(ctx: Context) -> bool:
    ll = Llama(ctx)
    view = ll.view()
    prev = previous_build(view, (ctx.state.get("llama") or {}).get("previous"))
    if prev is None:
        raise StepError("no previous build to roll back to"
                        + (f" (only {view.current})" if view.current else ""))
    cur = view.current
    ll.switch(prev)
    ll.record(prev, cur)
    ctx.say(f"llama: rolled back {cur} → {prev}")
    if unit_installed(ctx):
        restart_and_wait(ctx)
        ctx.say(f"llama: llama-server restarted on {prev}, healthy")
    return True


def task_status(ctx: Context) -> bool:
    ll = Llama(ctx)
    view = ll.view()
    name = ctx.host.name
    if view.current is None and not view.builds and view.src_url is None:
        ctx.say(f"llama: nothing built on {name} yet (no llama.cpp clone or build under {ll.base})"
                f" — run `invoke provision --host {name}` (or `invoke llama.build --host {name}`)")
        return False
    st = ctx.state.get("llama") or {}
    sizes: dict[str, str] = {}
    r = ll.sh(f"cd {quote(ll.base)} 2>/dev/null && du -sh builds/* src 2>/dev/null; "
              f"du -sh {quote(ll.ccache_dir)} 2>/dev/null; du -sh {quote(ll.base)} 2>/dev/null",
              check=False)
    for line in r.stdout.splitlines():
        parts = line.split("\t", 1)
        if len(parts) == 2:
            sizes[parts[1].strip().rstrip("/")] = parts[0]
    rows = []
    for b in sorted(view.builds.values(), key=lambda b: b.built_at, reverse=True):
        mark = "current" if b.name == view.current else ("previous" if b.name == st.get("previous") else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(b.built_at)) if b.built_at else "-"
        rows.append([b.name, mark, f"b{b.build_number}", b.commit[:9], b.fingerprint[:12],
                     sizes.get(f"builds/{b.name}", "-"), when])
    if rows:
        ctx.console.table(f"llama.cpp builds: {name}",
                          ["build", "", "number", "commit", "fingerprint", "size", "built (UTC)"], rows)
    cur = view.builds.get(view.current) if view.current else None
    if cur:
        ctx.say(f"llama: current {view.current} — commit {cur.commit}, fingerprint "
                f"{cur.fingerprint[:16]}, {cur.extra.get('version', '')}".rstrip(", "))
    elif view.current:
        ctx.say(f"llama: current → {view.current}, which is not a good build (no {GOOD_MARK})"
                f" — run `invoke llama.build --host {name}`")
    else:
        ctx.say(f"llama: no build is current yet (the clone is there) — run "
                f"`invoke llama.build --host {name}`")
    used = [f"disk used {sizes[ll.base]} ({ll.base}"
            + (f"; source {sizes['src']})" if "src" in sizes else ")")] if ll.base in sizes else []
    used.append(f"ccache {sizes[ll.ccache_dir]}" if ll.ccache_dir in sizes
                else f"ccache: nothing cached yet ({ll.ccache_dir})")
    ctx.say("llama: " + ", ".join(used))
    cs = ll.sh("command -v ccache >/dev/null && ccache -s", env=ll.ccache_env, check=False)
    if cs.ok:
        for ln in cs.stdout.splitlines():
            if ln.strip():
                ctx.say(f"llama: ccache: {ln.rstrip()}")
    else:
        ctx.say("llama: ccache: not installed")
    return False
