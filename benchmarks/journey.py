#!/usr/bin/env python3
"""The journey (tests/test_journey.py): a bare Tier B rig to a serving rig in one `provision`,
timed. Runs the test with LLAMA_RIG_JOURNEY_RECORD, then prints each run's steps with their wall
time and remote commands, and the cold/warm costs of the stand-in NVIDIA repo.

    python3 benchmarks/journey.py --json benchmarks/journey/record-$(date +%Y%m%d).json [--cold]

--cold first removes the stand-in repo's cache (NVIDIA's wheels and the built .debs under
/var/cache/llama-rig-tests/nvidia-repo/), so the run includes the download and the package build.
Needs what the test needs: root, the rig fixtures (see README.md, "Test it").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where the record goes")
    ap.add_argument("--cold", action="store_true", help="drop the stand-in repo's cache first")
    a = ap.parse_args()
    if a.cold:
        sys.path.insert(0, str(ROOT))
        from tests.rigs.nvidia_repo import ROOT as REPO_CACHE
        for d in REPO_CACHE.glob("*"):
            if d.name.startswith(("wheels-", "debs-")):
                shutil.rmtree(d, ignore_errors=True)
    out = Path(a.json).resolve()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        "tests/test_journey.py"], cwd=ROOT,
                       env=dict(os.environ, LLAMA_RIG_JOURNEY_RECORD=str(out)), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        print(r.stdout[-6000:])
        print(f"journey test failed (exit {r.returncode})")
        return 1
    rec = json.loads(out.read_text())
    rec["pytest_wall_s"] = round(wall, 1)
    rec["cold"] = a.cold
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"journey test: {wall:.1f}s wall ({'cold' if a.cold else 'warm'} stand-in repo cache)")
    repo = rec["stand_in_repo"]
    print(f"stand-in repo: wheels {repo['wheels']['bytes'] / 1e6:.0f} MB (download {repo['wheels']['seconds']}s "
          f"when cold), {len(repo['debs'])} .debs {repo['deb_bytes'] / 1e6:.0f} MB (built in "
          f"{repo['build_seconds']}s when cold)")
    print(f"CUDA objects (sm_86): {', '.join(rec['cuda_objects'])}; configure {rec['cuda_subset_seconds']['configure']}s, "
          f"compile {rec['cuda_subset_seconds']['compile']}s")
    for run in ("check", "first_run", "second_run"):
        print(f"\n{run}: {rec[run]['seconds']}s, exit {rec[run]['exit']}")
        print(f"  {'step':<40} {'status':<8} {'seconds':>8} {'remote commands':>16}")
        for s in rec[run]["steps"]:
            print(f"  {s['step']:<40} {s['status']:<8} {s['seconds']:>8.2f} {s['remote_commands']:>16}")
        print(f"  {'total':<40} {'':<8} {sum(s['seconds'] for s in rec[run]['steps']):>8.2f} "
              f"{sum(s['remote_commands'] for s in rec[run]['steps']):>16}")
    print(f"\nopencode run: {rec['opencode_run_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
