#!/bin/bash
# Online serving with CUDA graphs vs --enforce-eager, one GPU: `vattention serve` (dummy
# Llama-3-8B shapes with SmolLM2's tokenizer, .carry/llama-3-8b-smoltok) under Poisson load from
# `vattention bench serve` at 4 and 16 requests/s, 200 requests of 512 + 128 tokens.
# Usage (repository root, device machine, .carry carried): bash benchmarks/gpu_serve_graphs.sh OUT_DIR
set -u
out=${1:?output directory}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .carry/wheels fastapi uvicorn prometheus-client || exit 1
for mode in graphs eager; do
    flag=""; [ $mode = eager ] && flag="--enforce-eager"
    python3 -m vattention serve .carry/llama-3-8b-smoltok --load-format dummy --device cuda \
        --kv-cache-memory-gib 40 --max-num-seqs 256 --max-num-batched-tokens 8192 --port 8000 \
        --served-model-name llama-3-8b $flag > "$out/server_$mode.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    for rate in 4 16; do
        timeout 120 python3 -m vattention bench serve --base-url http://127.0.0.1:8000 --dataset random \
            --input-len 512 --output-len 128 --num-prompts 200 --request-rate $rate --vocab-size 49152 \
            --seed 0 --out "$out/serve_${mode}_rate${rate}.json" > "$out/serve_${mode}_rate${rate}.txt" 2>&1
        echo "$mode rate $rate: $(grep -E 'Output token|Median TTFT|Median TPOT' "$out/serve_${mode}_rate${rate}.txt" | tr -s ' ' | tr '\n' ' ')"
    done
    kill -TERM $server; wait $server
done
cd "$out" && tar -czf serve_graphs.tgz serve_* server_*.log && rm serve_*.json serve_*.txt server_*.log
