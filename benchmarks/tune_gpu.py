#!/usr/bin/env python3
"""GPU proof for `bench` and `tune` on a box the tool reaches with `connection: local`.

What it does, through the same code as `invoke bench` / `invoke tune` (provision.bench/.tune,
a LocalTarget, real nvidia-smi power sampling):

  build   build llama-bench with CUDA from a llama.cpp tree (Ninja, native arch from nvidia-smi)
  model   write a random f16 qwen35moe GGUF (the seed's architecture; default ~1.9 B params,
          64 experts / 8 used, like the hand sweep's 3.7 GB model), 4 shards
  run     bench: depth sweep (default 0,4096,16384) with power; tune: -ub/-b pairs at pp8192
          (and -ts variants with several GPUs); prints the prefill ratio of the best flags vs
          the seed's b2048/ub512 on this same box
  all     build + model + run

Example (one GPU, then a 4-GPU layer split on the same box):

  python3 benchmarks/tune_gpu.py all --llama-src /path/to/llama.cpp --work /tmp/gpu-proof --gpus 0
  python3 benchmarks/tune_gpu.py run --work /tmp/gpu-proof --gpus 0,1,2,3

Results land in results/<host>/<timestamp>/ (bench: results.json/.csv + PNGs; tune: tune.json)
and a summary line per run in <work>/summary.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the model: big enough that batch sizes matter, small enough to write in a minute
MODEL_DIMS = {
    "medium": dict(n_layer=16, full_attention_interval=4, n_embd=2048, n_head=16, n_head_kv=2,
                   head_dim=128, n_expert=64, n_expert_used=8, n_ff_exp=256, n_ff_shexp=512,
                   ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32),
    # ~22 B params, ~2.4 B active (8 of 128 experts): enough work per ubatch to load the GPUs
    "large": dict(n_layer=24, full_attention_interval=4, n_embd=3072, n_head=32, n_head_kv=2,
                  head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=768, n_ff_shexp=768,
                  ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32),
    "tiny": dict(n_layer=8, full_attention_interval=4),
}


def _fast_weights() -> None:
    """Random weights fast enough for tens of GB: tile a pool of 2^20+7 normal samples (per scale
    and dtype) instead of drawing every value. Routing stays varied; speed is what is measured."""
    import numpy as np
    from tests.fixtures import tiny_gguf

    pools: dict = {}

    def mat(self, *ne, scale=0.05, dtype=np.float16):
        key = (scale, np.dtype(dtype).str)
        if key not in pools:
            pools[key] = (self.rng.standard_normal(1048583) * scale).astype(dtype)
        shape = tuple(reversed(ne))
        return np.resize(pools[key], shape)

    tiny_gguf._Weights.mat = mat


def sh(cmd: str, **kw) -> None:
    print(f"+ {cmd}", flush=True)
    subprocess.run(cmd, shell=True, check=True, **kw)


def gpu_arch() -> str:
    out = subprocess.run("nvidia-smi --query-gpu=compute_cap --format=csv,noheader", shell=True,
                         capture_output=True, text=True).stdout.split()
    return out[0].replace(".", "") if out else "native"


def gpu_name() -> str:
    out = subprocess.run("nvidia-smi --query-gpu=name --format=csv,noheader", shell=True,
                         capture_output=True, text=True).stdout.splitlines()
    return out[0].strip() if out else "?"


def build(src: Path, work: Path, jobs: int) -> Path:
    bdir = work / "build"
    binary = bdir / "bin" / "llama-bench"
    if binary.exists():
        print(f"build: {binary} exists", flush=True)
        return binary
    t0 = time.monotonic()
    opts = ("-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DBUILD_SHARED_LIBS=OFF "
            f"-DCMAKE_CUDA_ARCHITECTURES={gpu_arch()} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
            "-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF")
    sh(f"cmake -S {src} -B {bdir} {opts} > {work}/cmake.log 2>&1 || (tail -30 {work}/cmake.log; exit 1)")
    sh(f"cmake --build {bdir} -j{jobs} --target llama-bench > {work}/build.log 2>&1 || (tail -30 {work}/build.log; exit 1)")
    print(f"build: llama-bench with CUDA in {time.monotonic() - t0:.0f}s", flush=True)
    return binary


def make_model(work: Path, size: str) -> Path:
    mdir = work / "model"
    name = f"qwen35moe-{size}"
    first = mdir / f"{name}-00001-of-00004.gguf"
    if first.exists():
        return first
    from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
    if size == "large":
        _fast_weights()
    t0 = time.monotonic()
    paths = write_tiny_qwen35moe(mdir, name, 4, **MODEL_DIMS[size])
    gb = sum(p.stat().st_size for p in paths) / 1e9
    print(f"model: {name}, {gb:.2f} GB in {time.monotonic() - t0:.0f}s", flush=True)
    return paths[0]


def inventory(work: Path, n_gpus: int) -> Path:
    server = {"n_gpu_layers": 999, "split_mode": "layer", "flash_attn": "on",
              "cache_type_k": "q8_0", "cache_type_v": "q8_0", "ctx_size": 262144}
    if n_gpus > 1:
        server["tensor_split"] = [1] * n_gpus
    import yaml
    p = work / f"hosts-{n_gpus}gpu.yaml"
    p.write_text("# written by benchmarks/tune_gpu.py\n" + yaml.safe_dump(
        {"hosts": {"gpu": {"connection": {"type": "local"}, "gpus": {"count": n_gpus},
                           "llama_cpp": {"cuda": True}, "server": server}}}, sort_keys=False))
    return p


def run(work: Path, binary: Path, model: Path, gpus: list[int], depths: str, reps: int,
        tune_depth: int, pairs: str | None, results: str, skip_bench: bool, tune_reps: int = 5) -> dict:
    from provision import bench as B
    from provision import tune as T
    from provision.app import App

    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    inv = inventory(work, len(gpus))
    app = App(inventory_path=str(inv))
    out: dict = {"gpus": gpus, "model": str(model), "binary": str(binary)}
    if not skip_bench:
        bopts = B.BenchOptions(depths=B.parse_depths(depths), reps=reps, ttft=False, service="keep",
                               binary=str(binary), model=str(model), results_root=results,
                               power_ids=gpus)

        def do_bench(ctx):
            r = B.run_bench(ctx, bopts)
            out["bench"] = {"dir": r["dir"], "points": [p.__dict__ for p in r["points"]]}
            return False
        st = app.each_host("gpu", do_bench, title="bench")
        if int(st) != 0:
            raise SystemExit(f"bench failed ({int(st)})")
    topts = T.TuneOptions(depth=tune_depth, reps=tune_reps, pairs=T.parse_pairs(pairs), service="keep",
                          binary=str(binary), model=str(model), results_root=results,
                          inventory_path=str(inv))

    def do_tune(ctx):
        r = T.run_tune(ctx, topts)
        out["tune"] = {"dir": r["dir"], "speedup_vs_seed": r["speedup"],
                       "best": r["best"].as_dict(), "seed": r["seed"].as_dict() if r["seed"] else None}
        return False
    st = app.each_host("gpu", do_tune, title="tune")
    if int(st) != 0:
        raise SystemExit(f"tune failed ({int(st)})")
    t = out["tune"]
    line = (f"GPU PROOF {len(gpus)} GPU(s) {gpus} {gpu_name()}: tune pp{tune_depth}: best {t['best']['label']} "
            f"{t['best']['prefill_ts']:,.1f} t/s vs seed b2048/ub512 "
            f"{(t['seed'] or {}).get('prefill_ts') or 0:,.1f} t/s = prefill ratio "
            f"{(t['speedup_vs_seed'] or 0):.3f}x")
    print(line, flush=True)
    out["summary"] = line
    with open(work / "summary.jsonl", "a") as fh:
        fh.write(json.dumps(out, default=str) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "model", "run", "all"])
    ap.add_argument("--llama-src", type=Path, help="llama.cpp source tree (build)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-proof"))
    ap.add_argument("--binary", type=Path, help="an existing llama-bench (skips the build)")
    ap.add_argument("--model", type=Path, help="an existing GGUF shard 1 (skips the model)")
    ap.add_argument("--size", choices=sorted(MODEL_DIMS), default="medium")
    ap.add_argument("--gpus", default="0", help="CUDA device ids, e.g. 0 or 0,1,2,3")
    ap.add_argument("--depths", default="0,4096,16384")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tune-depth", type=int, default=8192)
    ap.add_argument("--tune-reps", type=int, default=5)
    ap.add_argument("--pairs", default=None, help="ub/b pairs (default: provision.tune.DEFAULT_PAIRS)")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    ap.add_argument("--skip-bench", action="store_true", help="tune only")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    binary = a.binary or (a.work / "build" / "bin" / "llama-bench")
    if a.what in ("build", "all") and not a.binary:
        if not a.llama_src:
            ap.error("build needs --llama-src")
        binary = build(a.llama_src, a.work, a.jobs)
    model = a.model
    if a.what in ("model", "all") and not model:
        model = make_model(a.work, a.size)
    if a.what in ("run", "all"):
        model = model or make_model(a.work, a.size)
        run(a.work, binary, model, [int(x) for x in a.gpus.split(",")], a.depths, a.reps,
            a.tune_depth, a.pairs, a.results, a.skip_bench, a.tune_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
