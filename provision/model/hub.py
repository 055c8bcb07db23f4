"""What the hub has, asked from the control machine with huggingface_hub (no download here).

* `resolve`: a revision (branch, tag or 40-hex commit) -> a manifest: the commit sha and the files
  matching `model.include` with size and lfs.sha256 (one quant only; a pattern that matches nothing
  is refused with the folders it could have meant).
* `commits_between`: the hub commits after a pinned one, up to a new head (`model.update`).
* `diff_files`: which files a new commit changed, added or removed (by sha256).
* `load_token`: the HF token from `model.token_file` or the env var `model.token_env`, registered
  with the redactor, never printed.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .. import reach
from ..errors import StepError
from ..secrets import register

HEX40 = re.compile(r"^[0-9a-f]{40}$")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
MANIFEST_KEYS = ("repo", "revision", "include", "commit", "local_dir", "files")


def repo_dir(cfg: dict) -> str:
    """Where the repo's copies live on the rig: <model.dir>/<org>__<name>."""
    return f"{cfg['model']['dir'].rstrip('/')}/{cfg['model']['repo'].replace('/', '__')}"


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
# include matching and the one-quant rule (pure)


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


def make_manifest(cfg: dict, commit: str, entries: list[RepoEntry], revision: str | None = None,
                  branch: str | None = None) -> dict:
    """The pinned manifest: repo, revision (as asked), include, commit, local_dir (the repo's
    directory on the rig), files [{path, size, sha256}] and, when known, the branch it came from."""
    m = cfg["model"]
    rev = str(revision if revision is not None else m["revision"])
    out = {"repo": m["repo"], "revision": rev, "include": m["include"], "commit": commit,
           "local_dir": repo_dir(cfg),
           "files": [{"path": e.path, "size": int(e.size), "sha256": e.sha256} for e in entries]}
    br = branch if branch is not None else (None if HEX40.match(rev.lower()) else rev)
    if br:
        out["branch"] = br
    return out


def same_manifest(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in MANIFEST_KEYS)


def reuse_pin(cfg: dict, stored: dict | None) -> dict | None:
    """A 40-hex revision already resolved for this repo/include/dir: never asked again."""
    m = cfg["model"]
    rev = str(m["revision"]).lower()
    if not stored or not HEX40.match(rev):
        return None
    if (stored.get("repo"), stored.get("commit"), stored.get("include"), stored.get("local_dir")) == \
            (m["repo"], rev, m["include"], repo_dir(cfg)) and stored.get("files"):
        out = {k: stored[k] for k in MANIFEST_KEYS}
        if stored.get("branch"):
            out["branch"] = stored["branch"]
        return out
    return None


# ---------------------------------------------------------------------------------------------
# asking the hub


def _api(cfg: dict, token: str | None) -> Any:
    from huggingface_hub import HfApi
    return HfApi(endpoint=cfg["model"]["endpoint"] or None, token=token if token else False)


@contextlib.contextmanager
def hub_errors(cfg: dict, token: str | None, where: str, rev: str, doing: str = "resolving") -> Iterator[None]:
    """huggingface_hub's exceptions -> one StepError line that names the repo and what to do; a hub
    that cannot be reached (huggingface_hub 2.x raises httpx2 errors, no OSError) names the hub."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    m = cfg["model"]
    repo = m["repo"]
    try:
        yield
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
                        f"machine ({doing} {where}): {type(e).__name__}: {e}") from None


def resolve(cfg: dict, token: str | None, api: Any = None, revision: str | None = None) -> dict:
    """repo + revision (default model.revision) -> the manifest, with huggingface_hub, here."""
    from huggingface_hub.hf_api import RepoFile

    m = cfg["model"]
    repo, rev = m["repo"], str(revision if revision is not None else m["revision"])
    api = api or _api(cfg, token)
    where = f"{repo}@{rev}"
    with hub_errors(cfg, token, where, rev):
        info = api.model_info(repo, revision=rev)
        commit = info.sha
        if not commit or not HEX40.match(commit):
            raise StepError(f"{where}: the hub gave no commit sha for this revision")
        where = f"{repo}@{commit[:7]}"
        entries = [RepoEntry(f.path, int(f.size), f.lfs.sha256 if f.lfs else None)
                   for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)]
    files = match_files(entries, m["include"], where)
    return make_manifest(cfg, commit, files, revision=rev)


def commits_between(cfg: dict, token: str | None, since: str, head: str, api: Any = None,
                    limit: int = 200) -> tuple[list[dict], bool]:
    """The hub's commits from `head` back to (not including) `since`, newest first:
    [{id, title, date}], and whether `since` was found in head's history (False: the branch was
    rewritten, or the pin came from another branch)."""
    repo = cfg["model"]["repo"]
    api = api or _api(cfg, token)
    out: list[dict] = []
    with hub_errors(cfg, token, f"{repo}@{head[:7]}", head, doing="listing the commits of"):
        for c in api.list_repo_commits(repo, revision=head):
            if c.commit_id == since:
                return out, True
            out.append({"id": c.commit_id, "title": c.title,
                        "date": c.created_at.strftime("%Y-%m-%d %H:%M") if c.created_at else "?"})
            if len(out) >= limit:
                break
    return out, False


def diff_files(old: list[dict], new: list[dict]) -> dict[str, list]:
    """What a new file list changed: changed [(old, new)], added [new], removed [old], same [new]
    (by path; a file is the same when size and sha256 are)."""
    a = {f["path"]: f for f in old}
    b = {f["path"]: f for f in new}
    out: dict[str, list] = {"changed": [], "added": [], "removed": [], "same": []}
    for p in sorted(set(a) | set(b)):
        if p not in b:
            out["removed"].append(a[p])
        elif p not in a:
            out["added"].append(b[p])
        elif (a[p]["size"], a[p]["sha256"]) != (b[p]["size"], b[p]["sha256"]):
            out["changed"].append((a[p], b[p]))
        else:
            out["same"].append(b[p])
    return out
