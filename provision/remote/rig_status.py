#!/usr/bin/env python3
"""Everything `invoke status` shows about one rig, read on the rig in one go (stdlib only, as root).

Input: ONE JSON line on stdin (the API key travels here, never on a command line):
    {"port": 8000, "key": "sk-..." | null, "prefix": "/opt/llama-rig", "state_dir": "/var/lib/llama-rig",
     "service": "llama-server.service", "files": {"llama-server.service": "/etc/systemd/...", ...},
     "opencode_user": "root" | null, "gpu_query": "nvidia-smi --query-gpu=... --format=csv,noheader,nounits",
     "timeout": 5}
Output: one JSON line on stdout:
    {"systemd": {"ActiveState": ..., "SubState": ..., "ActiveEnterTimestampMonotonic": ..., ...},
     "monotonic_us": N, "uptime_s": S,
     "http": {"health": [status, body, seconds], "metrics": [...], "props": [...]},
     "build": {"name": "b1-5af12ca-...", "info": {...} | null},
     "state": {"llama": {...}, "model": {...}, "owed": [...]}, "model_current": "<commit>" | null,
     "gpus": {"query": "<csv>", "temps": "<csv>", "error": "..." | null},
     "hashes": {"llama-server.service": "<sha256>" | null, ...}}
Nothing here writes anything; /metrics and /props get the key, /health does not need it. The key
is never printed: bodies of answers that might echo a header are cut to what is needed.
"""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
import time
import urllib.error
import urllib.request


def http(base: str, path: str, key: str | None, timeout: float) -> list:
    h = {"Authorization": "Bearer " + key} if key and path != "/health" else {}
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=h), timeout=timeout) as r:
            return [r.status, r.read(200000).decode("utf-8", "replace"), round(time.monotonic() - t0, 4)]
    except urllib.error.HTTPError as e:
        return [e.code, e.read(2000).decode("utf-8", "replace"), round(time.monotonic() - t0, 4)]
    except Exception as e:  # noqa: BLE001 - refused, timeout: the caller shows it
        return [0, f"{type(e).__name__}: {e}", round(time.monotonic() - t0, 4)]


def sh(cmd: list[str] | str, timeout: float = 10) -> tuple[int, str, str]:
    try:
        r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    except FileNotFoundError as e:
        return 127, "", str(e)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout}s"


def sha256(path: str) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def main() -> int:
    a = json.loads(sys.stdin.readline())
    out: dict = {}
    props = ["ActiveState", "SubState", "ActiveEnterTimestampMonotonic", "NRestarts", "MainPID", "UnitFileState"]
    rc, so, _ = sh(["systemctl", "show", a["service"]] + [f"-p{p}" for p in props])
    out["systemd"] = dict(ln.split("=", 1) for ln in so.splitlines() if "=" in ln) if rc == 0 else {}
    out["monotonic_us"] = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
    try:
        with open("/proc/uptime") as fh:
            out["uptime_s"] = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        out["uptime_s"] = None
    base = f"http://127.0.0.1:{int(a['port'])}"
    t = float(a.get("timeout") or 5)
    out["http"] = {"health": http(base, "/health", None, t)}
    if out["http"]["health"][0]:
        out["http"]["metrics"] = http(base, "/metrics", a.get("key"), t)
        p = http(base, "/props", a.get("key"), t)
        try:  # only build_info and total_slots: /props also carries settings nobody asked for
            d = json.loads(p[1])
            p[1] = json.dumps({k: d.get(k) for k in ("build_info", "total_slots")})
        except ValueError:
            p[1] = p[1][:200]
        out["http"]["props"] = p
    cur = os.path.realpath(os.path.join(a["prefix"], "llama.cpp", "current"))
    name = os.path.basename(cur) if os.path.isdir(cur) else None
    out["build"] = {"name": name, "info": read_json(os.path.join(cur, "llama-rig-build.json")) if name else None}
    st = read_json(os.path.join(a["state_dir"], "state.json")) or {}
    model = st.get("model") or {}
    out["state"] = {"llama": {k: (st.get("llama") or {}).get(k) for k in ("current", "commit", "build_number")},
                    "model": {k: model.get(k) for k in ("repo", "commit", "revision", "branch", "local_dir",
                                                        "layout", "previous")},
                    "owed": st.get("owed") or []}
    out["model_current"] = None
    if model.get("local_dir"):
        try:
            link = os.readlink(os.path.join(model["local_dir"], "current"))
            out["model_current"] = link.rstrip("/").split("/")[-1]
        except OSError:
            pass
    gpus = {"query": "", "temps": "", "error": None}
    rc, so, se = sh(a["gpu_query"])
    if rc == 0:
        gpus["query"] = so
        rc2, so2, _ = sh("nvidia-smi --query-gpu=index,temperature.gpu --format=csv,noheader,nounits")
        gpus["temps"] = so2 if rc2 == 0 else ""
    else:
        gpus["error"] = (se.strip() or so.strip() or f"exit {rc}").splitlines()[-1][:200] if (se or so) else f"exit {rc}"
    out["gpus"] = gpus
    files = dict(a.get("files") or {})
    if a.get("opencode_user"):
        try:
            home = pwd.getpwnam(a["opencode_user"]).pw_dir
            files["opencode.json"] = os.path.join(home, ".config", "opencode", "opencode.json")
        except KeyError:
            pass
    out["hashes"] = {role: sha256(path) for role, path in files.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
