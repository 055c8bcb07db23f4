"""The whole `tune` flow -- batch, split and power -- through the real code on this machine
(`connection: local`), with the GPU side replayed: the fake nvidia-smi (tests/rigs/, keeps the
power-limit state; a board's draw is held under its limit), and a stand-in llama-bench that replays
llama-bench output recorded from REAL runs (tests/data/llama-bench-tune-*.jsonl) or, for the power
sweep, decode speeds that depend on the limit the fake nvidia-smi holds. The real llama-bench on a
rig under systemd is in tests/test_bench_rig.py.

What is checked: the rule names no winner in recorded noise and names the recorded clear gain
(and `--apply` writes only then), split candidates go through the VRAM preflight first (a refused
one is never run), the power sweep finds the knee and the most efficient limit, `--apply` writes
gpus.power_limit, and the limits found are restored -- after success, after a failure, and after
Ctrl-C (exit 130).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision.console import Console, Environment
from provision.engine import Context
from provision.errors import StepError
from provision.target import LocalTarget
from provision.tune import options as O
from provision.tune.batch import run_batch_tune
from provision.tune.power import run_power_tune

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FAKE_SMI = ROOT / "tests" / "rigs" / "fake_nvidia_smi.py"

# a stand-in llama-bench: replays a table of recorded t/s, one value per call and key
FAKE_BENCH = r'''#!/usr/bin/env python3
import json, os, subprocess, sys, time
args = sys.argv[1:]
env = os.environ
with open(env["FAKE_BENCH_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
if "--help" in args:
    sys.stdout.write(open(env["FAKE_BENCH_HELP"]).read())
    sys.exit(0)
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
table = json.load(open(env["FAKE_BENCH_TABLE"]))
cpath = env["FAKE_BENCH_COUNT"]
counts = json.load(open(cpath)) if os.path.exists(cpath) else {}
def take(key):
    vals = table.get(key)
    if vals is None:
        vals = table["*"]
    n = counts.get(key, 0)
    counts[key] = n + 1
    json.dump(counts, open(cpath, "w"))
    return vals[n % len(vals)]
def row(p, n, d, ts, ub=None):
    return json.dumps({"build_commit": "5af12ca", "build_number": 1, "backends": "CUDA",
                       "model_type": "qwen35moe ?B F16", "gpu_info": "NVIDIA H200",
                       "n_batch": int(opt("-b", 2048)), "n_ubatch": ub or int(opt("-ub", 512)),
                       "n_prompt": p, "n_gen": n, "n_depth": d, "avg_ts": ts, "stddev_ts": 0.0,
                       "samples_ts": [ts], "split_mode": opt("-sm"), "tensor_split": opt("-ts")})
p, n, d = int(opt("-p", 512)), int(opt("-n", 128)), int(opt("-d", 0))
if os.path.exists(env["FAKE_BENCH_DIR"] + "/slow"):
    open(env["FAKE_BENCH_DIR"] + "/running", "w").close()
    time.sleep(120)
if n == 0:  # tune: prefill, one row per ubatch
    for ub in opt("-ub").split(","):
        key = "sm=%s ts=%s b=%s ub=%s" % (opt("-sm"), opt("-ts"), opt("-b"), ub)
        v = take(key)
        if v == "fail":
            print("llama_bench: error: failed to load model", file=sys.stderr)
            sys.exit(1)
        print("llama-bench: benchmark 1/1: prompt run 1/1", file=sys.stderr, flush=True)
        print(row(p, 0, d, v, int(ub)), flush=True)
else:  # power: the decode speed follows the limit the (fake) GPU 0 holds
    limit = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits",
                            "-i", "0"], capture_output=True, text=True).stdout.strip()
    w = str(int(float(limit)))
    dec = take("decode " + w)
    print("llama-bench: benchmark 1/2: prompt run 1/1", file=sys.stderr, flush=True)
    time.sleep(0.15)
    print("llama-bench: benchmark 2/2: generation run 1/1", file=sys.stderr, flush=True)
    time.sleep(0.45)
    print(row(p, 0, d, dec * 20.0), flush=True)
    print(row(0, n, d, dec), flush=True)
'''

# a stand-in llama-fit-params: 40 GiB per GPU, except `-sm tensor` which wants 200 GiB
FAKE_FIT = r'''#!/usr/bin/env python3
import sys
args = sys.argv[1:]
big = "-sm" in args and args[args.index("-sm") + 1] == "tensor"
print("fit-params: estimating", file=sys.stderr)
for i in range(2):
    print("CUDA%d %d 2048 900" % (i, 200000 if big else 40000))
print("Host 100 0 300")
'''

H200 = {"name": "NVIDIA H200", "compute_cap": "9.0", "memory_total": 143771, "memory_used": 1,
        "power_min": 200, "power_max": 700, "power_default": 700, "power_draw": 500.0}


@pytest.fixture()
def box(tmp_path, monkeypatch):
    """A `connection: local` host with two fake H200s and the stand-ins on PATH."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "nvidia-smi").write_text(
        "#!/bin/sh\n"
        # a wrapper that refuses one limit when told to (a failure in the middle of a sweep)
        f'if [ -f {tmp_path}/refuse-500 ] && [ "$1" = "-i" ] && [ "$3" = "-pl" ] && [ "$4" = "500" ]; then\n'
        '  echo "Failed to set power limit for GPU 00000000:01:00.0: Unknown Error"; exit 15\nfi\n'
        f'exec {sys.executable} {FAKE_SMI} "$@"\n')
    (b / "llama-bench").write_text(FAKE_BENCH)
    prefix = tmp_path / "prefix"
    cur = prefix / "llama.cpp" / "current" / "bin"
    cur.mkdir(parents=True)
    (cur / "llama-fit-params").write_text(FAKE_FIT)
    (cur / "llama-server").write_text(f"#!/bin/sh\ncat {DATA / 'llama-server-help-split.txt'}\n")
    for f in [*b.iterdir(), *cur.iterdir()]:
        f.chmod(0o755)
    model = tmp_path / "model" / "m-00001-of-00004.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [H200, H200]}))
    env = {"PATH": f"{b}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI_CONFIG": str(tmp_path / "gpus.json"),
           "FAKE_NVIDIA_SMI_STATE": str(tmp_path / "smi-state.json"),
           "FAKE_BENCH_LOG": str(tmp_path / "bench.log"), "FAKE_BENCH_COUNT": str(tmp_path / "count.json"),
           "FAKE_BENCH_TABLE": str(tmp_path / "table.json"), "FAKE_BENCH_DIR": str(tmp_path),
           "FAKE_BENCH_HELP": str(DATA / "llama-bench-help.txt")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    class Box:
        dir = tmp_path
        bench = str(b / "llama-bench")

        def inventory(self, gpus: int = 2, **server) -> Path:
            p = tmp_path / "hosts.yaml"
            srv = {"tensor_split": [0.9, 1] if gpus == 2 else None, **server}
            p.write_text("# flow test inventory: this comment survives --apply\n" + yaml.safe_dump({
                "hosts": {"box": {"connection": {"type": "local"}, "gpus": {"count": gpus},
                                  "llama_cpp": {"cuda": True},
                                  "paths": {"prefix": str(prefix), "state_dir": str(tmp_path / "state")},
                                  "server": {k: v for k, v in srv.items() if v is not None}}}},
                sort_keys=False))
            return p

        def table(self, t: dict) -> None:
            (tmp_path / "table.json").write_text(json.dumps(t))

        def limits(self) -> list[float]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=True).stdout
            return [float(x) for x in out.split()]

        def calls(self) -> list[list[str]]:
            log = tmp_path / "bench.log"
            return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

        def opts(self, **kw) -> O.TuneOptions:
            return O.TuneOptions(binary=self.bench, model=str(model), results_root=str(tmp_path / "results"),
                                 inventory_path=str(tmp_path / "hosts.yaml"), service="keep",
                                 interval=0.05, **kw)

        def ctx(self, path: Path):
            host = inv.load(path).hosts["box"]
            out = io.StringIO()
            return Context(host, LocalTarget(host), Console(Environment(out, out, False))), out

    return Box()


def recorded(name: str) -> list[dict[int, float]]:
    runs, cur = [], None
    for ln in (DATA / name).read_text().splitlines():
        if ln.startswith("# run"):
            cur = {}
            runs.append(cur)
        elif ln.startswith("{"):
            o = json.loads(ln)
            cur[o["n_ubatch"]] = o["avg_ts"]
    return runs


# ---------------------------------------------------------------------------------------------
# batch and split


def test_recorded_noise_no_winner_and_apply_writes_nothing(box):
    runs = recorded("llama-bench-tune-runs.jsonl")
    box.table({f"sm=layer ts=None b=512 ub={ub}": [r[ub] for r in runs] for ub in (128, 256, 512)})
    path = box.inventory(gpus=1, batch_size=512, ubatch_size=512)
    before = path.read_text()
    ctx, out = box.ctx(path)
    res = run_batch_tune(ctx, box.opts(pairs=[(128, 512), (256, 512)], depth=512, apply=True))
    text = out.getvalue()
    assert res["winner"] is None and res["leader"] is None and res["applied"] is None
    assert "no significant gain over the current flags" in text and "--apply: nothing written" in text
    assert path.read_text() == before
    assert "confirmation" not in text  # no leader, nothing to confirm
    doc = json.loads((Path(res["dir"]) / "tune.json").read_text())
    assert doc["verdict"] == "no significant gain over the current flags" and doc["rule"].startswith("ranges apart")
    assert doc["current"]["label"] == "ub512/b512" and doc["current"]["runs"] == [runs[i][512] for i in range(3)]
    assert [c["label"] for c in doc["candidates"]] == ["ub128/b512", "ub256/b512"]
    assert all("within the noise" in c["verdict"] for c in doc["candidates"])
    # the old pick (the best median) would have called ub128 a 1.13x win
    assert doc["candidates"][0]["median"] / doc["current"]["median"] > 1.1
    assert (Path(res["dir"]) / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one llama-bench per round (one batch size: the ubatches share it), 3 rounds
    calls = box.calls()
    assert len(calls) == 3 and all(c[c.index("-ub") + 1] == "512,128,256" and c[c.index("-r") + 1] == "1"
                                   for c in calls)


def test_recorded_clear_gain_is_confirmed_and_applied(box):
    runs = recorded("llama-bench-tune-clear.jsonl")
    box.table({f"sm=layer ts=None b=256 ub={ub}": [r[ub] for r in runs] for ub in (2, 256)})
    path = box.inventory(gpus=1, batch_size=256, ubatch_size=2)
    ctx, out = box.ctx(path)
    res = run_batch_tune(ctx, box.opts(pairs=[(256, 256)], depth=256, apply=True))
    text = out.getvalue()
    assert res["winner"] is not None and res["winner"].label == "ub256/b256"
    assert res["winner"].runs == [r[256] for r in runs[:3]] and res["winner"].confirm == [r[256] for r in runs[3:]]
    assert res["speedup"] == pytest.approx(2792.3 / 1.0 / 657.2, rel=0.5)  # medians of runs 4-6
    assert "winner ub256/b256" in text and "beyond the noise" in text
    assert res["applied"] == {"batch_size": 256, "ubatch_size": 256}
    after = path.read_text()
    assert after.startswith("# flow test inventory") and inv.load(path).hosts["box"].cfg["server"]["ubatch_size"] == 256
    assert len(box.calls()) == 6  # 3 sweep + 3 confirmation runs


def test_split_modes_are_checked_by_the_vram_preflight_first(box):
    """2 GPUs: -ts variants and the split modes this tree's llama-bench and llama-server list;
    `-sm tensor` does not fit (the stand-in llama-fit-params says 200 GiB) and is never run."""
    box.table({"*": [1000.0, 1010.0, 990.0]})
    path = box.inventory(gpus=2)
    ctx, out = box.ctx(path)
    res = run_batch_tune(ctx, box.opts(pairs=[(512, 2048), (4096, 4096)], depth=512))
    text = out.getvalue()
    labels = [c.label for c in res["trials"]]
    assert labels == ["ub512/b2048 ts 0.9/1", "ub4096/b4096 ts 0.9/1", "ub512/b2048 ts 1/1",
                      "ub512/b2048 ts 1/0.9", "ub512/b2048 ts 0.9/1 sm row", "ub512/b2048 ts 0.9/1 sm tensor"]
    tensor = res["trials"][-1]
    assert tensor.fit.startswith("does not fit") and "GPU 0" in tensor.fit and not tensor.runs
    assert "ub512/b2048 ts 0.9/1 sm tensor: not measured, the VRAM preflight refuses it" in text
    assert res["trials"][-2].fit == "fits" and len(res["trials"][-2].runs) == 3
    calls = box.calls()
    assert not any("tensor" in c for c in calls)  # never run
    assert sum(1 for c in calls if "row" in c) == 3
    assert res["winner"] is None  # all the same numbers: nothing beyond the noise
    doc = json.loads((Path(res["dir"]) / "tune.json").read_text())
    assert len(doc["stages"]) == 2 and doc["stages"][1]["reference"]["label"] == "ub512/b2048 ts 0.9/1"


# ---------------------------------------------------------------------------------------------
# power

DECODE = {"200": [500.0, 505.0, 497.0], "300": [570.0, 566.0, 574.0], "400": [600.0, 597.0, 603.0],
          "500": [603.0, 600.0, 606.0], "600": [604.0, 601.0, 606.0], "700": [605.0, 602.0, 608.0]}


def test_power_sweep_knee_apply_and_restore(box):
    box.table({f"decode {w}": v for w, v in DECODE.items()})
    path = box.inventory(gpus=2)
    assert box.limits() == [700.0, 700.0]
    ctx, out = box.ctx(path)
    res = run_power_tune(ctx, box.opts(power=True, apply=True, n_gen=16, bench_reps=1))
    text = out.getvalue()
    assert [p.label for p in res["points"]] == ["200 W", "300 W", "400 W", "500 W", "600 W", "700 W"]
    assert res["found"].label == "700 W"
    # W drawn: 500 W per board, held under the limit, summed over the 2 GPUs
    assert [p.sweep.runs("power_w").median for p in res["points"]] == [400, 600, 800, 1000, 1000, 1000]
    assert res["knee"].label == "400 W"  # 600 >= 0.95 * 605; 300 W's 570 is not
    assert res["most_efficient"] == 200
    assert res["winner"] is res["knee"] and res["applied"] == {"power_limit": 400.0}
    assert inv.load(path).hosts["box"].cfg["gpus"]["power_limit"] == 400
    assert path.read_text().startswith("# flow test inventory")
    assert box.limits() == [700.0, 700.0]  # the limits found, restored
    assert "power limits restored: GPU 0,1 700 W" in text
    doc = json.loads((Path(res["dir"]) / "tune-power.json").read_text())
    knee = doc["knee"]
    assert knee["watts"] == 400 and knee["decode_share_of_best"] == pytest.approx(600 / 605)
    assert knee["tokens_per_kwh_vs_found"] == pytest.approx((600 * 3600 / 0.8) / (605 * 3600 / 1.0))
    assert doc["most_efficient"]["watts"] == 200 and doc["applied"] == {"power_limit": 400.0}
    p400 = next(p for p in doc["points"] if p["watts"] == 400)
    assert p400["tokens_per_kwh"]["median"] == pytest.approx(600 * 3600 / 0.8)
    assert p400["confirm"]["decode_ts"]["runs"]  # the knee was confirmed on fresh runs
    assert (Path(res["dir"]) / "tune-power.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rounds: 6 limits x 3 runs, then 2 x 3 confirmation runs
    assert len(box.calls()) == 18 + 6


def test_power_sweep_noise_no_apply(box):
    """The knee's tokens/kWh runs overlap the found limit's: no winner, nothing written."""
    box.table({"decode 300": [700.0, 500.0, 720.0], "decode 350": [650.0, 760.0, 560.0]})
    (box.dir / "gpus.json").write_text(json.dumps({"gpus": [dict(H200, power_draw=320.0)]}))
    path = box.inventory(gpus=1)
    before = path.read_text()
    subprocess.run(["nvidia-smi", "-pl", "350"], check=True, capture_output=True)
    ctx, out = box.ctx(path)
    res = run_power_tune(ctx, box.opts(power=True, apply=True, watts=[300.0], n_gen=16, bench_reps=1))
    text = out.getvalue()
    assert [p.label for p in res["points"]] == ["300 W", "350 W"] and res["found"].label == "350 W"
    assert res["winner"] is None and "no significant gain over the current flags" in text
    assert path.read_text() == before and box.limits() == [350.0]


def test_power_limits_restored_after_a_failure(box):
    box.table({f"decode {w}": v for w, v in DECODE.items()})
    (box.dir / "refuse-500").touch()
    path = box.inventory(gpus=2)
    ctx, out = box.ctx(path)
    with pytest.raises(StepError, match="Unknown Error"):
        run_power_tune(ctx, box.opts(power=True, watts=[300.0, 500.0], n_gen=16, bench_reps=1))
    assert box.limits() == [700.0, 700.0]
    assert "power limits restored" in out.getvalue()


def test_power_refuses_limits_outside_the_range_and_changes_nothing(box):
    path = box.inventory(gpus=2)
    ctx, out = box.ctx(path)
    with pytest.raises(StepError, match=r"^tune --power: 150 W outside GPU 0's range 200–700 W; .* — nothing was changed$"):
        run_power_tune(ctx, box.opts(power=True, watts=[150.0, 300.0]))
    assert box.limits() == [700.0, 700.0] and box.calls() == []


def test_ctrl_c_during_a_power_sweep_restores_the_limits_then_exits_130(box):
    box.table({f"decode {w}": v for w, v in DECODE.items()})
    path = box.inventory(gpus=2)
    (box.dir / "slow").touch()  # the stand-in llama-bench sleeps in its first run
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tune", "--host", "box", "--inventory", str(path), "--power",
         "--watts", "300,500", "--binary", box.bench, "--model", str(box.dir / "model" / "m-00001-of-00004.gguf"),
         "--service", "keep", "--results", str(box.dir / "results")],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (box.dir / "running").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "llama-bench never started"
            time.sleep(0.1)
        assert box.limits() == [300.0, 300.0]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert box.limits() == [700.0, 700.0]
    assert out.index("power limits restored") < out.index("interrupted")
    assert took < 10, took
    assert subprocess.run(["pgrep", "-f", str(box.dir / "bin" / "llama-bench")]).returncode == 1
    assert not (box.dir / "results").exists()  # an interrupted tune writes no result
