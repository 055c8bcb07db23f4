"""`llama`: clone/fetch llama.cpp, resolve `llama_cpp.ref` to a commit, build it with the flags
the inventory asks for into a versioned directory, smoke-test it, switch `current` atomically,
keep the last `keep_builds` builds. `invoke llama.build|update|rollback|status`: provision/llama_tasks.py.

Layout on the rig (see docs/ARCHITECTURE.md):
  <prefix>/llama.cpp/src                      git clone (full history: real build numbers)
  <prefix>/llama.cpp/builds/b<N>-<sha7>-<fp8>/ one build; `llama-rig-build.json` marks it good
  <prefix>/llama.cpp/current -> builds/...     what the service runs (current/bin/llama-server)
  <prefix>/ccache                              ccache directory shared by every build
  <state_dir>/logs/llama-build-*.log           full configure + build logs

`ref` is resolved on every run: a branch (default `master`) that moved means a new build on the
next `invoke provision`; pin a tag (b6895 / v0.5.0) or a 40-hex commit to freeze the version.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import llama_build as lb
from .. import llama_cuda_subset as cuda_subset
from .. import reach, sections, values
from ..engine import Call, Change, Context, Step
from ..errors import CommandError, StepError, UnsafeValue
from ..facts import host as hostfacts
from ..target import join, quote
from ..transfer import build_copy

NOTIFY = ("llama-server.restart",)
GOOD_MARK = "llama-rig-build.json"
LOG_TAIL = 20
GIT = "git -c advice.detachedHead=false"


# ---------------------------------------------------------------------------------------------
# what is on the rig


@dataclass
class RigView:
    """The llama.cpp side of a rig, read with one command."""

    current: str | None = None  # build name `current` points at
    src_url: str | None = None  # origin of the clone (None: no clone)
    builds: dict[str, lb.BuildInfo] = field(default_factory=dict)  # good builds by name

    def with_fingerprint(self, fp: str) -> lb.BuildInfo | None:
        for b in self.builds.values():
            if b.fingerprint == fp:
                return b
        return None

    def match(self, w: "Want") -> lb.BuildInfo | None:
        """The good build that IS `w`: the same fingerprint, or a build made before glibc joined
        the fingerprint (no `glibc` in its record) whose fingerprint without glibc is w's -- on
        its own rig glibc only moved forward since, and a binary runs on a newer glibc."""
        have = self.with_fingerprint(w.fingerprint)
        if have is None and w.glibc and w.legacy_fingerprint:
            have = next((b for b in self.builds.values()
                         if "glibc" not in b.extra and b.fingerprint == w.legacy_fingerprint), None)
        return have


def view_script(base: str) -> str:
    b = quote(base)
    return "; ".join([
        f"echo '@@current'; readlink {b}/current 2>/dev/null",
        f"echo '@@src'; [ -d {b}/src/.git ] && {{ git -C {b}/src remote get-url origin 2>/dev/null || echo '-'; }}",
        f"echo '@@builds'; for f in {b}/builds/*/{GOOD_MARK}; do [ -f \"$f\" ] || continue; "
        "echo \"@@b $(basename \"$(dirname \"$f\")\")\"; cat \"$f\"; echo; done",
        "true",
    ])


def parse_view(output: str) -> RigView:
    v = RigView()
    chunks: dict[str, list[str]] = {}
    for s in sections.parse(output, ("current", "src", "builds", "b")):
        line = next((ln.strip() for ln in s.lines if ln.strip()), "")
        if s.name == "current" and line:
            v.current = line.rstrip("/").split("/")[-1]
        elif s.name == "src" and line:
            v.src_url = line
        elif s.name == "b" and s.arg:
            chunks[s.arg] = s.lines
    for name, lines in chunks.items():
        try:
            d = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            continue
        if not isinstance(d, dict) or not d.get("fingerprint"):
            continue
        v.builds[name] = lb.BuildInfo(name, d["fingerprint"], d.get("commit", ""),
                                      d.get("build_number"), float(d.get("built_at", 0)), d)
    return v


# ---------------------------------------------------------------------------------------------
# what the inventory wants


@dataclass
class Want:
    commit: str
    tree: lb.TreeFacts
    build_number: int | None
    archs: list[str]
    targets: list[str]
    missing_targets: list[str]
    args: list[str]
    gcc: str | None
    nvcc: str | None
    fingerprint: str
    name: str
    summary: str  # "CUDA 86, FA all quants"
    glibc: str | None = None
    legacy_fingerprint: str | None = None  # the same without glibc (see RigView.match)

    def record(self) -> dict[str, Any]:
        return {"commit": self.commit, "build_number": self.build_number, "archs": self.archs,
                "targets": self.targets, "cmake_args": self.args, "gcc": self.gcc,
                "nvcc": self.nvcc, "glibc": self.glibc, "fingerprint": self.fingerprint,
                "name": self.name}


def want(cfg: dict, commit: str, tree: lb.TreeFacts, compute_caps: list[str | None],
         gcc: str | None, nvcc: str | None, ref: str | None = None, glibc: str | None = None) -> Want:
    """Pure: the build the inventory asks for, given the tree and the box."""
    lc = cfg["llama_cpp"]
    archs = lb.gpu_archs(lc["cuda_architectures"], compute_caps) if lc["cuda"] else []
    number = tree.commit_count
    pass_number = pass_commit = None
    if tree.shallow or number is None:
        # a shallow clone cannot count commits: take the number from a bNNNN tag if we can
        if ref and ref.startswith("b") and ref[1:].isdigit():
            number = int(ref[1:])
        pass_number = number if number is not None else 0
        pass_commit = commit[:9]
    targets, missing = lb.build_targets(cfg, tree)
    args = lb.cmake_args(cfg, tree, archs, pass_number, pass_commit)
    nv = nvcc if lc["cuda"] else None
    fp = lb.fingerprint(commit, args, gcc, nv, archs, targets, glibc)
    return Want(commit, tree, number, archs, targets, missing, args, gcc, nv, fp,
                lb.build_dir_name(number, commit, fp), lb.describe(cfg, tree, archs), glibc,
                lb.fingerprint(commit, args, gcc, nv, archs, targets))


def plan(cfg: dict, view: RigView, w: Want | None, commit: str | None,
         build: Callable[[Context], None] | None = None,
         switch: Callable[[Context], None] | None = None) -> list[Change]:
    """Pure: facts in, changes out. `w` is None when the wanted commit is not in the clone yet
    (it has to be fetched first, so it cannot have a build)."""
    base = "builds/"
    if w is None:
        what = commit[:7] if commit else cfg["llama_cpp"]["ref"]
        desc = (f"fetch and build llama.cpp {cfg['llama_cpp']['ref']} @ {what} → {base}b?-{what}-…" if commit
                else f"clone and build llama.cpp {cfg['llama_cpp']['ref']} (no git on the box yet: "
                     "the commit is resolved after the system step installs it)")
        return [Call(desc,
                     fn=build, data={"action": "build", "commit": commit, "name": None},
                     notify=NOTIFY)]
    have = view.match(w)
    if have is not None:
        if view.current == have.name:
            return []
        return [Call(f"switch llama.cpp current → {base}{have.name} (already built)", fn=switch,
                     data={"action": "switch", "commit": w.commit, "name": have.name,
                           "fingerprint": w.fingerprint}, notify=NOTIFY)]
    return [Call(f"build llama.cpp b{w.build_number}-{w.commit[:7]} ({w.summary}) → {base}{w.name}",
                 fn=build, data={"action": "build", "commit": w.commit, "name": w.name,
                                 "fingerprint": w.fingerprint, "cmake_args": w.args,
                                 "targets": w.targets}, notify=NOTIFY)]


# ---------------------------------------------------------------------------------------------
# progress on the control machine


class Progress:
    """[n/N] from ninja through the shared display (provision/progress.py): a rich bar on a TTY,
    a plain line every 10 % otherwise."""

    def __init__(self, ctx: Context, label: str):
        from ..progress import Progress as Display
        self.compiled = 0
        self.label = label
        self.display = Display(ctx, "llama", "steps", transient=True).__enter__()
        self.display.add(label, f"[{ctx.host.name}] {label}" if self.display.bar is not None else label)

    def __call__(self, line: str) -> None:
        p = lb.ninja_progress(line)
        if p is None:
            return
        n, total, desc = p
        if lb.is_compile(desc):
            self.compiled += 1
        self.display.update(self.label, n, total)

    def close(self) -> None:
        self.display.close()


# ---------------------------------------------------------------------------------------------
# the work on the rig


@dataclass
class Outcome:
    name: str
    commit: str
    built: bool = False
    switched: bool = False
    previous: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _git_reach(fn):
    """A clone/fetch that cannot reach the remote is one line naming it."""
    @functools.wraps(fn)
    def wrapped(self: "Llama", *a, **kw):
        try:
            return fn(self, *a, **kw)
        except CommandError as e:
            if " clone " in f" {e.command} " or " fetch " in f" {e.command} ":
                raise StepError(reach.git_unreachable(self.ctx.host.name, self.lc["repo"],
                                                      e.stderr or e.stdout)) from None
            raise
    return wrapped


class Llama:
    """Everything the step and the tasks do on one rig."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.lc = ctx.cfg["llama_cpp"]
        prefix = ctx.cfg["paths"]["prefix"].rstrip("/")
        self.base = f"{prefix}/llama.cpp"
        self.src = f"{self.base}/src"
        self.builds_dir = f"{self.base}/builds"
        self.ccache_dir = f"{prefix}/ccache"
        self.logs = f"{ctx.cfg['paths']['state_dir'].rstrip('/')}/logs"

    # -- helpers ---------------------------------------------------------------------------
    def sh(self, cmd: str, **kw):
        return self.ctx.target.run(cmd, sudo=True, **kw)

    def git(self, args: str, **kw):
        return self.sh(f"{GIT} -C {quote(self.src)} {args}", **kw)

    @property
    def ccache_env(self) -> dict[str, str]:
        # basedir = the llama.cpp dir, so paths into src AND into the (new) build dir are relative
        return {"CCACHE_DIR": self.ccache_dir, "CCACHE_BASEDIR": self.base}

    def build_env(self) -> dict[str, str]:
        """ccache, and for CUDA where the toolkit is. NVIDIA's packages do not put nvcc on a
        non-login shell's PATH, and CMake finds the CUDA compiler only through CUDACXX,
        CMAKE_CUDA_COMPILER, PATH or $CUDA_PATH/bin: the toolkit's location is a fact (the facts
        look on PATH, in /usr/local/cuda and /usr/local/cuda-*), handed to CMake here."""
        env = dict(self.ccache_env)
        if self.lc["cuda"]:
            hf = hostfacts.host_facts(self.ctx)
            if not hf.nvcc_path:
                raise StepError("llama_cpp.cuda is on but there is no nvcc on this host (looked on "
                                "PATH, in /usr/local/cuda/bin and /usr/local/cuda-*/bin): the system "
                                "step installs system.cuda_toolkit")
            env["CUDACXX"] = hf.nvcc_path
            if hf.cuda_home:
                env["CUDAToolkit_ROOT"] = hf.cuda_home
        return env

    def view(self) -> RigView:
        return parse_view(self.sh(view_script(self.base), check=False).stdout)

    # -- source ----------------------------------------------------------------------------
    def source(self) -> tuple[str, str]:
        """llama_cpp.repo and .ref, checked again (the inventory did already): a repo or ref that
        git could read as an option never reaches a command line."""
        repo, ref = self.lc["repo"], self.lc["ref"]
        for key, err in (("repo", values.git_url(repo)), ("ref", values.git_ref(ref))):
            if err:
                raise UnsafeValue(f"llama_cpp.{key}: {err}")
        return repo, ref

    def resolve_readonly(self, view: RigView) -> str | None:
        """The commit `ref` names now, without changing the box (ls-remote / the clone)."""
        repo, ref = self.source()
        kind = lb.ref_kind(ref)
        if kind == "commit":
            return ref
        r = self.sh(f"git ls-remote -- {quote(repo)} {quote(ref)} {quote(ref + '^{}')}",
                    check=False, timeout=120)
        sha = lb.parse_ls_remote(r.stdout, ref) if r.ok else None
        if sha:
            return sha
        if view.src_url:
            local = self.resolve_local(ref)
            if local:
                return local
        if r.exited == 127 and self.ctx.check:
            return None  # no git yet on a bare box: the system step installs it before this step
        if r.exited == 127:
            raise StepError("git is not installed on this host (the system step installs it: "
                            "keep git in system.packages)")
        if not r.ok:
            raise StepError(reach.git_unreachable(self.ctx.host.name, self.lc["repo"], r.stderr))
        raise StepError(f"llama_cpp.ref {ref!r} not found in {self.lc['repo']}")

    def resolve_local(self, ref: str) -> str | None:
        for rev in lb.local_rev(ref):
            r = self.git(f"rev-parse -q --verify {quote(rev + '^{commit}')}", check=False)
            if r.ok and lb.SHA_RE.match(r.stdout.strip()):
                return r.stdout.strip()
        return None

    def has_commit(self, sha: str) -> bool:
        return self.git(f"cat-file -e {quote(sha + '^{commit}')}", check=False).ok

    @_git_reach
    def sync(self, view: RigView) -> str:
        """Clone or fetch, resolve ref, check the commit out. Returns the 40-hex commit."""
        repo, ref = self.source()
        if view.src_url is None:
            self.ctx.say(f"llama: cloning {repo} (full history, for real build numbers)")
            self.sh(f"mkdir -p {quote(self.base)} && rm -rf {quote(self.src)} && "
                    f"git clone -q --no-checkout -- {quote(repo)} {quote(self.src)}", timeout=7200)
        else:
            if view.src_url != repo:
                self.git(f"remote set-url -- origin {quote(repo)}")
            self.git("fetch -q --prune --tags --force origin "
                     "'+refs/heads/*:refs/remotes/origin/*'", timeout=3600)
        sha = self.resolve_local(ref)
        if sha is None and lb.ref_kind(ref) == "commit":
            self.git(f"fetch -q -- origin {quote(ref)}", check=False, timeout=3600)
            sha = self.resolve_local(ref)
        if sha is None:
            raise StepError(f"llama_cpp.ref {ref!r} not found in {repo}")
        self.git(f"checkout -q --detach --force {sha}")
        self.git("clean -q -ffdx")
        return sha

    def glibc(self) -> str | None:
        return self.ctx.fact("llama.glibc", lambda: lb.parse_glibc(self.sh(lb.GLIBC_CMD, check=False).stdout))

    def tree(self, sha: str) -> lb.TreeFacts:
        return lb.parse_tree(self.sh(lb.tree_script(self.src, sha), check=False).stdout)

    def want(self, sha: str) -> Want:
        hf = hostfacts.host_facts(self.ctx)
        caps: list[str | None] = []
        if self.lc["cuda"] and self.lc["cuda_architectures"] in ("auto", None):
            gf = hostfacts.gpu(self.ctx)
            caps = [g.compute_cap for g in gf.gpus]
        try:
            return want(self.cfg, sha, self.tree(sha), caps, hf.gcc_version, hf.nvcc_version,
                        self.lc["ref"], self.glibc())
        except lb.BuildConfigError as e:
            raise StepError(str(e)) from None

    # -- build -----------------------------------------------------------------------------
    def ccache_stats(self) -> dict[str, int]:
        r = self.sh("command -v ccache >/dev/null && ccache --print-stats", env=self.ccache_env,
                    check=False)
        return lb.parse_ccache_stats(r.stdout) if r.ok else {}

    def log_tail(self, log: str, n: int = LOG_TAIL) -> list[str]:
        r = self.sh(f"tail -n {n} {quote(log)}", check=False)
        return r.stdout.splitlines()

    def fail(self, what: str, log: str, current: str | None, detail: str = "") -> None:
        self.ctx.console.line(f"[{self.ctx.host.name}] llama: last lines of {log}:")
        for ln in self.log_tail(log):
            self.ctx.console.line(f"[{self.ctx.host.name}]   | {ln}")
        raise StepError(f"{what}{': ' + detail if detail else ''} — current unchanged "
                        f"({current or 'none'}); full log on the rig: {log}")

    def build(self, w: Want, current: str | None) -> dict[str, Any]:
        """Fresh build dir + fresh cache, configure, build, smoke-test, mark good."""
        d = f"{self.builds_dir}/{w.name}"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        log = f"{self.logs}/llama-build-{w.name}-{stamp}.log"
        hf = hostfacts.host_facts(self.ctx)
        jobs = self.lc["jobs"] or hf.cpus or None
        if w.missing_targets:
            self.ctx.warn(f"llama: this tree has no {', '.join(w.missing_targets)}; not building it")
        self.sh(f"mkdir -p {quote(self.logs)} {quote(self.builds_dir)} {quote(self.ccache_dir)} && "
                f"rm -rf {quote(d)} && mkdir -p {quote(d)} && : > {quote(log)}")
        before = self.ccache_stats()
        env = self.build_env()
        t0 = time.monotonic()
        args, subset_info = w.args, None
        if self.lc["cuda"] and cuda_subset.CI_CUDA_SUBSET is not None:  # test seam, see there
            subset_info = cuda_subset.build(self, w, d, log, current, env)
            args = want(cuda_subset.cpu_cfg(self.cfg), w.commit, w.tree, [], w.gcc, None,
                        self.lc["ref"]).args
        configure = f"cmake -S {quote(self.src)} -B {quote(d)} {join(args)}"
        self.ctx.say(f"llama: configure {w.name} ({w.summary})")
        r = self.sh(f"{configure} >> {quote(log)} 2>&1", env=env, check=False,
                    timeout=3600)
        if not r.ok:
            self.sh(f"rm -rf {quote(d)}", check=False)
            self.fail(f"configure of {w.name} failed (exit {r.exited})", log, current)
        t_conf = time.monotonic() - t0
        prog = Progress(self.ctx, f"build {w.name}")
        build_cmd = (f"cmake --build {quote(d)} --target {join(w.targets)}"
                     + (f" -j {int(jobs)}" if jobs else ""))
        script = f"set -o pipefail; {build_cmd} 2>&1 | tee -a {quote(log)}"
        t1 = time.monotonic()
        try:
            r = self.sh(f"bash -c {quote(script)}", env=env, check=False,
                        on_stdout=prog, timeout=None)
        finally:
            prog.close()
        t_build = time.monotonic() - t1
        if not r.ok:
            self.sh(f"rm -rf {quote(d)}", check=False)
            self.fail(f"build of {w.name} failed (exit {r.exited})", log, current)
        after = self.ccache_stats()
        info = self.smoke(w, d, log, current)
        info.update(w.record())
        info.update({"built_at": time.time(), "configure_seconds": round(t_conf, 2),
                     "build_seconds": round(t_build, 2), "compiled": prog.compiled,
                     "ccache": lb.stats_delta(before, after) if before and after else {},
                     "log": log, "ref": self.lc["ref"], "repo": self.lc["repo"]})
        if subset_info is not None:
            info["ci_cuda_subset"] = subset_info
        self.ctx.target.write_file(f"{d}/{GOOD_MARK}", json.dumps(info, indent=2, sort_keys=True) + "\n")
        cc = info["ccache"]
        self.ctx.say(f"llama: built {w.name} in {t_conf + t_build:.0f}s ({prog.compiled} objects compiled"
                     + (f", ccache {cc['hits']} hits / {cc['misses']} misses" if cc else "") + ")")
        return info

    def smoke(self, w: Want, d: str, log: str, current: str | None) -> dict[str, Any]:
        """`--version` names what we built; every service flag is in `--help`."""
        exe = quote(f"{d}/bin/llama-server")
        r = self.sh(f"{exe} --version", check=False, timeout=120)
        text = r.stderr + "\n" + r.stdout
        self.sh(f"{{ echo '== smoke test: llama-server --version'; cat; }} >> {quote(log)}",
                stdin=text, check=False)
        try:
            parsed = lb.parse_version(text)
        except ValueError as e:
            self.sh(f"rm -rf {quote(d)}", check=False)
            self.fail(f"smoke test of {w.name} failed", log, current, str(e))
        if not lb.version_matches(parsed, w.build_number, w.commit):
            self.sh(f"rm -rf {quote(d)}", check=False)
            self.fail(f"smoke test of {w.name} failed", log, current,
                      f"--version says build {parsed[0]}, commit {parsed[1]}; built "
                      f"b{w.build_number}-{w.commit[:9]}")
        h = self.sh(f"{exe} --help", check=False, timeout=120)
        missing = lb.missing_flags(h.stdout + "\n" + h.stderr, lb.server_flags(self.cfg))
        if missing:
            self.sh(f"rm -rf {quote(d)}", check=False)
            self.fail(f"smoke test of {w.name} failed", log, current,
                      f"llama-server --help lacks {' '.join(missing)} (used by the service)")
        version_line = next((ln.strip() for ln in text.splitlines() if "version:" in ln), "")
        return {"version": version_line, "version_build": parsed[0], "version_commit": parsed[1]}

    # -- switch / prune / state ------------------------------------------------------------
    def switch(self, name: str) -> None:
        tmp = f".current.llama-rig-{int(time.time() * 1000)}"
        self.sh(f"cd {quote(self.base)} && test -f {quote(f'builds/{name}/{GOOD_MARK}')} && "
                f"ln -sfn {quote('builds/' + name)} {quote(tmp)} && mv -T {quote(tmp)} current")
        self.ctx.say(f"llama: current → builds/{name}")

    def prune(self, current: str, previous: str | None) -> list[str]:
        v = self.view()
        gone = lb.prune(list(v.builds.values()), self.lc["keep_builds"], current, previous)
        if gone:
            self.sh("rm -rf " + " ".join(quote(f"{self.builds_dir}/{n}") for n in gone))
            self.ctx.say(f"llama: removed old builds: {', '.join(gone)}")
        return gone

    def record(self, current: str, previous: str | None) -> None:
        v = self.view()
        b = v.builds.get(current)
        d = b.extra if b else {}
        self.ctx.state.set("llama", {
            "current": current, "build_dir": f"{self.builds_dir}/{current}",
            "commit": d.get("commit"), "build_number": d.get("build_number"),
            "fingerprint": d.get("fingerprint"), "cmake_args": d.get("cmake_args"),
            "gcc": d.get("gcc"), "nvcc": d.get("nvcc"), "glibc": d.get("glibc"), "archs": d.get("archs"),
            "targets": d.get("targets"), "ref": self.lc["ref"], "repo": self.lc["repo"],
            "previous": previous if previous in v.builds else None,
            "builds": sorted(v.builds, key=lambda n: v.builds[n].built_at),
        })

    # -- the whole thing -------------------------------------------------------------------
    def ensure(self, view: RigView | None = None, sha: str | None = None) -> Outcome:
        """Sync, and build + switch unless a good build with the wanted fingerprint is current."""
        view = view or self.view()
        if sha is None:
            sha = self.sync(view)
        w = self.want(sha)
        have = view.match(w)
        previous = view.current
        if have is not None:
            out = Outcome(have.name, sha, previous=previous, info=have.extra)
            if view.current != have.name:
                self.switch(have.name)
                out.switched = True
                self.record(have.name, previous)
            elif self.ctx.state.get("llama", {}).get("current") != have.name:
                self.record(have.name, self.ctx.state.get("llama", {}).get("previous"))
            return out
        # [--from SOURCE] the source rig's build of this fingerprint is copied, else its ccache
        # seeds ours (provision/transfer/build_copy.py); without --from this is self.build()
        info = build_copy.obtain(self, w, view.current)
        self.switch(w.name)
        self.prune(w.name, previous)
        self.record(w.name, previous)
        return Outcome(w.name, sha, built=True, switched=True, previous=previous, info=info)


# ---------------------------------------------------------------------------------------------
# the step


class LlamaStep(Step):
    name = "llama"
    title = "llama.cpp source, build, current link"

    def plan(self, ctx: Context) -> list[Change]:
        ll = Llama(ctx)
        view = ll.view()
        sha = ll.resolve_readonly(view)
        w = None
        if sha and view.src_url is not None and ll.has_commit(sha):
            w = ll.want(sha)

        def do_build(c: Context) -> None:
            Llama(c).ensure()

        def do_switch(c: Context) -> None:
            Llama(c).ensure()

        # [--from SOURCE] the plan says whether the build is copied or ccache-seeded, and why
        return build_copy.annotate(ctx, plan(ctx.cfg, view, w, sha, build=do_build, switch=do_switch), w)
