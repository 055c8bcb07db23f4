"""When is a candidate really better than the current flags? The one rule every tune uses.

Every point (a batch pair, a split, a power limit) is measured in `reps` separate llama-bench runs
(default 3). The runs are taken in rounds -- every point once per round, the order reversed every
other round -- so a drift of the box (clocks, temperature, a neighbour) hits all points alike.
A point's value is the median of its runs, its spread the range from its worst to its best run.

The rule, "ranges apart, twice":

1. both the candidate and the current flags have at least `MIN_REPS` (3) runs;
2. the candidate's WORST run beats the current flags' BEST run (the ranges do not overlap), and
   its median is at least `MIN_GAIN` (1 %) better;
3. it holds again on a confirmation: the leader (the best candidate that passed 2.) and the current
   flags measured `reps` more times, interleaved.

Why this rule. It needs no assumption about the noise's shape: if a candidate is no better, each
ordering of its n runs and the current flags' n runs is equally likely, and the chance that all of
its runs come out on top is 1/C(2n, n) -- 1 in 20 for n = 3, 1 in 252 for n = 5. A spread estimate
from 3 runs is itself noise (a MAD is 0 when two runs tie; a stddev of 3 can be off by 2x), so a
"k x MAD" or "k sigma" margin is a coin toss at these sample sizes. Step 3 is there because a tune
tries many candidates: with 14 candidates at 1 in 20 each, some candidate that is no better passes
step 2 about half the time, and the best of many noisy numbers is flattered by its own noise; a
fresh measurement of the leader alone has the 1 in 20 again. Run-to-run noise on lent GPUs is
large (the seed pair measured 12.6k and 15.0k t/s in two runs of the same test), so runs are
separate llama-bench processes, not llama-bench's own repetitions inside one process.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

MIN_REPS = 3
MIN_GAIN = 0.01
NO_GAIN = "no significant gain over the current flags"
RULE = (f"ranges apart, twice: at least {MIN_REPS} runs each; the candidate's worst run beats the "
        f"current flags' best run and its median is >= {MIN_GAIN:.0%} better; then the same again "
        "on a confirmation re-run of the leader against the current flags")


@dataclass(frozen=True)
class Runs:
    """A point's runs (one number per llama-bench run; higher is better)."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Runs":
        return cls(tuple(float(v) for v in values if v is not None and math.isfinite(v)))

    def __bool__(self) -> bool:
        return bool(self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def lo(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def hi(self) -> float | None:
        return max(self.samples) if self.samples else None

    @property
    def spread(self) -> float | None:
        """(best - worst) / median: the half-width of this, in %, is the `±` a table shows."""
        if not self.samples or not self.median:
            return None
        return (self.hi - self.lo) / self.median

    def text(self, spec: str = ",.1f") -> str:
        """`14,280.0 (13,970.0–14,590.0)`, or `-`."""
        if not self.samples:
            return "-"
        if self.n == 1:
            return format(self.median, spec)
        return f"{format(self.median, spec)} ({format(self.lo, spec)}–{format(self.hi, spec)})"

    def as_dict(self) -> dict:
        return {"runs": list(self.samples), "median": self.median, "min": self.lo, "max": self.hi}


@dataclass(frozen=True)
class Comparison:
    better: bool
    why: str
    gain: float | None  # median / current median - 1


def compare(cand: Runs, ref: Runs, what: str = "t/s", min_reps: int = MIN_REPS,
            min_gain: float = MIN_GAIN, spec: str = ",.1f", ref_name: str = "the current flags") -> Comparison:
    """Step 2 of the rule for one candidate against the current flags (higher is better)."""
    gain = (cand.median / ref.median - 1.0) if cand and ref and ref.median else None
    if cand.n < min_reps or ref.n < min_reps:
        return Comparison(False, f"too few runs to tell a gain from noise ({min(cand.n, ref.n)} < {min_reps})", gain)
    if cand.hi < ref.lo:
        return Comparison(False, f"slower: its best run {format(cand.hi, spec)} {what} is below the worst of "
                                 f"{ref_name}, {format(ref.lo, spec)}; median {(gain or 0):+.1%}", gain)
    if cand.lo <= ref.hi:
        return Comparison(False, f"within the noise: its worst run {format(cand.lo, spec)} {what} is not above "
                                 f"the best of {ref_name}, {format(ref.hi, spec)}", gain)
    if gain is None or gain < min_gain:
        return Comparison(False, f"ranges apart but the gain {(gain or 0):+.1%} is under {min_gain:.0%}", gain)
    return Comparison(True, f"beyond the noise: its worst run {format(cand.lo, spec)} > the best of "
                            f"{ref_name}, {format(ref.hi, spec)} {what}; median {gain:+.1%}", gain)


def leader(cands: dict[str, Runs], ref: Runs, **kw) -> tuple[str | None, dict[str, Comparison]]:
    """The candidate with the best median among those that pass step 2 (None if none does)."""
    verdicts = {k: compare(r, ref, **kw) for k, r in cands.items()}
    passing = [k for k, c in verdicts.items() if c.better]
    if not passing:
        return None, verdicts
    return max(passing, key=lambda k: cands[k].median), verdicts


def rounds(items: Sequence, reps: int):
    """(round, item) for every item once per round, `reps` rounds, the order reversed every other
    round (a drift of the box during the tune then favours no item)."""
    items = list(items)
    for r in range(reps):
        for it in (items if r % 2 == 0 else items[::-1]):
            yield r, it
