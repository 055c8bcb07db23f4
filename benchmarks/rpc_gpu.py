#!/usr/bin/env python3
"""Device proof for llama.cpp's RPC backend (issue 16): two GPUs through `--rpc` vs the same two GPUs
used directly, on one lent box (no systemd, no internet).

  direct  llama-bench -ngl 999 -sm layer -ts 1/1 on GPUs 0 and 1 in one process
  rpc     two ggml-rpc-servers on loopback (one GPU each via CUDA_VISIBLE_DEVICES), and llama-bench
          with --rpc 127.0.0.1:P0,127.0.0.1:P1 and no local GPU (CUDA_VISIBLE_DEVICES=""), the same
          flags: the layers live on the two rpc servers, every token crosses the RPC protocol
  load    llama-server's load time to /health 200: direct; through --rpc without the tensor cache;
          with `-c` on an empty cache (cold: the servers fill it); and again after restarting the
          rpc servers and the main (warm: tensors > 10 MiB come from each server's cache)

Prints `RPC PROOF ...` lines and writes <out>/rpc_gpu.json: prefill and decode t/s of both, their
ratios (rpc / direct), and the load times. `--bin DIR` holds llama-bench, llama-server and
ggml-rpc-server (or rpc-server) of one CUDA build with -DGGML_RPC=ON:

    python3 benchmarks/tune_gpu.py build --rpc --llama-src /opt/upstream/llama.cpp --work /tmp/gp
    python3 benchmarks/tune_gpu.py model --work /tmp/gp --size medium
    python3 benchmarks/rpc_gpu.py --bin /tmp/gp/prefix/llama.cpp/builds/gpu-rpc/bin \\
        --model /tmp/gp/model/qwen35moe-medium-00001-of-00004.gguf --out $OUT/rpc

`--cpu` runs the same logic on a CPU build (no GPUs: the rpc servers expose their CPU) to test it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rpc_binary(bindir: Path) -> Path:
    for name in ("ggml-rpc-server", "rpc-server"):
        if (bindir / name).exists():
            return bindir / name
    raise SystemExit(f"{bindir}: no ggml-rpc-server or rpc-server (build with -DGGML_RPC=ON)")


def env_for(gpus: str | None) -> dict[str, str]:
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


class RpcServers:
    """Two rpc servers on loopback, one GPU each (GPU i -> port i)."""

    def __init__(self, binary: Path, gpus: list[str], work: Path, cache_dir: Path | None, cpu: bool):
        self.binary, self.gpus, self.work, self.cache_dir, self.cpu = binary, gpus, work, cache_dir, cpu
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self) -> "RpcServers":
        for i, g in enumerate(self.gpus):
            port = free_port()
            argv = [str(self.binary), "-H", "127.0.0.1", "-p", str(port)]
            env = env_for(None if self.cpu else g)
            if self.cache_dir is not None:
                argv.append("-c")
                env["LLAMA_CACHE"] = str(self.cache_dir / f"server{i}")
            log = open(self.work / f"rpc-server{i}.log", "ab")
            self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            self.ports.append(port)
        deadline = time.monotonic() + 60
        for p, port in zip(self.procs, self.ports):
            while True:
                if p.poll() is not None:
                    raise SystemExit(f"rpc server on port {port} exited ({p.returncode}): see {self.work}/rpc-server*.log")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"rpc server on port {port} does not listen after 60 s")
                    time.sleep(0.2)
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs, self.ports = [], []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def bench(bindir: Path, model: Path, a, gpus: str | None, rpc: list[str] | None, label: str) -> dict:
    argv = [str(bindir / "llama-bench"), "-m", str(model), "-ngl", "999", "-sm", "layer",
            "-ts", "/".join(["1"] * a.n_gpus), "-fa", "1", "-p", str(a.prompt), "-n", str(a.gen),
            "-r", str(a.reps), "-o", "json"]
    if rpc:
        argv += ["--rpc", ",".join(rpc)]
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env_for(gpus), capture_output=True, text=True, timeout=a.timeout)
    (a.out / f"bench-{label}.log").write_text(" ".join(argv) + "\n" + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench ({label}) failed (exit {r.returncode}): {r.stderr.strip()[-600:]}")
    rows = json.loads(r.stdout)
    out = {"seconds": round(time.monotonic() - t0, 1), "argv": argv[1:]}
    for row in rows:
        key = "prefill" if row.get("n_prompt") and not row.get("n_gen") else "decode"
        out[f"{key}_tps"] = round(float(row["avg_ts"]), 2)
        out[f"{key}_stddev"] = round(float(row.get("stddev_ts") or 0), 2)
        out["build"] = f"b{row.get('build_number')}-{row.get('build_commit')}"
        out["devices"] = row.get("gpu_info") or row.get("backends")
    print(f"RPC PROOF bench {label}: prefill {out.get('prefill_tps')} t/s, decode {out.get('decode_tps')} t/s "
          f"({out['seconds']}s)", flush=True)
    return out


def load_time(bindir: Path, model: Path, a, gpus: str | None, rpc: list[str] | None, label: str) -> float:
    port = free_port()
    argv = [str(bindir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-ngl", "999", "--split-mode", "layer", "-ts", ",".join(["1"] * a.n_gpus), "-c", str(a.ctx),
            "--no-warmup", "--parallel", "1"]
    if rpc:
        argv += ["--rpc", ",".join(rpc)]
    log = open(a.out / f"server-{label}.log", "wb")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env_for(gpus), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if p.poll() is not None:
                raise SystemExit(f"llama-server ({label}) exited {p.returncode}: see {a.out}/server-{label}.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > a.timeout:
                raise SystemExit(f"llama-server ({label}) not healthy after {a.timeout}s")
            time.sleep(0.1)
        took = time.monotonic() - t0
        # one completion: the model answers through the rpc servers
        body = json.dumps({"prompt": "Hello", "n_predict": 4}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    print(f"RPC PROOF load {label}: {took:.2f}s to /health 200", flush=True)
    return round(took, 2)


def cache_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.exists() else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="dir with llama-bench, llama-server, ggml-rpc-server")
    ap.add_argument("--model", type=Path, required=True, help="GGUF (shard 1)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rpc-proof"))
    ap.add_argument("--gpus", default="0,1", help="the two GPUs (CUDA ids)")
    ap.add_argument("--prompt", type=int, default=2048, help="llama-bench -p")
    ap.add_argument("--gen", type=int, default=128, help="llama-bench -n")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench -r")
    ap.add_argument("--ctx", type=int, default=8192, help="llama-server -c for the load times")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--cpu", action="store_true", help="CPU build: test the logic (the servers expose their CPU)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    gpus = [g.strip() for g in a.gpus.split(",") if g.strip()]
    a.n_gpus = len(gpus)
    rpcbin = rpc_binary(a.bin)
    t_all = time.monotonic()
    direct_env = None if a.cpu else ",".join(gpus)
    main_env = None if a.cpu else ""  # the main process sees no GPU: every layer is on the rpc servers
    rec: dict = {"box": subprocess.run("nvidia-smi -L", shell=True, capture_output=True, text=True).stdout.strip()
                 if not a.cpu else "cpu", "model": str(a.model), "model_bytes": a.model.stat().st_size,
                 "rpc_binary": rpcbin.name, "gpus": gpus}

    rec["direct"] = bench(a.bin, a.model, a, direct_env, None, "direct")
    with RpcServers(rpcbin, gpus, a.out, None, a.cpu) as srv:
        rec["rpc"] = bench(a.bin, a.model, a, main_env, srv.endpoints, "rpc")
    for k in ("prefill", "decode"):
        d, r = rec["direct"].get(f"{k}_tps"), rec["rpc"].get(f"{k}_tps")
        rec[f"{k}_ratio_rpc_vs_direct"] = round(r / d, 3) if d and r else None
    print(f"RPC PROOF ratio rpc/direct: prefill {rec['prefill_ratio_rpc_vs_direct']}, "
          f"decode {rec['decode_ratio_rpc_vs_direct']}", flush=True)

    loads: dict = {"direct_s": load_time(a.bin, a.model, a, direct_env, None, "direct")}
    with RpcServers(rpcbin, gpus, a.out, None, a.cpu) as srv:
        loads["rpc_no_cache_s"] = load_time(a.bin, a.model, a, main_env, srv.endpoints, "rpc-nocache")
    cache = a.out / "rpc-cache"
    if cache.exists():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    with RpcServers(rpcbin, gpus, a.out, cache, a.cpu) as srv:
        loads["rpc_cache_cold_s"] = load_time(a.bin, a.model, a, main_env, srv.endpoints, "rpc-cache-cold")
    loads["cache_bytes"] = cache_bytes(cache)
    with RpcServers(rpcbin, gpus, a.out, cache, a.cpu) as srv:  # restarted servers, the same cache
        loads["rpc_cache_warm_s"] = load_time(a.bin, a.model, a, main_env, srv.endpoints, "rpc-cache-warm")
    loads["warm_vs_no_cache"] = round(loads["rpc_cache_warm_s"] / loads["rpc_no_cache_s"], 3) \
        if loads["rpc_no_cache_s"] else None
    rec["load"] = loads
    rec["seconds"] = round(time.monotonic() - t_all, 1)
    print(f"RPC PROOF load: direct {loads['direct_s']}s, rpc no cache {loads['rpc_no_cache_s']}s, "
          f"cache cold {loads['rpc_cache_cold_s']}s, warm {loads['rpc_cache_warm_s']}s "
          f"({loads['cache_bytes'] / 1e9:.2f} GB cached; warm/no-cache {loads['warm_vs_no_cache']})", flush=True)
    (a.out / "rpc_gpu.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(f"RPC PROOF done in {rec['seconds']}s -> {a.out}/rpc_gpu.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
