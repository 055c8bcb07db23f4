"""`invoke tune`: -b/-ub pairs (and, with several GPUs, -ts variants and split modes) against the
current flags, a winner only beyond the noise (significance.py).

What is measured: llama-bench prefill of ONE prompt of `depth` tokens from an empty cache
(`-p <depth> -n 0 -d 0`, default 8192). -b/-ub only change anything when a prompt is longer than a
batch -- at the seed's pp512 every pair with ub >= 512 is the same single ubatch -- so the prompt
itself is the depth: the prefill a client pays for an 8K-token request (its TTFT).

The reference is the current flags on the same box: the inventory's -b/-ub (llama.cpp's defaults
b2048/ub512 where unset, which the seed ran with), tensor split and split mode. Pairs are written
`ub/b` ("512/2048"). With several GPUs, a second stage tries -ts variants and the other split
modes the tree's llama-bench AND llama-server list (`row`, `tensor`) with the leading pair, each
checked by the service's VRAM preflight first (a split that would not fit is not measured).

`--apply` writes the winner (server.batch_size / ubatch_size, and tensor_split / split_mode when
they changed) into the host's own entry in hosts.yaml (inventory_edit.py), and only if the winner
passed the rule and the VRAM preflight with the service's context; otherwise nothing is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..bench.flags import BenchFlags, ts_arg
from ..bench.guard import RigGuard
from ..bench.parse import split_modes_from_help
from ..bench.sweep import charts_available
from ..errors import StepError
from .options import TuneOptions
from .session import Session, open_session
from .significance import NO_GAIN, RULE, Comparison, Runs, compare, rounds

SPLIT_MODES = ("row", "tensor")  # tried next to the configured mode, where the tree has them


@dataclass
class Candidate:
    flags: BenchFlags  # complete (-b/-ub spelled out)
    stage: str  # "current" | "batch" | "split"
    runs: list[float] = field(default_factory=list)  # prefill t/s, one per llama-bench run
    errors: list[str] = field(default_factory=list)
    fit: str | None = None  # the VRAM preflight's word (split stage)
    confirm: list[float] = field(default_factory=list)  # the confirmation runs (leader, current)
    verdict: Comparison | None = None
    vs_reference: float | None = None  # median / the current flags' median in the same rounds

    @property
    def label(self) -> str:
        f = self.flags
        ts = ts_arg(f.tensor_split)
        return (f"ub{f.ubatch_size}/b{f.batch_size}" + (f" ts {ts}" if ts else "")
                + (f" sm {f.split_mode}" if f.split_mode != "layer" else ""))

    @property
    def pair(self) -> tuple[int, int]:
        return (self.flags.ubatch_size, self.flags.batch_size)

    def as_dict(self) -> dict[str, Any]:
        r = Runs.of(self.runs)
        return {"label": self.label, "stage": self.stage, "ubatch": self.flags.ubatch_size,
                "batch": self.flags.batch_size, "tensor_split": self.flags.tensor_split,
                "split_mode": self.flags.split_mode, "prefill_ts": r.median, **r.as_dict(),
                "vs_reference": self.vs_reference, "errors": self.errors, "fit": self.fit,
                "confirm": Runs.of(self.confirm).as_dict() if self.confirm else None,
                "verdict": self.verdict.why if self.verdict else None}


# ---------------------------------------------------------------------------------------------
# candidates (pure)

def ts_variants(n_gpus: int, configured: Sequence[float] | None) -> list[list[float] | None]:
    """With several GPUs: the configured split, an even split, GPU0 lighter (the seed's 0.9), and
    the last GPU lighter. One GPU: only the configured/none."""
    if n_gpus <= 1:
        return [list(configured) if configured else None]
    even = [1.0] * n_gpus
    out: list[list[float] | None] = [list(configured) if configured else None, even,
                                     [0.9] + [1.0] * (n_gpus - 1), [1.0] * (n_gpus - 1) + [0.9]]
    uniq: list[list[float] | None] = []
    for v in out:
        norm = None if v is None else [float(x) for x in v]
        if norm not in uniq:
            uniq.append(norm)
    return uniq


def batch_candidates(current: BenchFlags, pairs: Sequence[tuple[int, int]]) -> list[Candidate]:
    """The current flags first (the reference), then every other pair with its ts / split mode."""
    out = [Candidate(current, "current")]
    for ub, b in pairs:
        if (ub, b) != (current.ubatch_size, current.batch_size):
            out.append(Candidate(current.but(batch_size=b, ubatch_size=ub), "batch"))
    return out


def split_candidates(base: BenchFlags, current: BenchFlags, n_gpus: int,
                     modes: Sequence[str]) -> list[Candidate]:
    """With the leading pair: the other -ts variants (current split mode) and the other split
    modes (current -ts)."""
    out = [Candidate(base.but(tensor_split=ts), "split")
           for ts in ts_variants(n_gpus, current.tensor_split)[1:]]
    out += [Candidate(base.but(split_mode=m), "split") for m in modes if m != current.split_mode]
    return out


def bench_groups(cands: Sequence[Candidate]) -> list[list[Candidate]]:
    """One llama-bench per batch size, split and mode (the ubatch list swept inside it: the model
    loads once)."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        f = c.flags
        key = (f.batch_size, tuple(f.tensor_split or ()), f.split_mode)
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def tune_argv(binary: str, model: str, flags: BenchFlags, batch: int, ubatches: Sequence[int],
              prompt: int, reps: int = 1) -> list[str]:
    base = flags.but(batch_size=None, ubatch_size=None)
    return [binary, "-m", model, *base.argv(), "-b", str(batch),
            "-ub", ",".join(str(u) for u in ubatches), "-p", str(prompt), "-n", "0", "-d", "0",
            "-r", str(reps), "-o", "jsonl", "--progress"]


def pick(stages: Sequence[tuple[Candidate, Sequence[Candidate]]]) -> Candidate | None:
    """Step 2 of the rule in each stage (candidates against the current flags measured in the same
    rounds); the leader is the passing candidate with the largest gain."""
    best: Candidate | None = None
    for ref, cands in stages:
        for c in cands:
            c.verdict = compare(Runs.of(c.runs), Runs.of(ref.runs))
            if c.verdict.better and (best is None or c.verdict.gain > best.verdict.gain):
                best = c
    return best


# ---------------------------------------------------------------------------------------------
# on the rig

def measure(s: Session, cands: Sequence[Candidate], reps: int, confirm: bool = False) -> None:
    """`reps` rounds over the llama-bench groups of `cands`; one prefill t/s per candidate per run."""
    for r, group in rounds(bench_groups(cands), reps):
        f = group[0].flags
        argv = tune_argv(s.binary, s.model, f, f.batch_size, [c.flags.ubatch_size for c in group],
                         s.opts.batch_depth)
        try:
            pr = s.runner.run(argv, allow_partial=True)
            by_ub = {row.n_ubatch: row for row in pr.rows if row.kind == "pp"}
        except StepError as e:
            by_ub, err = {}, str(e)
        else:
            err = "no result (llama-bench failed before this test)"
        words = []
        for c in group:
            row = by_ub.get(c.flags.ubatch_size)
            if row is None:
                c.errors.append(err)
                words.append(f"{c.label} FAILED ({err})")
            else:
                (c.confirm if confirm else c.runs).append(row.avg_ts)
                words.append(f"{c.label} {row.avg_ts:,.1f} t/s")
        s.say(f"{'confirmation ' if confirm else ''}run {r + 1}/{reps}: " + "; ".join(words))


def split_modes_of_tree(s: Session) -> list[str]:
    """Split modes both llama-bench and llama-server of the tree list in --help (row, tensor)."""
    from ..steps.service import binary_path
    t = s.ctx.target
    bench = split_modes_from_help(t.run(f"{s.binary} --help 2>&1", check=False).stdout)
    server = binary_path(s.ctx.cfg)
    if t.exists(server):
        bench = [m for m in bench if m in split_modes_from_help(t.run(f"{server} --help 2>&1", check=False).stdout)]
    return [m for m in SPLIT_MODES if m in bench]


def run_batch_tune(ctx, opts: TuneOptions) -> dict[str, Any]:
    s = open_session(ctx, opts)
    depth = opts.batch_depth
    cands = batch_candidates(s.flags, opts.pairs)
    current = cands[0]
    s.say(f"pp{depth} from an empty cache, {opts.reps} run(s) of every point, pairs (ub/b) "
          + ", ".join(f"{c.flags.ubatch_size}/{c.flags.batch_size}" for c in cands)
          + f"; the reference is the current flags ({current.label})")
    stages: list[tuple[Candidate, list[Candidate]]] = [(current, cands[1:])]
    split: list[Candidate] = []
    leader: Candidate | None = None
    with RigGuard(ctx, "tune") as guard, s.runner.interruptible():
        if s.stop:
            guard.stop_service(s.why)
        measure(s, cands, opts.reps)
        leader = pick(stages)
        if opts.splits and s.n_used > 1:
            base = leader or current
            modes = split_modes_of_tree(s)
            split = split_candidates(base.flags, s.flags, s.n_used, modes)
            s.say(f"{s.n_used} GPUs: -ts variants and split modes ({', '.join(modes) or 'none besides layer'} "
                  f"in this tree) with {base.label.split(' ')[0]}, each checked by the VRAM preflight first")
            runnable = []
            for c in split:
                ok, word = s.preflight(tensor_split=c.flags.tensor_split, split_mode=c.flags.split_mode,
                                       batch_size=c.flags.batch_size, ubatch_size=c.flags.ubatch_size)
                c.fit = word if ok is not False else f"does not fit: {word}"
                if ok is False:
                    s.say(f"{c.label}: not measured, the VRAM preflight refuses it ({word})")
                else:
                    runnable.append(c)
            if runnable:
                again = Candidate(current.flags, "current")  # the reference, in the same rounds
                measure(s, [again] + runnable, opts.reps)
                stages.append((again, runnable))
                leader = pick(stages)
        winner = None
        if leader is not None:
            s.say(f"leader {leader.label} ({leader.verdict.why}); confirming it against the current "
                  f"flags: {opts.reps} more run(s) each")
            ref = Candidate(current.flags, "current")
            leader.confirm.clear()
            measure(s, [ref, leader], opts.reps, confirm=True)
            confirmation = compare(Runs.of(leader.confirm), Runs.of(ref.confirm))
            current.confirm = ref.confirm
            winner = leader if confirmation.better else None
        else:
            confirmation = None
    everyone = cands + [c for c in split if c not in cands]
    return report(s, everyone, stages, current, leader, confirmation, winner)


# ---------------------------------------------------------------------------------------------
# the report

def report(s: Session, cands: list[Candidate], stages, current: Candidate, leader: Candidate | None,
           confirmation: Comparison | None, winner: Candidate | None) -> dict[str, Any]:
    opts, depth = s.opts, s.opts.batch_depth
    rows = []
    for ref, group in stages:
        ref_median = Runs.of(ref.runs).median
        rows.append(_row(ref, ref_median, "current flags" if ref is current
                         else "current flags (again, in the rounds of the splits)"))
        for c in group:
            c.vs_reference = (Runs.of(c.runs).median / ref_median) if c.runs and ref_median else None
            rows.append(_row(c, ref_median, None, c is winner))
    for c in cands:
        if c.stage == "split" and c.fit and c.fit.startswith("does not fit"):
            rows.append([c.label, "0", "-", "-", "not measured: the VRAM preflight refuses it"])
    s.ctx.console.table(f"tune: {s.name}, pp{depth} (prefill of one {depth}-token prompt), "
                        f"{opts.reps} run(s) each",
                        ["flags", "runs", "prefill t/s median (min–max)", "vs current (same rounds)",
                         "verdict"], rows)
    speedup = None
    if confirmation is not None:
        s.say(f"confirmation of {leader.label}: {confirmation.why}")
    if winner is not None:
        speedup = Runs.of(winner.confirm).median / Runs.of(current.confirm).median
        s.say(f"winner {winner.label}: {speedup:.3f}× the current flags ({current.label}) on the "
              "confirmation runs")
    else:
        why = ("its gain did not hold up on the confirmation runs" if leader is not None else
               "no candidate's runs were all above the current flags' runs by 1 % or more")
        s.say(f"{NO_GAIN} ({why})")
    out_dir = s.out_dir()
    doc = {**s.header("llama-rig tune"),
           "what": f"llama-bench -p {depth} -n 0 -d 0 -r 1 (prefill of one {depth}-token prompt), "
                   f"{opts.reps} separate runs of every point in interleaved rounds",
           "rule": RULE, "current": current.as_dict(),
           "candidates": [c.as_dict() for c in cands if c is not current],
           "stages": [{"reference": ref.as_dict(), "candidates": [c.label for c in group]}
                      for ref, group in stages],
           "leader": leader.label if leader else None,
           "confirmation": ({"leader": Runs.of(leader.confirm).as_dict(),
                             "current": Runs.of(current.confirm).as_dict(), "verdict": confirmation.why}
                            if confirmation else None),
           "winner": winner.as_dict() if winner else None,
           "speedup_vs_current": speedup, "verdict": winner.label if winner else NO_GAIN,
           "applied": None}
    result = {"dir": str(out_dir), "winner": winner, "leader": leader, "current": current,
              "speedup": speedup, "trials": cands, "applied": None}
    if opts.apply:
        result["applied"] = doc["applied"] = apply_winner(s, winner, current)
    s.write_json(out_dir, "tune.json", doc)
    if opts.charts and charts_available(s.ctx):
        from ..charts import tune_chart
        tune_chart(out_dir / "tune.png", [c.as_dict() for c in cands if c.runs],
                   f"tune {s.name}: pp{depth}, median and range of {opts.reps} runs",
                   current=current.label, winner=winner.label if winner else None)
    s.say(f"results in {out_dir}/")
    if not any(c.runs for c in cands):
        raise StepError("tune: no flag set produced a result")
    return result


def _row(c: Candidate, ref_median: float | None, what: str | None, won: bool = False) -> list[str]:
    r = Runs.of(c.runs)
    vs = f"{r.median / ref_median:.3f}×" if r and ref_median else "-"
    if what is None:
        if not r and c.errors:
            what = f"FAILED: {c.errors[-1]}"
        else:
            what = (c.verdict.why if c.verdict else "-") + ("  <- winner" if won else "")
    return [c.label, str(r.n), r.text(), vs, what]


def apply_winner(s: Session, winner: Candidate | None, current: Candidate) -> dict[str, Any] | None:
    if winner is None:
        s.say(f"--apply: nothing written ({NO_GAIN})")
        return None
    ok, word = s.preflight(tensor_split=winner.flags.tensor_split, split_mode=winner.flags.split_mode,
                           batch_size=winner.flags.batch_size, ubatch_size=winner.flags.ubatch_size)
    if ok is False:
        s.say(f"--apply: nothing written: with the service's context the winner does not fit ({word})")
        return None
    values: dict[str, Any] = {"batch_size": winner.flags.batch_size, "ubatch_size": winner.flags.ubatch_size}
    if winner.flags.tensor_split != current.flags.tensor_split:
        values["tensor_split"] = winner.flags.tensor_split
    if winner.flags.split_mode != current.flags.split_mode:
        values["split_mode"] = winner.flags.split_mode
    return s.apply("server", values, f"`invoke provision --host {s.name}` puts them into the service")
