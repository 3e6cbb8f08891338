#!/bin/bash
# Tensor parallelism on 2 GPUs (device kind nvidia-h200-x2): the GPU tests, then offline
# throughput of dummy Llama-3-8B at TP=1 and TP=2 and dummy Yi-34B at TP=2, vattention vs paged.
# "graphs": the GPU tests again (bf16 ones now capture CUDA graphs with NCCL all-reduces inside),
# Llama-3-8B at TP=2 with graphs and --enforce-eager, then Yi-34B at TP=2 with graphs.
# Usage (repository root): bash benchmarks/gpu_tp.sh OUT_DIR {tests-8b|yi-34b|graphs}
set -u
out=${1:?output directory}
part=${2:?tests-8b, yi-34b or graphs}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
common=(--load-format dummy --device cuda --dataset sharegpt --dataset-path benchmarks/data/sharegpt_subset.json
        --num-prompts 300 --kv-cache-memory-gib 40 --max-num-seqs 256 --max-num-batched-tokens 8192
        --kv-caches vattention,paged --block-sizes 16)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.txt"
if [ "$part" = tests-8b ]; then
    VATTENTION_TEST_DEVICE=cuda timeout 200 python3 -m pytest -v -p no:cacheprovider \
        tests/gpu/test_tensor_parallel_gpu.py > "$out/gpu_tests_tp_h200x2.txt" 2>&1
    tail -3 "$out/gpu_tests_tp_h200x2.txt"
    for tp in 1 2; do
        timeout 170 python3 -m vattention bench throughput --model llama-3-8b "${common[@]}" \
            --tensor-parallel-size $tp --out "$out/throughput_tp${tp}_llama-3-8b.json" \
            > "$out/throughput_tp${tp}_llama-3-8b.txt" 2>&1
        tail -6 "$out/throughput_tp${tp}_llama-3-8b.txt"
    done
elif [ "$part" = graphs ]; then
    VATTENTION_TEST_DEVICE=cuda timeout 150 python3 -m pytest -v -p no:cacheprovider \
        tests/gpu/test_tensor_parallel_gpu.py > "$out/gpu_tests_tp_graphs_h200x2.txt" 2>&1
    tail -3 "$out/gpu_tests_tp_graphs_h200x2.txt"
    timeout 260 python3 -m vattention bench throughput --model llama-3-8b "${common[@]}" \
        --tensor-parallel-size 2 --compare-eager --out "$out/throughput_tp2_llama-3-8b_graphs.json" \
        > "$out/throughput_tp2_llama-3-8b_graphs.txt" 2>&1
    tail -8 "$out/throughput_tp2_llama-3-8b_graphs.txt"
    timeout 150 python3 -m vattention bench throughput --model yi-34b "${common[@]}" \
        --tensor-parallel-size 2 --out "$out/throughput_tp2_yi-34b_graphs.json" \
        > "$out/throughput_tp2_yi-34b_graphs.txt" 2>&1
    tail -6 "$out/throughput_tp2_yi-34b_graphs.txt"
else
    VATTENTION_TEST_DEVICE=cuda timeout 150 python3 -m pytest -v -p no:cacheprovider \
        tests/gpu/test_tensor_parallel_gpu.py -k bf16 > "$out/gpu_tests_tp_bf16_h200x2.txt" 2>&1
    tail -3 "$out/gpu_tests_tp_bf16_h200x2.txt"
    timeout 420 python3 -m vattention bench throughput --model yi-34b "${common[@]}" \
        --tensor-parallel-size 2 --out "$out/throughput_tp2_yi-34b.json" > "$out/throughput_tp2_yi-34b.txt" 2>&1
    tail -6 "$out/throughput_tp2_yi-34b.txt"
fi
