#!/usr/bin/env python3
"""Download given files of a Hugging Face repo at a given commit into a local dir; runs on the rig,
in a venv that has huggingface_hub. Resolves nothing itself.

Input: ONE JSON line on stdin (so that a token never shows in argv, the environment of the
command line, a process list or shell history):
    {"repo_id": "org/name", "revision": "<40-hex sha>", "local_dir": "/abs/dir",
     "files": [{"path": "UD-Q6_K_XL/x-00001-of-00004.gguf", "size": 123}, ...],
     "token": "hf_..." | null, "endpoint": "https://..." | null, "workers": 4,
     "progress_s": 1.0, "repo_type": "model", "env": {"HF_XET_HIGH_PERFORMANCE": "1", ...}}
Output: JSON lines on stdout:
    {"event": "start", "path": P, "size": N}
    {"event": "progress", "path": P, "bytes": B, "total": N, "net": B2}   (throttled)
    {"event": "done", "path": P, "size": N, "fetched": B, "seconds": S, "xet": bool}
    {"event": "error", "path": P, "error": "...", "type": "..."}
    {"event": "summary", "ok": bool, "files": N, "fetched": B, "seconds": S, "xet": bool | null,
     "xet_available": bool, "xet_disabled": bool}
`bytes` counts the file's bytes written, `net`/`fetched` the bytes that came over the network:
the same over plain HTTP; over Xet (the client's default where the hub advertises it) chunks
already in the chunk cache are not fetched again. Xet is never switched off here: a hub that does
not advertise it (the tests' stand-in) gets plain HTTP from the client by itself.
Exit status 0 when every file is in place, 1 otherwise. The token is scrubbed from every message.
The client checks sizes only, never sha256 (either path): the caller hashes afterwards.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

_out_lock = threading.Lock()
_secret: list[str] = []


def scrub(text: str) -> str:
    for s in _secret:
        if s:
            text = text.replace(s, "********")
    return text


def emit(obj: dict) -> None:
    line = scrub(json.dumps(obj, separators=(",", ":")))
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def make_bar_class(path: str, progress_s: float, counter: dict):
    """A tqdm stand-in (huggingface_hub accepts any class through `tqdm_class`) bound to one file.
    The client calls update(n) with the bytes written to the file and update_transfer(n) with the
    bytes received from the network (the same over plain HTTP; fewer over Xet when chunks come from
    the chunk cache). Whether Xet carried the file is told by `mark_xet` (see `trace_xet`)."""

    class Bar:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            self.total = total
            self.n = int(initial or 0)
            self._last = time.monotonic()
            self.format_dict = {"rate": None}

        @staticmethod
        def mark_xet():
            counter["xet"] = True

        def _report(self):
            now = time.monotonic()
            if now - self._last >= progress_s:
                self._last = now
                emit({"event": "progress", "path": path, "bytes": self.n, "total": self.total,
                      "net": net_bytes(counter)})

        def update(self, n=1):
            if not n:
                return
            self.n += int(n)
            counter["fetched"] += int(n)
            self._report()

        def update_transfer(self, n=1):
            counter["transfer"] = True
            counter["net"] += int(n or 0)
            self._report()

        def set_postfix_str(self, *a, **k):
            pass

        def set_transfer_postfix_str(self, *a, **k):
            pass

        def set_description(self, *a, **k):
            pass

        def refresh(self, *a, **k):
            pass

        def reset(self, total=None):
            self.n = 0
            if total is not None:
                self.total = total

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @classmethod
        def get_lock(cls):
            return _out_lock

        @classmethod
        def set_lock(cls, lock):
            pass

    return Bar


def net_bytes(counter: dict) -> int:
    """Bytes that came over the network for one file."""
    return counter["net"] if counter.get("transfer") else counter["fetched"]


def trace_xet() -> bool:
    """Have the client tell each file's bar when it downloads through Xet (it does so where the hub
    advertises Xet for the file, and only there). False if this client has no such function."""
    from huggingface_hub import file_download
    orig = getattr(file_download, "xet_get", None)
    if orig is None:
        return False

    def xet_get(*args, **kwargs):
        mark = getattr(kwargs.get("tqdm_class"), "mark_xet", None)
        if mark is not None:
            mark()
        return orig(*args, **kwargs)
    file_download.xet_get = xet_get
    return True


def main() -> int:
    line = sys.stdin.readline()
    cfg = json.loads(line)
    token = cfg.get("token") or None
    if token:
        _secret.append(token)
    # the client reads its settings at import time: set them before importing it
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.pop("HF_TOKEN", None)
    os.environ.pop("HF_TOKEN_PATH", None)
    if cfg.get("endpoint"):
        os.environ["HF_ENDPOINT"] = cfg["endpoint"].rstrip("/")
    for k, v in (cfg.get("env") or {}).items():
        os.environ[str(k)] = str(v)
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils._runtime import is_xet_available
    traced = trace_xet()

    repo_id, revision, local_dir = cfg["repo_id"], cfg["revision"], cfg["local_dir"]
    files = cfg.get("files", [])
    progress_s = float(cfg.get("progress_s", 1.0))
    workers = max(1, min(int(cfg.get("workers") or len(files) or 1), len(files) or 1))
    t_all = time.monotonic()
    totals = {"fetched": 0, "ok": True, "xet": False}

    def one(f: dict) -> None:
        path, size = f["path"], f.get("size")
        counter = {"fetched": 0, "net": 0, "transfer": False, "xet": False}
        emit({"event": "start", "path": path, "size": size})
        t0 = time.monotonic()
        try:
            out = hf_hub_download(repo_id, path, revision=revision, local_dir=local_dir,
                                  repo_type=cfg.get("repo_type") or None, token=token if token else False,
                                  tqdm_class=make_bar_class(path, progress_s, counter))
            got = os.path.getsize(out)
            if size is not None and got != int(size):
                raise OSError(f"size {got} after download, expected {size}")
            emit({"event": "done", "path": path, "size": got,
                  "fetched": net_bytes(counter),
                  "seconds": round(time.monotonic() - t0, 3), "xet": counter["xet"]})
        except BaseException as e:  # noqa: BLE001 - report everything, keep going
            totals["ok"] = False
            msg = " ".join(str(e).split())[:1500]
            emit({"event": "error", "path": path, "type": type(e).__name__, "error": msg})
        finally:
            with _out_lock:
                totals["fetched"] += net_bytes(counter)
                totals["xet"] = totals["xet"] or counter["xet"]

    if workers == 1:
        for f in files:
            one(f)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, files))
    emit({"event": "summary", "ok": totals["ok"], "files": len(files), "fetched": totals["fetched"],
          "seconds": round(time.monotonic() - t_all, 3), "xet": totals["xet"] if traced else None,
          "xet_available": bool(is_xet_available()), "xet_disabled": bool(constants.HF_HUB_DISABLE_XET)})
    return 0 if totals["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
