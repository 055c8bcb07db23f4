"""The llama step's part of `provision --from SOURCE`: the source's build, or its ccache.

When this rig has no good build with the fingerprint it wants (commit, cmake flags, CUDA archs,
targets, gcc, nvcc, glibc: `llama_build.fingerprint`), the llama step calls `obtain()`, which
`decide()`s one of three paths and says which and why:

* copy  -- the source has a good build with exactly this fingerprint: its `bin/` (and `lib/`) is
           copied into `builds/.copy-<name>`, smoke-tested like a fresh build (`--version` names
           the commit and build number, `--help` has every service flag), marked good and renamed
           to `builds/<name>`; only then does the step switch `current`. A copy that fails (or
           fails the smoke test) falls back to the next path.
* seed  -- no such build there: the source's ccache is merged into this rig's (files already here
           are kept), then the normal build runs -- the objects that did not change hit.
* build -- neither fits: the source has no ccache, its gcc differs (no hit possible), or
           `llama_cpp.native` is on and the CPUs differ (the binaries are for its CPU, and ccache
           would hand back objects built for it: ccache#824).

`annotate()` puts the same decision into the plan (`--check` shows it; read-only on both rigs).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .. import llama_build as lb
from ..engine import Call, Change, Context
from ..errors import StepError
from ..target import quote
from .copy import TreeItem, copy, human, probe
from .source import CPU_CMD, Cpu, SourceRig, SourceUnavailable, parse_cpu, source_of

COMPARED = ("commit", "build_number", "cmake_args", "targets", "archs", "gcc", "nvcc", "glibc")
CCACHE_SKIP_NAMES = ["stats", "ccache.conf", "CACHEDIR.TAG"]
CCACHE_SKIP_DIRS = ["tmp", "lock"]


@dataclass(frozen=True)
class Decision:
    action: str  # copy | seed | build
    why: str
    build: str | None = None  # the source build to copy
    seed: bool = False  # the source's ccache can help (the fallback of a failed copy)
    seed_why: str = ""

    def summary(self, source: str) -> str:
        if self.action == "copy":
            return f"copying build {self.build} from {source}: {self.why}"
        if self.action == "seed":
            return f"building here with a ccache seeded from {source}'s: {self.why}"
        return f"building here, nothing to take from {source}: {self.why}"


def differences(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """What differs between the build wanted here and a build record there, one phrase each."""
    out = []
    for k in COMPARED:
        a, b = want.get(k), have.get(k)
        if a == b or (not a and not b):
            continue
        if isinstance(a, list) and isinstance(b, list):
            plus = [f"+{x}" for x in a if x not in b]
            minus = [f"-{x}" for x in b if x not in a]
            out.append(f"{k} {' '.join(plus + minus) or '(other order)'}")
        else:
            out.append(f"{k} {b if b is not None else 'none'} there, {a if a is not None else 'none'} here")
    return out


def decide(want: dict[str, Any], fingerprint: str, legacy_fingerprint: str | None,
           builds: Sequence[lb.BuildInfo], source: str, *, native: bool = False,
           src_cpu: Cpu | None = None, dst_cpu: Cpu | None = None, src_glibc: str | None = None,
           dst_glibc: str | None = None, src_gcc: str | None = None, dst_gcc: str | None = None,
           ccache_files: int = 0, current: str | None = None) -> Decision:
    """Pure: copy, seed or build, and why."""
    if native and (src_cpu is None or dst_cpu is None or src_cpu != dst_cpu):
        there = src_cpu.describe() if src_cpu else "unknown"
        here = dst_cpu.describe() if dst_cpu else "unknown"
        same_model = " (same model, other flags)" if src_cpu and dst_cpu and src_cpu.model == dst_cpu.model else ""
        return Decision("build", f"llama_cpp.native is on and {source}'s CPU ({there}) is not this one's "
                                 f"({here}){same_model}: its binaries and its ccache are for its CPU "
                                 "(-march=native; ccache would hand back objects built for the other CPU)")
    match = next((b for b in builds if b.fingerprint == fingerprint), None)
    if match is None and legacy_fingerprint and src_glibc and src_glibc == dst_glibc:
        # built before glibc joined the fingerprint: same everything else, and glibc is the same there now
        match = next((b for b in builds if "glibc" not in b.extra and b.fingerprint == legacy_fingerprint), None)
    seed_why, seed = "", False
    if ccache_files <= 0:
        seed_why = f"{source} has no ccache"
    elif want.get("gcc") and src_gcc and want.get("gcc") != src_gcc:
        seed_why = f"{source}'s gcc {src_gcc} is not {want.get('gcc')}: its ccache cannot hit"
    else:
        seed, seed_why = True, f"{ccache_files} files in {source}'s ccache"
    if match is not None:
        return Decision("copy", f"same fingerprint {fingerprint[:8]} (commit, cmake flags, CUDA archs, "
                                "targets, gcc, nvcc, glibc)", match.name, seed, seed_why)
    if not builds:
        nearest = f"{source} has no good build"
    else:
        def rec(b: lb.BuildInfo) -> dict[str, Any]:
            d = dict(b.extra)
            if "glibc" not in d:
                d["glibc"] = src_glibc  # an older record: the glibc there now
            return d
        ranked = sorted(builds, key=lambda b: (len(differences(want, rec(b))), b.name != current, -b.built_at))
        best = ranked[0]
        nearest = (f"{source} has no build with fingerprint {fingerprint[:8]} (nearest {best.name}: "
                   f"{'; '.join(differences(want, rec(best))) or 'other fingerprint'})")
    if seed:
        return Decision("seed", nearest, None, True, seed_why)
    return Decision("build", f"{nearest}, and {seed_why}", None, False, seed_why)


# ---------------------------------------------------------------------------------------------
# reading both rigs


def _llama():
    from ..steps import llama  # imported here: the llama step imports this module
    return llama


def src_base(src: SourceRig) -> str:
    return f"{src.cfg['paths']['prefix'].rstrip('/')}/llama.cpp"


def src_ccache(src: SourceRig) -> str:
    return f"{src.cfg['paths']['prefix'].rstrip('/')}/ccache"


def decide_live(ll: Any, src: SourceRig, w: Any) -> tuple[Decision, Any]:
    """Read what decide() needs (both rigs, read-only). Returns (decision, the source's RigView)."""
    L = _llama()
    view = L.parse_view(src.run(L.view_script(src_base(src)), sudo=True, check=False).stdout)
    glibc = src.fact("llama.glibc", lb.GLIBC_CMD, lb.parse_glibc)
    gcc = src.fact("transfer.gcc", "gcc -dumpfullversion 2>/dev/null; true", lambda s: s.strip() or None)
    cc = src.run(f"find {quote(src_ccache(src))} -type f 2>/dev/null | wc -l", sudo=True, check=False).stdout
    native = bool(ll.lc.get("native"))
    src_cpu = dst_cpu = None
    if native:
        src_cpu = src.fact("transfer.cpu", CPU_CMD, parse_cpu)
        dst_cpu = ll.ctx.fact("transfer.cpu", lambda: parse_cpu(ll.sh(CPU_CMD, check=False).stdout))
    d = decide(w.record(), w.fingerprint, w.legacy_fingerprint, list(view.builds.values()), src.name,
               native=native, src_cpu=src_cpu, dst_cpu=dst_cpu, src_glibc=glibc, dst_glibc=w.glibc,
               src_gcc=gcc, dst_gcc=w.gcc, ccache_files=int(cc.strip() or 0) if cc.strip().isdigit() else 0,
               current=view.current)
    return d, view


def annotate(ctx: Context, changes: list[Change], w: Any) -> list[Change]:
    """The llama plan with --from: its build change says copy / seed / build and why."""
    src = source_of(ctx)
    if src is None:
        return changes
    for ch in changes:
        if not (isinstance(ch, Call) and ch.data.get("action") == "build"):
            continue
        if w is None:
            ch.description += (f"; then {src.name}'s build if it has the same fingerprint, else a build "
                               f"with a ccache seeded from {src.name}'s")
            continue
        try:
            d, _ = decide_live(_llama().Llama(ctx), src, w)
        except SourceUnavailable as e:
            ch.description += f" ({e}: built here)"
            continue
        ch.data["source"] = {"name": src.name, "action": d.action, "build": d.build, "why": d.why}
        if d.action == "copy":
            ch.description = (f"copy llama.cpp build {d.build} from {src.name} ({d.why}), smoke-test, "
                              f"→ builds/{w.name}")
        else:
            ch.description += f" ({'ccache seeded from ' + src.name if d.action == 'seed' else 'no help from ' + src.name}: {d.why})"
    return changes


# ---------------------------------------------------------------------------------------------
# the paths


def obtain(ll: Any, w: Any, current: str | None) -> dict[str, Any]:
    """The good build `w` in builds/<w.name>: copied from the source, or built (ccache seeded)."""
    src = source_of(ll.ctx)
    if src is None:
        return ll.build(w, current)
    try:
        d, view = decide_live(ll, src, w)
    except SourceUnavailable as e:
        ll.ctx.warn(f"llama: {e}: building here")
        return ll.build(w, current)
    ll.ctx.say(f"llama: {d.summary(src.name)}")
    ll.ctx.facts["transfer.build_path"] = d.action
    if d.action == "copy":
        try:
            return copy_build(ll, src, w, view.builds[d.build], current)
        except (StepError, SourceUnavailable) as e:
            ll.ctx.warn(f"llama: copying {d.build} from {src.name} failed ({e}); building here"
                        + (" with its ccache" if d.seed else f" ({d.seed_why})"))
            ll.ctx.facts["transfer.build_path"] = "seed" if d.seed else "build"
            if not d.seed:
                return ll.build(w, current)
    if d.action in ("copy", "seed") and d.seed:
        seed_ccache(ll, src)
    return ll.build(w, current)


def _free_bytes(ll: Any, where: str) -> int:
    return probe(ll.ctx, [], where)[1]


def _preflight(ll: Any, need: int, where: str, what: str) -> None:
    margin = int(float(ll.cfg["model"]["free_space_margin_gb"]) * 1e9)
    free = _free_bytes(ll, where)
    if need + margin > free:
        raise StepError(f"not enough disk space at {where} for {what}: {human(free)} free, need "
                        f"{human(need)} + {human(margin)} margin (model.free_space_margin_gb)")


def _size(src: SourceRig, paths: list[str]) -> int:
    r = src.run("du -sbc " + " ".join(quote(p) for p in paths) + " 2>/dev/null | tail -n 1", sudo=True,
                check=False)
    parts = r.stdout.split()
    return int(parts[0]) if parts and parts[0].isdigit() else 0


def copy_build(ll: Any, src: SourceRig, w: Any, build: lb.BuildInfo, current: str | None) -> dict[str, Any]:
    """Copy the source's build `build` (the fingerprint w wants), smoke-test it, mark it good."""
    there = f"{src_base(src)}/builds/{build.name}"
    final = f"{ll.builds_dir}/{w.name}"  # = build.name, unless it predates glibc in the fingerprint
    tmp = f"{ll.builds_dir}/.copy-{w.name}"
    need = _size(src, [f"{there}/bin", f"{there}/lib"])
    ll.sh(f"mkdir -p {quote(ll.logs)} {quote(ll.builds_dir)} && rm -rf {quote(tmp)}")
    _preflight(ll, need, ll.builds_dir, f"build {build.name} ({human(need)})")
    run = copy(ll.ctx, src, [TreeItem("build", there, tmp, include=["bin", "lib"], label=f"builds/{build.name}")],
               "llama")
    ll.ctx.facts["transfer.bytes"] = ll.ctx.facts.get("transfer.bytes", 0) + run.bytes
    r = run.results["build"]
    if not r.ok:
        ll.sh(f"rm -rf {quote(tmp)}", check=False)
        raise StepError(r.error)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    log = f"{ll.logs}/llama-copy-{build.name}-{stamp}.log"
    ll.sh(f"{{ echo '== copied from {src.name}:{there} ({run.route})'; }} > {quote(log)}")
    info = dict(build.extra)
    info.update(ll.smoke(w, tmp, log, current))  # raises StepError (and removes tmp) when it fails
    # the record of what it is HERE (the same as there, but for an older record without glibc: the
    # glibc of both rigs is the same, so it joins the fingerprint like for a build made here)
    info.update({"fingerprint": w.fingerprint, "glibc": w.glibc, "name": w.name,
                 "copied_from": f"{src.name}:builds/{build.name}", "copied_at": time.time(),
                 "copy_route": run.route, "copy_seconds": round(run.seconds, 2), "log": log})
    ll.ctx.target.write_file(f"{tmp}/{_llama().GOOD_MARK}", json.dumps(info, indent=2, sort_keys=True) + "\n")
    ll.sh(f"rm -rf {quote(final)} && mv -T {quote(tmp)} {quote(final)}")
    ll.ctx.say(f"llama: {build.name} copied from {src.name} ({human(r.bytes)}, {r.files} files in "
               f"{run.seconds:.1f}s, {run.route}); smoke test passed")
    return info


def seed_ccache(ll: Any, src: SourceRig) -> None:
    """Merge the source's ccache into this rig's (files here are kept). A failure is a warning."""
    there = src_ccache(src)
    try:
        need = _size(src, [there])
        _preflight(ll, need, ll.ccache_dir, f"{src.name}'s ccache ({human(need)})")
        run = copy(ll.ctx, src, [TreeItem("ccache", there, ll.ccache_dir, skip_names=CCACHE_SKIP_NAMES,
                                          skip_dirs=CCACHE_SKIP_DIRS, tolerant=True, skip_existing=True,
                                          label="ccache")], "llama")
    except (StepError, SourceUnavailable) as e:
        ll.ctx.warn(f"llama: could not seed the ccache from {src.name} ({e}); building without it")
        return
    ll.ctx.facts["transfer.bytes"] = ll.ctx.facts.get("transfer.bytes", 0) + run.bytes
    r = run.results["ccache"]
    if r.ok:
        ll.ctx.say(f"llama: ccache seeded from {src.name}: {r.files} files, {human(r.bytes)} in "
                   f"{run.seconds:.1f}s ({run.route})")
    else:
        ll.ctx.warn(f"llama: could not seed the ccache from {src.name} ({r.error}); building without it")
