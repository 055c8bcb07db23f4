"""bench / tune / charts as data: argv from the inventory, llama-bench JSON from REAL runs,
power sampling against the fake nvidia-smi, tokens/kWh vs the seed, result files, baseline
comparison, tune's pick and the minimal hosts.yaml edit of `tune --apply`.

The tests/data/llama-bench-* fixtures were produced by the real CPU llama-bench
(/var/cache/llama-rig-tests/llama-bin-cpu, llama-cpp-python 0.3.36's vendored llama.cpp) on the
tiny 4-shard qwen35moe of tests/fixtures/tiny_gguf.py — see tests/data/llama-bench-README.txt for
the exact command lines.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provision import bench as B
from provision import inventory as inv
from provision import tune as T
from provision.errors import InventoryError, UsageError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FAKE_SMI = ROOT / "tests" / "rigs" / "fake_nvidia_smi.py"
SEED = json.loads((ROOT / "baselines" / "seed-6x3090-350w.json").read_text())


def seed_cfg() -> dict:
    return inv.load(ROOT / "hosts.yaml").hosts["rig"].cfg


# ---------------------------------------------------------------------------------------------
# argv


def test_argv_from_the_seed_inventory():
    flags = B.BenchFlags.from_cfg(seed_cfg())
    argv = B.bench_argv("/opt/llama-rig/llama.cpp/current/bin/llama-bench", "/m/s-00001-of-00004.gguf",
                        flags, depths=B.DEFAULT_DEPTHS, reps=3)
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
    flags = B.BenchFlags.from_cfg({**cfg, "server": srv})
    argv = flags.argv()
    assert argv == ["-ngl", "999", "-sm", "none", "-fa", "0", "-ctk", "f16", "-ctv", "f16",
                    "-b", "4096", "-ub", "1024"]
    assert B.fa_arg("on") == "1" and B.fa_arg("auto") == "1" and B.fa_arg("off") == "0"
    assert B.ts_arg([0.9, 1.0, 1, 1.25]) == "0.9/1/1/1.25"


def test_parse_depths():
    assert B.parse_depths(None) == list(B.DEFAULT_DEPTHS)
    assert B.parse_depths("0, 512,4K,8k,198000") == [0, 512, 4096, 8192, 198000]
    with pytest.raises(UsageError):
        B.parse_depths("4096,lots")
    with pytest.raises(UsageError):
        B.parse_depths(",")


# ---------------------------------------------------------------------------------------------
# llama-bench output (real fixtures)


def test_parse_real_json_fixture():
    rows = B.parse_bench_output((DATA / "llama-bench-sweep.json").read_text())
    assert [(r.kind, r.n_depth) for r in rows] == [("pp", 0), ("tg", 0), ("pp", 256), ("tg", 256)]
    for r in rows:
        assert r.avg_ts > 0 and r.stddev_ts >= 0 and len(r.samples_ts) == 2
        assert r.type_k == "q8_0" and r.type_v == "q8_0" and r.n_gpu_layers == 999
        assert r.tensor_split == "0.90/1.00" and r.model_type.startswith("qwen35moe")
        assert r.build_commit and r.build_number is not None
    pts = B.points_from(rows, [0, 256])
    assert pts[0].prefill_ts == rows[0].avg_ts and pts[256].decode_ts == rows[3].avg_ts


def test_json_and_jsonl_fixtures_parse_alike():
    a = B.parse_bench_output((DATA / "llama-bench-sweep.json").read_text())
    b = B.parse_bench_output((DATA / "llama-bench-sweep.jsonl").read_text())
    assert [(r.n_prompt, r.n_gen, r.n_depth) for r in a] == [(r.n_prompt, r.n_gen, r.n_depth) for r in b]


def test_progress_lines_of_a_real_run_make_phases():
    events = [(float(i), ln) for i, ln in enumerate((DATA / "llama-bench-progress.txt").read_text().splitlines())]
    ph = B.phases(events)
    kinds = [p.kind for p in ph]
    assert "prompt" in kinds and "generation" in kinds and "depth" in kinds
    assert all(p.t1 > p.t0 for p in ph)


def test_real_point_output_with_fake_nvidia_smi_power():
    """A whole point as the rig prints it: real llama-bench + the fake nvidia-smi sampler."""
    pr = B.parse_point_output((DATA / "llama-bench-point.txt").read_text())
    assert pr.rc == 0 and len(pr.rows) == 2
    assert pr.samples and all(s.gpus == 2 and s.watts == pytest.approx(150.25 + 175.5) for s in pr.samples)
    pt = B.points_from(pr.rows, [128])[128]
    B.apply_power(pt, pr.samples, pr.events)
    assert pt.power_w == pytest.approx(325.75) and pt.power_samples == len(pr.samples)
    pt.finish(64)
    assert pt.decode_tokens_per_kwh == pytest.approx(pt.decode_ts * 3600 / 0.32575)


def test_tune_fixture_gives_one_trial_per_ubatch():
    rows = B.parse_bench_output((DATA / "llama-bench-tune.jsonl").read_text())
    trials = T._trials_from(rows, 512, None, [128, 256, 512])
    assert [t.ubatch for t in trials] == [128, 256, 512]
    assert all(t.prefill_ts and t.error is None for t in trials)
    assert trials[0].prefill_ts == T.robust_ts(rows[0])


# ---------------------------------------------------------------------------------------------
# power sampling against the fake nvidia-smi


def _fake_smi(tmp_path, config) -> str:
    cfg = tmp_path / "gpus.json"
    cfg.write_text(json.dumps(config))
    env = dict(os.environ, FAKE_NVIDIA_SMI_CONFIG=str(cfg), FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st.json"))
    r = subprocess.run([sys.executable, str(FAKE_SMI), *B.POWER_QUERY.split()[1:]], env=env,
                       capture_output=True, text=True, check=True)
    return r.stdout


def test_power_csv_of_the_fake_nvidia_smi(tmp_path):
    out = _fake_smi(tmp_path, {"gpus": [{"power_draw": 281.5}, {"power_draw": 300}, {}]})
    got = B.parse_power_csv(out)
    assert got[0] == 281.5 and got[1] == 300.0 and 20 <= got[2] <= 30  # default idle draw
    out = _fake_smi(tmp_path, {"gpus": [{}, {}], "power_draw": 350.0})
    assert B.parse_power_csv(out) == {0: 350.0, 1: 350.0}


def test_power_na_and_noise_are_tolerated(tmp_path):
    out = _fake_smi(tmp_path, {"gpus": [{"power_draw": None}, {"power_draw": 120.0}]})
    got = B.parse_power_csv(out)
    assert got == {0: None, 1: 120.0}
    log = "\n".join([f"P 10.0 {ln}" for ln in out.splitlines()] + ["P 10.2 WARNING: infoROM", "junk",
                     "P 10.4 0, 100.00", "P 10.4 1, [Not Supported]"])
    samples = B.parse_power_log(log)
    assert [(s.t, s.watts, s.gpus) for s in samples] == [(10.0, 120.0, 1), (10.4, 100.0, 1)]


def test_power_by_phase():
    samples = [B.PowerSample(t, w, 2) for t, w in [(1.0, 100), (2.0, 300), (3.0, 500), (4.0, 700)]]
    events = [(0.5, "@@start"), (1.5, "llama-bench: benchmark 1/2: prompt run 1/1"),
              (2.5, "llama-bench: benchmark 2/2: generation run 1/1"), (4.5, "@@end")]
    pt = B.BenchPoint(0, prefill_ts=1000.0, decode_ts=50.0)
    B.apply_power(pt, samples, events)
    assert pt.power_prefill_w == 300 and pt.power_w == 600 and pt.power_mean_w == 400
    assert pt.power_source == "generation"
    short = [(0.5, "@@start"), (1.1, "llama-bench: benchmark 2/2: generation run 1/1"), (1.2, "x"), (4.5, "@@end")]
    pt2 = B.BenchPoint(0, decode_ts=50.0)
    B.apply_power(pt2, samples, short)  # no sample inside the short phase -> the point's mean
    assert pt2.power_w == 400 and pt2.power_source == "point"


def test_sampler_script_runs_with_the_fake_nvidia_smi(tmp_path):
    """point_script for real (sh + setsid), llama-bench replaced by a script that replays the
    real JSONL fixture and the real --progress lines."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_SMI} \"$@\"\n")
    prog = [ln for ln in (DATA / "llama-bench-progress.txt").read_text().splitlines() if ln.startswith("llama-bench:")]
    rows = (DATA / "llama-bench-sweep.jsonl").read_text().splitlines()
    fake = "#!/bin/sh\n" + "".join(f"echo {json.dumps(p)} >&2; sleep 0.15\n" for p in prog[:4])
    fake += "".join(f"echo {json.dumps(r).replace('$', '')}\n" for r in rows)
    (bindir / "llama-bench").write_text(fake)
    for f in bindir.iterdir():
        f.chmod(0o755)
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [{}, {}], "power_draw": 200.0}))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               FAKE_NVIDIA_SMI_CONFIG=str(tmp_path / "gpus.json"), FAKE_NVIDIA_SMI_STATE=str(tmp_path / "st"))
    wd = tmp_path / "wd"
    script = B.point_script(["llama-bench", "-m", "x"], str(wd), True, interval=0.05)
    r = subprocess.run(["setsid", "-w", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    pr = B.parse_point_output(r.stdout)
    assert pr.rc == 0 and len(pr.rows) == 4
    assert pr.samples and {s.watts for s in pr.samples} == {400.0}
    assert any(e[1].startswith("llama-bench:") for e in pr.events)
    assert not wd.exists()  # cleaned up


# ---------------------------------------------------------------------------------------------
# tokens/kWh and the seed's table


def test_tokens_per_kwh_formula():
    assert B.tokens_per_kwh(46.3, 818) == pytest.approx(46.3 * 3600 / 0.818)
    assert round(B.tokens_per_kwh(46.3, 818)) == 203765
    # the seed printed 203,854: its t/s was unrounded (46.32 -> 46.3 in the table)
    assert round(B.tokens_per_kwh(46.32, 818), -1) == 203850
    assert B.tokens_per_kwh(None, 818) is None and B.tokens_per_kwh(46.3, 0) is None


@pytest.mark.parametrize("row", SEED["points"], ids=lambda r: str(r["depth"]))
def test_seed_table_reproduces_within_rounding(row):
    """Every printed tokens/kWh follows from its t/s and W with the same formula, within the
    rounding of the printed values (t/s to 0.1, W to 1): the seed computed from unrounded ones."""
    got = B.tokens_per_kwh(row["decode_ts"], row["power_w"])
    lo = B.tokens_per_kwh(row["decode_ts"] - 0.05, row["power_w"] + 0.5)
    hi = B.tokens_per_kwh(row["decode_ts"] + 0.05, row["power_w"] - 0.5)
    assert lo <= row["decode_tokens_per_kwh"] <= hi
    assert abs(got - row["decode_tokens_per_kwh"]) / row["decode_tokens_per_kwh"] < 0.002


def test_baseline_loads_and_compares():
    base = B.load_baseline(B.DEFAULT_BASELINE)
    assert [p.depth for p in base.points] == [4096, 8192, 16384, 32768, 65536, 131072, 198000]
    ours = [B.BenchPoint(4096, prefill_ts=1295.0, decode_ts=46.3, power_w=409.0).finish(512),
            B.BenchPoint(1000, prefill_ts=1.0, decode_ts=1.0).finish(512)]
    cmp = B.compare(ours, base)
    assert len(cmp) == 1 and cmp[0]["depth"] == 4096
    assert cmp[0]["prefill_ratio"] == pytest.approx(2.0)
    assert cmp[0]["decode_ratio"] == pytest.approx(1.0)
    assert cmp[0]["power_ratio"] == pytest.approx(0.5)
    assert cmp[0]["efficiency_ratio"] == pytest.approx(ours[0].decode_tokens_per_kwh / 203854)
    assert B.comparison_rows(cmp)[0][:3] == ["4K", "2.000×", "1.000×"]


def test_baseline_errors(tmp_path):
    with pytest.raises(UsageError):
        B.load_baseline(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError):
        B.load_baseline(tmp_path / "bad.json")


def test_derived_and_measured_ttft():
    p = B.BenchPoint(4096, prefill_ts=647.5).finish(512)
    assert p.ttft_kind == "derived" and p.ttft_ms == pytest.approx(4096 / 647.5 * 1000)
    p0 = B.BenchPoint(0, prefill_ts=1000.0).finish(512)
    assert p0.ttft_ms == pytest.approx(512.0) and p0.ttft_prompt_tokens == 512
    m = B.BenchPoint(4096, prefill_ts=647.5, ttft_ms=869.0, ttft_kind="measured").finish(512)
    assert m.ttft_ms == 869.0
    got = B.parse_ttft('noise\n@@ttft {"depth": 512, "n_tokens": 512, "prompt_ms": 12.5}\n'
                       '@@ttft {"depth": 99999, "error": "too long"}\n')
    assert got[512]["prompt_ms"] == 12.5 and got[99999]["error"] == "too long"


# ---------------------------------------------------------------------------------------------
# result files


def test_results_json_csv_png(tmp_path):
    pts = []
    for d, pp, tg, w in [(4096, 700.0, 47.0, 800.0), (16384, 650.0, 44.0, 820.0), (65536, 600.0, 40.0, 840.0)]:
        pts.append(B.BenchPoint(d, prefill_ts=pp, decode_ts=tg, power_w=w, power_prefill_w=w + 10).finish(512))
    base = B.load_baseline(B.DEFAULT_BASELINE)
    out = B.results_dir(tmp_path, "rig", "20260101T000000Z")
    assert out == tmp_path / "rig" / "20260101T000000Z"
    assert B.results_dir(tmp_path, "rig", "20260101T000000Z").name == "20260101T000000Z-2"
    files = B.write_results(out, {"host": "rig", "title": "t"}, pts, base)
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
    p = B.BenchPoint(4096, prefill_ts=647.5, decode_ts=46.3, ttft_ms=869.0, ttft_kind="measured",
                     power_w=818.0).finish(512)
    assert B.table_rows([p]) == [["4K", "647.5", "46.3", "869 (measured)", "818", "203,765"]]
    assert B.ctx_label(198000) == "198K" and B.ctx_label(0) == "0" and B.ctx_label(512) == "512"


def test_charts_module_imports_matplotlib_lazily():
    code = ("import sys; import provision.charts, provision.bench, provision.tune; "
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
    got, why = B.decide_stop(policy, gpus, cuda, ngl, active)
    assert got is stop and why


# ---------------------------------------------------------------------------------------------
# tune


def test_parse_pairs_and_grouping():
    assert T.parse_pairs(None)[0] == (512, 2048)
    assert T.parse_pairs("4096/4096, 1024/2048") == [(512, 2048), (4096, 4096), (1024, 2048)]
    for bad in ("4096", "2048/1024", "0/512", "a/b"):
        with pytest.raises(UsageError):
            T.parse_pairs(bad)
    assert T.group_by_batch([(512, 2048), (1024, 2048), (4096, 4096)]) == [(2048, [512, 1024]), (4096, [4096])]


def test_tune_argv():
    flags = B.BenchFlags.from_cfg(seed_cfg())
    argv = T.tune_argv("lb", "m.gguf", flags, 2048, [512, 1024], 8192, 3)
    line = " ".join(argv)
    assert "-ts 0.9/1/1/1/1/1 -fa 1 -ctk q8_0 -ctv q8_0 -b 2048 -ub 512,1024 -p 8192 -n 0 -d 0 -r 3" in line


def test_ts_variants():
    assert T.ts_variants(1, None) == [None]
    v = T.ts_variants(4, None)
    assert v == [None, [1.0] * 4, [0.9, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.9]]
    v6 = T.ts_variants(6, [0.9, 1, 1, 1, 1, 1])
    assert v6[0] == [0.9, 1, 1, 1, 1, 1] and len(v6) == 3  # the seed's split is also "GPU0 lighter"


def test_pick_best_and_speedup():
    seed = T.Trial(512, 2048, None, 24619.0)
    trials = [seed, T.Trial(1024, 2048, None, 20449.0), T.Trial(2048, 2048, None, 23422.0),
              T.Trial(4096, 4096, None, 26521.0), T.Trial(8192, 8192, None, None, error="OOM")]
    best, sp = T.pick_best(trials, seed)
    assert (best.ubatch, best.batch) == (4096, 4096) and sp == pytest.approx(26521 / 24619)
    tie = [seed, T.Trial(1024, 4096, None, 24619.0)]
    assert T.pick_best(tie, seed)[0] is seed
    assert T.pick_best([T.Trial(1, 1, None, None)], None) == (None, None)


def test_robust_ts_uses_the_median():
    r = B.BenchRow(512, 0, 0, avg_ts=900.0, stddev_ts=1.0, samples_ts=[1000.0, 1010.0, 500.0])
    assert T.robust_ts(r) == 1000.0
    assert T.robust_ts(B.BenchRow(512, 0, 0, avg_ts=900.0, stddev_ts=1.0)) == 900.0


# ---------------------------------------------------------------------------------------------
# tune --apply: minimal edit of hosts.yaml


def _copy_inventory(tmp_path) -> Path:
    p = tmp_path / "hosts.yaml"
    shutil.copy(ROOT / "hosts.yaml", p)
    return p


def test_apply_keeps_every_comment_and_line(tmp_path):
    p = _copy_inventory(tmp_path)
    before = p.read_text()
    diff = T.apply_to_inventory(p, "rig", {"batch_size": 4096, "ubatch_size": 4096})
    after = p.read_text()
    assert "+      batch_size: 4096" in diff and "+      ubatch_size: 4096" in diff
    b_lines, a_lines = before.splitlines(), after.splitlines()
    assert len(a_lines) == len(b_lines) + 2
    assert [ln for ln in a_lines if "batch_size" not in ln] == b_lines  # nothing else moved
    assert all(ln in after for ln in before.splitlines() if "#" in ln)
    cfg = inv.load(p).hosts["rig"].cfg["server"]
    assert cfg["batch_size"] == 4096 and cfg["ubatch_size"] == 4096
    assert cfg["tensor_split"] == [0.9, 1, 1, 1, 1, 1]
    # inserted inside rig's server section, at its indentation
    i = a_lines.index("      batch_size: 4096")
    # right after the last key of rig's server section (the shipped file's order)
    assert a_lines[i - 1].startswith("      vram_margin_mib:") and a_lines[i + 2].startswith("    opencode:")
    # again: values replaced in place, comments kept, no duplicates
    T.apply_to_inventory(p, "rig", {"batch_size": 2048, "ubatch_size": 1024})
    again = p.read_text()
    assert again.count("batch_size:") == 2 and "      batch_size: 2048" in again
    assert inv.load(p).hosts["rig"].cfg["server"]["ubatch_size"] == 1024
    assert T.apply_to_inventory(p, "rig", {"batch_size": 2048}) == ""  # no change, no write


def test_apply_replaces_tensor_split_and_keeps_its_comment(tmp_path):
    p = _copy_inventory(tmp_path)
    T.apply_to_inventory(p, "rig", {"batch_size": 2048, "ubatch_size": 512,
                                    "tensor_split": [1, 1, 1, 1, 1, 0.9]})
    text = p.read_text()
    assert "      tensor_split: [1, 1, 1, 1, 1, 0.9]   # -ts (0.9 on GPU0 avoids the OOM the seed hit)" in text
    assert inv.load(p).hosts["rig"].cfg["server"]["tensor_split"] == [1, 1, 1, 1, 1, 0.9]


def test_apply_adds_a_server_section_to_a_host_without_one(tmp_path):
    p = _copy_inventory(tmp_path)
    T.apply_to_inventory(p, "local", {"batch_size": 4096, "ubatch_size": 4096})
    loaded = inv.load(p)
    assert loaded.hosts["local"].cfg["server"]["batch_size"] == 4096
    assert loaded.hosts["rig"].cfg["server"]["batch_size"] is None  # the other host untouched
    assert "# <- your rig" in p.read_text()


def test_apply_block_list_and_quoted_host(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("# top comment\nhosts:\n  \"box\":   # the box\n    connection: {type: local}\n"
                 "    gpus:\n      count: 2\n    server:\n      # split\n      tensor_split:\n"
                 "        - 1   # first\n        - 1\n      port: 8001  # port comment\n"
                 "  other:\n    connection: {type: local}\n")
    T.apply_to_inventory(p, "box", {"tensor_split": [0.9, 1], "batch_size": 4096, "ubatch_size": 2048})
    text = p.read_text()
    assert "      tensor_split: [0.9, 1]\n      port: 8001  # port comment\n" in text
    assert "# split" in text and "# top comment" in text and "# the box" in text
    cfg = inv.load(p).hosts["box"].cfg["server"]
    assert cfg["tensor_split"] == [0.9, 1] and cfg["port"] == 8001 and cfg["batch_size"] == 4096


def test_apply_refuses_what_does_not_load_and_writes_nothing(tmp_path):
    p = _copy_inventory(tmp_path)
    before = p.read_text()
    with pytest.raises(InventoryError, match="does not load"):
        T.apply_to_inventory(p, "rig", {"batch_size": 512, "ubatch_size": 4096})  # ub > b
    assert p.read_text() == before
    with pytest.raises(InventoryError, match="not found"):
        T.set_host_values(before, "nope", "server", {"batch_size": 1})
    assert not list(tmp_path.glob(".hosts-*"))


def test_apply_writes_no_secret(tmp_path):
    p = _copy_inventory(tmp_path)
    before = set(p.read_text().splitlines())
    T.apply_to_inventory(p, "rig", {"batch_size": 4096, "ubatch_size": 4096})
    new = set(p.read_text().splitlines()) - before
    assert new == {"      batch_size: 4096", "      ubatch_size: 4096"}


def test_tasks_are_registered():
    r = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True)
    names = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert "bench" in names and "tune" in names
    h = subprocess.run([sys.executable, "-m", "invoke", "bench", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--depths" in h.stdout and "--no-ttft" in h.stdout and "--reps" in h.stdout
    h = subprocess.run([sys.executable, "-m", "invoke", "tune", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--depth" in h.stdout and "--apply" in h.stdout
