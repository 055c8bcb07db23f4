#!/usr/bin/env python3
"""GPU proof for `bench` and `tune` (batch, split modes, power) on a box the tool reaches with
`connection: local` (no systemd, no internet needed).

Everything runs through the same code as the invoke tasks (provision.bench / provision.tune, a
LocalTarget, real nvidia-smi power sampling and `nvidia-smi -pl`), with the seed's flags (-ngl 999
-c 262144 -ctk q8_0 -ctv q8_0 --split-mode layer [-ts ...]) on a generated qwen35moe:

  build   build llama-bench, llama-fit-params and llama-server with CUDA from a llama.cpp tree
          into <work>/prefix/llama.cpp/builds/gpu (Ninja, arch from nvidia-smi), `current` -> it
  model   write a random f16 qwen35moe GGUF, 4 shards (--size medium: 4.25 GB; large: 46 GB)
  power   tune --power: a power sweep (default: each GPU's minimum .. default limit in 6 steps, or
          --watts), decode/prefill t/s, W and tokens/kWh per limit, the knee, the t/s cost at the
          knee; limits restored afterwards (the found limits are re-read and checked)
  tune    the batch tune --times N times in a row at --depth (default 4096, as in issue 18):
          median and range of 3 separate runs per pair, and the significance rule's verdict
  split   with several --gpus: the batch tune with the -ts variants and split modes (row, tensor
          where the tree's llama-bench and llama-server list them), each VRAM-preflighted
  run     the older bench + tune proof (depth sweep with power, then tune)

Outputs: JSON + PNG of every run under --out (e.g. $OUT), and summary.json there with the key
numbers; `GPU PROOF ...` lines on stdout.

    python3 benchmarks/tune_gpu.py build --llama-src /opt/upstream/llama.cpp --work /tmp/gp
    python3 benchmarks/tune_gpu.py model --work /tmp/gp --size medium
    python3 benchmarks/tune_gpu.py power --work /tmp/gp --gpus 0 --watts 200,300,400,500,600,700 --out $OUT/power
    python3 benchmarks/tune_gpu.py tune  --work /tmp/gp --gpus 0 --times 2 --out $OUT/tune
    python3 benchmarks/tune_gpu.py split --work /tmp/gp --gpus 0,1 --ts 0.9,1 --out $OUT/split
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the model: big enough that batch sizes matter, small enough to write in a minute
MODEL_DIMS = {
    # ~2.1 B params f16 (4.25 GB), 64 experts / 8 used: "several GB", like issue 18's 3.5 GB model
    "medium": dict(n_layer=16, full_attention_interval=4, n_embd=2048, n_head=16, n_head_kv=2,
                   head_dim=128, n_expert=64, n_expert_used=8, n_ff_exp=256, n_ff_shexp=512,
                   ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32),
    # ~22 B params, ~2.4 B active (8 of 128 experts): enough work per ubatch to load the GPUs
    "large": dict(n_layer=24, full_attention_interval=4, n_embd=3072, n_head=32, n_head_kv=2,
                  head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=768, n_ff_shexp=768,
                  ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32),
    "tiny": dict(n_layer=8, full_attention_interval=4),
}
TARGETS = ("llama-bench", "llama-fit-params", "llama-server")


def _fast_weights() -> None:
    """Random weights fast enough for GBs: tile a pool of 2^20+7 normal samples (per scale and
    dtype) instead of drawing every value. Routing stays varied; speed is what is measured."""
    import numpy as np
    from tests.fixtures import tiny_gguf

    pools: dict = {}

    def mat(self, *ne, scale=0.05, dtype=np.float16):
        key = (scale, np.dtype(dtype).str)
        if key not in pools:
            pools[key] = (self.rng.standard_normal(1048583) * scale).astype(dtype)
        return np.resize(pools[key], tuple(reversed(ne)))

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


def prefix(work: Path) -> Path:
    return work / "prefix"


def bindir(work: Path) -> Path:
    return prefix(work) / "llama.cpp" / "current" / "bin"


def _rpc_target(src: Path) -> str:
    """ggml-rpc-server (new trees) or rpc-server (older): what tools/rpc builds."""
    text = (src / "tools" / "rpc" / "CMakeLists.txt").read_text() if (src / "tools" / "rpc").exists() else ""
    return "ggml-rpc-server" if "ggml-rpc-server" in text else "rpc-server"


def build(src: Path, work: Path, jobs: int, rpc: bool = False) -> Path:
    name = "gpu-rpc" if rpc else "gpu"  # --rpc: -DGGML_RPC=ON and the rpc server (benchmarks/rpc_gpu.py)
    bdir = prefix(work) / "llama.cpp" / "builds" / name
    targets = TARGETS + ((_rpc_target(src),) if rpc else ())
    if all((bdir / "bin" / t).exists() for t in targets):
        print(f"build: {bdir}/bin has {', '.join(targets)}", flush=True)
    else:
        t0 = time.monotonic()
        opts = ("-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DBUILD_SHARED_LIBS=OFF "
                f"-DCMAKE_CUDA_ARCHITECTURES={gpu_arch()} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                "-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF" + (" -DGGML_RPC=ON" if rpc else ""))
        log = work / f"build-{name}.log"
        sh(f"cmake -S {src} -B {bdir} {opts} > {log} 2>&1 || (tail -30 {log}; exit 1)")
        sh(f"cmake --build {bdir} -j{jobs} --target {' '.join(targets)} >> {log} 2>&1 || (tail -30 {log}; exit 1)")
        print(f"build: {', '.join(targets)} with CUDA in {time.monotonic() - t0:.0f}s", flush=True)
    cur = prefix(work) / "llama.cpp" / "current"
    if cur.is_symlink() or cur.exists():
        cur.unlink()
    cur.symlink_to(f"builds/{name}")
    return bindir(work) / "llama-bench"


def make_model(work: Path, size: str) -> Path:
    mdir = work / "model"
    name = f"qwen35moe-{size}"
    first = mdir / f"{name}-00001-of-00004.gguf"
    if first.exists():
        return first
    from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
    if size != "tiny":
        _fast_weights()
    t0 = time.monotonic()
    paths = write_tiny_qwen35moe(mdir, name, 4, **MODEL_DIMS[size])
    gb = sum(p.stat().st_size for p in paths) / 1e9
    print(f"model: {name}, {gb:.2f} GB in {time.monotonic() - t0:.0f}s", flush=True)
    return paths[0]


def inventory(work: Path, n_gpus: int, ts: list[float] | None) -> Path:
    """The seed's server flags (hosts.yaml's `rig`), on this box's prefix."""
    server = {"n_gpu_layers": 999, "split_mode": "layer", "flash_attn": "auto",
              "cache_type_k": "q8_0", "cache_type_v": "q8_0", "ctx_size": 262144, "parallel": 1}
    if n_gpus > 1:
        server["tensor_split"] = ts or [1] * n_gpus
    import yaml
    p = work / f"hosts-{n_gpus}gpu.yaml"
    p.write_text("# written by benchmarks/tune_gpu.py (the seed's server flags)\n" + yaml.safe_dump(
        {"hosts": {"gpu": {"connection": {"type": "local"}, "gpus": {"count": n_gpus},
                           "llama_cpp": {"cuda": True},
                           "paths": {"prefix": str(prefix(work)), "state_dir": str(work / "state")},
                           "server": server}}}, sort_keys=False))
    return p


def _env(gpus: list[int]) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


def _host(app, fn, title: str):
    box: dict = {}

    def go(ctx):
        box["r"] = fn(ctx)
        return False
    st = app.each_host("gpu", go, title=title)
    if int(st) != 0:
        raise SystemExit(f"{title} failed (exit {int(st)})")
    return box["r"]


def _keep(res_dir: str, out: Path, name: str) -> str:
    """Copy a results folder (JSON + PNG) to --out/<name>."""
    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(res_dir, dest)
    return str(dest)


def _summary(out: Path, key: str, value) -> None:
    p = out / "summary.json"
    doc = json.loads(p.read_text()) if p.exists() else {}
    doc[key] = value
    p.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def power(a, binary: Path, model: Path) -> dict:
    from provision.app import App
    from provision.tune import options as O
    from provision.tune.power import run_power_tune
    gpus = [int(x) for x in a.gpus.split(",")]
    _env(gpus)
    inv = inventory(a.work, len(gpus), None)
    opts = O.TuneOptions(power=True, watts=O.parse_watts(a.watts), keep=O.parse_keep(a.keep), reps=a.reps,
                         depth=a.depth if a.depth is not None else None, n_gen=a.gen, bench_reps=a.bench_reps,
                         gpu_ids=gpus, service="keep", binary=str(binary), model=str(model),
                         results_root=str(a.work / "results"), inventory_path=str(inv))
    t0 = time.monotonic()
    r = _host(App(inventory_path=str(inv)), lambda ctx: run_power_tune(ctx, opts), "tune --power")
    doc = json.loads((Path(r["dir"]) / "tune-power.json").read_text())
    kept = _keep(r["dir"], a.out, "power")
    k, e = doc.get("knee") or {}, doc.get("most_efficient") or {}
    found = r["found"]
    line = (f"GPU PROOF power {gpu_name()} x{len(gpus)}: knee {k.get('label')} keeps "
            f"{(k.get('decode_share_of_best') or 0):.1%} of the best decode t/s "
            f"(t/s cost at the knee vs the limits found {found.label}: {((k.get('decode_vs_found') or 1) - 1):+.1%}), "
            f"tokens/kWh {(k.get('tokens_per_kwh_vs_found') or 0):.3f}x the found limits'; most tokens/kWh at "
            f"{e.get('label')} ({(e.get('decode_share_of_best') or 0):.1%} of the best decode t/s); "
            f"verdict: {doc['winner']}; {time.monotonic() - t0:.0f}s")
    print(line, flush=True)
    rec = {"line": line, "dir": kept, "knee": k, "most_efficient": e, "winner": doc["winner"],
           "found": found.limits, "points": [{"label": p["label"], "decode_ts": p["decode_ts"]["median"],
                                              "power_w": p["power_w"]["median"],
                                              "tokens_per_kwh": p["tokens_per_kwh"]["median"]}
                                             for p in doc["points"]],
           "limits_after": _limits(gpus)}
    _summary(a.out, "power", rec)
    return rec


def _limits(gpus: list[int]) -> list[float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,power.limit", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    vals = {int(i): float(w) for i, w in (ln.split(",") for ln in out.splitlines() if ln.strip())}
    return [vals[g] for g in gpus]


def tune(a, binary: Path, model: Path, split: bool) -> list[dict]:
    from provision.app import App
    from provision.tune import options as O
    from provision.tune.batch import run_batch_tune
    gpus = [int(x) for x in a.gpus.split(",")]
    if split and len(gpus) < 2:
        raise SystemExit("split needs at least two --gpus")
    _env(gpus)
    ts = [float(x) for x in a.ts.split(",")] if a.ts else None
    inv = inventory(a.work, len(gpus), ts)
    recs = []
    for i in range(a.times):
        opts = O.TuneOptions(depth=a.depth or 4096, reps=a.reps, pairs=O.parse_pairs(a.pairs), splits=split,
                             service="keep", binary=str(binary), model=str(model),
                             results_root=str(a.work / "results"), inventory_path=str(inv))
        t0 = time.monotonic()
        r = _host(App(inventory_path=str(inv)), lambda ctx: run_batch_tune(ctx, opts), "tune")
        doc = json.loads((Path(r["dir"]) / "tune.json").read_text())
        name = f"{'split' if split else 'tune'}-{i + 1}"
        kept = _keep(r["dir"], a.out, name)
        cands = doc["candidates"]
        top = max((c for c in cands if c["vs_reference"]), key=lambda c: c["vs_reference"], default=None)
        cur = doc["current"]
        line = (f"GPU PROOF {name} {gpu_name()} x{len(gpus)} pp{opts.batch_depth}: current {cur['label']} "
                f"{cur['median']:,.1f} t/s ({cur['min']:,.1f}–{cur['max']:,.1f}); best median "
                + (f"{top['label']} {top['median']:,.1f} ({top['min']:,.1f}–{top['max']:,.1f}) = "
                   f"{top['vs_reference']:.3f}x the current flags in the same rounds" if top else "-")
                + f"; verdict: {doc['verdict']}"
                + (f" ({doc['speedup_vs_current']:.3f}x on the confirmation runs)" if doc["speedup_vs_current"] else "")
                + f"; {time.monotonic() - t0:.0f}s")
        print(line, flush=True)
        rec = {"line": line, "dir": kept, "current": cur, "best_median": top, "leader": doc["leader"],
               "confirmation": doc["confirmation"], "verdict": doc["verdict"],
               "speedup": doc["speedup_vs_current"],
               "split_candidates": [{"label": c["label"], "fit": c["fit"], "median": c["median"],
                                     "errors": c["errors"][-1:]} for c in cands if c["stage"] == "split"]}
        recs.append(rec)
        _summary(a.out, name, rec)
    return recs


def legacy_run(a, binary: Path, model: Path) -> None:
    """bench (depth sweep with power) + tune, as recorded in gpu-proof-20261127-h200x4."""
    from provision.app import App
    from provision.bench import flags as bf, sweep
    from provision.tune import options as O
    from provision.tune.batch import run_batch_tune
    gpus = [int(x) for x in a.gpus.split(",")]
    _env(gpus)
    inv = inventory(a.work, len(gpus), None)
    app = App(inventory_path=str(inv))
    bopts = sweep.BenchOptions(depths=bf.parse_depths(a.depths), reps=3, ttft=False, service="keep",
                               binary=str(binary), model=str(model), results_root=str(a.work / "results"),
                               power_ids=gpus)
    r = _host(app, lambda ctx: sweep.run_bench(ctx, bopts), "bench")
    _keep(r["dir"], a.out, "bench")
    topts = O.TuneOptions(depth=a.depth or 8192, reps=a.reps, pairs=O.parse_pairs(a.pairs), service="keep",
                          binary=str(binary), model=str(model), results_root=str(a.work / "results"),
                          inventory_path=str(inv))
    r = _host(app, lambda ctx: run_batch_tune(ctx, topts), "tune")
    _keep(r["dir"], a.out, "tune")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "model", "power", "tune", "split", "run"])
    ap.add_argument("--llama-src", type=Path, help="llama.cpp source tree (build)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gp"))
    ap.add_argument("--out", type=Path, default=None, help="where JSON/PNG and summary.json go (default <work>/out)")
    ap.add_argument("--binary", type=Path, help="an existing llama-bench (default <work>/prefix/.../current/bin)")
    ap.add_argument("--model", type=Path, help="an existing GGUF shard 1 (default: the generated one)")
    ap.add_argument("--size", choices=sorted(MODEL_DIMS), default="medium")
    ap.add_argument("--gpus", default="0", help="CUDA device ids, e.g. 0 or 0,1")
    ap.add_argument("--ts", default=None, help="split: the current -ts (default 1 per GPU), e.g. 0.9,1")
    ap.add_argument("--watts", default=None, help="power: limits to try (default: min..default in 6 steps)")
    ap.add_argument("--keep", default=None, help="power: share of the best decode t/s the knee keeps (0.95)")
    ap.add_argument("--gen", type=int, default=512, help="power: decode tokens per llama-bench test")
    ap.add_argument("--bench-reps", type=int, default=3, help="power: llama-bench -r inside each run")
    ap.add_argument("--depth", type=int, default=None, help="tune: prompt length (4096); power: KV depth (4096)")
    ap.add_argument("--reps", type=int, default=3, help="separate runs of every point")
    ap.add_argument("--times", type=int, default=1, help="tune/split: how many tunes in a row")
    ap.add_argument("--pairs", default=None, help="ub/b pairs (default: provision.tune.options.DEFAULT_PAIRS)")
    ap.add_argument("--depths", default="0,4096,16384", help="run: bench depths")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    ap.add_argument("--rpc", action="store_true", help="build: with -DGGML_RPC=ON and the rpc server "
                    "(into builds/gpu-rpc; benchmarks/rpc_gpu.py)")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out = a.out or a.work / "out"
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "build":
        if not a.llama_src:
            ap.error("build needs --llama-src")
        build(a.llama_src, a.work, a.jobs, rpc=a.rpc)
        return 0
    if a.what == "model":
        make_model(a.work, a.size)
        return 0
    binary = a.binary or bindir(a.work) / "llama-bench"
    if not binary.exists():
        ap.error(f"{binary} not found: run `build` first (or pass --binary)")
    model = a.model or make_model(a.work, a.size)
    if a.what == "power":
        power(a, binary, model)
    elif a.what in ("tune", "split"):
        tune(a, binary, model, split=a.what == "split")
    else:
        legacy_run(a, binary, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
