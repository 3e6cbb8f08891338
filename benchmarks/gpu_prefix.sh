#!/bin/bash
# Prefix caching on one GPU (repository root, device machine):
#   bash benchmarks/gpu_prefix.sh OUT_DIR tests     the GPU tests of sharing and prefix caching
#   bash benchmarks/gpu_prefix.sh OUT_DIR shared    bench prefix, the 512 x (2048 shared + 128) workload
#   bash benchmarks/gpu_prefix.sh OUT_DIR rest      bench prefix, multi-turn ShareGPT and nothing shared
#   bash benchmarks/gpu_prefix.sh OUT_DIR none      bench prefix, nothing shared, caching off,on,off,on (its cost)
# dummy Llama-3-8B, vattention (cross_layer) and paged (bs16), caching off then on, same flags.
set -u
out=${1:?output directory}; part=${2:?tests, shared, rest or none}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
engine="--model llama-3-8b --load-format dummy --device cuda --max-num-seqs 256 --max-num-batched-tokens 8192"
case $part in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_prefix_gpu.py tests/gpu/test_cuda_memory.py 2>&1 | tail -15
    VATTENTION_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_sharing.py \
        tests/test_properties.py tests/test_cache.py 2>&1 | tail -6 ;;
shared)
    python3 -m vattention bench prefix $engine --workloads shared --num-prompts 512 --prefix-len 2048 \
        --suffix-len 128 --output-len 128 --out "$out/prefix_shared_llama-3-8b_h200.json" ;;
rest)
    python3 -m vattention bench prefix $engine --workloads multi-turn,none --num-conversations 128 \
        --num-prompts 500 --dataset-path benchmarks/data/sharegpt_subset.json \
        --multi-turn-path benchmarks/data/sharegpt_multiturn_subset.json \
        --out "$out/prefix_multiturn_none_llama-3-8b_h200.json" ;;
none)
    python3 -m vattention bench prefix $engine --workloads none --num-prompts 500 \
        --dataset-path benchmarks/data/sharegpt_subset.json --caching off,on,off,on \
        --out "$out/prefix_none_llama-3-8b_h200_after.json" ;;
esac
