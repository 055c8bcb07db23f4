"""`invoke tune`: find -b/-ub (and, with several GPUs, -ts) that beat the seed's flags on this box.

What is measured: llama-bench prefill of ONE prompt of `depth` tokens from an empty cache
(`-p <depth> -n 0 -d 0`, default 8192). -b/-ub only change anything when a prompt is longer than
a batch — at the seed's pp512 every pair with ub >= 512 is the same single ubatch — so the prompt
itself is the depth: it is the prefill a client pays for an 8K-token request (its TTFT).
The reference is the seed's flags on the same box: b2048/ub512 (llama.cpp's defaults, which the
seed ran with) and the configured tensor split. Pairs are written `ub/b` ("512/2048").
With several GPUs a few -ts variants are then tried with the best pair.

`--apply` writes server.batch_size / server.ubatch_size (and server.tensor_split) into the host's
own entry in hosts.yaml by editing only those lines of the text, so comments survive, and keeps
the new text only if the inventory still loads with those values.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import bench as B
from .errors import InventoryError, StepError, UsageError

DEFAULT_PAIRS: tuple[tuple[int, int], ...] = (
    (512, 2048),  # the seed (llama.cpp defaults)
    (1024, 2048), (2048, 2048),
    (1024, 4096), (2048, 4096), (4096, 4096),
    # b > ub: several ubatches per batch, which a layer split pipelines across its GPUs
    (512, 8192), (1024, 8192), (2048, 8192), (4096, 8192), (8192, 8192))
SEED_PAIR = (B.SEED_UBATCH, B.SEED_BATCH)


def parse_pairs(spec: str | None) -> list[tuple[int, int]]:
    """"512/2048,4096/4096" -> [(512, 2048), (4096, 4096)] as (ubatch, batch)."""
    if not spec:
        return list(DEFAULT_PAIRS)
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)/(\d+)", item)
        if not m:
            raise UsageError(f"command line: --pairs: expected UBATCH/BATCH like 512/2048, got {item!r}")
        ub, b = int(m.group(1)), int(m.group(2))
        if ub < 1 or b < 1 or ub > b:
            raise UsageError(f"command line: --pairs: {item}: need 1 <= ubatch <= batch")
        if (ub, b) not in out:
            out.append((ub, b))
    if SEED_PAIR not in out:
        out.insert(0, SEED_PAIR)  # the speed-up is always against the seed's flags on this box
    return out


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


@dataclass
class Trial:
    ubatch: int
    batch: int
    tensor_split: list[float] | None
    prefill_ts: float | None = None
    stddev: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        ts = B.ts_arg(self.tensor_split)
        return f"ub{self.ubatch}/b{self.batch}" + (f" ts {ts}" if ts else "")

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "ubatch": self.ubatch, "batch": self.batch,
                "tensor_split": self.tensor_split, "prefill_ts": self.prefill_ts,
                "stddev": self.stddev, "error": self.error}


def pick_best(trials: Sequence[Trial], ref: Trial | None) -> tuple[Trial | None, float | None]:
    """Fastest trial that ran; a tie keeps the earlier (smaller) one. Speed-up vs ref (seed)."""
    ok = [t for t in trials if t.prefill_ts]
    if not ok:
        return None, None
    best = ok[0]
    for t in ok[1:]:
        if t.prefill_ts > best.prefill_ts:  # type: ignore[operator]
            best = t
    sp = (best.prefill_ts / ref.prefill_ts) if ref and ref.prefill_ts else None  # type: ignore[operator]
    return best, sp


def group_by_batch(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """One llama-bench per batch size (ubatch list swept inside it; the model loads once)."""
    groups: dict[int, list[int]] = {}
    for ub, b in pairs:
        groups.setdefault(b, []).append(ub)
    return [(b, ubs) for b, ubs in groups.items()]


def tune_argv(binary: str, model: str, flags: B.BenchFlags, batch: int, ubatches: Sequence[int],
              prompt: int, reps: int) -> list[str]:
    base = B.BenchFlags(**{**flags.__dict__, "batch_size": None, "ubatch_size": None})
    return [binary, "-m", model, *base.argv(), "-b", str(batch),
            "-ub", ",".join(str(u) for u in ubatches), "-p", str(prompt), "-n", "0", "-d", "0",
            "-r", str(reps), "-o", "jsonl", "--progress"]


# ---------------------------------------------------------------------------------------------
# hosts.yaml: minimal text edit


def _fmt_yaml(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(B.fmt_num(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return B.fmt_num(v)
    return str(v)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _key_re(key: str) -> re.Pattern:
    return re.compile(r"^(?P<ind>\s*)(?P<q>['\"]?)" + re.escape(key) + r"(?P=q)\s*:(?P<rest>.*)$")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line that belongs to the block opened at `start` (deeper-indented
    content; trailing blank/comment lines are not counted as part of it)."""
    end = start + 1
    i = start + 1
    while i < len(lines):
        if _content(lines[i]):
            if _indent(lines[i]) <= indent:
                break
            end = i + 1
        i += 1
    return end


def _find_child(lines: list[str], start: int, end: int, indent: int, key: str) -> int | None:
    """Line index of `key:` directly under the block (start, end) whose own indent is `indent`."""
    rx = _key_re(key)
    child_ind = None
    for i in range(start + 1, end):
        if not _content(lines[i]):
            continue
        ind = _indent(lines[i])
        if ind <= indent:
            break
        if child_ind is None:
            child_ind = ind
        if ind == child_ind and rx.match(lines[i]):
            return i
    return None


def _child_indent(lines: list[str], start: int, end: int, indent: int) -> int:
    for i in range(start + 1, end):
        if _content(lines[i]) and _indent(lines[i]) > indent:
            return _indent(lines[i])
    return indent + 2


def set_host_values(text: str, host: str, section: str, values: dict[str, Any]) -> str:
    """Set section.key for each of `values` in hosts.<host> of a hosts.yaml text, touching only
    those lines (comments, order and everything else stay byte for byte)."""
    nl = "\n"
    lines = text.split(nl)
    hosts_i = next((i for i, ln in enumerate(lines) if _key_re("hosts").match(ln) and _indent(ln) == 0), None)
    if hosts_i is None:
        raise InventoryError("hosts.yaml: no top-level 'hosts:'")
    h_end = _block_end(lines, hosts_i, 0)
    host_i = _find_child(lines, hosts_i, h_end, 0, host)
    if host_i is None:
        raise InventoryError(f"hosts.yaml: host {host!r} not found under hosts:")
    host_ind = _indent(lines[host_i])
    m = _key_re(host).match(lines[host_i])
    if m and m.group("rest").split("#")[0].strip():
        raise InventoryError(f"hosts.yaml: host {host!r} is written in flow style; edit it by hand")
    hb_end = _block_end(lines, host_i, host_ind)
    sec_i = _find_child(lines, host_i, hb_end, host_ind, section)
    if sec_i is None:
        ci = _child_indent(lines, host_i, hb_end, host_ind)
        new = [" " * ci + f"{section}:"] + [" " * (ci + 2) + f"{k}: {_fmt_yaml(v)}" for k, v in values.items()]
        lines[hb_end:hb_end] = new
        return nl.join(lines)
    sec_ind = _indent(lines[sec_i])
    ms = _key_re(section).match(lines[sec_i])
    if ms and ms.group("rest").split("#")[0].strip():
        raise InventoryError(f"hosts.yaml: host {host!r}: {section} is written in flow style; edit it by hand")
    for k, v in values.items():
        s_end = _block_end(lines, sec_i, sec_ind)
        ki = _find_child(lines, sec_i, s_end, sec_ind, k)
        val = _fmt_yaml(v)
        if ki is None:
            ci = _child_indent(lines, sec_i, s_end, sec_ind)
            lines.insert(s_end, " " * ci + f"{k}: {val}")
            continue
        mk = _key_re(k).match(lines[ki])
        rest = mk.group("rest")
        cm = re.search(r"(\s+#.*)$", rest)
        comment = cm.group(1) if cm else ""
        body = rest[: cm.start()] if cm else rest
        pre = lines[ki][: len(lines[ki]) - len(rest)]
        lead = re.match(r"\s*", body).group(0) or " "
        lines[ki] = f"{pre}{lead}{val}{comment}"
        if not body.strip():  # a block value (`- 0.9` lines) follows: drop it
            k_ind = _indent(lines[ki])
            last = ki
            for j in range(ki + 1, len(lines)):
                if not _content(lines[j]):
                    continue
                if _indent(lines[j]) > k_ind or (lines[j].lstrip().startswith("-") and _indent(lines[j]) == k_ind):
                    last = j
                else:
                    break
            del lines[ki + 1:last + 1]
    return nl.join(lines)


def apply_to_inventory(path: str | Path, host: str, values: dict[str, Any]) -> str:
    """Edit hosts.yaml in place (atomic), after checking that the edited file loads and carries
    exactly these values for the host. Returns the unified diff."""
    from . import inventory as inv
    from .engine import file_diff
    p = Path(path)
    before = p.read_text()
    after = set_host_values(before, host, "server", values)
    if after == before:
        return ""
    fd, tmp = tempfile.mkstemp(prefix=".hosts-", suffix=".yaml", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(after)
        try:
            loaded = inv.load(tmp)
        except InventoryError as e:
            raise InventoryError(f"tune --apply: the edited inventory does not load, nothing written: {e}") from None
        srv = loaded.hosts[host].cfg["server"]
        for k, v in values.items():
            got = srv.get(k)
            if (list(map(float, got)) if isinstance(v, list) and got else got) != (list(map(float, v)) if isinstance(v, list) else v):
                raise InventoryError(f"tune --apply: after the edit server.{k} reads {got!r}, not {v!r} "
                                     "(a --set or a later layer overrides it?); nothing written")
        os.chmod(tmp, os.stat(p).st_mode & 0o7777)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file_diff(str(p), before, after)


# ---------------------------------------------------------------------------------------------
# the tune run


@dataclass
class TuneOptions:
    depth: int = 8192
    reps: int = 3
    pairs: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_PAIRS))
    tensor_splits: bool = True
    service: str = "auto"
    binary: str | None = None
    model: str | None = None
    results_root: str = "results"
    apply: bool = False
    inventory_path: str = "hosts.yaml"
    charts: bool = True
    timeout: float | None = None


def robust_ts(row: B.BenchRow) -> float:
    """Median of the repetitions (llama-bench's samples_ts) — one slow repetition (a clock or
    power dip) must not decide the pick; llama-bench's own mean when there are no samples."""
    import statistics
    return statistics.median(row.samples_ts) if row.samples_ts else row.avg_ts


def _trials_from(rows: Sequence[B.BenchRow], batch: int, ts: list[float] | None,
                 ubs: Sequence[int]) -> list[Trial]:
    by_ub = {r.n_ubatch: r for r in rows if r.kind == "pp"}
    out = []
    for ub in ubs:
        r = by_ub.get(ub)
        out.append(Trial(ub, batch, ts, robust_ts(r) if r else None, r.stddev_ts if r else None,
                         None if r else "no result (llama-bench failed before this test)"))
    return out


def run_tune(ctx, opts: TuneOptions) -> dict[str, Any]:
    from .facts import host as hostfacts

    cfg = ctx.cfg
    if opts.depth < 1:
        raise UsageError("command line: --depth: must be at least 1 token")
    flags = B.BenchFlags.from_cfg(cfg)
    binary = opts.binary or B.default_binary(cfg)
    if not ctx.target.exists(binary, sudo=True):
        raise StepError(f"{binary} not found (build llama.cpp with the llama-bench target, or pass --binary)")
    model = opts.model or B.find_model(ctx)
    gf = hostfacts.gpu(ctx)
    n_gpus = len(gf.gpus) if gf.available else 0
    # GPUs the server uses: gpus.count when the inventory says (CUDA_VISIBLE_DEVICES may hide some)
    n_used = min(n_gpus, cfg["gpus"]["count"]) if cfg["gpus"]["count"] else n_gpus
    installed = B.service_installed(ctx)
    active = installed and B.service_active(ctx)
    stop, why = B.decide_stop(opts.service, n_gpus, bool(cfg["llama_cpp"]["cuda"]), flags.n_gpu_layers, active)
    runner = B.RigBench(ctx, binary, model, sample_power=False, timeout=opts.timeout)
    ctx.say(f"tune: pp{opts.depth} from an empty cache, {opts.reps} rep(s), pairs (ub/b) "
            + ", ".join(f"{u}/{b}" for u, b in opts.pairs))
    ctx.say("tune: " + (f"stopping {B.SERVICE} ({why}); restarted afterwards, whatever happens"
                         if stop else f"{B.SERVICE} left as it is ({why})"))
    trials: list[Trial] = []
    stopped = False

    def sweep(pairs, ts):
        for b, ubs in group_by_batch(pairs):
            f = B.BenchFlags(**{**flags.__dict__, "tensor_split": ts})
            argv = tune_argv(binary, model, f, b, ubs, opts.depth, opts.reps)
            try:
                pr = runner.run(argv, allow_partial=True)
                got = _trials_from(pr.rows, b, ts, ubs)
            except StepError as e:
                got = [Trial(ub, b, ts, error=str(e)) for ub in ubs]
            for t in got:
                ctx.say(f"tune: {t.label}: " + (f"{t.prefill_ts:,.1f} t/s" if t.prefill_ts else f"FAILED ({t.error})"))
            trials.extend(got)

    try:
        with runner.interruptible():
            if stop:
                B.stop_service(ctx)
                stopped = True
            sweep(opts.pairs, flags.tensor_split)
            ref = next((t for t in trials if (t.ubatch, t.batch) == SEED_PAIR), None)
            best, _ = pick_best(trials, ref)
            if opts.tensor_splits and n_used > 1 and best is not None:
                for ts in ts_variants(n_used, flags.tensor_split)[1:]:
                    sweep([(best.ubatch, best.batch)], ts)
    finally:
        if stopped:
            B.restore_service(ctx, "tune")
    ref = next((t for t in trials if (t.ubatch, t.batch) == SEED_PAIR and t.tensor_split == flags.tensor_split), None)
    best, speedup = pick_best(trials, ref)
    rows = [[t.label, B._f(t.prefill_ts, ",.1f"), B._f(t.stddev, ",.1f"),
             (f"{t.prefill_ts / ref.prefill_ts:.3f}×" if t.prefill_ts and ref and ref.prefill_ts else "-")
             + ("  <- seed" if t is ref else "") + ("  <- best" if t is best else "")]
            for t in trials]
    ctx.console.table(f"tune: {ctx.host.name}, pp{opts.depth} (prefill of one {opts.depth}-token prompt)",
                      ["flags", "prefill t/s (median)", "± stddev", "vs seed b2048/ub512"], rows)
    out_dir = B.results_dir(opts.results_root, ctx.host.name)
    doc = {"kind": "llama-rig tune", "host": ctx.host.name,
           "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "what": f"llama-bench -p {opts.depth} -n 0 -d 0 (prefill of one {opts.depth}-token prompt)",
           "binary": binary, "model": model, "base_flags": flags.argv(), "reps": opts.reps,
           "gpus": [g.name for g in gf.gpus],
           "seed": ref.as_dict() if ref else None, "best": best.as_dict() if best else None,
           "speedup_vs_seed": speedup, "trials": [t.as_dict() for t in trials], "applied": None}
    result = {"dir": str(out_dir), "best": best, "seed": ref, "speedup": speedup, "trials": trials}
    if best is None:
        (out_dir / "tune.json").write_text(json.dumps(doc, indent=2) + "\n")
        raise StepError("tune: no flag set produced a result")
    ctx.say(f"tune: best {best.label}: {best.prefill_ts:,.1f} t/s"
            + (f", {speedup:.3f}× the seed's flags (b2048/ub512) on this box" if speedup else ""))
    if opts.apply:
        values: dict[str, Any] = {"batch_size": best.batch, "ubatch_size": best.ubatch}
        if best.tensor_split is not None and best.tensor_split != flags.tensor_split:
            values["tensor_split"] = best.tensor_split
        diff = apply_to_inventory(opts.inventory_path, ctx.host.name, values)
        doc["applied"] = values
        if diff:
            ctx.say(f"tune: wrote {', '.join(f'server.{k}' for k in values)} to {opts.inventory_path}")
            ctx.console.diff(diff)
        else:
            ctx.say(f"tune: {opts.inventory_path} already has these values")
        ctx.say("tune: `invoke provision --host " + ctx.host.name + "` puts them into the service")
    (out_dir / "tune.json").write_text(json.dumps(doc, indent=2) + "\n")
    if opts.charts:
        try:
            from .charts import tune_chart
            tune_chart(out_dir / "tune.png", [t.as_dict() for t in trials if t.prefill_ts],
                       f"tune {ctx.host.name}: pp{opts.depth}")
        except ImportError:
            ctx.warn("matplotlib is not installed (pip install 'llama-rig[bench]'): no PNG chart")
    ctx.say(f"tune: results in {out_dir}/")
    return result
