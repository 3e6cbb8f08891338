"""The built-in model on the CPU: our engine vs HF transformers, side by side in one process.

    python benchmarks/cpu_vs_hf.py [--prompt-len 1006] [--batch 16] [--new-tokens 32] [--repeats 3]

Three workloads, each run by both in turn (ours, HF, ours, HF, ...; the median is reported):
  prefill   one prompt of --prompt-len tokens, one output token (time to first token)
  single    one short prompt, --new-tokens greedy tokens (decode tokens/s)
  batch     --batch short prompts at once, --new-tokens greedy tokens each (output tokens/s)
HF runs `generate` with its KV cache, greedy, fp32, the same token ids. Writes a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=1006)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cpu_vs_hf.json")
    ns = p.parse_args()

    from transformers import AutoModelForCausalLM

    from vattention import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    rng = random.Random(0)
    vocab = llm.engine.model.config.vocab_size
    long_prompt = [rng.randrange(vocab) for _ in range(ns.prompt_len)]
    short = [[rng.randrange(vocab) for _ in range(12)] for _ in range(ns.batch)]

    def ours(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, params))

    @torch.inference_mode()
    def theirs(prompts, n):
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    workloads = {"prefill": ([long_prompt], 1), "single": (short[:1], ns.new_tokens),
                 "batch": (short, ns.new_tokens)}
    results = {}
    for name, (prompts, n) in workloads.items():
        ours(prompts, 2), theirs(prompts, 2)  # warm-up
        times = {"vattention": [], "transformers": []}
        tokens = {}
        for _ in range(ns.repeats):
            for who, fn in (("vattention", ours), ("transformers", theirs)):
                start = time.perf_counter()
                tokens[who] = fn(prompts, n)
                times[who].append(time.perf_counter() - start)
        row = {who: statistics.median(t) for who, t in times.items()}
        row["output_tokens"] = tokens
        row["ours_speed_vs_hf"] = row["transformers"] / row["vattention"]
        results[name] = row
    print(f"{'workload':10s} {'ours s':>8s} {'HF s':>8s} {'ours/HF speed':>14s}")
    for name, row in results.items():
        print(f"{name:10s} {row['vattention']:8.3f} {row['transformers']:8.3f} {row['ours_speed_vs_hf']:14.2f}")
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"args": vars(ns), "torch_threads": torch.get_num_threads(),
                                        "results": results}, indent=2))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
