#!/bin/bash
# CUDA graphs for decode steps, on one GPU: tests (graphs vs eager, and the engine tests that now
# run with graphs), then offline decode latency at small batches and ShareGPT throughput, each
# with graphs and with --enforce-eager in the same run.
# Usage (repository root, device machine): bash benchmarks/gpu_graphs.sh OUT_DIR
set -u
out=${1:?output directory}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
VATTENTION_TEST_DEVICE=cuda timeout 300 python3 -m pytest -v -p no:cacheprovider \
    tests/gpu/test_decode_graphs_gpu.py tests/gpu/test_engine_gpu.py > "$out/gpu_tests_graphs.txt" 2>&1
tail -3 "$out/gpu_tests_graphs.txt"
for batch in 1 8 64; do
  for mode in graphs eager; do
    flag=""; [ $mode = eager ] && flag="--enforce-eager"
    timeout 120 python3 -m vattention bench offline --model llama-3-8b --load-format dummy --device cuda \
        --num-prompts $batch --input-len 512 --output-len 256 --max-num-seqs 256 \
        --max-num-batched-tokens 8192 --kv-cache-memory-gib 40 $flag \
        --out "$out/offline_b${batch}_${mode}.json" > "$out/offline_b${batch}_${mode}.txt" 2>&1
    echo "batch $batch $mode: $(grep -E 'decode_step|output_tok' "$out/offline_b${batch}_${mode}.txt" | tr -s ' ' | tr '\n' ' ')"
  done
done
timeout 400 python3 -m vattention bench throughput --model llama-3-8b --load-format dummy --device cuda \
    --dataset sharegpt --dataset-path benchmarks/data/sharegpt_subset.json --num-prompts 500 \
    --kv-cache-memory-gib 40 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --kv-caches vattention,paged --compare-eager \
    --out "$out/throughput_sharegpt_llama-3-8b_graphs.json" > "$out/throughput_sharegpt_llama-3-8b_graphs.txt" 2>&1
tail -8 "$out/throughput_sharegpt_llama-3-8b_graphs.txt"
tar -C "$out" -czf "$out/offline_graphs.tgz" $(cd "$out" && ls offline_b*)  # the device tool returns 8 files
rm "$out"/offline_b*
