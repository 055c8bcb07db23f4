"""TEST SEAM for the llama step — set only by tests/test_journey.py, in-process
(`llama_cuda_subset.CI_CUDA_SUBSET = CudaSubset(...)`); no inventory key, lock file, command-line
flag or environment variable reaches it, and nothing in provision/ sets it.

Why: CI runs on 2 cores, and a CUDA build of llama.cpp is ~190 CUDA objects (~5000 core-seconds).
With a CudaSubset set, a CUDA build still configures llama.cpp with the inventory's CUDA flags and
the real nvcc (through the same CUDACXX/CUDAToolkit_ROOT hand-off as always) in
`<build>/cuda-subset/`, compiles exactly the named CUDA objects there for the GPUs' arch, and the
binaries it installs come from a CPU build of the same commit (the test rig has no GPU). The build
record (llama-rig-build.json) says so under "ci_cuda_subset", and the run prints it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from .target import join, quote


@dataclass(frozen=True)
class CudaSubset:
    sources: tuple[str, ...]  # files under ggml/src/ggml-cuda/, e.g. "arange.cu"

    def ninja_targets(self) -> list[str]:
        return [f"ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/{s}.o" for s in self.sources]


CI_CUDA_SUBSET: CudaSubset | None = None


def cpu_cfg(cfg: dict) -> dict:
    c = copy.deepcopy(cfg)
    c["llama_cpp"]["cuda"] = False
    return c


def build(ll, w, d: str, log: str, current: str | None, env: dict[str, str]) -> dict[str, Any]:
    """Configure with the CUDA flags in <d>/cuda-subset and compile the subset (ll: steps.llama.Llama)."""
    subset = CI_CUDA_SUBSET
    assert subset is not None
    sub = f"{d}/cuda-subset"
    t0 = time.monotonic()
    ll.ctx.say(f"llama: [test seam CI_CUDA_SUBSET] configure {w.name} with CUDA in {sub}")
    r = ll.sh(f"cmake -S {quote(ll.src)} -B {quote(sub)} {join(w.args)} >> {quote(log)} 2>&1",
              env=env, check=False, timeout=3600)
    if not r.ok:
        ll.sh(f"rm -rf {quote(d)}", check=False)
        ll.fail(f"CUDA configure of {w.name} failed (exit {r.exited})", log, current)
    t1 = time.monotonic()
    objs = subset.ninja_targets()
    r = ll.sh(f"cmake --build {quote(sub)} --verbose --target {join(objs)} >> {quote(log)} 2>&1",
              env=env, check=False, timeout=3600)
    if not r.ok:
        ll.sh(f"rm -rf {quote(d)}", check=False)
        ll.fail(f"CUDA objects of {w.name} failed to compile (exit {r.exited})", log, current)
    ll.ctx.say(f"llama: [test seam CI_CUDA_SUBSET] compiled {len(objs)} CUDA objects "
               f"({', '.join(subset.sources)}) for arch {';'.join(w.archs)} in "
               f"{time.monotonic() - t1:.0f}s; the served binaries are a CPU build")
    return {"dir": sub, "objects": [f"{sub}/{o}" for o in objs], "archs": list(w.archs),
            "configure_seconds": round(t1 - t0, 2), "compile_seconds": round(time.monotonic() - t1, 2),
            "served": "CPU build of the same commit (-DGGML_CUDA=OFF)"}
