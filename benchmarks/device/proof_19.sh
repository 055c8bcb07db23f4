#!/usr/bin/env bash
# Issue 19 on a lent GPU box (one device command): the no-op `provision --only facts,system,gpu`
# against the REAL nvidia-smi and driver, as `connection: local` (the lent box has no sshd and no
# systemd). Checks that the one facts command (host script + GPU query + read-ahead beside it,
# dpkg's state included) parses on a real GPU box, that a second run changes nothing, and times
# the no-op runs (new process each, as a user runs them).
#
#   bash benchmarks/device/proof_19.sh        (carry .device: see benchmarks/device/setup.sh)
#
# Results in $OUT/proof19.tgz (logs, hosts.yaml, summary.json).
set -u
T0=$(date +%s)
RES=/tmp/res19
mkdir -p "$RES"
pack() { tar -czf "$OUT/proof19.tgz" -C "$RES" . ; ls -la "$OUT"; }
trap pack EXIT

bash benchmarks/device/setup.sh > "$RES/setup.log" 2>&1 || { tail -20 "$RES/setup.log"; exit 1; }
tail -8 "$RES/setup.log"
. /tmp/rig-env.sh
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
n=$(nvidia-smi -L | wc -l)
# the power limits the GPUs have now: the gpu step has nothing to change there
limits=$(nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits | awk '{printf "%s%s", (NR>1?", ":""), $1}')
cat > "$RES/hosts.yaml" <<EOT
hosts:
  local:
    connection: {type: local}
    gpus: {count: $n, power_limit: [$limits]}
    system: {packages: [], driver: require}
    llama_cpp: {repo: /opt/upstream/llama.cpp, cuda: true}
    paths: {prefix: /tmp/gp19/prefix, state_dir: /tmp/gp19/prefix/state}
EOT
cat "$RES/hosts.yaml"

echo "== the one facts command, in-process (LocalTarget)"
python3 - "$RES/hosts.yaml" > "$RES/facts.json" 2> "$RES/facts.err" <<'EOF'
import json, sys, time
from provision import inventory as inv
from provision.console import Console, Environment
from provision.engine import Context
from provision.facts import host as hostfacts
from provision.steps import system
from provision.target import LocalTarget
h = inv.load(sys.argv[1]).hosts["local"]
t = LocalTarget(h)
ctx = Context(h, t, Console(Environment(sys.stderr, sys.stderr, False)), check=True)
t0 = time.perf_counter()
hf, gf = hostfacts.host_and_gpu(ctx, read_ahead=True)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": round(secs, 3), "commands": t.commands_run, "os": hf.os_pretty,
                  "nvcc": hf.nvcc_version, "dpkg_interrupted": hf.dpkg_interrupted,
                  "packages": len(hf.packages), "gpu_available": gf.available, "gpu_reason": gf.reason,
                  "gpus": [[g.index, g.name, g.power_limit, g.persistence] for g in gf.gpus],
                  "driver": gf.driver_version, "cuda": gf.cuda_version,
                  "read_ahead": "readahead" in ctx.facts,
                  "dpkg_needs_no_command": system.dpkg_interrupted(ctx) == "" and t.commands_run == 1},
                 indent=1))
EOF
cat "$RES/facts.json"; tail -3 "$RES/facts.err"

echo "== provision --only facts,system,gpu: one converging run, then 7 timed no-op runs"
run() {
  local log=$1
  local s=$(date +%s.%N)
  python3 -m invoke --search-root "$PWD" provision --host local --inventory "$RES/hosts.yaml" \
      --only facts,system,gpu > "$log" 2>&1
  local rc=$?
  local e=$(date +%s.%N)
  echo "$rc $(python3 -c "print(round($e - $s, 3))") $(grep -E '^local ' "$log" | awk '{print $4}')"
}
run "$RES/run0.log" | tee "$RES/run0.txt"
for i in 1 2 3 4 5 6 7; do run "$RES/run$i.log"; done | tee "$RES/noop.txt"
tail -8 "$RES/run7.log"
python3 - "$RES" > "$RES/summary.json" <<'EOF'
import json, statistics, sys
from pathlib import Path
res = Path(sys.argv[1])
rows = [ln.split() for ln in (res / "noop.txt").read_text().splitlines() if ln.strip()]
secs = [float(r[1]) for r in rows]
print(json.dumps({"facts": json.loads((res / "facts.json").read_text()),
                  "first_run": (res / "run0.txt").read_text().split(),
                  "noop_runs": rows, "noop_median_s": round(statistics.median(secs), 3),
                  "noop_all_exit_0": all(r[0] == "0" for r in rows),
                  "noop_all_0_changed": all(len(r) > 2 and r[2] == "0" for r in rows)}, indent=1))
EOF
cat "$RES/summary.json"
echo "proof 19 done in $(( $(date +%s) - T0 ))s"
