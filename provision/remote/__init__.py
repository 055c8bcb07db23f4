"""Self-contained scripts run on a rig (stdlib, plus huggingface_hub for hf_pull): uploaded to
<prefix>/libexec/ (hf_pull, sha256_files, ttft_probe) or passed whole as `python3 -c` (model_probe,
rig_status: one round trip).

`source(name)` gives a script's text; `sha(name)` its sha256 (to upload only when it changed).
They talk back in JSON lines on stdout and take their input (including any token) on stdin.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("hf_pull.py", "sha256_files.py", "ttft_probe.py", "model_probe.py", "rig_status.py", "rig_copy.py",
           "rig_keys.py", "rpc_watch.py", "rpc_cache_prune.py", "rpc_health.py")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    if name not in SCRIPTS:
        raise KeyError(name)
    return (HERE / name).read_text()


def sha(name: str) -> str:
    return hashlib.sha256(source(name).encode()).hexdigest()
