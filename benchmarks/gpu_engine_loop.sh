#!/bin/bash
# End-to-end runs for the engine loop, one GPU: `bench throughput` on ShareGPT x 500 (vattention
# and paged, dummy Llama-3-8B) and `vattention serve` + `bench serve` at 4 requests/s (200 requests
# of 512 + 128 tokens, dummy Llama-3-8B shapes with SmolLM2's tokenizer, .carry/llama-3-8b-smoltok).
# Extra engine flags (e.g. --no-async-scheduling) go in $FLAGS; results go to OUT_DIR with TAG.
# Usage (repository root, device machine, .carry carried): FLAGS=... bash benchmarks/gpu_engine_loop.sh OUT_DIR TAG
set -u
out=${1:?output directory}; tag=${2:?tag}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .carry/wheels fastapi uvicorn prometheus-client || exit 1
python3 -m vattention bench throughput --model llama-3-8b --load-format dummy --device cuda --dataset sharegpt \
    --dataset-path benchmarks/data/sharegpt_subset.json --num-prompts 500 --kv-cache-memory-gib 40 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --kv-caches vattention,paged ${FLAGS:-} \
    --out "$out/throughput_sharegpt_llama-3-8b_$tag.json" > "$out/throughput_sharegpt_llama-3-8b_$tag.txt" 2>&1
tail -12 "$out/throughput_sharegpt_llama-3-8b_$tag.txt"
python3 -m vattention serve .carry/llama-3-8b-smoltok --load-format dummy --device cuda \
    --kv-cache-memory-gib 40 --max-num-seqs 256 --max-num-batched-tokens 8192 --port 8000 \
    --served-model-name llama-3-8b ${FLAGS:-} > "$out/server_$tag.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
timeout 150 python3 -m vattention bench serve --base-url http://127.0.0.1:8000 --dataset random \
    --input-len 512 --output-len 128 --num-prompts 200 --request-rate 4 --vocab-size 49152 \
    --seed 0 --out "$out/serve_vattention_rate4_$tag.json" > "$out/serve_vattention_rate4_$tag.txt" 2>&1
grep -E 'Output token|Median TTFT|Median TPOT|Median ITL' "$out/serve_vattention_rate4_$tag.txt"
kill -TERM $server; wait $server
