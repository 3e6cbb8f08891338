#!/bin/bash
# FlexAttention + PagedAttention in the engine, on the GPU: tests, then end-to-end throughput of
# vattention vs paged (block 128) under our Triton paged kernel and under FlexAttention.
# Usage (repository root, device machine): bash benchmarks/gpu_flex.sh OUT_DIR
set -u
out=${1:?output directory}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
VATTENTION_TEST_DEVICE=cuda timeout 240 python3 -m pytest -v -p no:cacheprovider tests/test_flex_paged.py \
    tests/gpu/test_engine_gpu.py > "$out/gpu_tests_flex_h200.txt" 2>&1
tail -3 "$out/gpu_tests_flex_h200.txt"
timeout 300 python3 -m vattention bench throughput --model llama-3-8b --load-format dummy --device cuda \
    --dataset sharegpt --dataset-path benchmarks/data/sharegpt_subset.json --num-prompts 500 \
    --kv-cache-memory-gib 40 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --kv-caches vattention,paged --block-sizes 128 --paged-backends triton,flex \
    --out "$out/throughput_sharegpt_llama-3-8b_flex.json" > "$out/throughput_sharegpt_llama-3-8b_flex.txt" 2>&1
tail -20 "$out/throughput_sharegpt_llama-3-8b_flex.txt"
