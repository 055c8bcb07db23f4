"""Getting a commit's files onto the rig and proving them: the hub client's venv, download
(`remote/hf_pull.py`: huggingface_hub ON the rig, Xet where the hub offers it, the token on stdin
only), sha256 of files in parallel (`remote/sha256_files.py`), verified markers, and the repair
loop (a bad file is deleted and fetched again, up to model.max_attempts).

Each piece works on a `store.Work` (a commit's manifest + the directory being filled + the state
key its markers go to), so another source of bytes (a copy from another rig) can fill a work dir
and reuse `verify_files` to mark it verified.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import reach, remote
from ..engine import Context, Run
from ..errors import StepError
from ..progress import Progress, human
from ..target import quote
from .store import RESTART, Work, download_cache

GB = 1_000_000_000


# ---------------------------------------------------------------------------------------------
# the hub client's venv and the helper scripts on the rig


def venv_dir(cfg: dict) -> str:
    return f"{cfg['paths']['prefix'].rstrip('/')}/hf-venv"


def libexec_dir(cfg: dict) -> str:
    return f"{cfg['paths']['prefix'].rstrip('/')}/libexec"


def venv_ok(version: str | None, requirement: str) -> bool:
    if not version:
        return False
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
    try:
        return Requirement(requirement).specifier.contains(Version(version), prereleases=True)
    except (InvalidVersion, ValueError):
        return False


def pip_args(mcfg: dict) -> list[str]:
    """--index-url / --find-links from the inventory (a rig without PyPI); pip ignores a plain-http
    location unless told to trust its host, so an http:// one also gets --trusted-host."""
    from urllib.parse import urlsplit
    args: list[str] = []
    trusted: list[str] = []
    for opt, key in (("--index-url", "pip_index_url"), ("--find-links", "pip_find_links")):
        url = mcfg.get(key)
        if url:
            args += [opt, url]
            u = urlsplit(url)
            if u.scheme == "http" and u.hostname and u.hostname not in trusted:
                trusted.append(u.hostname)
    if mcfg.get("pip_find_links") and not mcfg.get("pip_index_url"):
        args.append("--no-index")
    for h in trusted:
        args += ["--trusted-host", h]
    return args


def venv_commands(cfg: dict) -> list[str]:
    v = venv_dir(cfg)
    req = cfg["model"]["hub_requirement"]
    extra = " ".join(quote(a) for a in pip_args(cfg["model"]))
    return [
        f"test -x {quote(v)}/bin/python || python3 -m venv {quote(v)} || "
        f"{{ rm -rf {quote(v)}; echo 'python3 -m venv failed: install python3-venv (the system step does)' >&2; exit 1; }}",
        f"{quote(v)}/bin/python -m pip install --disable-pip-version-check -q {extra} {quote(req)}".replace("  ", " "),
    ]


@dataclass
class PipVenv(Run):
    """The rig's venv with huggingface_hub: pip on the rig; an index/wheelhouse it cannot reach
    is one line naming it."""

    pip: dict = field(default_factory=dict)  # the model section's pip settings (for the message)

    def apply(self, ctx: Context) -> None:
        for c in self.commands:
            r = ctx.target.run(c, sudo=self.sudo, timeout=self.timeout, check=False)
            if not r.ok:
                out = r.stdout + "\n" + r.stderr
                why = reach.pip_unreachable(ctx.host.name, out, self.pip)
                tail = [ln.strip() for ln in out.splitlines() if ln.strip()][-1:] or [f"exit {r.exited}"]
                raise StepError(why or f"python venv {venv_dir(ctx.cfg)} on {ctx.host.name}: {tail[0][:300]}")


def venv_change(cfg: dict) -> PipVenv:
    """The plan's change that makes the venv (also the --from copy's hub fallback)."""
    return PipVenv(f"python venv {venv_dir(cfg)} with {cfg['model']['hub_requirement']}",
                   commands=venv_commands(cfg), timeout=1800,
                   pip={k: cfg["model"][k] for k in ("pip_index_url", "pip_find_links")})


def pip_probe(ctx: Context) -> None:
    """--check, when the venv would be made: can the rig reach where pip downloads from? (a GET;
    without python3 yet -- the system step installs it -- there is nothing to probe with)."""
    url = reach.pip_probe_url(ctx.cfg["model"])
    r = ctx.target.run(reach.url_probe_command(url), check=False, timeout=60)
    why = reach.parse_url_probe(r.stdout + "\n" + r.stderr) if r.exited != 127 else None
    if why:
        raise StepError(f"{reach.pip_where(ctx.cfg['model'])} unreachable from {ctx.host.name}: {why}")


def ensure_script(ctx: Any, name: str) -> str:
    """Install a helper script on the rig if it is missing or different; return its path."""
    path = f"{libexec_dir(ctx.cfg)}/{name}"
    key = f"model.script.{name}"
    if ctx.facts.get(key) != path:
        if ctx.target.sha256(path, sudo=True) != remote.sha(name):
            ctx.target.write_file(path, remote.source(name), mode=0o755)
        ctx.facts[key] = path
    return path


# ---------------------------------------------------------------------------------------------
# progress of the remote scripts (their JSON lines)


class EventFeed:
    """hf_pull.py / sha256_files.py events -> the shared progress display."""

    def __init__(self, prog: Progress, verb: str):
        self.prog = prog
        self.verb = verb

    @staticmethod
    def _name(path: str) -> str:
        return path.rsplit("/", 1)[-1]

    def __call__(self, line: str) -> None:
        line = line.strip()
        if not line.startswith("{"):
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        kind, path = ev.get("event"), ev.get("path", "")
        p = self.prog
        if kind == "start":
            p.add(path, self._name(path), ev.get("size"))
            if p.bar is None:
                p.say(f"{self.verb} {self._name(path)} ({human(ev.get('size'))})")
        elif kind == "progress":
            p.update(path, int(ev.get("bytes") or 0), ev.get("total"))
        elif kind in ("done", "hashed"):
            size = int(ev.get("size") or 0)
            secs = float(ev.get("seconds") or 0) or p.seconds(path)
            p.complete(path, size)
            if kind == "done":
                got = int(ev.get("fetched") or 0)
                via = f" via Xet ({human(size)} file)" if ev.get("xet") else ""
                p.say(f"fetched {self._name(path)}: {human(got)} in {secs:.1f}s "
                      f"({human(got / max(secs, 1e-6))}/s){via}")
        elif kind == "error":
            p.say(f"{self._name(path)}: ERROR {ev.get('type', '')}: {ev.get('error', '')}")


# ---------------------------------------------------------------------------------------------
# download


def download_settings(cfg: dict, n_files: int) -> tuple[int, dict[str, str]]:
    """(workers, environment) for hf_pull: one worker per file unless model.download_workers says
    otherwise; Xet's knobs from the inventory. Xet itself is never switched off: the client uses
    it where the hub offers it and plain HTTP elsewhere."""
    m = cfg["model"]
    workers = int(m.get("download_workers") or max(1, n_files))
    env = {"HF_HOME": f"{cfg['paths']['prefix'].rstrip('/')}/hf-home"}
    if m.get("xet_high_performance"):
        env["HF_XET_HIGH_PERFORMANCE"] = "1"
    cache = int(float(m.get("xet_chunk_cache_gb") or 0) * GB)
    env["HF_XET_CHUNK_CACHE_SIZE_BYTES"] = str(cache)
    return workers, env


def run_pull(ctx: Any, work: Work, files: list[dict], token: str | None) -> dict[str, dict]:
    """hf_pull.py in the rig's venv into work.dir; the token travels on stdin only.
    Returns path -> done/error event; raises StepError unless every file arrived."""
    script = ensure_script(ctx, "hf_pull.py")
    m = ctx.cfg["model"]
    workers, env = download_settings(ctx.cfg, len(files))
    cfg = {"repo_id": work.man["repo"], "revision": work.man["commit"], "local_dir": work.dir,
           "files": [{"path": f["path"], "size": f["size"]} for f in files], "token": token,
           "endpoint": m["endpoint"], "workers": workers, "progress_s": 1.0, "env": env}
    py = f"{venv_dir(ctx.cfg)}/bin/python"
    t0 = time.monotonic()
    with Progress(ctx, "model", "bytes") as prog:
        r = ctx.target.run(f"{quote(py)} {quote(script)}", sudo=True, stdin=json.dumps(cfg) + "\n",
                           on_stdout=EventFeed(prog, "downloading"), check=False)
    events: dict[str, dict] = {}
    summary: dict = {}
    for ln in r.stdout.splitlines():
        if ln.startswith("{"):
            ev = json.loads(ln)
            if ev.get("event") in ("done", "error"):
                events[ev["path"]] = ev
            if ev.get("event") == "summary":
                summary = ev
    bad = [p for p in (f["path"] for f in files) if events.get(p, {}).get("event") != "done"]
    net = [events[p] for p in bad if re.search(r"Connect|Timeout|Network|Transport|LocalEntryNotFound",
                                                events.get(p, {}).get("type", ""))]
    if bad and len(net) == len(bad):  # every failure is the hub not answering: one line naming it
        e = net[0]
        raise StepError(f"the hub {m['endpoint'] or 'https://huggingface.co'} unreachable from "
                        f"{ctx.host.name} (downloading {len(bad)} file(s)): {e.get('type')}: "
                        f"{str(e.get('error'))[:200]}")
    if bad:
        why = "; ".join(f"{p.rsplit('/', 1)[-1]}: {events.get(p, {}).get('error') or 'no result'}" for p in bad[:3])
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        raise StepError(f"download of {len(bad)} file(s) failed (exit {r.exited}): {why}"
                        + (f" [{tail[-200:]}]" if tail and not events else ""))
    fetched = int(summary.get("fetched") or 0)
    secs = time.monotonic() - t0
    ctx.say(f"model: downloaded {len(files)} file(s), {human(fetched)} in {secs:.1f}s "
            f"({human(fetched / max(secs, 1e-6))}/s), {workers} worker(s){transport(summary)}")
    ctx.facts["model.fetched_bytes"] = ctx.facts.get("model.fetched_bytes", 0) + fetched
    ctx.facts["model.pull_summary"] = summary
    return events


def transport(summary: dict) -> str:
    """How hf_pull's client moved the bytes, in words (from its summary event)."""
    if summary.get("xet_disabled"):
        return ", plain HTTP (Xet switched off on the rig by HF_HUB_DISABLE_XET)"
    if summary.get("xet"):
        return ", over Xet"
    if summary.get("xet") is False:
        have = "hf_xet installed" if summary.get("xet_available") else "hf_xet not installed"
        return f", plain HTTP ({have}; the hub offered no Xet)"
    return ""


def remove_files(ctx: Any, d: str, paths: list[str]) -> None:
    """Delete files of a work dir and their huggingface_hub metadata (so the client fetches them
    again). A hard link only loses this name: other copies keep their bytes."""
    if not paths:
        return
    args = []
    for p in paths:
        args += [f"{d}/{p}", f"{download_cache(d)}/{p}.metadata", f"{download_cache(d)}/{p}.lock"]
    ctx.target.run("rm -f -- " + " ".join(quote(a) for a in args), sudo=True)


def clean_debris(ctx: Any, dirs: list[str]) -> int:
    """Remove *.incomplete files that an interrupted download left in these dirs' caches."""
    r = ctx.target.run(" ; ".join(f"if [ -d {quote(download_cache(d))} ]; then find {quote(download_cache(d))} "
                                  f"-type f -name '*.incomplete' -print -delete; fi" for d in dirs) + "; true",
                       sudo=True)
    return len([ln for ln in r.stdout.splitlines() if ln.strip()])


# ---------------------------------------------------------------------------------------------
# hashing, markers, the repair loop


def hash_files(ctx: Any, paths: list[str]) -> dict[str, dict]:
    """sha256 of absolute paths on the rig, in parallel; returns path -> hashed/error event."""
    if not paths:
        return {}
    script = ensure_script(ctx, "sha256_files.py")
    workers = int(ctx.cfg["model"]["hash_workers"])
    cfg = {"paths": paths, "workers": workers, "progress_s": 5.0}
    with Progress(ctx, "model", "bytes") as prog:
        r = ctx.target.run(f"python3 {quote(script)}", sudo=True, stdin=json.dumps(cfg) + "\n",
                           on_stdout=EventFeed(prog, "hashing"), check=False)
    out: dict[str, dict] = {}
    for ln in r.stdout.splitlines():
        if ln.startswith("{"):
            ev = json.loads(ln)
            if ev.get("event") in ("hashed", "error"):
                out[ev["path"]] = ev
    missing = [p for p in paths if p not in out]
    if missing:
        raise StepError(f"hashing on the rig failed (exit {r.exited}) for {len(missing)} file(s): "
                        f"{(r.stderr.strip() or r.stdout.strip())[-300:]}")
    return out


def record(ctx: Any, work: Work) -> dict:
    """The state record that holds `work`'s markers (a copy; `save` writes it back)."""
    st = dict(ctx.state.get(work.key) or {})
    st["verified"] = dict(st.get("verified") or {})
    return st


def save(ctx: Any, work: Work, st: dict) -> None:
    ctx.state.set(work.key, st)


def drop_markers(ctx: Any, work: Work, paths: list[str]) -> None:
    st = record(ctx, work)
    if any(p in st["verified"] for p in paths):
        st["verified"] = {p: mk for p, mk in st["verified"].items() if p not in paths}
        save(ctx, work, st)


def verify_files(ctx: Any, work: Work, todo: list[dict], attempts: dict[str, int], refetch: bool,
                 token: Callable[[], str | None] = lambda: None) -> list[str]:
    """Hash `todo` in work.dir; record markers for the good ones. With `refetch`, a mismatching file
    is deleted (with its .metadata) and fetched again, up to model.max_attempts in all; else it is
    reported. Returns the paths that are still bad (only when not refetching)."""
    max_attempts = int(ctx.cfg["model"]["max_attempts"])
    pending = list(todo)
    while pending:
        t0 = time.monotonic()
        res = hash_files(ctx, [f"{work.dir}/{f['path']}" for f in pending])
        st = record(ctx, work)
        bad: list[tuple[dict, str]] = []
        hashed = 0
        for f in pending:
            ev = res[f"{work.dir}/{f['path']}"]
            if ev["event"] == "error":
                bad.append((f, f"cannot read: {ev['error']}"))
                continue
            hashed += int(ev["size"])
            if ev["sha256"] == f["sha256"] and int(ev["size"]) == f["size"] and not ev.get("changed_while_hashing"):
                st["verified"][f["path"]] = {"size": int(ev["size"]), "mtime_ns": int(ev["mtime_ns"]),
                                             "sha256": ev["sha256"]}
                ctx.say(f"model: verified {f['path'].rsplit('/', 1)[-1]} ({human(ev['size'])}, "
                        f"{ev['seconds']:.1f}s)")
            else:
                st["verified"].pop(f["path"], None)
                bad.append((f, f"sha256 {ev['sha256'][:12]}… size {ev['size']}, expected "
                               f"{f['sha256'][:12]}… size {f['size']}"))
        save(ctx, work, st)
        secs = time.monotonic() - t0
        ctx.facts["model.hashed_bytes"] = ctx.facts.get("model.hashed_bytes", 0) + hashed
        ctx.say(f"model: hashed {len(pending)} file(s), {hashed} bytes ({human(hashed)}) in {secs:.1f}s"
                f" ({human(hashed / max(secs, 1e-6))}/s)")
        if not bad:
            return []
        for f, why in bad:
            ctx.warn(f"model: {f['path']}: MISMATCH: {why}")
        if not refetch:
            return [f["path"] for f, _ in bad]
        over = [f for f, _ in bad if attempts.get(f["path"], 0) + 1 > max_attempts]
        if over:
            f = over[0]
            raise StepError(f"{f['path']}: sha256 still wrong after {attempts.get(f['path'], 0)} download "
                            f"attempt(s) (model.max_attempts = {max_attempts}): "
                            + dict((b[0]['path'], b[1]) for b in bad)[f["path"]]
                            + " — the hub or the network corrupts this file; it was left in "
                            + ("place, unverified" if work.kind == "current" else
                               f"{work.label}, unverified (the model in service is untouched)"))
        refetch_files = [f for f, _ in bad]
        if work.kind == "current":
            ctx.state.owe(RESTART)  # the copy in service changes under the server
        remove_files(ctx, work.dir, [f["path"] for f in refetch_files])
        clean_debris(ctx, [work.dir])
        for f in refetch_files:
            attempts[f["path"]] = attempts.get(f["path"], 0) + 1
        ctx.say(f"model: re-fetching {len(refetch_files)} file(s): "
                + ", ".join(f"{f['path'].rsplit('/', 1)[-1]} (attempt {attempts[f['path']]})" for f in refetch_files))
        run_pull(ctx, work, refetch_files, token())
        pending = refetch_files
    return []
