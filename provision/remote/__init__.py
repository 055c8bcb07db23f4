"""Self-contained scripts run on a rig (stdlib, plus huggingface_hub for hf_pull): uploaded to
<prefix>/libexec/ (hf_pull, sha256_files) or passed whole as `python3 -c` (model_probe, rig_status,
rig_read, http_probe, key_inject: one round trip). `http_probe.py` is the one HTTP client on a rig: bench's
TTFT, the service step's checks, reachability of a URL, and (rendered into
templates/llama-rig-health.sh.j2) the unit's readiness gate. Shell programs are passed whole to
`bash -c`: `run_lock.sh` (the run lock's keeper, provision/runlock.py) after `stop_groups.sh`
(also the line that stops a command's process group, provision/keeper.py), `bench_point.sh`.

`source(name)` gives a script's text; `sha(name)` its sha256 (to upload only when it changed).
They talk back in JSON lines on stdout and take their input (including any token) on stdin.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("hf_pull.py", "sha256_files.py", "http_probe.py", "model_probe.py", "rig_status.py", "rig_copy.py",
           "rig_keys.py", "rig_read.py", "tcp_reach.py", "bench_point.sh", "rpc_watch.py", "rpc_cache_prune.py",
           "rpc_health.py", "key_inject.py", "stop_groups.sh", "run_lock.sh")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    if name not in SCRIPTS:
        raise KeyError(name)
    return (HERE / name).read_text()


def command(name: str, *args: str) -> str:
    """`python3 -c SOURCE ARGS...` (quoted): one round trip, nothing left on the rig."""
    from ..target import join
    return join(["python3", "-c", source(name), *args])


def sha(name: str) -> str:
    return hashlib.sha256(source(name).encode()).hexdigest()
