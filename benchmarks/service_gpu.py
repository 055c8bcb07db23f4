#!/usr/bin/env python3
"""GPU proof for the service step (and the gpu step) on a box reached with `connection: local`.

No systemd there: it runs the service's RENDERED command line (provision.steps.service.server_argv,
the same argv the unit's ExecStart= gets) with the seed's flags (-ngl 999 -c 262144 -ctk q8_0
-ctv q8_0 --parallel 1 --split-mode layer -ts ... --no-warmup --temp 0.6 --top-p 0.95 --top-k 20
--min-p 0.0 --jinja --alias ...) against a generated qwen35moe model, and records:

  * llama-fit-params' per-GPU estimate (the service step's VRAM preflight, same argv) vs
    nvidia-smi's memory.used per GPU after the model is loaded (minus the idle baseline);
  * time to /health 200, one real chat completion (content, timings);
  * the API key as the service passes it (server.api_key: auto): the key made by the service
    step's own generator in /etc/llama-rig/api-key, `--api-key-file` in the rendered argv, and the
    real CUDA llama-server answering 401 without / with a wrong key on /v1/models and
    /v1/chat/completions, 200 with the key, /health open (the readiness gate);
  * the hardened unit's [Service] sandbox lines (rendered; no systemd on that box to run them);
  * what the gpu step does with power limits there (set + re-query, or nvidia-smi's message).

    python3 benchmarks/service_gpu.py --prefix /tmp/llama-bench --gpus 0 --json $OUT/svc-1gpu.json
    python3 benchmarks/service_gpu.py --prefix /tmp/llama-bench --gpus 0,1,2,3 --ts 0.9,1,1,1 ...

`--prefix` is the llama step's `paths.prefix` (the build under <prefix>/llama.cpp/current).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision import inventory as inv  # noqa: E402
from provision.console import Console, Environment  # noqa: E402
from provision.engine import Context  # noqa: E402
from provision.errors import StepError  # noqa: E402
from provision.facts import gpu as gpu_facts  # noqa: E402
from provision.steps import gpu as gpu_step  # noqa: E402
from provision.steps import api_key as auth  # noqa: E402
from provision.steps import service  # noqa: E402
from provision.steps import vram_preflight  # noqa: E402
from provision.target import LocalTarget  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=8, full_attention_interval=4),
    # ~1.9 B params, f16 (~3.7 GB): enough to spread over several GPUs measurably
    "medium": dict(n_layer=16, full_attention_interval=4, n_embd=2048, n_head=16, n_head_kv=2,
                   head_dim=128, n_expert=64, n_expert_used=8, n_ff_exp=256, n_ff_shexp=512,
                   ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32),
}


def mem_used(gpus: list[int]) -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    vals = {int(a): int(b) for a, b in (ln.split(",") for ln in out.splitlines() if ln.strip())}
    return {i: vals[g] for i, g in enumerate(gpus)}


KEY: str | None = None  # the key of /etc/llama-rig/api-key (set in main), sent unless told otherwise


def http(url: str, body: dict | None = None, timeout: float = 60, key: str | None | bool = True) -> tuple[int, str]:
    """key=True: the service's key; None/False: none; a string: that one."""
    data = json.dumps(body).encode() if body is not None else None
    k = KEY if key is True else (key or None)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {k}"} if k else {})}
    rq = urllib.request.Request(url, data=data, headers=h)
    try:
        with urllib.request.urlopen(rq, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def serve(argv_: list[str], env: dict, gpus: list[int], port: int, alias: str, fit: dict,
          log_path: Path) -> dict:
    """Start llama-server with argv_, wait for /health, compare fit-params with nvidia-smi per GPU,
    send one chat completion, stop it."""
    rec: dict = {}
    base = mem_used(gpus)
    log = open(log_path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv_, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        code = 0
        while time.monotonic() - t0 < 300:
            code, _ = http(f"http://127.0.0.1:{port}/health", timeout=5, key=None)  # open
            if code == 200 or proc.poll() is not None:
                break
            time.sleep(0.2)
        rec["health"] = code
        rec["health_s"] = round(time.monotonic() - t0, 2)
        print(f"/health {code} after {rec['health_s']} s", flush=True)
        loaded = mem_used(gpus)
        rec["mem_used_after_load"] = loaded
        rec["mem_used_baseline"] = base
        rows = []
        for i in range(len(gpus)):
            est = fit.get(f"CUDA{i}", {}).get("total")
            meas = loaded[i] - base[i]
            err = None if not est else round(100.0 * (est - meas) / meas, 1) if meas else None
            rows.append({"device": f"CUDA{i}", "gpu": gpus[i], "fit_estimate_mib": est,
                         "measured_mib": meas, "error_pct": err})
        rec["per_gpu"] = rows
        for r in rows:
            print(f"{r['device']} (GPU {r['gpu']}): fit-params {r['fit_estimate_mib']} MiB, "
                  f"nvidia-smi +{r['measured_mib']} MiB, error {r['error_pct']} %", flush=True)
        if KEY:  # the API key, as the service passes it: refused without it, served with it
            chat = {"model": alias, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            a: dict = {}
            for name, k in (("no_key", None), ("wrong_key", "not-the-key"), ("key", True)):
                a[name] = {"/v1/models": http(f"http://127.0.0.1:{port}/v1/models", key=k)[0],
                           "/v1/chat/completions": http(f"http://127.0.0.1:{port}/v1/chat/completions",
                                                        chat, timeout=120, key=k)[0]}
            a["/health without key"] = http(f"http://127.0.0.1:{port}/health", key=None)[0]
            a["ok"] = (all(v == 401 for v in {**a["no_key"], **a["wrong_key"]}.values())
                       and all(v == 200 for v in a["key"].values()) and a["/health without key"] == 200)
            rec["auth"] = a
            print(f"API key: {json.dumps(a)}", flush=True)
        t1 = time.monotonic()
        code, body = http(f"http://127.0.0.1:{port}/v1/chat/completions",
                          {"model": alias, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "Say hello."}]}, timeout=120)
        rec["completion_status"] = code
        rec["completion_s"] = round(time.monotonic() - t1, 3)
        try:
            j = json.loads(body)
            rec["completion"] = {"content": j["choices"][0]["message"].get("content", "")[:120],
                                 "finish_reason": j["choices"][0].get("finish_reason"),
                                 "timings": j.get("timings")}
        except (ValueError, KeyError, IndexError):
            rec["completion"] = body[:300]
        print(f"chat completion: HTTP {code} in {rec['completion_s']} s: {str(rec['completion'])[:200]}",
              flush=True)
        # the first request creates the cuBLAS handles/workspace: memory llama-fit-params does not count
        done = mem_used(gpus)
        rec["mem_used_after_completion"] = done
        for i, r in enumerate(rows):
            r["after_completion_mib"] = done[i] - base[i]
            r["uncounted_mib"] = None if r["fit_estimate_mib"] is None else done[i] - base[i] - r["fit_estimate_mib"]
        print("after the first completion: " + ", ".join(
            f"{r['device']} +{r['after_completion_mib']} MiB (uncounted by fit-params {r['uncounted_mib']})"
            for r in rows), flush=True)
        code, body = http(f"http://127.0.0.1:{port}/v1/models")
        rec["models"] = body[:300]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    rec["server_log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    return rec


def run_preflight(data: dict, first: Path, ts: list[float] | None) -> dict:
    """The service step's own VRAM preflight (service.preflight: nvidia-smi facts, llama-fit-params
    with the server's flags, free memory per GPU, refusal + proposed -ts) on this box."""
    d = json.loads(json.dumps(data))
    if ts is None:
        d["hosts"]["gpu"]["server"].pop("tensor_split", None)
    else:
        d["hosts"]["gpu"]["server"]["tensor_split"] = ts
    host = inv.from_data(d).hosts["gpu"]
    out = io.StringIO()
    ctx = Context(host, LocalTarget(host), Console(Environment(out, out, False)))
    res: dict = {"tensor_split": ts}
    try:
        rep = service.preflight(ctx, str(first))
        res.update(ok=bool(rep and rep.ok), rows=rep.rows if rep else None)
    except StepError as e:
        res.update(ok=False, refused=str(e))
    res["output"] = out.getvalue()
    print(f"preflight -ts {ts}: " + ("fits" if res["ok"] else "REFUSED") + "\n" + res["output"]
          + (res.get("refused", "") + "\n" if "refused" in res else ""), flush=True)
    return res


def squeeze(a, data: dict, first: Path, env: dict, gpus: list[int], work: Path) -> dict:
    """The seed's GPU0 OOM, reproduced on near-full GPUs: gpu_filler occupies every GPU until only
    the plan's share + server.vram_margin_mib + 40 % of its weights/KV is free there, and GPU 0 (the card that
    also drives a display on the seed rig) keeps only 60 % of its share. The step's preflight must
    refuse the plan with a -ts it checked with llama-fit-params, and llama-server must serve with it."""
    rec: dict = {}
    ts = data["hosts"]["gpu"]["server"].get("tensor_split")
    ok_run = run_preflight(data, first, ts)
    rec["before"] = ok_run
    rows = {r[0]: r for r in (ok_run.get("rows") or []) if str(r[0]).startswith("CUDA")}
    if len(rows) != len(gpus):
        rec["error"] = f"the preflight reported {sorted(rows)} for GPUs {gpus}"
        return rec
    filler = work / "gpu_filler"
    subprocess.run(["nvcc", "-O2", "-o", str(filler), str(ROOT / "benchmarks" / "device" / "gpu_filler.cu")],
                   check=True)

    def free_now() -> dict[int, int]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             check=True).stdout
        vals = {int(i): int(t) - int(u) for i, t, u in (ln.split(",") for ln in out.splitlines() if ln.strip())}
        return {k: vals[g] for k, g in enumerate(gpus)}

    def start_filler(k: int, mib: int) -> subprocess.Popen:
        fp = subprocess.Popen([str(filler), str(mib)], stdout=subprocess.PIPE, text=True,
                              env=dict(env, CUDA_VISIBLE_DEVICES=str(gpus[k])))
        fp.stdout.readline()
        return fp

    # what a CUDA context costs on this box (counts in memory.used on top of what the filler holds)
    before = free_now()
    probe = start_filler(0, 1)
    overhead = max(0, before[0] - free_now()[0] - 1)
    probe.terminate()
    probe.wait(20)
    rec["cuda_context_mib"] = overhead
    margin = inv.from_data(data).hosts["gpu"].cfg["server"]["vram_margin_mib"]
    rec["margin_mib"] = margin
    targets = {}
    for k in range(len(gpus)):
        _, m, c, comp, _need, *_ = rows[f"CUDA{k}"]
        share = 0.6 if k == 0 else 1.4
        targets[k] = int(margin + comp + share * (m + c))
    time.sleep(1)
    free0 = free_now()
    fillers = []
    try:
        for k in range(len(gpus)):
            fillers.append(start_filler(k, max(1, free0[k] - targets[k] - overhead)))
        got = free_now()
        rec["free_target_mib"] = targets
        rec["free_mib"] = got
        print(f"gpu_filler: free MiB per GPU {got} (targets {targets}, CUDA context {overhead} MiB)",
              flush=True)
        refused = run_preflight(data, first, ts)
        rec["squeezed"] = refused
        proposed = None
        if "refused" in refused and "server.tensor_split: [" in refused["refused"]:
            txt = refused["refused"].split("server.tensor_split: [", 1)[1].split("]", 1)[0]
            proposed = [float(x) for x in txt.split(",")]
        rec["proposed_ts"] = proposed
        if not proposed:
            return rec
        rec["with_proposed"] = run_preflight(data, first, proposed)
        d = json.loads(json.dumps(data))
        d["hosts"]["gpu"]["server"]["tensor_split"] = proposed
        cfg = inv.from_data(d).hosts["gpu"].cfg
        argv_ = service.server_argv(cfg, str(first), service.binary_path(cfg))
        rec["argv"] = argv_
        fit = subprocess.run(service.fit_params_argv(cfg, str(first), service.fit_params_path(cfg)),
                             capture_output=True, text=True, env=env, timeout=600)
        fitd = {d_: {"total": sum(v)} for d_, v in vram_preflight.parse_fit_output(fit.stdout).items()}
        rec["serve"] = serve(argv_, env, gpus, a.port, cfg["server"]["alias"], fitd,
                             work / "server-squeezed.log")
    finally:
        for fp in fillers:
            fp.terminate()
            fp.wait(20)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="/tmp/llama-bench")
    ap.add_argument("--work", default="/tmp/svc-proof")
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--ts", default=None, help="tensor split, e.g. 0.9,1,1,1 (default: none / all 1)")
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--ctx", type=int, default=262144)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--power", action="store_true", help="also try the gpu step's power limits")
    ap.add_argument("--squeeze", action="store_true",
                    help="also reproduce the seed's GPU0 OOM: fill every GPU (GPU 0 most), show the "
                         "preflight refusing with a checked -ts, serve with it (needs nvcc)")
    ap.add_argument("--margin", type=int, default=None,
                    help="server.vram_margin_mib for the preflight (default: the inventory default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--key-dir", default=auth.KEY_DIR,
                    help="where the API key file goes (default: the service's own /etc/llama-rig)")
    a = ap.parse_args(argv)
    gpus = [int(x) for x in a.gpus.split(",")]
    auth.KEY_DIR, auth.KEY_PATH = a.key_dir, f"{a.key_dir}/api-key"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rec: dict = {"gpus": gpus, "size": a.size}

    # the model
    from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
    name = f"qwen35moe-{a.size}"
    first = work / "model" / f"{name}-00001-of-00004.gguf"
    if not first.exists():
        t0 = time.monotonic()
        write_tiny_qwen35moe(work / "model", name, 4, **SIZES[a.size])
        print(f"model: {name} written in {time.monotonic() - t0:.1f}s", flush=True)
    rec["model_bytes"] = sum(p.stat().st_size for p in (work / "model").glob(f"{name}-*.gguf"))

    # the inventory: the shipped seed rig's server section, GPU count of this run
    seed = inv.load(ROOT / "hosts.yaml").hosts["rig"].cfg
    server = dict(seed["server"], ctx_size=a.ctx, port=a.port, host="127.0.0.1")
    server["tensor_split"] = [float(x) for x in a.ts.split(",")] if a.ts else None
    if a.margin is not None:
        server["vram_margin_mib"] = a.margin
    data = {"hosts": {"gpu": {"connection": {"type": "local"},
                              "gpus": {"count": len(gpus)},
                              "paths": {"prefix": a.prefix, "state_dir": f"{a.work}/state"},
                              "server": {k: v for k, v in server.items() if v is not None}}}}
    cfg = inv.from_data(data).hosts["gpu"].cfg
    binary = service.binary_path(cfg)
    argv_ = service.server_argv(cfg, str(first), binary)
    rec["argv"] = argv_
    print("rendered command line: " + " ".join(argv_), flush=True)
    unit = service.render_unit(cfg, str(first))
    rec["unit_execstart"] = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    rec["unit_sandbox"] = [ln for ln in unit.split("[Service]")[1].split("[Install]")[0].splitlines()
                           if ln.startswith(("Protect", "Private", "Device", "Restrict", "NoNew",
                                             "Capability", "SystemCall", "ReadWrite", "ExecStartPre"))]
    # the API key exactly as the service step makes it (its generator, here as root)
    global KEY
    if auth.enabled(cfg):
        assert argv_[argv_.index("--api-key-file") + 1] == auth.KEY_PATH
        subprocess.run(["sh", "-c", auth.generate_command("root")], check=True)
        KEY = Path(auth.KEY_PATH).read_text().strip()
        rec["key_file"] = subprocess.run(["stat", "-c", "%U:%G %a", auth.KEY_PATH], capture_output=True,
                                         text=True).stdout.strip()
        print(f"API key file {auth.KEY_PATH} ({rec['key_file']}), {len(KEY)} hex digits", flush=True)

    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
    ver = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env)
    rec["version"] = [ln for ln in (ver.stderr + ver.stdout).splitlines() if ln.startswith("version")]

    # VRAM preflight: llama-fit-params with the same flags
    fit_argv = service.fit_params_argv(cfg, str(first), service.fit_params_path(cfg))
    t0 = time.monotonic()
    fp = subprocess.run(fit_argv, capture_output=True, text=True, env=env, timeout=600)
    rec["fit_params_s"] = round(time.monotonic() - t0, 2)
    devices = vram_preflight.parse_fit_output(fp.stdout)
    rec["fit_params"] = {d: {"model": v[0], "context": v[1], "compute": v[2], "total": sum(v)}
                         for d, v in devices.items()}
    print("llama-fit-params: " + json.dumps(rec["fit_params"]), flush=True)

    # start the server with the rendered argv; baseline memory first
    rec.update(serve(argv_, env, gpus, a.port, cfg["server"]["alias"], rec["fit_params"], work / "server.log"))

    if a.squeeze:
        rec["squeeze"] = squeeze(a, data, first, env, gpus, work)

    if a.power:
        host = inv.from_data({"hosts": {"gpu": {"connection": {"type": "local"}}}}).hosts["gpu"]
        out = io.StringIO()
        ctx = Context(host, LocalTarget(host), Console(Environment(out, out, False)))
        gf = gpu_facts.gather(ctx.target)
        g0 = gf.gpus[gpus[0]]
        rec["power_before"] = {"limit": g0.power_limit, "min": g0.power_min, "max": g0.power_max,
                               "default": g0.power_default}
        want = g0.power_min if g0.power_min else None
        res = subprocess.run(["nvidia-smi", "-i", str(gpus[0]), "-pl", str(int(want or 300))],
                             capture_output=True, text=True)
        rec["power_set"] = {"rc": res.returncode, "out": (res.stdout + res.stderr).strip()[-400:]}
        after = gpu_facts.gather(ctx.target).gpus[gpus[0]]
        rec["power_after"] = after.power_limit
        if g0.power_default:
            subprocess.run(["nvidia-smi", "-i", str(gpus[0]), "-pl", str(int(g0.power_default))],
                           capture_output=True, text=True)
        try:
            gpu_step.apply_now(ctx, watts=g0.power_default)
            rec["gpu_step"] = out.getvalue()[-600:]
        except Exception as e:  # noqa: BLE001 - record what the step says
            rec["gpu_step"] = f"{type(e).__name__}: {e}"[:600]
        print("power: " + json.dumps({k: rec[k] for k in ("power_before", "power_set", "power_after")}),
              flush=True)
    text = json.dumps(rec, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    ok = rec.get("health") == 200 and rec.get("completion_status") == 200
    if KEY:
        ok = ok and bool(rec.get("auth", {}).get("ok"))
    if a.squeeze:
        sq = rec["squeeze"]
        ok = ok and "refused" in sq.get("squeezed", {}) and sq.get("with_proposed", {}).get("ok") \
            and sq.get("serve", {}).get("health") == 200 and sq["serve"].get("completion_status") == 200
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
