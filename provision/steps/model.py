"""`model`: the GGUF shards of one quant, pinned to a commit, downloaded ON the rig, sha256-verified.

Flow (facts -> plan -> apply):

* resolve on the control machine with huggingface_hub: `model.revision` -> a 40-hex commit sha;
  the files matching `model.include` with size and lfs.sha256. One quant only; a pattern that
  matches nothing is refused with the folders it could have meant. A 40-hex revision is a pin:
  once recorded in host state it is never re-resolved (no hub call at all).
* read the rig (one command): size + mtime_ns of each file, `*.incomplete` debris, the hub venv.
* plan (pure, `plan()`): facts in -> changes out. Nothing missing and every file carrying a valid
  verified marker (size, mtime_ns, sha256 the same as now) -> [] (and 0 bytes hashed).
* apply: preflight free space, venv with huggingface-hub, `hf_pull.py` (token on stdin only),
  `sha256_files.py` in parallel, re-fetch only a shard whose sha256 is wrong (after deleting it and
  its `.metadata`), up to `model.max_attempts`, then stop with a clear error.

Layout on the rig: `<model.dir>/<org>__<name>/<repo path>` (huggingface_hub's local_dir layout,
with its `.cache/huggingface/download/<path>.metadata`), the venv at `<paths.prefix>/hf-venv`, the
helper scripts at `<paths.prefix>/libexec/`.

For the service step: `shard1_path(ctx)` (never an unverified file) and `manifest(ctx)`.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .. import reach, remote
from ..engine import Call, Change, Context, Run, Step
from ..errors import StepError
from ..facts import host as hostfacts
from ..secrets import register
from ..target import quote
from ..transfer import model_copy

RESTART = ("llama-server.restart",)
HEX40 = re.compile(r"^[0-9a-f]{40}$")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
GB = 1_000_000_000
STATE_KEY = "model"


# ---------------------------------------------------------------------------------------------
# small helpers


def human(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def local_dir(cfg: dict) -> str:
    """Where the repo's files live on the rig: <model.dir>/<org>__<name>."""
    return f"{cfg['model']['dir'].rstrip('/')}/{cfg['model']['repo'].replace('/', '__')}"


def venv_dir(cfg: dict) -> str:
    return f"{cfg['paths']['prefix'].rstrip('/')}/hf-venv"


def libexec_dir(cfg: dict) -> str:
    return f"{cfg['paths']['prefix'].rstrip('/')}/libexec"


def hf_cache_dir(cfg: dict) -> str:
    return f"{local_dir(cfg)}/.cache/huggingface/download"


def metadata_path(cfg: dict, path: str) -> str:
    return f"{hf_cache_dir(cfg)}/{path}.metadata"


# ---------------------------------------------------------------------------------------------
# token (control machine only)


def load_token(mcfg: dict, environ: dict[str, str] | None = None) -> str | None:
    """`model.token_file` (on the control machine) wins, else the env var named by `model.token_env`.
    Registered with the redactor; never printed."""
    environ = os.environ if environ is None else environ
    tok = None
    if mcfg.get("token_file"):
        p = os.path.expanduser(mcfg["token_file"])
        try:
            with open(p) as fh:
                tok = fh.read().strip()
        except OSError as e:
            raise StepError(f"model.token_file: cannot read {p}: {e.strerror}") from None
        if not tok:
            raise StepError(f"model.token_file: {p} is empty")
    elif mcfg.get("token_env"):
        tok = (environ.get(mcfg["token_env"]) or "").strip() or None
    register(tok)
    return tok


# ---------------------------------------------------------------------------------------------
# resolution: include matching and the one-quant rule (pure)


@dataclass(frozen=True)
class RepoEntry:
    path: str
    size: int
    sha256: str | None  # lfs.sha256; None for a plain git file


def quant_key(path: str) -> tuple[str, str]:
    """(key, label) of the quant a file belongs to: a `-0000i-of-0000N` set, or the file itself."""
    m = SHARD_RE.match(path)
    if m:
        return f"{m['stem']}|{m['n']}", f"{m['stem']}-*-of-{m['n']}.gguf"
    return path, path


def match_files(entries: Iterable[RepoEntry], include: str, where: str) -> list[RepoEntry]:
    """The files of `entries` matching `include` (fnmatch on repo paths; several patterns may be
    separated by commas). Raises StepError (saying which) if nothing matches, if the matches span
    more than one quant, if a shard set is incomplete, or if a match has no lfs.sha256."""
    entries = list(entries)
    pats = [p.strip() for p in include.split(",") if p.strip()]
    hits = [e for e in entries if any(fnmatch.fnmatchcase(e.path, p) for p in pats)]
    if not hits:
        folders = sorted({e.path.split("/", 1)[0] for e in entries if "/" in e.path})
        singles = sorted(e.path for e in entries if "/" not in e.path and e.path.endswith(".gguf"))
        first = pats[0].split("/", 1)[0] if pats else ""
        guess = difflib.get_close_matches(first, folders, n=1, cutoff=0.5)
        hint = f"; did you mean '{guess[0]}/*'?" if guess else ""
        raise StepError(f"model.include {include!r} matches nothing in {where}; top-level folders: "
                        f"{', '.join(folders) or '(none)'}"
                        + (f"; top-level .gguf files: {', '.join(singles)}" if singles else "") + hint)
    sets: dict[str, tuple[str, list[RepoEntry]]] = {}
    for e in hits:
        if not e.path.endswith(".gguf"):
            continue
        key, label = quant_key(e.path)
        sets.setdefault(key, (label, []))[1].append(e)
    if len(sets) > 1:
        labels = sorted(f"{lbl} ({len(es)} file{'s' if len(es) != 1 else ''})" for lbl, es in sets.values())
        raise StepError(f"model.include {include!r} matches files of more than one quant in {where}: "
                        f"{'; '.join(labels)} — narrow it to one (e.g. '{_folder_hint(sets)}')")
    for label, es in sets.values():
        m = SHARD_RE.match(es[0].path)
        if m:
            n = int(m["n"])
            have = sorted(int(SHARD_RE.match(e.path)["i"]) for e in es)
            if have != list(range(1, n + 1)):
                raise StepError(f"model.include {include!r}: incomplete shard set {label} in {where}: "
                                f"has part(s) {','.join(map(str, have))} of {n}")
    if not sets:
        raise StepError(f"model.include {include!r} matches no .gguf file in {where} (only "
                        f"{', '.join(sorted(e.path for e in hits)[:5])})")
    nolfs = [e.path for e in hits if not e.sha256]
    if nolfs:
        raise StepError(f"model.include {include!r} matches files without an lfs.sha256 to verify "
                        f"against: {', '.join(sorted(nolfs)[:5])} — narrow it to the .gguf files")
    return sorted(hits, key=lambda e: e.path)


def _folder_hint(sets: dict) -> str:
    label = sorted(lbl for lbl, _ in sets.values())[0]
    return f"{label.split('/', 1)[0]}/*" if "/" in label else label


def shard1(files: list[dict]) -> dict:
    """The file to point llama-server at: the `-00001-of-` shard, or the single .gguf file."""
    ggufs = [f for f in files if f["path"].endswith(".gguf")]
    for f in ggufs:
        m = SHARD_RE.match(f["path"])
        if m and int(m["i"]) == 1:
            return f
    if len(ggufs) == 1:
        return ggufs[0]
    raise StepError("no -00001-of- shard (or single .gguf file) among the model's files")


def make_manifest(cfg: dict, commit: str, entries: list[RepoEntry]) -> dict:
    m = cfg["model"]
    return {"repo": m["repo"], "revision": m["revision"], "include": m["include"], "commit": commit,
            "local_dir": local_dir(cfg),
            "files": [{"path": e.path, "size": int(e.size), "sha256": e.sha256} for e in entries]}


def _same_manifest(a: dict | None, b: dict | None) -> bool:
    keys = ("repo", "revision", "include", "commit", "local_dir", "files")
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in keys)


def reuse_pin(cfg: dict, stored: dict | None) -> dict | None:
    """A 40-hex revision already resolved for this repo/include/dir: never asked again."""
    m = cfg["model"]
    rev = str(m["revision"]).lower()
    if not stored or not HEX40.match(rev):
        return None
    if (stored.get("repo"), stored.get("commit"), stored.get("include"), stored.get("local_dir")) == \
            (m["repo"], rev, m["include"], local_dir(cfg)) and stored.get("files"):
        return {k: stored[k] for k in ("repo", "revision", "include", "commit", "local_dir", "files")}
    return None


def resolve(cfg: dict, token: str | None, api: Any = None) -> dict:
    """repo + revision -> {commit, files [{path,size,sha256}]} with huggingface_hub, on this machine."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.hf_api import RepoFile

    m = cfg["model"]
    repo, rev = m["repo"], str(m["revision"])
    api = api or HfApi(endpoint=m["endpoint"] or None, token=token if token else False)
    where = f"{repo}@{rev}"
    try:
        info = api.model_info(repo, revision=rev)
        commit = info.sha
        if not commit or not HEX40.match(commit):
            raise StepError(f"{where}: the hub gave no commit sha for this revision")
        where = f"{repo}@{commit[:7]}"
        entries = [RepoEntry(f.path, int(f.size), f.lfs.sha256 if f.lfs else None)
                   for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)]
    except GatedRepoError:
        how = (f"model.token_file ({m['token_file']})" if m.get("token_file")
               else f"the environment variable {m['token_env']}")
        raise StepError(f"{repo}: gated or private repo — access refused"
                        + (" with the token given" if token else f"; give a token with access in {how}")) from None
    except RevisionNotFoundError:
        raise StepError(f"{repo}: revision {rev!r} not found (a branch, tag or 40-hex commit)") from None
    except RepositoryNotFoundError:
        raise StepError(f"{repo}: repo not found (or private: set a token in the environment variable "
                        f"{m['token_env']} or model.token_file)") from None
    except HfHubHTTPError as e:
        raise StepError(f"{where}: hub error: {' '.join(str(e).split())[:300]}") from None
    except reach.network_errors() as e:  # httpx2.ConnectError is no OSError
        raise StepError(f"the hub {m['endpoint'] or 'https://huggingface.co'} unreachable from this "
                        f"machine (resolving {where}): {type(e).__name__}: {e}") from None
    files = match_files(entries, m["include"], where)
    return make_manifest(cfg, commit, files)


# ---------------------------------------------------------------------------------------------
# the rig as data


@dataclass
class RigView:
    """What the model step reads on the rig (one command)."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # repo path -> (size, mtime_ns)
    debris: list[str] = field(default_factory=list)  # absolute paths of *.incomplete files
    venv_version: str | None = None  # huggingface_hub version in the venv, None = no usable venv
    free_bytes: int = 0
    disk_path: str = ""


_PROBE = r'''
import json, os, subprocess, sys
a = json.loads(sys.argv[1])
out = {"files": {}, "debris": [], "venv": None}
for p in a["paths"]:
    try:
        st = os.stat(os.path.join(a["dir"], p))
        out["files"][p] = [st.st_size, st.st_mtime_ns]
    except OSError:
        pass
for root, dirs, names in os.walk(a["cache"]):
    out["debris"] += [os.path.join(root, n) for n in names if n.endswith(".incomplete")]
py = os.path.join(a["venv"], "bin", "python")
if os.path.exists(py):
    r = subprocess.run([py, "-c", "import huggingface_hub as h; print(h.__version__)"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        out["venv"] = r.stdout.strip()
print(json.dumps(out))
'''


def probe_command(cfg: dict, paths: list[str]) -> str:
    arg = json.dumps({"dir": local_dir(cfg), "cache": hf_cache_dir(cfg), "venv": venv_dir(cfg),
                      "paths": paths})
    return f"python3 -c {quote(_PROBE)} {quote(arg)}"


def parse_probe(output: str, free_bytes: int = 0, disk_path: str = "") -> RigView:
    line = [ln for ln in output.splitlines() if ln.startswith("{")][-1:]
    if not line:
        raise StepError(f"cannot read the model files on the rig: {output.strip()[-300:] or 'no output'}")
    d = json.loads(line[0])
    return RigView({p: (int(v[0]), int(v[1])) for p, v in d["files"].items()}, list(d["debris"]),
                   d.get("venv"), free_bytes, disk_path)


def read_rig(ctx: Context, man: dict) -> RigView:
    hostfacts.invalidate(ctx, "host")
    hf = hostfacts.host_facts(ctx)
    r = ctx.target.run(probe_command(ctx.cfg, [f["path"] for f in man["files"]]), sudo=True, check=False)
    if not r.ok and "{" not in r.stdout:
        raise StepError(f"cannot read the model files on the rig (python3 missing?): "
                        f"{(r.stderr.strip() or r.stdout.strip())[-300:]}")
    return parse_probe(r.stdout, hf.disk_free_bytes, hf.disk_path)


# ---------------------------------------------------------------------------------------------
# verified markers and the plan (pure)


def marker_valid(marker: dict | None, f: dict, stat: tuple[int, int] | None) -> bool:
    """A marker counts only if it is for this content (sha256) and the file is untouched since."""
    if not marker or stat is None:
        return False
    return (marker.get("sha256") == f["sha256"] and int(marker.get("size", -1)) == f["size"] == stat[0]
            and int(marker.get("mtime_ns", -1)) == stat[1])


def classify(man: dict, rig: RigView, verified: dict, full: bool = False) -> dict[str, list[dict]]:
    """Sort the manifest's files: ok / verify (present, not known good) / fetch (missing) /
    stale (present but known to be other content or the wrong size: delete, then fetch)."""
    out: dict[str, list[dict]] = {"ok": [], "verify": [], "fetch": [], "stale": []}
    for f in man["files"]:
        st = rig.files.get(f["path"])
        mk = verified.get(f["path"])
        if st is None:
            out["fetch"].append(f)
        elif st[0] != f["size"]:
            out["stale"].append(f)
        elif mk and mk.get("sha256") != f["sha256"] and (int(mk.get("size", -1)), int(mk.get("mtime_ns", -1))) == st:
            out["stale"].append(f)  # we hashed exactly this file before: it is other content
        elif full or not marker_valid(mk, f, st):
            out["verify"].append(f)
        else:
            out["ok"].append(f)
    return out


def preflight(free_bytes: int, need_bytes: int, margin_gb: float, where: str = "") -> None:
    margin = int(margin_gb * GB)
    if need_bytes > 0 and free_bytes < need_bytes + margin:
        raise StepError(f"not enough disk space{(' at ' + where) if where else ''}: {human(free_bytes)} free "
                        f"({free_bytes} bytes), need {human(need_bytes)} ({need_bytes} bytes) to download + "
                        f"{human(margin)} margin (model.free_space_margin_gb = {margin_gb:g}) = "
                        f"{human(need_bytes + margin)}; short by {human(need_bytes + margin - free_bytes)}")


def need_bytes(groups: dict[str, list[dict]], rig: RigView) -> int:
    """Bytes to download minus what deleting the stale files frees."""
    fetch = groups["fetch"] + groups["stale"]
    return max(0, sum(f["size"] for f in fetch) - sum(rig.files[f["path"]][0] for f in groups["stale"]))


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


def plan(cfg: dict, man: dict, rig: RigView, state_model: dict | None, *, full: bool = False,
         fns: dict[str, Callable] | None = None, source: Any = None) -> list[Change]:
    """Manifest + rig facts + host state in -> changes out (pure; `fns` are the apply functions).
    `source`: with `--from`, what the source rig offers (a transfer.model_copy.Offer)."""
    fns = fns or {}
    stored = state_model or {}
    verified = dict(stored.get("verified") or {})
    sha7 = man["commit"][:7]
    where = f"{man['repo']}@{sha7}"
    changes: list[Change] = []
    groups = classify(man, rig, verified, full)
    if not _same_manifest(stored, man):
        n = len(man["files"])
        changes.append(Call(f"pin {where} ({man['revision']}): {n} file{'s' if n != 1 else ''}, "
                            f"{human(sum(f['size'] for f in man['files']))}", fn=fns.get("pin"),
                            data={"commit": man["commit"], "files": [f["path"] for f in man["files"]]}))
    if rig.debris:
        changes.append(Call(f"remove {len(rig.debris)} *.incomplete leftover(s) of interrupted downloads",
                            fn=fns.get("clean"), data={"paths": sorted(rig.debris)}))
    fetch = groups["stale"] + groups["fetch"]
    if fetch:
        preflight(rig.free_bytes, need_bytes(groups, rig), float(cfg["model"]["free_space_margin_gb"]),
                  rig.disk_path or cfg["model"]["dir"])
    # [--from SOURCE] what the source rig has verified is copied from it (provision/transfer/)
    copy = [f for f in fetch if source is not None and f["path"] in source.files]
    if copy:
        changes.append(model_copy.change(source, copy, [f["path"] for f in groups["stale"] if f in copy],
                                         fns.get("copy"), RESTART))
        fetch = [f for f in fetch if f not in copy]
    if fetch:
        if not venv_ok(rig.venv_version, cfg["model"]["hub_requirement"]):
            changes.append(PipVenv(f"python venv {venv_dir(cfg)} with {cfg['model']['hub_requirement']}",
                                   commands=venv_commands(cfg), timeout=1800,
                                   pip={k: cfg["model"][k] for k in ("pip_index_url", "pip_find_links")}))
        total = sum(f["size"] for f in fetch)
        n_stale = len([f for f in groups["stale"] if f in fetch])
        stale = f" (replacing {n_stale} stale)" if n_stale else ""
        changes.append(Call(f"download {len(fetch)} file{'s' if len(fetch) != 1 else ''} "
                            f"({human(total)}) from {where}{stale}", fn=fns.get("download"),
                            data={"files": [f["path"] for f in fetch], "bytes": total,
                                  "stale": [f["path"] for f in groups["stale"] if f in fetch]},
                            notify=RESTART))
    check = copy + fetch + groups["verify"]
    if check:
        changes.append(Call(f"verify sha256 of {len(check)} file{'s' if len(check) != 1 else ''} "
                            f"({human(sum(f['size'] for f in check))})", fn=fns.get("verify"),
                            data={"files": [f["path"] for f in check]}))
    return changes


# ---------------------------------------------------------------------------------------------
# progress on the control machine


class Progress:
    """Per-file bytes, rate and ETA: rich bars on a TTY, throttled plain lines otherwise."""

    def __init__(self, ctx: Context, verb: str, every_s: float = 5.0):
        self.ctx = ctx
        self.verb = verb
        self.every_s = every_s
        self.fancy = ctx.console.fancy
        self.t0: dict[str, float] = {}
        self.base: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.tasks: dict[str, Any] = {}
        self.bar = None
        self.events: list[dict] = []

    def __enter__(self) -> "Progress":
        if self.fancy:
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                    TransferSpeedColumn(), TimeRemainingColumn(),
                                    console=self.ctx.console.rich, transient=False)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _name(self, path: str) -> str:
        return path.rsplit("/", 1)[-1]

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(f"[{self.ctx.host.name}] {text}", markup=False, highlight=False)
        else:
            self.ctx.say(text)

    def feed(self, line: str) -> None:
        line = line.strip()
        if not line.startswith("{"):
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        self.events.append(ev)
        kind, path = ev.get("event"), ev.get("path", "")
        now = time.monotonic()
        if kind == "start":
            self.t0[path], self.base[path], self.last[path] = now, 0, now
            if self.bar is not None:
                self.tasks[path] = self.bar.add_task(self._name(path), total=ev.get("size"))
            else:
                self.say(f"model: {self.verb} {self._name(path)} ({human(ev.get('size'))})")
        elif kind == "progress":
            done, total = int(ev.get("bytes") or 0), ev.get("total")
            if path not in self.t0:
                self.t0[path], self.base[path], self.last[path] = now, done, now
                if self.bar is not None:
                    self.tasks[path] = self.bar.add_task(self._name(path), total=total)
            if self.bar is not None:
                self.bar.update(self.tasks[path], completed=done, total=total)
            elif now - self.last.get(path, 0) >= self.every_s:
                self.last[path] = now
                el = max(now - self.t0[path], 1e-6)
                rate = (done - self.base[path]) / el
                eta = (int(total) - done) / rate if total and rate > 0 else None
                pct = f" ({100 * done / int(total):.0f}%)" if total else ""
                self.say(f"model: {self._name(path)}: {human(done)} / {human(total)}{pct}, "
                         f"{human(rate)}/s, ETA {duration(eta)}")
        elif kind in ("done", "hashed"):
            secs = float(ev.get("seconds") or 0) or (now - self.t0.get(path, now))
            size = int(ev.get("size") or 0)
            if self.bar is not None and path in self.tasks:
                self.bar.update(self.tasks[path], completed=size, total=size)
            if kind == "done":
                self.say(f"model: fetched {self._name(path)}: {human(ev.get('fetched'))} in {secs:.1f}s"
                         f" ({human(int(ev.get('fetched') or 0) / max(secs, 1e-6))}/s)")
        elif kind == "error":
            self.say(f"model: {self._name(path)}: ERROR {ev.get('type', '')}: {ev.get('error', '')}")


# ---------------------------------------------------------------------------------------------
# apply: scripts, download, hashing


def ensure_script(ctx: Context, name: str) -> str:
    """Install a helper script on the rig if it is missing or different; return its path."""
    path = f"{libexec_dir(ctx.cfg)}/{name}"
    key = f"model.script.{name}"
    if ctx.facts.get(key) != path:
        if ctx.target.sha256(path, sudo=True) != remote.sha(name):
            ctx.target.write_file(path, remote.source(name), mode=0o755)
        ctx.facts[key] = path
    return path


def hash_files(ctx: Context, paths: list[str]) -> dict[str, dict]:
    """sha256 of absolute paths on the rig, in parallel; returns path -> hashed/error event."""
    if not paths:
        return {}
    script = ensure_script(ctx, "sha256_files.py")
    workers = int(ctx.cfg["model"]["hash_workers"])
    cfg = {"paths": paths, "workers": workers, "progress_s": 5.0}
    with Progress(ctx, "hashing") as prog:
        r = ctx.target.run(f"python3 {quote(script)}", sudo=True, stdin=json.dumps(cfg) + "\n",
                           on_stdout=prog.feed, check=False)
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


def run_pull(ctx: Context, man: dict, files: list[dict], token: str | None) -> dict[str, dict]:
    """hf_pull.py in the rig's venv; the token travels on stdin only. Returns path -> event."""
    script = ensure_script(ctx, "hf_pull.py")
    m = ctx.cfg["model"]
    cfg = {"repo_id": man["repo"], "revision": man["commit"], "local_dir": man["local_dir"],
           "files": [{"path": f["path"], "size": f["size"]} for f in files], "token": token,
           "endpoint": m["endpoint"], "workers": 2, "progress_s": 1.0,
           "env": {"HF_HOME": f"{ctx.cfg['paths']['prefix'].rstrip('/')}/hf-home",
                   "HF_HUB_DISABLE_XET": "1"}}
    py = f"{venv_dir(ctx.cfg)}/bin/python"
    t0 = time.monotonic()
    with Progress(ctx, "downloading") as prog:
        r = ctx.target.run(f"{quote(py)} {quote(script)}", sudo=True, stdin=json.dumps(cfg) + "\n",
                           on_stdout=prog.feed, check=False)
    events: dict[str, dict] = {}
    fetched = 0
    for ln in r.stdout.splitlines():
        if ln.startswith("{"):
            ev = json.loads(ln)
            if ev.get("event") in ("done", "error"):
                events[ev["path"]] = ev
            if ev.get("event") == "summary":
                fetched = int(ev.get("fetched") or 0)
    bad = [p for p in (f["path"] for f in files) if events.get(p, {}).get("event") != "done"]
    net = [events[p] for p in bad if re.search(r"Connect|Timeout|Network|Transport|LocalEntryNotFound",
                                                events.get(p, {}).get("type", ""))]
    if bad and len(net) == len(bad):
        e = net[0]
        raise StepError(f"the hub {m['endpoint'] or 'https://huggingface.co'} unreachable from "
                        f"{ctx.host.name} (downloading {len(bad)} file(s)): {e.get('type')}: "
                        f"{str(e.get('error'))[:200]}")
    if bad:
        why = "; ".join(f"{p.rsplit('/', 1)[-1]}: {events.get(p, {}).get('error') or 'no result'}" for p in bad[:3])
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        raise StepError(f"download of {len(bad)} file(s) failed (exit {r.exited}): {why}"
                        + (f" [{tail[-200:]}]" if tail and not events else ""))
    secs = time.monotonic() - t0
    ctx.say(f"model: downloaded {len(files)} file(s), {human(fetched)} in {secs:.1f}s "
            f"({human(fetched / max(secs, 1e-6))}/s)")
    ctx.facts["model.fetched_bytes"] = ctx.facts.get("model.fetched_bytes", 0) + fetched
    return events


def remove_files(ctx: Context, paths: list[str]) -> None:
    """Delete model files and their huggingface_hub metadata (so the client fetches them again)."""
    if not paths:
        return
    args = []
    for p in paths:
        args += [f"{local_dir(ctx.cfg)}/{p}", metadata_path(ctx.cfg, p), f"{hf_cache_dir(ctx.cfg)}/{p}.lock"]
    ctx.target.run("rm -f -- " + " ".join(quote(a) for a in args), sudo=True)


def clean_debris(ctx: Context) -> int:
    cache = hf_cache_dir(ctx.cfg)
    r = ctx.target.run(f"if [ -d {quote(cache)} ]; then find {quote(cache)} -type f -name '*.incomplete' "
                       f"-print -delete; fi", sudo=True)
    return len([ln for ln in r.stdout.splitlines() if ln.strip()])


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
        man = self.manifest(ctx)
        rig = read_rig(ctx, man)
        stored = ctx.state.get(STATE_KEY)
        changes = plan(ctx.cfg, man, rig, stored, full=self.full,
                       fns={"pin": self._pin, "clean": self._clean, "download": self._download,
                            "verify": self._verify, "copy": self._copy},
                       source=model_copy.offer(ctx, man, rig, stored, self.full))  # [--from]
        ctx.facts["model.rig"] = rig
        ctx.facts["model.hashed_bytes"] = 0
        if ctx.check and any(isinstance(c, PipVenv) for c in changes):
            # --check: the venv would be made: can the rig reach where pip downloads from? (a GET)
            url = reach.pip_probe_url(ctx.cfg["model"])
            r = ctx.target.run(reach.url_probe_command(url), check=False, timeout=60)
            why = reach.parse_url_probe(r.stdout + "\n" + r.stderr) if r.exited != 127 else None
            if why:  # (no python3 yet: the system step installs it; nothing to probe with)
                raise StepError(f"{reach.pip_where(ctx.cfg['model'])} unreachable from "
                                f"{ctx.host.name}: {why}")
        total = sum(f["size"] for f in man["files"])
        if not changes:
            ctx.say(f"model: {man['repo']}@{man['commit'][:7]}: {len(man['files'])} file(s), {human(total)}, "
                    f"all verified (0 bytes hashed, 0 bytes fetched)")
        return changes

    # -- apply ------------------------------------------------------------------------------
    def _state(self, ctx: Context) -> dict:
        st = dict(ctx.state.get(STATE_KEY) or {})
        st.setdefault("verified", {})
        return st

    def _pin(self, ctx: Context) -> None:
        man = self.manifest(ctx)
        st = self._state(ctx)
        if st.get("local_dir") != man["local_dir"]:
            st["verified"] = {}  # another repo or dir: its markers say nothing about these files
        st.update(man)  # markers of other content stay: they mark a file as stale, never as good
        ctx.state.set(STATE_KEY, st)

    def _clean(self, ctx: Context) -> None:
        n = clean_debris(ctx)
        ctx.say(f"model: removed {n} *.incomplete file(s)")

    def _files(self, ctx: Context, paths: list[str]) -> list[dict]:
        man = self.manifest(ctx)
        by = {f["path"]: f for f in man["files"]}
        return [by[p] for p in paths]

    def _download(self, ctx: Context) -> None:
        man = self.manifest(ctx)
        rig: RigView = ctx.facts["model.rig"]
        groups = classify(man, rig, self._state(ctx)["verified"], self.full)
        if groups["stale"]:
            remove_files(ctx, [f["path"] for f in groups["stale"]])
        fetch = groups["stale"] + groups["fetch"]
        self._drop_markers(ctx, [f["path"] for f in fetch])
        clean_debris(ctx)
        run_pull(ctx, man, fetch, self.token(ctx))
        ctx.facts.setdefault("model.attempts", {}).update({f["path"]: 1 for f in fetch})

    def _copy(self, ctx: Context) -> None:
        """[--from SOURCE] copy, verify here, fall back to the hub (provision/transfer/model_copy.py)."""
        model_copy.apply(ctx, self, self.manifest(ctx))

    def _drop_markers(self, ctx: Context, paths: list[str]) -> None:
        st = self._state(ctx)
        if any(p in st["verified"] for p in paths):
            st["verified"] = {p: mk for p, mk in st["verified"].items() if p not in paths}
            ctx.state.set(STATE_KEY, st)

    def _verify(self, ctx: Context) -> None:
        man = self.manifest(ctx)
        rig: RigView = ctx.facts["model.rig"]
        groups = classify(man, rig, self._state(ctx)["verified"], self.full)
        todo = groups["stale"] + groups["fetch"] + groups["verify"]
        attempts: dict[str, int] = dict(ctx.facts.get("model.attempts") or {})
        verify_files(ctx, self, man, todo, attempts, refetch=True)
        model_copy.report(ctx, attempts)  # [--from] which shard came from where

    def verify(self, ctx: Context) -> None:
        """After applying: every file present with a valid marker."""
        man = self.manifest(ctx)
        rig = read_rig(ctx, man)
        ctx.facts["model.rig"] = rig
        groups = classify(man, rig, self._state(ctx)["verified"])
        bad = [f["path"] for f in groups["fetch"] + groups["stale"] + groups["verify"]]
        if bad:
            raise StepError(f"after applying, {len(bad)} file(s) are still not verified: {', '.join(bad[:4])}")
        if rig.debris:
            raise StepError(f"after applying, {len(rig.debris)} *.incomplete file(s) are left: {rig.debris[0]}")


def verify_files(ctx: Context, step: ModelStep, man: dict, todo: list[dict], attempts: dict[str, int],
                 refetch: bool) -> list[str]:
    """Hash `todo` on the rig; record markers for the good ones. With `refetch`, a mismatching file is
    deleted (with its .metadata) and fetched again, up to model.max_attempts in all; else it is
    reported. Returns the paths that are still bad (only when not refetching)."""
    max_attempts = int(ctx.cfg["model"]["max_attempts"])
    ldir = man["local_dir"]
    pending = list(todo)
    while pending:
        t0 = time.monotonic()
        res = hash_files(ctx, [f"{ldir}/{f['path']}" for f in pending])
        st = step._state(ctx)
        bad: list[tuple[dict, str]] = []
        hashed = 0
        for f in pending:
            ev = res[f"{ldir}/{f['path']}"]
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
        ctx.state.set(STATE_KEY, st)
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
                            + " — the hub or the network corrupts this file; it was left in place, unverified")
        refetch_files = [f for f, _ in bad]
        ctx.state.owe(RESTART)
        remove_files(ctx, [f["path"] for f in refetch_files])
        clean_debris(ctx)
        for f in refetch_files:
            attempts[f["path"]] = attempts.get(f["path"], 0) + 1
        ctx.say(f"model: re-fetching {len(refetch_files)} file(s): "
                + ", ".join(f"{f['path'].rsplit('/', 1)[-1]} (attempt {attempts[f['path']]})" for f in refetch_files))
        run_pull(ctx, man, refetch_files, step.token(ctx))
        pending = refetch_files
    return []


# ---------------------------------------------------------------------------------------------
# for the service step and the tasks


def manifest(ctx: Context) -> dict:
    """The pinned manifest recorded on the host (repo, revision, commit, local_dir, files)."""
    st = ctx.state.get(STATE_KEY)
    if not st or not st.get("files"):
        raise StepError("no model manifest on this host yet (run the model step: invoke model.pull)")
    return st


def shard1_path(ctx: Context) -> str:
    """Absolute path on the rig of the file llama-server loads (-m). Raises StepError unless EVERY
    file of the model is verified and unchanged since (size + mtime as when hashed)."""
    st = manifest(ctx)
    first = shard1(st["files"])
    rig = read_rig(ctx, st)
    verified = st.get("verified") or {}
    bad = [f["path"] for f in st["files"] if not marker_valid(verified.get(f["path"]), f, rig.files.get(f["path"]))]
    if bad:
        raise StepError(f"model file(s) not verified: {', '.join(p.rsplit('/', 1)[-1] for p in bad[:4])}"
                        f" — run invoke model.pull (the service is never pointed at an unverified file)")
    return f"{st['local_dir']}/{first['path']}"


def verify_action(ctx: Context, full: bool = False) -> bool:
    """`model.verify`: hash files whose marker is missing/stale (all with --full); report, repair nothing."""
    st = manifest(ctx)
    rig = read_rig(ctx, st)
    groups = classify(st, rig, st.get("verified") or {}, full)
    missing = [f["path"] for f in groups["fetch"]]
    todo = groups["verify"] + groups["stale"]
    ctx.facts["model.hashed_bytes"] = 0
    step = ModelStep(full)
    ctx.facts["model.manifest"] = {k: st[k] for k in ("repo", "revision", "include", "commit", "local_dir", "files")}
    bad = verify_files(ctx, step, st, todo, {}, refetch=False) if todo else []
    if not todo:
        ctx.say(f"model: {len(groups['ok'])} file(s) verified earlier and unchanged (0 bytes hashed)"
                + ("; use --full to re-hash them" if groups["ok"] else ""))
    if missing or bad:
        raise StepError(f"{len(missing)} file(s) missing, {len(bad)} with a wrong sha256: "
                        f"{', '.join(p.rsplit('/', 1)[-1] for p in (missing + bad)[:4])} — run invoke model.pull")
    return False


def status_action(ctx: Context) -> bool:
    """`model.status`: repo, pinned sha, files with size and verified state, disk free. Reads only."""
    st = ctx.state.get(STATE_KEY)
    cfg_m = ctx.cfg["model"]
    if not st or not st.get("files"):
        hf = hostfacts.host_facts(ctx)
        ctx.console.table(f"model: {ctx.host.name}", ["key", "value"], [
            ["repo", f"{cfg_m['repo']} (not pulled yet)"], ["revision", cfg_m["revision"]],
            ["include", cfg_m["include"]], ["disk free", f"{human(hf.disk_free_bytes)} at {hf.disk_path}"]])
        return False
    rig = read_rig(ctx, st)
    verified = st.get("verified") or {}
    rows = [["repo", st["repo"]], ["revision", f"{st['revision']} -> {st['commit']}"],
            ["include", st["include"]], ["dir", st["local_dir"]],
            ["disk free", f"{human(rig.free_bytes)} at {rig.disk_path}"],
            ["files", f"{len(st['files'])}, {human(sum(f['size'] for f in st['files']))}"]]
    if rig.debris:
        rows.append(["debris", f"{len(rig.debris)} *.incomplete file(s)"])
    ctx.console.table(f"model: {ctx.host.name}", ["key", "value"], rows)
    frows = []
    for f in st["files"]:
        stt = rig.files.get(f["path"])
        if stt is None:
            state = "missing"
        elif marker_valid(verified.get(f["path"]), f, stt):
            state = "verified"
        elif stt[0] != f["size"]:
            state = f"wrong size ({stt[0]})"
        elif f["path"] in verified:
            state = "changed since verified"
        else:
            state = "not verified"
        frows.append([f["path"], f["size"], f["sha256"][:16], state])
    ctx.console.table("files", ["path", "size", "sha256", "state"], frows)
    return False
