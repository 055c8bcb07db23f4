#!/usr/bin/env bash
# The GPU proofs of issue 14 (service_gpu.py: the hardened unit's rendered argv with --api-key-file,
# 401 without the key / 200 with it / /health open, on the real CUDA llama-server) and issue 16
# (rpc_gpu.py: GPUs through ggml-rpc-server vs used directly) on ONE lent GPU box, in one device
# command, with ONE CUDA build (-DGGML_RPC=ON; llama-server, llama-bench, llama-fit-params and the
# rpc server) that both use.
#
#   GPUS=0 bash benchmarks/device/proof_14_16.sh      # a 1-GPU box: one rpc server vs the GPU direct
#   GPUS=0,1 bash benchmarks/device/proof_14_16.sh    # a 2-GPU box: the two servers
#
# Everything lands in /tmp/res, packed into $OUT/proof.tgz at the end (every step runs under
# `timeout` so the pack always happens).
set -u
T0=$(date +%s)
LIMIT=${LIMIT:-570}
GPUS=${GPUS:-0}
# RPC_ARGS: rpc_gpu.py sizes for a short budget, e.g. "--reps 2 --prompt 1024 --gen 64"
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
RES=/tmp/res
mkdir -p "$RES"
pack() { tar -czf "$OUT/proof.tgz" --exclude=rpc-cache -C "$RES" . ; ls -la "$OUT"; }  # not the tensor cache (GBs)
trap pack EXIT

bash benchmarks/device/setup.sh > "$RES/setup.log" 2>&1 || { tail -20 "$RES/setup.log"; exit 1; }
tail -12 "$RES/setup.log"
. /tmp/rig-env.sh
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
( python3 benchmarks/tune_gpu.py model --work /tmp/gp --size medium > "$RES/model.log" 2>&1 \
    && touch /tmp/model.done ) &
mpid=$!
timeout -s INT -k 20 $(( $(left) - 60 )) python3 benchmarks/tune_gpu.py build --rpc \
    --llama-src /opt/upstream/llama.cpp --work /tmp/gp > "$RES/build.log" 2>&1
echo "build exit $? after $(( $(date +%s) - T0 ))s"; tail -3 "$RES/build.log"
wait $mpid; tail -2 "$RES/model.log"
MODEL=/tmp/gp/model/qwen35moe-medium-00001-of-00004.gguf
[ -f /tmp/model.done ] && [ -x /tmp/gp/prefix/llama.cpp/current/bin/llama-server ] || { echo "no build or model"; exit 1; }

timeout -s INT -k 20 $(( $(left) / 2 )) python3 benchmarks/service_gpu.py --prefix /tmp/gp/prefix \
    --work /tmp/gp --gpus "$GPUS" --size medium --ctx 65536 --json "$RES/service.json" > "$RES/service.log" 2>&1
echo "service_gpu exit $? after $(( $(date +%s) - T0 ))s"; tail -25 "$RES/service.log"

timeout -s INT -k 20 $(( $(left) - 15 )) python3 benchmarks/rpc_gpu.py --bin /tmp/gp/prefix/llama.cpp/current/bin \
    --model "$MODEL" --gpus "$GPUS" ${RPC_ARGS:---reps 3} --ctx 8192 --out "$RES/rpc" > "$RES/rpc.log" 2>&1
echo "rpc_gpu exit $? after $(( $(date +%s) - T0 ))s"; grep 'RPC PROOF' "$RES/rpc.log"; tail -5 "$RES/rpc.log"
