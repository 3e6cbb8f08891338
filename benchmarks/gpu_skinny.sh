#!/bin/bash
# Issue #12's small-batch projections (skinny GEMM, silu(gate) * up in the down projection's
# load) and #13's ensure() fast path, on one GPU (repository root, device machine):
#   bash benchmarks/gpu_skinny.sh OUT bench   # bench latency: main before (before_src/src, a copy
#                                             # of the previous commit's src) and after, in one call
#   bash benchmarks/gpu_skinny.sh OUT tests   # the fused kernels and the engine's GPU tests
# Prepare the "before" side here first (an untracked copy, which the device tool carries; do not
# commit it):  mkdir before_src && git archive <rev> src | tar -x -C before_src
# The tests part needs .carry/ as benchmarks/gpu_families.sh describes (carry [".carry"]).
set -u
OUT=$1; WHAT=$2
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
LATENCY="-m vattention bench latency --model llama-3-8b --load-format dummy --device cuda --kv-caches
    vattention,paged --max-num-seqs 256 --max-num-batched-tokens 8192 --kv-cache-memory-gib 40
    --decode-steps 32 --batch-sizes 1,8,32,64,128,256"
if [ "$WHAT" = bench ]; then
    for side in before after; do
        if [ $side = before ]; then export PYTHONPATH=$PWD/before_src/src; else export PYTHONPATH=$PWD/src; fi
        python3 $LATENCY --out "$OUT/latency_llama-3-8b_h200_skinny_$side.json" 2>&1 \
            | grep -v "Warning\|warn_once" > "$OUT/latency_llama-3-8b_h200_skinny_$side.txt"
        sed -n '/start s/,/^$/p; /^decode step/,/^$/p; /^top kernels: vattention, batch 1 /,/^$/p' \
            "$OUT/latency_llama-3-8b_h200_skinny_$side.txt"
    done
else
    . benchmarks/gpu_env.sh
    VATTENTION_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rs tests/test_fused_kernels.py \
        tests/test_triton_kernels.py tests/gpu/test_engine_gpu.py tests/gpu/test_decode_graphs_gpu.py \
        tests/gpu/test_families_gpu.py 2>&1 | tr '\r' '\n' | grep -v "Processed prompts\|Writing model shards\|^\s*$" \
        > "$OUT/gpu_tests_skinny_h200.txt"
    tail -n 30 "$OUT/gpu_tests_skinny_h200.txt"
fi
