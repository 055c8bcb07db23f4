#!/usr/bin/env python3
"""Read the model copies of one repo on a rig in one go (stdlib only); runs on the rig, as root.

Input: ONE JSON line on stdin:
    {"repo_dir": "/var/lib/llama-rig/models/org__name", "venv": "/opt/llama-rig/hf-venv",
     "paths": ["UD-Q6_K_XL/x-00001-of-00004.gguf", ...],      # files of the wanted commit
     "current_paths": [...],                                   # files of the recorded current one
     "target": "<40-hex commit wanted>" | null}
Output: one JSON line on stdout:
    {"current": "<commit `current` points at>" | null,
     "kept": {"<commit>": {"mark": {...} | null, "stats": {path: [size, mtime_ns, inode]}}},
     "staging": ["<commit>", ...],
     "dirs": {"current": {path: stat}, "flat": {...}, "commit": {...}, "staging": {...}},
     "debris": ["/abs/…/x.incomplete", ...], "venv": "2.4.0" | null}
`dirs`: the wanted files (and the current ones) under `current/`, the old flat layout (the repo
dir itself), `commits/<target>/` and `staging/<target>/`. A symlink is not a file here (lstat):
the links the flat layout leaves behind after its migration do not count as copies.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

MARK = ".llama-rig-model.json"


def stats(base: str, paths: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in paths:
        try:
            st = os.lstat(os.path.join(base, p))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[p] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def read_mark(d: str) -> dict | None:
    try:
        with open(os.path.join(d, MARK)) as fh:
            m = json.load(fh)
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def listdir(d: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))
                      and not os.path.islink(os.path.join(d, n)))
    except OSError:
        return []


def debris(d: str) -> list[str]:
    out: list[str] = []
    cache = os.path.join(d, ".cache", "huggingface", "download")
    for root, _dirs, names in os.walk(cache):
        out += [os.path.join(root, n) for n in names if n.endswith(".incomplete")]
    return out


def probe(a: dict) -> dict:
    rdir = a["repo_dir"]
    paths = list(dict.fromkeys(list(a.get("paths") or []) + list(a.get("current_paths") or [])))
    target = a.get("target")
    try:
        cur = os.readlink(os.path.join(rdir, "current"))
        current = cur.rstrip("/").split("/")[-1] if cur.rstrip("/").split("/")[-2:-1] == ["commits"] else None
    except OSError:
        current = None
    kept: dict[str, dict] = {}
    for c in listdir(os.path.join(rdir, "commits")):
        d = os.path.join(rdir, "commits", c)
        mark = read_mark(d)
        files = [f["path"] for f in (mark or {}).get("files") or [] if isinstance(f, dict) and "path" in f]
        kept[c] = {"mark": mark, "stats": stats(d, files)}
    staging = listdir(os.path.join(rdir, "staging"))
    dirs = {"current": stats(os.path.join(rdir, "current"), paths) if current else {},
            "flat": stats(rdir, paths)}
    wanted = list(a.get("paths") or [])
    dbr = debris(rdir)
    if target:
        dirs["commit"] = stats(os.path.join(rdir, "commits", target), wanted)
        dirs["staging"] = stats(os.path.join(rdir, "staging", target), wanted)
        dbr += debris(os.path.join(rdir, "commits", target)) + debris(os.path.join(rdir, "staging", target))
    if current and current != target:
        dbr += debris(os.path.join(rdir, "commits", current))
    out = {"current": current, "kept": kept, "staging": staging, "dirs": dirs,
           "debris": sorted(set(dbr)), "venv": None}
    py = os.path.join(a["venv"], "bin", "python")
    if os.path.exists(py):
        r = subprocess.run([py, "-c", "import huggingface_hub as h; print(h.__version__)"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            out["venv"] = r.stdout.strip()
    return out


def main() -> int:
    print(json.dumps(probe(json.loads(sys.stdin.readline()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
