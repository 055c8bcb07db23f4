"""bench / charts as data: argv from the inventory, llama-bench JSON from REAL runs, power
sampling against the fake nvidia-smi, tokens/kWh vs the seed, result files, baseline comparison,
and RigGuard (what a bench/tune borrows from the rig is given back, power limits first). tune's
rule, knee and --apply edit: tests/test_tune_unit.py.

The tests/data/llama-bench-* fixtures were produced by the real CPU llama-bench
(/var/cache/llama-rig-tests/llama-bin-cpu, llama-cpp-python 0.3.36's vendored llama.cpp) on the
tiny 4-shard qwen35moe of tests/fixtures/tiny_gguf.py — see tests/data/llama-bench-README.txt for
the exact command lines.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.bench import flags as F, guard as G, parse as P, results as R, run as RUN, ttft as TT
from provision import inventory as inv
from provision.errors import StepError, UsageError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FAKE_SMI = ROOT / "tests" / "rigs" / "fake_nvidia_smi.py"
SEED = json.loads((ROOT / "baselines" / "seed-6x3090-350w.json").read_text())


def seed_cfg() -> dict:
    return inv.load(ROOT / "hosts.yaml").hosts["rig"].cfg


# ---------------------------------------------------------------------------------------------
# argv


def test_argv_from_the_seed_inventory():
    flags = F.BenchFlags.from_cfg(seed_cfg())
    argv = F.bench_argv("/opt/llama-rig/llama.cpp/current/bin/llama-bench", "/m/s-00001-of-00004.gguf",
                        flags, depths=F.DEFAULT_DEPTHS, reps=3)
    line = " ".join(argv)
    assert argv[:3] == ["/opt/llama-rig/llama.cpp/current/bin/llama-bench", "-m", "/m/s-00001-of-00004.gguf"]
    assert "-ngl 999 -sm layer -ts 0.9/1/1/1/1/1 -fa 1 -ctk q8_0 -ctv q8_0" in line
    assert "-p 512 -n 128 -d 4096,8192,16384,32768,65536,131072,198000 -r 3 -o jsonl" in line
    assert "-b" not in argv and "-ub" not in argv  # the seed never set them (llama.cpp defaults)
    assert "," not in argv[argv.index("-ts") + 1]  # a comma would make llama-bench sweep


def test_argv_batch_flags_fa_and_no_split():
    cfg = seed_cfg()
    srv = dict(cfg["server"], batch_size=4096, ubatch_size=1024, tensor_split=None,
               cache_type_k="f16", cache_type_v="f16", flash_attn="off", split_mode="none")
    flags = F.BenchFlags.from_cfg({**cfg, "server": srv})
    argv = flags.argv()
    assert argv == ["-ngl", "999", "-sm", "none", "-fa", "0", "-ctk", "f16", "-ctv", "f16",
                    "-b", "4096", "-ub", "1024"]
    assert F.fa_arg("on") == "1" and F.fa_arg("auto") == "1" and F.fa_arg("off") == "0"
    assert F.ts_arg([0.9, 1.0, 1, 1.25]) == "0.9/1/1/1.25"


def test_parse_depths():
    assert F.parse_depths(None) == list(F.DEFAULT_DEPTHS)
    assert F.parse_depths("0, 512,4K,8k,198000") == [0, 512, 4096, 8192, 198000]
    with pytest.raises(UsageError):
        F.parse_depths("4096,lots")
    with pytest.raises(UsageError):
        F.parse_depths(",")


# ---------------------------------------------------------------------------------------------
# llama-bench output (real fixtures)


def test_parse_real_json_fixture():
    rows = P.parse_bench_output((DATA / "llama-bench-sweep.json").read_text())
    assert [(r.kind, r.n_depth) for r in rows] == [("pp", 0), ("tg", 0), ("pp", 256), ("tg", 256)]
    for r in rows:
        assert r.avg_ts > 0 and r.stddev_ts >= 0 and len(r.samples_ts) == 2
        assert r.type_k == "q8_0" and r.type_v == "q8_0" and r.n_gpu_layers == 999
        assert r.tensor_split == "0.90/1.00" and r.model_type.startswith("qwen35moe")
        assert r.build_commit and r.build_number is not None
    pts = R.points_from(rows, [0, 256])
    assert pts[0].prefill_ts == rows[0].avg_ts and pts[256].decode_ts == rows[3].avg_ts


def test_json_and_jsonl_fixtures_parse_alike():
    a = P.parse_bench_output((DATA / "llama-bench-sweep.json").read_text())
    b = P.parse_bench_output((DATA / "llama-bench-sweep.jsonl").read_text())
    assert [(r.n_prompt, r.n_gen, r.n_depth) for r in a] == [(r.n_prompt, r.n_gen, r.n_depth) for r in b]


def test_progress_lines_of_a_real_run_make_phases():
    events = [(float(i), ln) for i, ln in enumerate((DATA / "llama-bench-progress.txt").read_text().splitlines())]
    ph = P.phases(events)
    kinds = [p.kind for p in ph]
    assert "prompt" in kinds and "generation" in kinds and "depth" in kinds
    assert all(p.t1 > p.t0 for p in ph)


def test_real_point_output_with_fake_nvidia_smi_power():
    """A whole point as the rig prints it: real llama-bench + the fake nvidia-smi sampler."""
    pr = P.parse_point_output((DATA / "llama-bench-point.txt").read_text())
    assert pr.rc == 0 and len(pr.rows) == 2
    assert pr.samples and all(s.gpus == 2 and s.watts == pytest.approx(150.25 + 175.5) for s in pr.samples)
    pt = R.points_from(pr.rows, [128])[128]
    R.apply_power(pt, pr.samples, pr.events)
    assert pt.power_w == pytest.approx(325.75) and pt.power_samples == len(pr.samples)
    pt.finish(64)
    assert pt.decode_tokens_per_kwh == pytest.approx(pt.decode_ts * 3600 / 0.32575)


# ---------------------------------------------------------------------------------------------
# power sampling against the fake nvidia-smi


def _fake_smi(tmp_path, config) -> str:
    cfg = tmp_path / "gpus.json"
    cfg.write_text(json.dumps(config))
    env = dict(os.environ, FAKE_NVIDIA_SMI_CONFIG=str(cfg), FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st.json"))
    r = subprocess.run([sys.executable, str(FAKE_SMI), *RUN.POWER_QUERY.split()[1:]], env=env,
                       capture_output=True, text=True, check=True)
    return r.stdout


def test_power_csv_of_the_fake_nvidia_smi(tmp_path):
    out = _fake_smi(tmp_path, {"gpus": [{"power_draw": 281.5}, {"power_draw": 300}, {}]})
    got = P.parse_power_csv(out)
    assert got[0] == 281.5 and got[1] == 300.0 and 20 <= got[2] <= 30  # default idle draw
    out = _fake_smi(tmp_path, {"gpus": [{}, {}], "power_draw": 350.0})
    assert P.parse_power_csv(out) == {0: 350.0, 1: 350.0}


def test_fake_nvidia_smi_holds_the_draw_under_the_limit(tmp_path):
    """What tune --power's rig tests rely on: a board draws at most its power limit."""
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [{"power_draw": 300.0}, {"power_draw": 120.0}]}))
    env = dict(os.environ, FAKE_NVIDIA_SMI_CONFIG=str(tmp_path / "gpus.json"),
               FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st.json"))

    def smi(*args):
        return subprocess.run([sys.executable, str(FAKE_SMI), *args], env=env, capture_output=True,
                              text=True, check=True).stdout
    assert P.parse_power_csv(smi(*RUN.POWER_QUERY.split()[1:])) == {0: 300.0, 1: 120.0}
    smi("-pl", "200")
    assert P.parse_power_csv(smi(*RUN.POWER_QUERY.split()[1:])) == {0: 200.0, 1: 120.0}
    smi("-i", "0", "-pl", "350")
    assert P.parse_power_csv(smi(*RUN.power_query([0]).split()[1:])) == {0: 300.0}


def test_power_na_and_noise_are_tolerated(tmp_path):
    out = _fake_smi(tmp_path, {"gpus": [{"power_draw": None}, {"power_draw": 120.0}]})
    got = P.parse_power_csv(out)
    assert got == {0: None, 1: 120.0}
    log = "\n".join([f"P 10.0 {ln}" for ln in out.splitlines()] + ["P 10.2 WARNING: infoROM", "junk",
                     "P 10.4 0, 100.00", "P 10.4 1, [Not Supported]"])
    samples = P.parse_power_log(log)
    assert [(s.t, s.watts, s.gpus) for s in samples] == [(10.0, 120.0, 1), (10.4, 100.0, 1)]


def test_power_by_phase():
    samples = [P.PowerSample(t, w, 2) for t, w in [(1.0, 100), (2.0, 300), (3.0, 500), (4.0, 700)]]
    events = [(0.5, "@@start"), (1.5, "llama-bench: benchmark 1/2: prompt run 1/1"),
              (2.5, "llama-bench: benchmark 2/2: generation run 1/1"), (4.5, "@@end")]
    pt = R.BenchPoint(0, prefill_ts=1000.0, decode_ts=50.0)
    R.apply_power(pt, samples, events)
    assert pt.power_prefill_w == 300 and pt.power_w == 600 and pt.power_mean_w == 400
    assert pt.power_source == "generation"
    short = [(0.5, "@@start"), (1.1, "llama-bench: benchmark 2/2: generation run 1/1"), (1.2, "x"), (4.5, "@@end")]
    pt2 = R.BenchPoint(0, decode_ts=50.0)
    R.apply_power(pt2, samples, short)  # no sample inside the short phase -> the point's mean
    assert pt2.power_w == 400 and pt2.power_source == "point"


def test_sampler_script_runs_with_the_fake_nvidia_smi(tmp_path):
    """point_script for real (sh + setsid), llama-bench replaced by a script that replays the
    real JSONL fixture and the real --progress lines."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_SMI} \"$@\"\n")
    prog = [ln for ln in (DATA / "llama-bench-progress.txt").read_text().splitlines() if ln.startswith("llama-bench:")]
    rows = (DATA / "llama-bench-sweep.jsonl").read_text().splitlines()
    fake = "#!/bin/sh\necho \"env: $LLAMA_RIG_X\" >&2\n"
    fake += "".join(f"echo {json.dumps(p)} >&2; sleep 0.15\n" for p in prog[:4])
    fake += "".join(f"echo {json.dumps(r).replace('$', '')}\n" for r in rows)
    (bindir / "llama-bench").write_text(fake)
    for f in bindir.iterdir():
        f.chmod(0o755)
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [{}, {}], "power_draw": 200.0}))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               FAKE_NVIDIA_SMI_CONFIG=str(tmp_path / "gpus.json"), FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st"))
    wd = tmp_path / "wd"
    script = RUN.point_script(["llama-bench", "-m", "x"], str(wd), True, interval=0.05,
                              env={"LLAMA_RIG_X": "a b  *"})
    r = subprocess.run(["setsid", "-w", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    pr = P.parse_point_output(r.stdout)
    assert pr.rc == 0 and len(pr.rows) == 4
    assert pr.samples and {s.watts for s in pr.samples} == {400.0}
    assert any(e[1].startswith("llama-bench:") for e in pr.events)
    assert any(e[1] == "env: a b  *" for e in pr.events)  # the environment reached llama-bench whole
    assert not wd.exists()  # cleaned up


def test_point_pid_is_the_process_group_to_kill(tmp_path):
    """RigBench.kill kills `-$(cat pid)`: under `setsid -w` the script's pid is its group."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "llama-bench").write_text("#!/bin/sh\nsleep 30\n")
    (bindir / "llama-bench").chmod(0o755)
    wd = tmp_path / "wd"
    script = RUN.point_script(["llama-bench"], str(wd), False)
    p = subprocess.Popen(f"setsid -w {script}", shell=True, env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if (wd / "pid").exists() and (wd / "pid").read_text().strip():
            break
        time.sleep(0.02)
    pid = int((wd / "pid").read_text())
    assert os.getpgid(pid) == pid
    os.killpg(pid, signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode is not None


# ---------------------------------------------------------------------------------------------
# tokens/kWh and the seed's table


def test_tokens_per_kwh_formula():
    assert R.tokens_per_kwh(46.3, 818) == pytest.approx(46.3 * 3600 / 0.818)
    assert round(R.tokens_per_kwh(46.3, 818)) == 203765
    # the seed printed 203,854: its t/s was unrounded (46.32 -> 46.3 in the table)
    assert round(R.tokens_per_kwh(46.32, 818), -1) == 203850
    assert R.tokens_per_kwh(None, 818) is None and R.tokens_per_kwh(46.3, 0) is None


@pytest.mark.parametrize("row", SEED["points"], ids=lambda r: str(r["depth"]))
def test_seed_table_reproduces_within_rounding(row):
    """Every printed tokens/kWh follows from its t/s and W with the same formula, within the
    rounding of the printed values (t/s to 0.1, W to 1): the seed computed from unrounded ones."""
    got = R.tokens_per_kwh(row["decode_ts"], row["power_w"])
    lo = R.tokens_per_kwh(row["decode_ts"] - 0.05, row["power_w"] + 0.5)
    hi = R.tokens_per_kwh(row["decode_ts"] + 0.05, row["power_w"] - 0.5)
    assert lo <= row["decode_tokens_per_kwh"] <= hi
    assert abs(got - row["decode_tokens_per_kwh"]) / row["decode_tokens_per_kwh"] < 0.002


def test_baseline_loads_and_compares():
    base = R.load_baseline(R.DEFAULT_BASELINE)
    assert [p.depth for p in base.points] == [4096, 8192, 16384, 32768, 65536, 131072, 198000]
    ours = [R.BenchPoint(4096, prefill_ts=1295.0, decode_ts=46.3, power_w=409.0).finish(512),
            R.BenchPoint(1000, prefill_ts=1.0, decode_ts=1.0).finish(512)]
    cmp = R.compare(ours, base)
    assert len(cmp) == 1 and cmp[0]["depth"] == 4096
    assert cmp[0]["prefill_ratio"] == pytest.approx(2.0)
    assert cmp[0]["decode_ratio"] == pytest.approx(1.0)
    assert cmp[0]["power_ratio"] == pytest.approx(0.5)
    assert cmp[0]["efficiency_ratio"] == pytest.approx(ours[0].decode_tokens_per_kwh / 203854)
    assert R.comparison_rows(cmp)[0][:3] == ["4K", "2.000×", "1.000×"]


def test_baseline_errors(tmp_path):
    with pytest.raises(UsageError):
        R.load_baseline(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError):
        R.load_baseline(tmp_path / "bad.json")


def test_derived_and_measured_ttft():
    p = R.BenchPoint(4096, prefill_ts=647.5).finish(512)
    assert p.ttft_kind == "derived" and p.ttft_ms == pytest.approx(4096 / 647.5 * 1000)
    p0 = R.BenchPoint(0, prefill_ts=1000.0).finish(512)
    assert p0.ttft_ms == pytest.approx(512.0) and p0.ttft_prompt_tokens == 512
    m = R.BenchPoint(4096, prefill_ts=647.5, ttft_ms=869.0, ttft_kind="measured").finish(512)
    assert m.ttft_ms == 869.0
    got = TT.parse_ttft('noise\n@@ttft {"depth": 512, "n_tokens": 512, "prompt_ms": 12.5}\n'
                       '@@ttft {"depth": 99999, "error": "too long"}\n')
    assert got[512]["prompt_ms"] == 12.5 and got[99999]["error"] == "too long"


# ---------------------------------------------------------------------------------------------
# result files


def test_results_json_csv_png(tmp_path):
    pts = []
    for d, pp, tg, w in [(4096, 700.0, 47.0, 800.0), (16384, 650.0, 44.0, 820.0), (65536, 600.0, 40.0, 840.0)]:
        pts.append(R.BenchPoint(d, prefill_ts=pp, decode_ts=tg, power_w=w, power_prefill_w=w + 10).finish(512))
    base = R.load_baseline(R.DEFAULT_BASELINE)
    out = R.results_dir(tmp_path, "rig", "20260101T000000Z")
    assert out == tmp_path / "rig" / "20260101T000000Z"
    assert R.results_dir(tmp_path, "rig", "20260101T000000Z").name == "20260101T000000Z-2"
    files = R.write_results(out, {"host": "rig", "title": "t"}, pts, base)
    doc = json.loads(files["json"].read_text())
    assert [p["depth"] for p in doc["points"]] == [4096, 16384, 65536]
    assert doc["baseline"]["name"] == "seed-6x3090-350w" and len(doc["baseline"]["comparison"]) == 3
    lines = files["csv"].read_text().splitlines()
    assert lines[0].startswith("depth,prefill_ts,prefill_std,decode_ts") and len(lines) == 4
    assert lines[1].split(",")[0] == "4096"
    for name in ("prefill", "decode", "power", "efficiency"):
        png = files[f"chart_{name}"]
        data = png.read_bytes()
        assert png.name == f"{name}.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8000


def test_table_rows():
    p = R.BenchPoint(4096, prefill_ts=647.5, decode_ts=46.3, ttft_ms=869.0, ttft_kind="measured",
                     power_w=818.0).finish(512)
    assert R.table_rows([p]) == [["4K", "647.5", "46.3", "869 (measured)", "818", "203,765"]]
    assert R.ctx_label(198000) == "198K" and R.ctx_label(0) == "0" and R.ctx_label(512) == "512"


def test_charts_module_imports_matplotlib_lazily():
    code = ("import sys; import provision.charts, provision.bench.sweep, provision.tune.batch, "
            "provision.tune.power; "
            "print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# the service during a bench


@pytest.mark.parametrize("policy,gpus,cuda,ngl,active,stop", [
    ("auto", 6, True, 999, True, True),
    ("auto", 6, True, 999, False, False),   # nothing to stop
    ("auto", 0, True, 999, True, False),    # no GPUs: no VRAM pressure
    ("auto", 6, False, 999, True, False),   # CPU build
    ("auto", 6, True, 0, True, False),      # nothing offloaded
    ("stop", 0, False, 0, True, True),
    ("keep", 6, True, 999, True, False),
])
def test_decide_stop(policy, gpus, cuda, ngl, active, stop):
    got, why = G.decide_stop(policy, gpus, cuda, ngl, active)
    assert got is stop and why


def test_tasks_are_registered():
    r = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True)
    names = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert "bench" in names and "tune" in names
    h = subprocess.run([sys.executable, "-m", "invoke", "bench", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--depths" in h.stdout and "--no-ttft" in h.stdout and "--reps" in h.stdout
    h = subprocess.run([sys.executable, "-m", "invoke", "tune", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--depth" in h.stdout and "--apply" in h.stdout


# ---------------------------------------------------------------------------------------------
# RigGuard: what a bench/tune borrows is given back, power limits first, then the service


class _Ctx:
    class host:
        name = "box"

    def __init__(self):
        import io
        from provision.console import Console, Environment
        self.out = io.StringIO()
        self.console = Console(Environment(self.out, self.out, False))
        self.said = []

    def say(self, text):
        self.said.append(text)


@pytest.fixture()
def guarded(monkeypatch):
    """RigGuard with the rig replaced by a log of what it was asked to do."""
    calls, state = [], {"limits": {0: 350.0, 1: 350.0}, "fail": set()}

    def set_limits(ctx, limits, why=""):
        calls.append(("set", dict(limits)))
        if "set" in state["fail"] and not why:
            raise StepError("nvidia-smi said no")
        state["limits"].update(limits)

    monkeypatch.setattr(G, "set_limits", set_limits)
    monkeypatch.setattr(G, "read_limits", lambda ctx, ids=None: dict(state["limits"]))
    monkeypatch.setattr(G.service_step, "stop", lambda ctx: calls.append(("stop",)))

    def restart(ctx):
        calls.append(("restart",))
        if "restart" in state["fail"]:
            raise StepError("llama-server did not come back")
    monkeypatch.setattr(G.service_step, "restart_and_wait", restart)
    return calls, state


def test_guard_restores_power_first_then_the_service(guarded):
    calls, state = guarded
    ctx = _Ctx()
    with pytest.raises(KeyboardInterrupt):
        with G.RigGuard(ctx, "tune") as g:
            g.stop_service("--service stop")
            g.set_power({0: 200.0, 1: 200.0})
            g.set_power({0: 300.0, 1: 300.0})
            raise KeyboardInterrupt
    assert calls == [("stop",), ("set", {0: 200.0, 1: 200.0}), ("set", {0: 300.0, 1: 300.0}),
                     ("set", {0: 350.0, 1: 350.0}), ("restart",)]
    assert state["limits"] == {0: 350.0, 1: 350.0}
    assert "tune: power limits restored: GPU 0,1 350 W" in ctx.said and "tune: llama-server is back" in ctx.said


def test_guard_a_failed_restore_is_reported_and_the_rest_still_restored(guarded):
    calls, state = guarded
    state["fail"].add("restart")
    ctx = _Ctx()
    with pytest.raises(StepError, match="could not put the rig back: llama-server did not come back"):
        with G.RigGuard(ctx, "bench") as g:
            g.stop_service("--service stop")
            g.set_power({0: 200.0, 1: 200.0})
    assert calls[-2:] == [("set", {0: 350.0, 1: 350.0}), ("restart",)]
    # with an error already on its way, that error goes on and the restore problem is printed
    state["fail"] = {"set", "restart"}
    calls.clear()
    ctx = _Ctx()
    with pytest.raises(StepError, match="nvidia-smi said no"):
        with G.RigGuard(ctx, "tune") as g:
            g.stop_service("x")
            g.set_power({0: 250.0, 1: 250.0})
    assert calls == [("stop",), ("set", {0: 250.0, 1: 250.0}), ("set", {0: 350.0, 1: 350.0}), ("restart",)]
    assert "could not put the rig back: llama-server did not come back" in ctx.out.getvalue()


def test_guard_with_nothing_borrowed_does_nothing(guarded):
    calls, _ = guarded
    with G.RigGuard(_Ctx(), "bench"):
        pass
    assert calls == []


def test_sampler_takes_one_sample_when_the_point_ends_first(tmp_path):
    """A point that ends before the sampler's first nvidia-smi answers (a loaded box, a tiny
    model: CI saw `power_w None`) still gets one sample, taken at its end."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # a slow nvidia-smi: the first background sample is still running when llama-bench is done
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\nsleep 0.6\nexec {sys.executable} {FAKE_SMI} \"$@\"\n")
    (bindir / "llama-bench").write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [{}, {}], "power_draw": 150.0}))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               FAKE_NVIDIA_SMI_CONFIG=str(tmp_path / "gpus.json"), FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st"))
    script = RUN.point_script(["llama-bench", "-m", "x"], str(tmp_path / "wd"), True, interval=0.05)
    r = subprocess.run(["setsid", "-w", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    pr = P.parse_point_output(r.stdout)
    assert pr.rc == 0 and pr.samples, r.stdout
    assert {s.watts for s in pr.samples} == {300.0}
    pt = R.BenchPoint(0, decode_ts=10.0)
    R.apply_power(pt, pr.samples, pr.events)
    assert pt.power_w == 300.0 and pt.power_samples == len(pr.samples)
