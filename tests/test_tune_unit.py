"""tune as data: the significance rule (on recorded llama-bench runs and on the noise numbers of
issue 18), the knee and the most efficient power limit, the candidates of the batch and split
stages, the option parsers, and the minimal hosts.yaml edit of `tune --apply`.

Recorded runs: tests/data/llama-bench-tune-runs.jsonl and llama-bench-tune-clear.jsonl are separate
runs of the REAL CPU llama-bench on the tiny qwen35moe (tests/data/llama-bench-README.txt).
The whole flow on a rig (the real llama-bench, systemd, the fake nvidia-smi) is in
tests/test_bench_rig.py; test_tune_flow.py replays recorded output through the same code locally.
"""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.bench import flags as F, parse as P
from provision.errors import InventoryError, StepError, UsageError
from provision.facts.gpu import Gpu
from provision.tune import batch as TB, inventory_edit as IE, options as O, power as TP
from provision.tune import significance as S

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def seed_cfg() -> dict:
    return inv.load(ROOT / "hosts.yaml").hosts["rig"].cfg


def recorded_runs(name: str) -> list[dict[int, float]]:
    """A file of separate llama-bench runs ('# run N' between them) -> [{ubatch: t/s}, ...]."""
    runs, cur = [], None
    for ln in (DATA / name).read_text().splitlines():
        if ln.startswith("# run"):
            cur = {}
            runs.append(cur)
        elif ln.startswith("{"):
            (row,) = P.parse_bench_output(ln)
            cur[row.n_ubatch] = row.avg_ts
    return runs


def spread_runs(mean: float, stddev: float) -> list[float]:
    """Three runs with exactly this mean and (sample) stddev: mean-s, mean, mean+s."""
    return [mean - stddev, mean, mean + stddev]


# ---------------------------------------------------------------------------------------------
# the rule, on recorded runs


def test_recorded_noise_is_not_called_a_win():
    """Five real runs on a loaded box: ub128's median is 1.25x ub512's (what the old `tune` would
    have called "best"), but its runs range over the same values: no winner."""
    runs = recorded_runs("llama-bench-tune-runs.jsonl")
    assert len(runs) == 5
    by_ub = {ub: S.Runs.of([r[ub] for r in runs]) for ub in (128, 256, 512)}
    current = by_ub[512]
    assert by_ub[128].median / current.median > 1.2  # the median alone looks like a big win
    lead, verdicts = S.leader({"ub128": by_ub[128], "ub256": by_ub[256]}, current)
    assert lead is None
    assert all(not v.better and "within the noise" in v.why for v in verdicts.values())


def test_recorded_clear_gain_wins_and_is_confirmed():
    """ub 2 vs ub 256 on the same noisy box: the ranges are apart in the sweep (runs 1-3) and
    again in the confirmation (runs 4-6)."""
    runs = recorded_runs("llama-bench-tune-clear.jsonl")
    sweep, confirm = runs[:3], runs[3:]
    cur, cand = S.Runs.of([r[2] for r in sweep]), S.Runs.of([r[256] for r in sweep])
    lead, verdicts = S.leader({"ub256": cand}, cur)
    assert lead == "ub256" and "beyond the noise" in verdicts["ub256"].why
    again = S.compare(S.Runs.of([r[256] for r in confirm]), S.Runs.of([r[2] for r in confirm]))
    assert again.better and again.gain > 1.0


def test_issue_18_h200_pp4096_noise():
    """Issue 18, one H200, pp4096: `ub2048/b8192 ... 1.020x the seed's flags` while the seed row's
    stddev was 141 t/s and the other rows' 310-442 t/s. Same numbers as runs: no winner."""
    seed = S.Runs.of(spread_runs(14000.0, 141.0))
    cands = {"ub2048/b8192": S.Runs.of(spread_runs(14280.0, 310.0)),
             "ub4096/b8192": S.Runs.of(spread_runs(14100.0, 442.0)),
             "ub1024/b4096": S.Runs.of(spread_runs(13900.0, 380.0))}
    assert cands["ub2048/b8192"].median / seed.median == pytest.approx(1.02)
    lead, verdicts = S.leader(cands, seed)
    assert lead is None
    assert "within the noise" in verdicts["ub2048/b8192"].why


def test_issue_18_two_h200_noise():
    """Issue 18, two H200s with -ts 0.9,1: a 1.090x row named "best" while the seed row's stddev
    was 933 t/s: the seed's best run is above the candidate's worst -- no winner."""
    seed = S.Runs.of(spread_runs(10000.0, 933.0))
    cand = S.Runs.of(spread_runs(10900.0, 300.0))
    c = S.compare(cand, seed)
    assert not c.better and c.gain == pytest.approx(0.09)
    # the same gain with the seed's runs as tight as the candidate's IS beyond the noise
    assert S.compare(cand, S.Runs.of(spread_runs(10000.0, 150.0))).better


def test_the_rule_needs_three_runs_and_a_one_percent_gain():
    assert "too few runs" in S.compare(S.Runs.of([200, 201]), S.Runs.of([100, 101])).why
    tight = S.compare(S.Runs.of([100.6, 100.7, 100.8]), S.Runs.of([100.1, 100.2, 100.3]))
    assert not tight.better and "under 1%" in tight.why
    assert S.compare(S.Runs.of([102, 103, 104]), S.Runs.of([100, 100.5, 101])).better


def test_the_false_positive_rate_claimed_in_the_docstring():
    """If a candidate is no better, every split of the 2n runs into candidate/current is equally
    likely; exactly one of the C(2n, n) splits puts all of the candidate's runs on top."""
    for n in (3, 4, 5):
        values = [1000.0 + 100.0 * i for i in range(2 * n)]
        splits = list(itertools.combinations(values, n))
        wins = sum(S.compare(S.Runs.of(c), S.Runs.of([v for v in values if v not in c])).better
                   for c in splits)
        assert wins == 1 and len(splits) == {3: 20, 4: 70, 5: 252}[n]


def test_leader_is_the_passing_candidate_with_the_best_median():
    ref = S.Runs.of([100, 101, 102])
    lead, v = S.leader({"a": S.Runs.of([110, 111, 112]), "b": S.Runs.of([120, 121, 122]),
                        "c": S.Runs.of([90, 150, 160])}, ref)  # c: higher median, worst run below
    assert lead == "b" and not v["c"].better


def test_rounds_alternate_the_order():
    got = [(r, x) for r, x in S.rounds(["a", "b", "c"], 3)]
    assert got == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]


def test_runs_text():
    assert S.Runs.of([3.0, 1.0, 2.0]).text(",.1f") == "2.0 (1.0–3.0)"
    assert S.Runs.of([5.0]).text(",.1f") == "5.0" and S.Runs.of([]).text() == "-"
    assert S.Runs.of([1.0, None, float("nan")]).n == 1


# ---------------------------------------------------------------------------------------------
# the knee and the most efficient limit

# RTX 3090 with llama.cpp (shared/reference/nvidia-install.md, Power): 62.3 t/s at 275 W vs 68.9
# at 350 W, best tokens per watt near 275 W. Runs around those numbers, W drawn ~= the limit.
RTX3090 = {250: ([55.8, 56.3, 56.9], 250.0), 275: ([61.9, 62.3, 62.6], 274.0),
           300: ([65.4, 65.9, 66.3], 298.0), 325: ([67.7, 68.1, 68.4], 321.0),
           350: ([68.5, 68.9, 69.2], 342.0)}


def curve(data=RTX3090):
    dec = [(w, S.Runs.of(ts)) for w, (ts, _) in data.items()]
    tpk = [(w, S.Runs.of([t * 3600 / (watts / 1000) for t in ts])) for w, (ts, watts) in data.items()]
    return dec, tpk


def test_knee_on_the_3090_curve():
    dec, tpk = curve()
    assert TP.knee(dec, 0.95) == 300  # 65.9 >= 0.95 * 68.9 = 65.46; 62.3 is not
    assert TP.knee(dec, 0.90) == 275  # 62.3 >= 62.01
    assert TP.knee(dec, 1.0) == 350
    assert TP.most_efficient(tpk) == 275  # the reference's "best tokens per watt near 275 W"
    assert TP.knee([], 0.95) is None and TP.most_efficient([]) is None


def test_knee_when_the_top_is_noisy():
    """The best median need not be the highest limit: the knee is measured from the best."""
    dec = [(200, S.Runs.of([500, 505, 510])), (300, S.Runs.of([560, 570, 575])),
           (400, S.Runs.of([590, 600, 604])), (500, S.Runs.of([600, 603, 606])),
           (700, S.Runs.of([596, 601, 605]))]
    assert TP.knee(dec, 0.95) == 400  # best 603; 0.95 * 603 = 572.9; 300 W's 570 is not enough


def _pt(watts, decode, tpk, found=False):
    p = TP.PowerPoint({0: float(watts)}, found=found)
    p.sweep.decode_ts.extend(decode)
    p.sweep.tokens_per_kwh.extend(tpk)
    return p


def test_judge_lower_knee_on_tokens_per_kwh_higher_knee_on_speed():
    found = _pt(350, [68.5, 68.9, 69.2], [721000, 725000, 728000], found=True)
    knee = _pt(300, [65.4, 65.9, 66.3], [790000, 796000, 801000])
    c = TP.judge(knee, found)
    assert c.better and "tokens/kWh" in c.why and c.gain == pytest.approx(796000 / 725000 - 1)
    slow_found = _pt(250, [55.8, 56.3, 56.9], [803000, 810000, 819000], found=True)
    c2 = TP.judge(knee, slow_found)
    assert c2.better and "decode t/s" in c2.why
    noisy = _pt(300, [60.0, 66.0, 70.0], [700000, 796000, 830000])
    assert not TP.judge(noisy, found).better


H200 = dict(name="NVIDIA H200", uuid="GPU-x", pci_bus_id="00000000:01:00.0", compute_cap="9.0",
            memory_total_mib=143771, memory_used_mib=1, persistence=True, power_draw=80.0,
            power_limit=700.0, power_default=700.0, power_min=200.0, power_max=700.0,
            driver_version="570.133.20")


def gpu(i=0, **kw) -> Gpu:
    return Gpu(**{**H200, "index": i, **kw})


def test_default_watts_from_min_to_default():
    assert TP.default_watts([gpu()]) == [200, 300, 400, 500, 600, 700]
    g3090 = gpu(name="NVIDIA GeForce RTX 3090", power_min=100.0, power_max=350.0, power_default=350.0)
    assert TP.default_watts([g3090, g3090]) == [100, 150, 200, 250, 300, 350]
    odd = gpu(power_min=150.0, power_max=450.0, power_default=420.0)
    assert TP.default_watts([odd]) == [150, 205, 260, 310, 365, 420]


def test_check_watts_names_the_gpu_and_its_range():
    TP.check_watts([200, 700], [gpu(0), gpu(1)])
    with pytest.raises(StepError, match=r"150 W outside GPU 1's range 200–700 W — nothing was changed"):
        TP.check_watts([150, 300], [gpu(0, power_min=100.0), gpu(1)])
    with pytest.raises(StepError, match="GPU 0 .* reports no power limit range"):
        TP.check_watts([], [gpu(0, power_min=None, power_max=None)])


def test_power_points_include_the_limits_found():
    pts = TP.power_points([200, 300, 700], {0: 700.0, 1: 700.0})
    assert [p.label for p in pts] == ["200 W", "300 W", "700 W"] and pts[-1].found
    pts = TP.power_points([200, 300], {0: 350.0, 1: 350.0})
    assert [p.label for p in pts] == ["200 W", "300 W", "350 W"] and pts[-1].found
    pts = TP.power_points([200, 300], {0: 350.0, 1: 270.0})
    assert [p.label for p in pts] == ["200 W", "300 W", "found 350,270 W"]
    assert pts[2].found and pts[2].watts is None and pts[2].limits == {0: 350.0, 1: 270.0}


# ---------------------------------------------------------------------------------------------
# candidates of the batch and split stages


def test_parse_pairs():
    assert O.parse_pairs(None)[0] == (512, 2048) and len(O.parse_pairs(None)) == 11
    assert O.parse_pairs("4096/4096, 1024/2048,4096/4096") == [(4096, 4096), (1024, 2048)]
    for bad in ("4096", "2048/1024", "0/512", "a/b", ","):
        with pytest.raises(UsageError):
            O.parse_pairs(bad)


def test_batch_candidates_start_with_the_current_flags():
    cur = F.BenchFlags.from_cfg(seed_cfg()).but(batch_size=4096, ubatch_size=1024)
    cands = TB.batch_candidates(cur, [(512, 2048), (1024, 4096), (4096, 4096)])
    assert [c.label for c in cands] == ["ub1024/b4096 ts 0.9/1/1/1/1/1", "ub512/b2048 ts 0.9/1/1/1/1/1",
                                        "ub4096/b4096 ts 0.9/1/1/1/1/1"]
    assert cands[0].stage == "current" and {c.stage for c in cands[1:]} == {"batch"}
    groups = TB.bench_groups(cands)
    assert [[c.flags.ubatch_size for c in g] for g in groups] == [[1024, 4096], [512]]


def test_split_candidates_and_modes_from_the_trees_help():
    modes = P.split_modes_from_help((DATA / "llama-bench-help.txt").read_text())
    assert modes == ["none", "layer", "row", "tensor"]
    assert P.split_modes_from_help((DATA / "llama-server-help-split.txt").read_text()) == modes
    assert P.split_modes_from_help("usage: llama-bench [options]") == []
    cur = F.BenchFlags(tensor_split=[0.9, 1.0], batch_size=2048, ubatch_size=512)
    base = cur.but(batch_size=4096, ubatch_size=4096)
    got = TB.split_candidates(base, cur, 2, ["row", "tensor"])
    assert [c.label for c in got] == ["ub4096/b4096 ts 1/1", "ub4096/b4096 ts 1/0.9",
                                      "ub4096/b4096 ts 0.9/1 sm row", "ub4096/b4096 ts 0.9/1 sm tensor"]
    assert len(TB.bench_groups(got)) == 4  # each its own llama-bench


def test_tune_argv_one_run():
    flags = F.BenchFlags.from_cfg(seed_cfg())
    line = " ".join(TB.tune_argv("lb", "m.gguf", flags, 2048, [512, 1024], 8192))
    assert "-ts 0.9/1/1/1/1/1 -fa 1 -ctk q8_0 -ctv q8_0 -b 2048 -ub 512,1024 -p 8192 -n 0 -d 0 -r 1" in line


def test_ts_variants():
    assert TB.ts_variants(1, None) == [None]
    assert TB.ts_variants(4, None) == [None, [1.0] * 4, [0.9, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.9]]
    v6 = TB.ts_variants(6, [0.9, 1, 1, 1, 1, 1])
    assert v6[0] == [0.9, 1, 1, 1, 1, 1] and len(v6) == 3  # the seed's split is also "GPU0 lighter"


def test_pick_compares_each_stage_with_its_own_reference():
    cur = TB.Candidate(F.BenchFlags(batch_size=2048, ubatch_size=512), "current", runs=[100, 101, 102])
    a = TB.Candidate(cur.flags.but(ubatch_size=1024), "batch", runs=[105, 106, 107])
    b = TB.Candidate(cur.flags.but(ubatch_size=2048), "batch", runs=[99, 120, 130])
    again = TB.Candidate(cur.flags, "current", runs=[80, 81, 82])  # the box got slower later
    c = TB.Candidate(cur.flags.but(split_mode="row"), "split", runs=[90, 91, 92])
    assert TB.pick([(cur, [a, b])]) is a and not b.verdict.better
    assert TB.pick([(cur, [a, b]), (again, [c])]) is c  # +11 % over its own reference beats +5 %


# ---------------------------------------------------------------------------------------------
# option parsers (UsageError: one line, exit 2)


def test_parse_watts_keep_reps_and_modes():
    assert O.parse_watts("250,275, 300W,350,275") == [250.0, 275.0, 300.0, 350.0]
    assert O.parse_watts(None) is None and O.parse_watts("") is None
    for bad, msg in (("250,lots", "not a number"), ("0", "outside"), ("9000", "outside"), (",", "empty")):
        with pytest.raises(UsageError, match=msg):
            O.parse_watts(bad)
    assert O.parse_keep(None) == 0.95 and O.parse_keep("0.9") == 0.9 and O.parse_keep("90%") == 0.9
    for bad in ("x", "0.2", "1.5"):
        with pytest.raises(UsageError):
            O.parse_keep(bad)
    assert O.parse_reps("5") == 5
    for bad in ("0", "x", "51"):
        with pytest.raises(UsageError):
            O.parse_reps(bad)
    with pytest.raises(UsageError, match="need --power"):
        O.check_mode(O.TuneOptions(), watts="300")
    with pytest.raises(UsageError, match="at least 1 token"):
        O.check_mode(O.TuneOptions(depth=0))
    O.check_mode(O.TuneOptions(power=True, depth=0))  # power: KV depth 0 is fine
    with pytest.raises(UsageError, match="does not go with --power"):
        O.check_mode(O.TuneOptions(power=True), pairs="512/2048")
    assert F.parse_count("7", "gen") == 7
    with pytest.raises(UsageError, match="--gen"):
        F.parse_count("0", "gen")


# ---------------------------------------------------------------------------------------------
# tune --apply: minimal edit of hosts.yaml


def _copy_inventory(tmp_path) -> Path:
    p = tmp_path / "hosts.yaml"
    shutil.copy(ROOT / "hosts.yaml", p)
    return p


def test_apply_keeps_every_comment_and_line(tmp_path):
    p = _copy_inventory(tmp_path)
    before = p.read_text()
    diff = IE.apply_to_inventory(p, "rig", {"batch_size": 4096, "ubatch_size": 4096})
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
    IE.apply_to_inventory(p, "rig", {"batch_size": 2048, "ubatch_size": 1024})
    again = p.read_text()
    assert again.count("batch_size:") == 2 and "      batch_size: 2048" in again
    assert inv.load(p).hosts["rig"].cfg["server"]["ubatch_size"] == 1024
    assert IE.apply_to_inventory(p, "rig", {"batch_size": 2048}) == ""  # no change, no write


def test_apply_replaces_tensor_split_and_keeps_its_comment(tmp_path):
    p = _copy_inventory(tmp_path)
    IE.apply_to_inventory(p, "rig", {"batch_size": 2048, "ubatch_size": 512,
                                    "tensor_split": [1, 1, 1, 1, 1, 0.9]})
    text = p.read_text()
    assert "      tensor_split: [1, 1, 1, 1, 1, 0.9]   # -ts (0.9 on GPU0 avoids the OOM the seed hit)" in text
    assert inv.load(p).hosts["rig"].cfg["server"]["tensor_split"] == [1, 1, 1, 1, 1, 0.9]


def test_apply_adds_a_server_section_to_a_host_without_one(tmp_path):
    p = _copy_inventory(tmp_path)
    IE.apply_to_inventory(p, "local", {"batch_size": 4096, "ubatch_size": 4096})
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
    IE.apply_to_inventory(p, "box", {"tensor_split": [0.9, 1], "batch_size": 4096, "ubatch_size": 2048})
    text = p.read_text()
    assert "      tensor_split: [0.9, 1]\n      port: 8001  # port comment\n" in text
    assert "# split" in text and "# top comment" in text and "# the box" in text
    cfg = inv.load(p).hosts["box"].cfg["server"]
    assert cfg["tensor_split"] == [0.9, 1] and cfg["port"] == 8001 and cfg["batch_size"] == 4096


def test_apply_refuses_what_does_not_load_and_writes_nothing(tmp_path):
    p = _copy_inventory(tmp_path)
    before = p.read_text()
    with pytest.raises(InventoryError, match="does not load"):
        IE.apply_to_inventory(p, "rig", {"batch_size": 512, "ubatch_size": 4096})  # ub > b
    assert p.read_text() == before
    with pytest.raises(InventoryError, match="not found"):
        IE.set_host_values(before, "nope", "server", {"batch_size": 1})
    assert not list(tmp_path.glob(".hosts-*"))


def test_apply_writes_no_secret(tmp_path):
    p = _copy_inventory(tmp_path)
    before = set(p.read_text().splitlines())
    IE.apply_to_inventory(p, "rig", {"batch_size": 4096, "ubatch_size": 4096})
    new = set(p.read_text().splitlines()) - before
    assert new == {"      batch_size: 4096", "      ubatch_size: 4096"}




def test_apply_power_limit_into_the_hosts_own_entry(tmp_path):
    """`tune --power --apply` writes gpus.power_limit into the host (over the group's 350)."""
    p = _copy_inventory(tmp_path)
    before = p.read_text()
    assert inv.load(p).hosts["rig"].cfg["gpus"]["power_limit"] == 350  # from the rtx3090 group
    diff = IE.apply_to_inventory(p, "rig", {"power_limit": 275.0}, section="gpus")
    assert "+    gpus:" in diff and "+      power_limit: 275" in diff
    changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    assert changed == ["+    gpus:", "+      power_limit: 275"]  # nothing else moved
    assert len(p.read_text().splitlines()) == len(before.splitlines()) + 2
    cfg = inv.load(p).hosts["rig"].cfg["gpus"]
    assert cfg["power_limit"] == 275 and cfg["count"] == 6
    IE.apply_to_inventory(p, "rig", {"power_limit": 300.0}, section="gpus")
    assert p.read_text().count("power_limit: 300") == 1 and inv.load(p).hosts["rig"].cfg["gpus"]["power_limit"] == 300
    with pytest.raises(InventoryError, match="does not load"):
        IE.apply_to_inventory(p, "rig", {"power_limit": 5000.0}, section="gpus")


@pytest.mark.parametrize("args,line", [
    (["bench", "--service", "sometimes"], "command line: --service: expected one of auto, stop, keep, got 'sometimes'"),
    (["bench", "--reps", "0"], "command line: --reps: must be between 1 and 1000000, got 0"),
    (["tune", "--watts", "300"], "command line: --watts and --keep need --power"),
    (["tune", "--power", "--watts", "250,lots"], "command line: --watts: not a number of watts: 'lots'"),
    (["tune", "--power", "--keep", "2"], "command line: --keep: must be between 0.5 and 1 (50%..100%), got 2"),
    (["tune", "--power", "--pairs", "512/2048"], "command line: --pairs does not go with --power"),
])
def test_bad_options_are_one_line_and_exit_2(args, line):
    """Checked before any host is contacted (the shipped rig's address is not reachable here)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "invoke", *args, "--host", "rig"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith(line) and len(r.stderr.strip().splitlines()) == 1


def test_clearly_slower_is_called_slower_not_noise():
    """A candidate whose best run is under the current flags' worst (the H100 proof's ub1024 at
    0.73x) is named slower, with its median change -- not "within the noise"."""
    cur = S.Runs.of([600.0, 605.0, 610.0])
    slow = S.Runs.of([430.0, 440.0, 450.0])
    c = S.compare(slow, cur)
    assert not c.better and c.why.startswith("slower: its best run 450.0 t/s is below the worst")
    assert "-27.3%" in c.why
    overlap = S.compare(S.Runs.of([590.0, 600.0, 606.0]), cur)
    assert not overlap.better and overlap.why.startswith("within the noise")
