#!/usr/bin/env bash
# The GPU proofs of issue 12 (cuda_path_proof.py) and issue 18 (tune_gpu.py) on ONE lent GPU box,
# in two device commands on the same warm machine (each under the 10-minute limit), with ONE
# CUDA build: the provision build of cuda_path_proof.py (nvcc off PATH) also builds llama-bench
# and llama-fit-params into /tmp/gp/prefix, the prefix tune_gpu.py --work /tmp/gp reads.
#
#   bash benchmarks/device/proof_12_18.sh 1   # setup, the model (in the background), cuda_path_proof,
#                                             # then the power sweep if time is left
#   bash benchmarks/device/proof_12_18.sh 2   # the power sweep (if not done yet), the batch tune x2,
#                                             # the split modes when the box has 2+ GPUs
#
# Everything lands in /tmp/res and is packed into $OUT/call<N>.tgz at the end (the device tool
# brings back at most 8 files); every step runs under `timeout` so the pack always happens.
# Sizes are reduced to fit a short device budget: FA default quants (q8_0 K/V is among them),
# 4 power limits 200..700 W at the tool's own run size (-n 256 -r 2), 5 ub/b pairs + the current one for the tune.
set -u
phase=${1:?phase 1 or 2}
T0=$(date +%s)
LIMIT=${LIMIT:-570}   # seconds this command may use in all
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
RES=/tmp/res
mkdir -p "$RES/tune"
pack() { tar -czf "$OUT/call$phase.tgz" -C "$RES" . ; ls -la "$OUT"; }
trap pack EXIT

power() {
  [ -f /tmp/model.done ] || { echo "power: the model is not there"; return 1; }
  grep -q '"power"' "$RES/tune/summary.json" 2>/dev/null && { echo "power: done already"; return 0; }
  timeout -s INT -k 20 $(( $(left) - 20 )) python3 benchmarks/tune_gpu.py power --work /tmp/gp --gpus 0 --watts 200,350,500,700 \
      --gen 256 --bench-reps 2 --out "$RES/tune" > "$RES/power.log" 2>&1
  echo "power exit $?"; grep 'GPU PROOF' "$RES/power.log"; tail -3 "$RES/power.log"
}

if [ "$phase" = 1 ]; then
  bash benchmarks/device/setup.sh > "$RES/setup.log" 2>&1 || { tail -20 "$RES/setup.log"; exit 1; }
  tail -12 "$RES/setup.log"
  . /tmp/rig-env.sh
  nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=index,name,power.limit,power.min_limit,power.max_limit,power.default_limit \
      --format=csv >> "$RES/nvidia-smi.txt" 2>&1
  ( python3 benchmarks/tune_gpu.py model --work /tmp/gp --size medium > "$RES/model.log" 2>&1 \
      && touch /tmp/model.done ) &
  mpid=$!
  timeout -s INT -k 20 $(( $(left) - 30 )) python3 benchmarks/cuda_path_proof.py --upstream /opt/upstream/llama.cpp \
      --prefix /tmp/gp/prefix --targets llama-server,llama-bench,llama-fit-params --fa-all-quants off \
      --out "$RES/cuda-path" > "$RES/cuda-path.log" 2>&1
  echo "cuda_path_proof exit $? after $(( $(date +%s) - T0 ))s"
  tail -22 "$RES/cuda-path.log"
  wait $mpid; cat "$RES/model.log"
  if [ "$(left)" -gt 200 ] && [ -x /tmp/gp/prefix/llama.cpp/current/bin/llama-bench ]; then power; fi
else
  . /tmp/rig-env.sh
  [ -x /tmp/gp/prefix/llama.cpp/current/bin/llama-bench ] || { echo "no llama-bench: run phase 1 first"; exit 1; }
  power
  timeout -s INT -k 20 $(( $(left) - 15 )) python3 benchmarks/tune_gpu.py tune --work /tmp/gp --gpus 0 --times 2 \
      --pairs 1024/2048,2048/2048,4096/4096,2048/8192,4096/8192 --out "$RES/tune" > "$RES/tune.log" 2>&1
  echo "tune exit $?"; grep 'GPU PROOF' "$RES/tune.log"; tail -3 "$RES/tune.log"
  n=$(nvidia-smi -L | wc -l)
  if [ "$n" -ge 2 ] && [ "$(left)" -gt 200 ]; then
    timeout -s INT -k 20 $(( $(left) - 15 )) python3 benchmarks/tune_gpu.py split --work /tmp/gp --gpus 0,1 --ts 0.9,1 \
        --pairs 2048/2048,4096/4096 --out "$RES/tune" > "$RES/split.log" 2>&1
    echo "split exit $?"; grep 'GPU PROOF' "$RES/split.log"
  else
    echo "split: not run ($n GPU(s), $(left)s left)"
  fi
fi
echo "phase $phase done in $(( $(date +%s) - T0 ))s"
