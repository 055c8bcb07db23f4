#!/usr/bin/env python3
"""Device proof for issue 12 (run ON a GPU box with nvcc, `connection: local`, no internet/systemd).

With every CUDA bin dir taken off PATH and no CUDACXX / CUDA_PATH / CUDA_HOME / CUDAToolkit_ROOT
in the environment (a plain non-login shell right after NVIDIA's packages), it runs

    invoke provision --host local --skip model,service,opencode

three times and records what happened:
  1. the facts found the toolkit anyway (its location, nvcc's version, the cuda keyring's key
     fingerprints if NVIDIA's keyring is installed) and the llama step built llama.cpp WITH CUDA
     (CMake's CUDA compiler came through CUDACXX/CUDAToolkit_ROOT; CUDA objects compiled;
     `llama-server --list-devices` lists the GPUs); the gpu step changed a REAL power limit
     (each GPU to its current limit minus --delta W, within min/max);
  2. the same with the original limits: the gpu step puts them back, the llama step has nothing
     to build;
  3. again: 0 changes.

    bash benchmarks/device/setup.sh && . /tmp/rig-env.sh && \\
    python3 benchmarks/cuda_path_proof.py --upstream /opt/upstream/llama.cpp --out $OUT/cuda-path

Writes <out>/record.json, <out>/run{1,2,3}.log, <out>/llama-build.log (the configure + build log)
and prints a summary. Exit 0 only if every check held. THE PREFIX (--prefix, default
/tmp/llama-proof) IS WIPED FIRST. The power limits are put back even if a run fails.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUDA_ENV = ("CUDACXX", "CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR")


def gpus() -> list[dict]:
    q = "index,name,compute_cap,power.limit,power.min_limit,power.max_limit,power.default_limit"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for ln in out.strip().splitlines():
        i, name, cc, pl, lo, hi, dflt = [x.strip() for x in ln.split(",")]
        rows.append({"index": int(i), "name": name, "cc": cc, "limit": float(pl), "min": float(lo),
                     "max": float(hi), "default": float(dflt)})
    return rows


def plain_env() -> tuple[dict[str, str], list[str]]:
    """This environment minus CUDA: every PATH dir holding nvcc goes, and the CUDA variables."""
    env = {k: v for k, v in os.environ.items() if k not in CUDA_ENV}
    keep, dropped = [], []
    for d in env.get("PATH", "").split(":"):
        if d and (os.path.exists(os.path.join(d, "nvcc")) or "/cuda" in d):
            dropped.append(d)
        elif d:
            keep.append(d)
    env["PATH"] = ":".join(keep)
    assert shutil.which("nvcc", path=env["PATH"]) is None
    return env, dropped


def inventory(path: Path, a, n: int, limits: list[float]) -> None:
    import yaml
    path.write_text(yaml.safe_dump({"hosts": {"local": {
        "connection": {"type": "local"},
        "gpus": {"count": n, "power_limit": limits},
        # an offline box: nothing to install from apt (what the build needs is there already)
        "system": {"packages": [], "driver": "require"},
        "llama_cpp": {"repo": a.upstream, "ref": "master", "cuda": True, "cuda_architectures": "auto",
                      "fa_all_quants": a.fa_all_quants == "on", "prebuilt_ui": False,
                      "targets": [t for t in a.targets.split(",") if t]},
        "paths": {"prefix": a.prefix, "state_dir": f"{a.prefix}/state"},
    }}}, sort_keys=False))


def provision(inv: Path, env: dict, log: Path, skip: str) -> dict:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "provision", "--host", "local",
            "--inventory", str(inv), "--skip", skip]
    t0 = time.monotonic()
    r = subprocess.run(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=3000)
    secs = time.monotonic() - t0
    log.write_text(r.stdout)
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.split()[:1] == ["local"]]
    recap = dict(zip(["host", "result", "ok", "changed", "failed", "skipped", "time"], rows[-1])) if rows else {}
    return {"exit": r.returncode, "seconds": round(secs, 1), "recap": recap,
            "changes": [ln.split("change: ", 1)[1] for ln in r.stdout.splitlines() if "] " in ln and ": change: " in ln],
            "output_tail": r.stdout.splitlines()[-12:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="local git repo of llama.cpp (llama_cpp.repo)")
    ap.add_argument("--prefix", default="/tmp/llama-proof")
    ap.add_argument("--delta", type=float, default=50.0, help="lower each GPU's limit by this many W")
    ap.add_argument("--out", required=True)
    ap.add_argument("--targets", default="llama-server",
                    help="llama_cpp.targets, comma-separated (add llama-bench,llama-fit-params to reuse the "
                         "build for benchmarks/tune_gpu.py: --prefix <work>/prefix)")
    ap.add_argument("--fa-all-quants", choices=("on", "off"), default="on",
                    help="llama_cpp.fa_all_quants (off: the tree's default FA quants, a shorter CUDA build)")
    ap.add_argument("--skip", default="model,service,opencode",
                    help="steps to skip (a dry run without a GPU: llama,model,service,opencode)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.prefix, ignore_errors=True)
    env, dropped = plain_env()
    before = gpus()
    n = len(before)
    original = [g["limit"] for g in before]
    lowered = [max(g["min"], g["limit"] - a.delta) for g in before]
    rec: dict = {"gpus": before, "path_dirs_removed": dropped, "cuda_env_removed": [k for k in CUDA_ENV if k in os.environ],
                 "nvcc_on_plain_path": shutil.which("nvcc", path=env["PATH"]), "limits_original": original,
                 "limits_run1": lowered}
    inv = out / "hosts.yaml"
    checks: dict[str, bool] = {}
    try:
        from provision import inventory as invmod
        from provision.facts import host as host_facts
        from provision.target import LocalTarget
        inventory(inv, a, n, lowered)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # the facts as the plain shell sees them
        try:
            hf = host_facts.gather(LocalTarget(invmod.load(inv).hosts["local"]), a.prefix)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        rec["facts"] = {"os": hf.os_pretty, "kernel": hf.kernel, "nvcc_path": hf.nvcc_path,
                        "nvcc_version": hf.nvcc_version, "cuda_home": hf.cuda_home,
                        "cuda_keyring_fingerprints": hf.cuda_keyring_fprs, "cuda_lists": hf.cuda_lists,
                        "secure_boot": hf.secure_boot, "headers_candidate": hf.headers_candidate,
                        "cmake": hf.cmake_version, "gcc": hf.gcc_version}
        checks["facts found nvcc off PATH"] = bool(hf.nvcc_path)

        rec["run1"] = provision(inv, env, out / "run1.log", a.skip)
        after1 = gpus()
        rec["limits_after_run1"] = [g["limit"] for g in after1]
        checks["run1 exit 0"] = rec["run1"]["exit"] == 0
        checks["run1 changed the power limits"] = (rec["limits_after_run1"] == lowered and lowered != original)
        cur = Path(a.prefix) / "llama.cpp/current"
        info = json.loads((cur / "llama-rig-build.json").read_text()) if (cur / "llama-rig-build.json").exists() else {}
        rec["build"] = {k: info.get(k) for k in ("name", "cmake_args", "archs", "nvcc", "configure_seconds",
                                                  "build_seconds", "compiled", "version", "ccache")}
        if info.get("log") and Path(info["log"]).exists():
            shutil.copy(info["log"], out / "llama-build.log")
            text = Path(info["log"]).read_text(errors="replace")
            rec["build"]["cuda_compiler_line"] = next((ln for ln in text.splitlines()
                                                       if "CUDA compiler identification" in ln), None)
            rec["build"]["cuda_objects"] = text.count("Building CUDA object")
        checks["built with -DGGML_CUDA=ON"] = "-DGGML_CUDA=ON" in (info.get("cmake_args") or [])
        checks["CUDA objects compiled"] = rec["build"].get("cuda_objects", 0) > 0
        if (cur / "bin/llama-server").exists():
            r = subprocess.run([str(cur / "bin/llama-server"), "--list-devices"], capture_output=True,
                               text=True, timeout=120)
            rec["list_devices"] = (r.stdout + r.stderr).strip().splitlines()[-8:]
            checks["llama-server lists a CUDA device"] = any("CUDA0" in ln for ln in rec["list_devices"])

        inventory(inv, a, n, original)
        rec["run2"] = provision(inv, env, out / "run2.log", a.skip)
        rec["limits_after_run2"] = [g["limit"] for g in gpus()]
        checks["run2 exit 0"] = rec["run2"]["exit"] == 0
        checks["run2 put the limits back"] = rec["limits_after_run2"] == original
        checks["run2 built nothing"] = not any(c.startswith(("build llama.cpp", "fetch and build"))
                                               for c in rec["run2"]["changes"])
        rec["run3"] = provision(inv, env, out / "run3.log", a.skip)
        checks["run3: 0 changes"] = rec["run3"]["exit"] == 0 and rec["run3"]["recap"].get("changed") == "0"
    finally:
        now = [g["limit"] for g in gpus()]
        if now != original:  # never leave the lent GPUs at other limits
            for g, w in zip(before, original):
                subprocess.run(["nvidia-smi", "-i", str(g["index"]), "-pl", f"{w:g}"], capture_output=True)
            rec["limits_restored_by_script"] = [g["limit"] for g in gpus()]
        rec["checks"] = checks
        (out / "record.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("facts", "build", "limits_original", "limits_after_run1",
                                              "limits_after_run2", "list_devices")}, indent=2, default=str))
    for k, v in checks.items():
        print(f"{'ok  ' if v else 'FAIL'} {k}")
    for r in ("run1", "run2", "run3"):
        if r in rec:
            print(f"{r}: exit {rec[r]['exit']} in {rec[r]['seconds']}s, recap {rec[r]['recap']}")
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
