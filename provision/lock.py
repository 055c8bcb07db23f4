"""Lockfiles: what a provisioned rig IS, so a second box can be made the same.

After a successful provision `locks/<host>.lock.yaml` is written on the control machine (see
`AfterHost`): llama.cpp repo + commit + build number + every cmake argument + the gcc/nvcc the
build saw; the model repo + commit sha + every file with size and sha256; sha256 of the rendered
units and opencode config (read on the rig with one `sha256sum`; never of a file that holds or
held a secret: the env file and the API key file are left out, lock files get committed and a
weak key could be guessed offline from its hash); power limits; the
GPU model/count and driver; the llama-rig version. Plain YAML, fixed key order, no timestamps: a
re-run that changes nothing rewrites nothing, and `git diff locks/` reads well.

The document has two blocks: `host:` (name, address, groups: where it came from, never compared)
and `lock:` (everything that must be the same on a reproduced rig).

Applying a lock (`invoke provision --lock FILE`, or `lock: FILE` in the host's inventory entry):

* `overrides(lock)` -> inventory settings: llama_cpp.ref = the commit, every build option,
  the CUDA architectures the build used; model.repo/include, model.revision = the commit sha.
* `BeforeHost` (engine hook before the first step): warnings before anything runs for what cannot match
  (GPU model/count, driver, nvcc, gcc); hands the model step the lock's file list (sizes and
  sha256) as its manifest, so files are verified against the LOCK's sha256, not just the hub's;
  a rig already pinned to other bytes for that commit fails here, before any download.
* `AfterHost` (engine hook after the steps and handlers succeeded): re-reads the rig, fails the host if the llama.cpp
  commit/cmake args or the model bytes differ from the lock (for the steps that ran), prints the
  differences (`--check`: the difference between the rig now and the lock), writes the host's lock.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from . import __version__, readahead
from .engine import Context
from .errors import StepError, UsageError
from .facts import host as hostfacts
from .target import quote

FORMAT = 1
LOCK_DIR = "locks"
HEADER = ("# llama-rig lockfile: what this rig was provisioned with. Reproduce it on another box with\n"
          "#   invoke provision --host OTHER --lock {path}\n"
          "# `host:` says where it came from (never compared); everything under `lock:` must match.\n")
# the llama_cpp settings that decide what is built (they go into the lock and come back out)
BUILD_OPTIONS = ("cuda", "cuda_architectures", "fa_all_quants", "native", "rpc", "prebuilt_ui",
                 "targets", "cmake_options")
SERVICE_UNIT = "/etc/systemd/system/llama-server.service"
SERVICE_ENV = "/etc/llama-rig/llama-server.env"
GPU_UNIT = "/etc/systemd/system/llama-rig-gpu.service"


# ---------------------------------------------------------------------------------------------
# paths and files


def lock_path(host: str, root: str | os.PathLike = LOCK_DIR) -> Path:
    return Path(root) / f"{host}.lock.yaml"


def dump(doc: dict[str, Any], path: str | os.PathLike | None = None) -> str:
    """The lock as text: a fixed header, then YAML in the document's own (fixed) key order."""
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=10000)
    name = (doc.get("host") or {}).get("name") or "<host>"
    return HEADER.format(path=f"{LOCK_DIR}/{name}.lock.yaml") + body


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a lock file; one-line UsageError if it is missing or not a lock."""
    from .errors import InventoryError
    from .yamlfile import MAX_FILE_BYTES, parse_yaml
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise UsageError(f"{p}: too large for a lock file (at most {MAX_FILE_BYTES >> 20} MiB)")
        data = parse_yaml(p.read_text(), f"{p}: not valid YAML")
    except FileNotFoundError:
        raise UsageError(f"lock file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read lock file {p}: {e}") from None
    except InventoryError as e:
        raise UsageError(str(e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("lock"), dict):
        raise UsageError(f"{p}: not a llama-rig lock file (no `lock:` mapping)")
    fmt = data["lock"].get("format")
    if fmt != FORMAT:
        raise UsageError(f"{p}: lock format {fmt!r} is not supported (this llama-rig reads {FORMAT})")
    return data


def write(doc: dict[str, Any], path: str | os.PathLike) -> bool:
    """Write atomically; False (nothing written) if the file already has exactly this content."""
    p = Path(path)
    text = dump(doc, p)
    try:
        if p.read_text() == text:
            return False
    except OSError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return True


# ---------------------------------------------------------------------------------------------
# building a lock (pure: state + facts + hashes in, document out)


def _opt(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: v[k] for k in sorted(v)}
    return copy.deepcopy(v)


def build(*, name: str, address: str, groups: Sequence[str], cfg: dict[str, Any],
          state: dict[str, Any], hf: Any = None, gf: Any = None,
          hashes: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The lock document of one host. `state` is the host state (state.json), `hf`/`gf` host and
    GPU facts (may be None), `hashes` the sha256 of the rendered files by role."""
    ll = state.get("llama") or {}
    md = state.get("model") or {}
    gpus = list(getattr(gf, "gpus", None) or [])
    lc = cfg["llama_cpp"]
    verified = md.get("verified") or {}
    files = []
    for f in sorted(md.get("files") or [], key=lambda f: f["path"]):
        mk = verified.get(f["path"]) or {}
        ent: dict[str, Any] = {"path": f["path"], "size": int(f["size"]), "sha256": f.get("sha256")}
        if mk.get("sha256") != f.get("sha256") or int(mk.get("size", -1)) != int(f["size"]):
            ent["verified"] = False  # never hashed on the rig with this content
        files.append(ent)
    power = None
    if gpus:
        power = {"inventory": _opt(cfg["gpus"]["power_limit"]),
                 "persistence": bool(cfg["gpus"]["persistence"]),
                 "limits_w": [g.power_limit for g in gpus]}
    lock = {
        "format": FORMAT,
        "llama_rig": __version__,
        "hardware": {
            "gpu_model": gpus[0].name if gpus else None,
            "gpu_count": len(gpus),
            "compute_caps": sorted({g.compute_cap for g in gpus if g.compute_cap}),
            "driver": getattr(gf, "driver_version", None) if gf is not None else None,
            "cuda": getattr(gf, "cuda_version", None) if gf is not None else None,
            "nvcc": ll.get("nvcc") if ll else getattr(hf, "nvcc_version", None),
            "gcc": ll.get("gcc") if ll else getattr(hf, "gcc_version", None),
            "os": f"{hf.os_id} {hf.os_version}".strip() if hf is not None else None,
            "arch": getattr(hf, "arch", None),
        },
        "llama_cpp": None if not ll.get("commit") else {
            "repo": ll.get("repo") or lc["repo"],
            "commit": ll.get("commit"),
            "build_number": ll.get("build_number"),
            "build": ll.get("current"),
            "fingerprint": ll.get("fingerprint"),
            "archs": list(ll.get("archs") or []),
            "targets": list(ll.get("targets") or []),
            "options": {k: _opt(lc[k]) for k in BUILD_OPTIONS},
            "cmake_args": list(ll.get("cmake_args") or []),
        },
        "model": None if not md.get("commit") else {
            "repo": md.get("repo"),
            "include": md.get("include"),
            "commit": md.get("commit"),
            "files": files,
        },
        "rendered": {k: (hashes or {}).get(k) for k in RENDERED},
        "power": power,
    }
    rpc_workers = (state.get("rpc") or {}).get("workers")
    if rpc_workers:  # a main host of llama.cpp's RPC backend: the worker builds it was started with
        lock["rpc"] = {"workers": {w: {"endpoint": v.get("endpoint"), "build": v.get("build"),
                                       "commit": ll.get("commit")}
                                   for w, v in sorted(rpc_workers.items())}}
    return {"host": {"name": name, "address": address, "groups": list(groups)}, "lock": lock}


# the files whose sha256 a lock holds: none of them holds a secret (the opencode config holds a
# {file:...} reference to the key, never the key)
RENDERED = ("llama-server.service", "llama-rig-gpu.service", "opencode.json")


def rendered_paths(ctx: Context) -> dict[str, str]:
    """Role -> path on the rig of the files whose sha256 goes into the lock."""
    paths = {"llama-server.service": SERVICE_UNIT, "llama-rig-gpu.service": GPU_UNIT}
    oc = ctx.cfg.get("opencode") or {}
    if oc.get("enabled") and oc.get("user"):
        r = ctx.target.run(f"getent passwd {quote(oc['user'])} | cut -d: -f6", check=False)
        home = r.stdout.strip()
        if r.ok and home:
            paths["opencode.json"] = f"{home}/.config/opencode/opencode.json"
    return paths


def sha256_many(ctx: Context, paths: dict[str, str]) -> dict[str, str | None]:
    """Role -> sha256 of each file on the rig (None: absent), in ONE remote command (what
    `Target.sha256` does, for all of them at once: a no-op provision stays cheap)."""
    if not paths:
        return {}
    r = ctx.target.run("sha256sum -- " + " ".join(quote(p) for p in paths.values()) + " 2>/dev/null; true",
                       sudo=True, check=False)
    got: dict[str, str] = {}
    for ln in r.stdout.splitlines():
        digest, _, name = ln.partition("  ")
        if len(digest) == 64:
            got[name.strip()] = digest
    return {role: got.get(path) for role, path in paths.items()}


readahead.wants(lambda ctx: readahead.Want(sha256=[SERVICE_UNIT, SERVICE_ENV, GPU_UNIT]))


def from_rig(ctx: Context, read_ahead: bool = False) -> dict[str, Any]:
    """Build the lock of the rig behind `ctx` (reads state, facts, the rendered files' sha256).
    `read_ahead`: the hashes may come from the run's read-ahead (the engine's hook after the
    steps: it drops what it read ahead once anything changed)."""
    hf = hostfacts.host_facts(ctx)
    gf = hostfacts.gpu(ctx)
    paths = rendered_paths(ctx)
    if read_ahead:
        got = readahead.sha256(ctx, list(paths.values()))
        hashes = {role: got[p] for role, p in paths.items()}
    else:
        hashes = sha256_many(ctx, paths)
    return build(name=ctx.host.name, address=ctx.host.address, groups=ctx.host.groups,
                 cfg=ctx.cfg, state=dict(ctx.state.data), hf=hf, gf=gf, hashes=hashes)


# ---------------------------------------------------------------------------------------------
# applying a lock


def overrides(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Inventory settings that make a host build/pull exactly what the lock says."""
    lk = doc["lock"]
    out: dict[str, dict[str, Any]] = {}
    ll = lk.get("llama_cpp")
    if ll:
        lc: dict[str, Any] = {"repo": ll["repo"], "ref": ll["commit"]}
        for k, v in (ll.get("options") or {}).items():
            if k in BUILD_OPTIONS:
                lc[k] = copy.deepcopy(v)
        if lc.get("cuda") and ll.get("archs"):
            lc["cuda_architectures"] = list(ll["archs"])  # what the build used, not "auto"
        out["llama_cpp"] = lc
    md = lk.get("model")
    if md:
        out["model"] = {"repo": md["repo"], "revision": md["commit"], "include": md["include"]}
    return out


def apply_to_cfg(cfg: dict[str, Any], doc: dict[str, Any], keep_repo: bool = False) -> list[str]:
    """Merge the lock's overrides into a host's settings. With `keep_repo` the host keeps its own
    llama_cpp.repo (a mirror): the commit decides. Returns notes for the user."""
    notes = []
    for sec, vals in overrides(doc).items():
        for k, v in vals.items():
            if sec == "llama_cpp" and k == "repo" and keep_repo and cfg[sec][k] != v:
                notes.append(f"llama_cpp.repo stays {cfg[sec][k]} (the lock's is {v}); "
                             f"commit {doc['lock']['llama_cpp']['commit'][:12]} must exist there")
                continue
            cfg[sec][k] = v
    return notes


def hardware_warnings(lk: dict[str, Any], hf: Any, gf: Any) -> list[str]:
    """What cannot match the lock on this box (another GPU model/count, driver, nvcc, gcc)."""
    want = lk.get("hardware") or {}
    gpus = list(getattr(gf, "gpus", None) or [])
    have = {"gpu_model": gpus[0].name if gpus else None, "gpu_count": len(gpus),
            "compute_caps": sorted({g.compute_cap for g in gpus if g.compute_cap}),
            "driver": getattr(gf, "driver_version", None),
            "nvcc": getattr(hf, "nvcc_version", None), "gcc": getattr(hf, "gcc_version", None)}
    labels = {"gpu_model": "GPU model", "gpu_count": "GPU count", "compute_caps": "compute capability",
              "driver": "NVIDIA driver", "nvcc": "nvcc", "gcc": "gcc"}
    out = []
    cuda = bool(((lk.get("llama_cpp") or {}).get("options") or {}).get("cuda"))
    for k, label in labels.items():
        if k not in want or (k == "nvcc" and not cuda):
            continue  # a CPU build never used nvcc
        if k in ("gcc", "nvcc") and have[k] is None and want[k] is not None:
            continue  # not installed yet: the system step installs it (the lock shows it after)
        if want[k] != have[k]:
            out.append(f"{label}: the lock has {_show(want[k])}, this box has {_show(have[k])}")
    if [w for w in out if w.startswith(("gcc", "nvcc"))]:
        out.append("the build fingerprint will differ (same commit and cmake flags, other compiler)")
    return out


def _show(v: Any) -> str:
    if v is None or v == []:
        return "none"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# comparing


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values. Lists of {path: ...} mappings are keyed by path; other lists stay
    values (cmake_args is compared as a whole and shown as added/removed items)."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        if not node and prefix:
            out[prefix] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, list) and node and all(isinstance(x, dict) and "path" in x for x in node):
        for x in node:
            rest = {k: v for k, v in x.items() if k != "path"}
            out.update(flatten(rest, f"{prefix}[{x['path']}]"))
    else:
        out[prefix] = node
    return out


def differences(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("lock", "rig"),
                ignore: Iterable[str] = ()) -> list[str]:
    """One line per difference between two `lock:` blocks (host blocks are never compared)."""
    fa, fb = flatten(a), flatten(b)
    ign = tuple(ignore)
    out = []
    for k in sorted(set(fa) | set(fb)):
        if ign and k.startswith(ign):
            continue
        va, vb = fa.get(k, _ABSENT), fb.get(k, _ABSENT)
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list):
            only_a = [x for x in va if x not in vb]
            only_b = [x for x in vb if x not in va]
            parts = [f"only in {names[0]}: {' '.join(map(str, only_a))}" if only_a else "",
                     f"only in {names[1]}: {' '.join(map(str, only_b))}" if only_b else ""]
            detail = "; ".join(p for p in parts if p) or "same items, other order"
            out.append(f"{k}: {detail}")
            continue
        out.append(f"{k}: {names[0]} {_val(va)} ≠ {names[1]} {_val(vb)}")
    return out


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _val(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def enforced(lk: dict[str, Any], steps: Iterable[str]) -> list[str]:
    """Key prefixes of the `lock:` block a reproduced rig MUST match, for the steps that ran."""
    steps = set(steps)
    out = []
    if "llama" in steps and lk.get("llama_cpp"):
        out += ["llama_cpp.commit", "llama_cpp.build_number", "llama_cpp.cmake_args",
                "llama_cpp.targets", "llama_cpp.archs"]
    if "model" in steps and lk.get("model"):
        out += ["model.repo", "model.commit", "model.files"]
    return out


# ---------------------------------------------------------------------------------------------
# what the engine calls around each host's steps (RunOptions.before_host / after_host)

Locks = dict[str, tuple[str, dict[str, Any]]]  # host -> (lock file, document)


class BeforeHost:
    """Before the first step: with a lock applied, warn about what cannot match and hand the model
    step the lock's manifest (so every file is verified against the LOCK's sha256)."""

    name = "lock"

    def __init__(self, locks: Locks):
        self.locks = locks

    def __call__(self, ctx: Context) -> None:
        got = self.locks.get(ctx.host.name)
        if got is None:
            return
        path, doc = got
        lk = doc["lock"]
        src = (doc.get("host") or {}).get("name") or "?"
        warns = hardware_warnings(lk, hostfacts.host_facts(ctx), hostfacts.gpu(ctx))
        for w in warns:
            ctx.warn(f"lock {path}: cannot match: {w}")
        ll, md = lk.get("llama_cpp") or {}, lk.get("model") or {}
        ctx.say(f"lock: reproducing {src} from {path}"
                + (f": llama.cpp {ll['commit'][:12]} (b{ll.get('build_number')})" if ll else "")
                + (f", model {md['repo']}@{md['commit'][:12]} ({len(md['files'])} files)" if md else "")
                + (f"; {len(warns)} warning(s) above" if warns else ""))
        if md:
            pin_model(ctx, md, path)


def pin_model(ctx: Context, md: dict[str, Any], path: str) -> None:
    """Make the model step work from the lock's file list: a rig already pinned to other bytes
    for this commit fails here (no download); otherwise the lock's sizes and sha256 are what the
    step downloads and verifies against."""
    from .steps import model as M
    stored = ctx.state.get(M.STATE_KEY) or {}
    if stored.get("repo") == md["repo"] and stored.get("commit") == md["commit"] and stored.get("files"):
        files, whose, refusing = stored["files"], "the files pinned on this rig for that commit", "reproduce"
    else:
        # not pinned here yet: ask the hub (on this machine, no download) what that commit holds
        files = M.resolve(ctx.cfg, M.load_token(ctx.cfg["model"]))["files"]
        whose, refusing = "the hub's files for that commit", "download"
    have = {f["path"]: (int(f["size"]), f.get("sha256")) for f in files}
    want = {f["path"]: (int(f["size"]), f.get("sha256")) for f in md["files"]}
    if have != want:
        bad = sorted(p for p in set(have) | set(want) if have.get(p) != want.get(p))
        raise StepError(f"model {md['repo']}@{md['commit'][:12]}: {whose} differ from the lock "
                        f"{path} ({', '.join(bad[:4])}): refusing to {refusing} other bytes")
    entries = [M.RepoEntry(f["path"], int(f["size"]), f["sha256"]) for f in md["files"]]
    ctx.facts["model.manifest"] = M.make_manifest(ctx.cfg, md["commit"], entries)
    ctx.facts["lock.model"] = md


class AfterHost:
    """After the steps and handlers succeeded: compare the rig with an applied lock (a difference
    in what the steps that ran must reproduce fails the host), print the differences, and write
    locks/<host>.lock.yaml. In --check: only the differences from an applied lock, nothing written."""

    name = "lockfile"

    def __init__(self, locks: Locks, ran: Iterable[str], lock_dir: str | os.PathLike = LOCK_DIR):
        self.locks = locks
        self.ran = list(ran)
        self.lock_dir = lock_dir

    def __call__(self, ctx: Context) -> None:
        got = self.locks.get(ctx.host.name)
        if ctx.check and got is None:
            return
        doc = from_rig(ctx, read_ahead=True)
        if got is not None:
            path, want = got
            diffs = differences(want["lock"], doc["lock"], names=("lock", "rig"))
            if not diffs:
                ctx.say(f"lock: {'the rig matches' if ctx.check else 'matches'} {path}")
            for d in diffs:
                ctx.say(f"lock: {'would differ' if ctx.check else 'differs'} from {path}: {d}")
            must = [] if ctx.check else enforced(want["lock"], self.ran)
            bad = [d for d in diffs if must and d.startswith(tuple(must))]
            if bad:
                raise StepError(f"the rig does not match the lock {path}: {bad[0]}"
                                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        if ctx.check:
            return
        out = lock_path(ctx.host.name, self.lock_dir)
        if write(doc, out):
            ctx.say(f"lock: wrote {out}")
        else:
            ctx.say(f"lock: {out} unchanged")


# ---------------------------------------------------------------------------------------------
# lock.diff / lock.show helpers


def is_lock_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or Path(spec).is_file()


def show_differences(console, a: dict[str, Any], b: dict[str, Any], na: str, nb: str) -> list[str]:
    diffs = differences(a["lock"], b["lock"], names=(na, nb))
    if diffs:
        console.line(f"{na} vs {nb}: {len(diffs)} difference{'s' if len(diffs) != 1 else ''}")
        for d in diffs:
            console.line(f"  {d}")
    else:
        console.line(f"{na} vs {nb}: no differences (host name/address aside)")
    return diffs
