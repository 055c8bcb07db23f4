#!/usr/bin/env python3
"""Hashing throughput of the model step's verify path (provision/remote/sha256_files.py) vs sha256sum.

1. One multi-GB file (--size, default 2 GiB): `sha256sum FILE` vs `python3 sha256_files.py FILE`
   (the exact command the step runs on a rig, interpreter start included). Goal: ratio >= 0.9.
2. The same bytes as N shards (--shards, default 4): our hasher with 1 worker vs N workers, and
   sha256sum one after another vs N sha256sum processes at once.

Both warm the page cache first (one untimed pass) and report the best of --repeat runs, so the
numbers compare the hashing, not the disk. Run: python3 benchmarks/hash_throughput.py [--size 2G]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HASHER = ROOT / "provision" / "remote" / "sha256_files.py"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s[-1:] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    if s.endswith("IB") and s[-3:-2] in mult:
        return int(float(s[:-3]) * mult[s[-3]])
    return int(s)


def make_file(path: Path, size: int, chunk: int = 64 << 20) -> None:
    block = os.urandom(chunk)  # random once, then varied cheaply: hashing cost does not depend on content
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            n = min(chunk, left)
            f.write(i.to_bytes(8, "little") + block[8:n] if n > 8 else block[:n])
            left -= n
            i += 1


def split(src: Path, n: int, outdir: Path) -> list[Path]:
    size = src.stat().st_size
    per = size // n
    out = []
    with open(src, "rb") as f:
        for i in range(n):
            p = outdir / f"shard-{i + 1:05d}-of-{n:05d}.gguf"
            want = per if i < n - 1 else size - per * (n - 1)
            with open(p, "wb") as g:
                while want > 0:
                    b = f.read(min(64 << 20, want))
                    g.write(b)
                    want -= len(b)
            out.append(p)
    return out


def timed(argv: list[str], stdin: str | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, p.stdout


def timed_parallel(argvs: list[list[str]]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL) for a in argvs]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{p.args} failed")
    return time.perf_counter() - t0


def ours(paths: list[Path], workers: int) -> tuple[float, dict[str, str]]:
    cfg = json.dumps({"paths": [str(p) for p in paths], "workers": workers, "progress_s": 0}) + "\n"
    secs, out = timed([sys.executable, str(HASHER)], cfg)
    got = {}
    for ln in out.splitlines():
        ev = json.loads(ln)
        if ev["event"] == "hashed":
            got[ev["path"]] = ev["sha256"]
    return secs, got


def best(fn, repeat: int):
    runs = [fn() for _ in range(repeat)]
    secs = [r[0] if isinstance(r, tuple) else r for r in runs]
    return min(secs), statistics.median(secs), runs[0]


def gbps(size: int, secs: float) -> str:
    return f"{size / secs / 1e9:.2f} GB/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2G", help="file size (default 2G = 2 GiB)")
    ap.add_argument("--shards", type=int, default=4, help="shards for the parallel test (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is reported)")
    ap.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the test files")
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    work = Path(tempfile.mkdtemp(prefix="hashbench-", dir=a.dir or "/var/tmp"))
    try:
        big = work / "one.bin"
        print(f"cpus: {os.cpu_count()}  file: {big} ({size / (1 << 30):.2f} GiB)  repeat: {a.repeat}", flush=True)
        t0 = time.perf_counter()
        make_file(big, size)
        print(f"wrote the file in {time.perf_counter() - t0:.1f}s", flush=True)

        # warm the page cache and check both agree
        _, out = timed(["sha256sum", str(big)])
        ref = out.split()[0]
        _, got = ours([big], 1)
        assert got[str(big)] == ref, (got, ref)

        s_best, s_med, _ = best(lambda: timed(["sha256sum", str(big)]), a.repeat)
        o_best, o_med, _ = best(lambda: ours([big], 1), a.repeat)
        print("\n== one file ==")
        print(f"sha256sum            best {s_best:7.2f}s  median {s_med:7.2f}s  {gbps(size, s_best)}")
        print(f"sha256_files.py      best {o_best:7.2f}s  median {o_med:7.2f}s  {gbps(size, o_best)}")
        ratio = s_best / o_best
        print(f"ratio (ours / sha256sum throughput): {ratio:.3f}  (goal >= 0.9: {'MET' if ratio >= 0.9 else 'NOT MET'})")
        if shutil.which("openssl"):  # reference: OpenSSL's SHA-256 (SHA-NI when the CPU has it), as hashlib uses
            r_best, _, _ = best(lambda: timed(["openssl", "dgst", "-sha256", str(big)]), a.repeat)
            print(f"(reference) openssl dgst best {r_best:7.2f}s  {gbps(size, r_best)}   ours / openssl: {r_best / o_best:.3f}")

        n = a.shards
        shards = split(big, n, work)
        big.unlink()
        ours(shards, n)  # warm
        print(f"\n== {n} shards of {size / n / (1 << 20):.0f} MiB ({os.cpu_count()} cpus) ==")
        o1, o1m, _ = best(lambda: ours(shards, 1), a.repeat)
        oN, oNm, (_, gotN) = best(lambda: ours(shards, n), a.repeat)
        refs = {str(p): timed(["sha256sum", str(p)])[1].split()[0] for p in shards}
        assert gotN == refs
        s1, s1m, _ = best(lambda: timed(["sha256sum", *map(str, shards)]), a.repeat)
        sN, sNm, _ = best(lambda: timed_parallel([["sha256sum", str(p)] for p in shards]), a.repeat)
        print(f"sha256_files.py 1 worker    best {o1:7.2f}s  {gbps(size, o1)}")
        print(f"sha256_files.py {n} workers   best {oN:7.2f}s  {gbps(size, oN)}   speed-up x{o1 / oN:.2f}")
        print(f"sha256sum one after another best {s1:7.2f}s  {gbps(size, s1)}")
        print(f"sha256sum x{n} at once        best {sN:7.2f}s  {gbps(size, sN)}   speed-up x{s1 / sN:.2f}")
        print(f"ratio parallel (ours {n} workers / {n} sha256sum at once): {sN / oN:.3f}")
        print(json.dumps({"size": size, "cpus": os.cpu_count(), "one_file": {"sha256sum_s": round(s_best, 3),
                          "ours_s": round(o_best, 3), "ratio": round(ratio, 3)},
                          "shards": {"n": n, "ours_1_s": round(o1, 3), "ours_n_s": round(oN, 3),
                                     "sha256sum_seq_s": round(s1, 3), "sha256sum_par_s": round(sN, 3)}}))
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
