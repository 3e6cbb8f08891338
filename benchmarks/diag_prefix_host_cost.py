"""What prefix caching costs the host when nothing is shared: the scheduler's own time per step
(schedule + update_from_output, where all prefix-cache work happens), caching off and on in
turn, in one process, 256 requests of random prompts (200-600 tokens) and 96 output tokens each.
The model is a small random Llama on the CPU whose cache unit is 16 tokens, as Llama-3-8B's is
on 2 MiB pages, so the prefix work per step is the GPU run's; the forward is not timed.

    python benchmarks/diag_prefix_host_cost.py [--model-dir DIR] [--kv-caches vattention,paged]
        [--caching off,on] [--repeats 3] [--profile]

(writes the model's config to DIR, default /tmp/cpumodel). With several designs it also answers
#13's question, vattention's host time per step against paged's, on the host driver; --profile
prints the top functions of the scheduler's time per design (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import time
from pathlib import Path

from vattention import LLM, SamplingParams


def write_model(model: Path) -> None:
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({  # 4 layers x 2 x 8 heads x 32 x 4 B = 8 KiB a token
        "architectures": ["LlamaForCausalLM"], "vocab_size": 5000, "hidden_size": 256, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}))


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams,
          profile: cProfile.Profile | None = None) -> list[tuple[bool, float, float]]:
    """Per step: (decode only, schedule seconds, update seconds). A diagnostic: it wraps the
    scheduler's two methods, which no public engine method times apart from the forward."""
    sched, steps = llm.engine.scheduler, []
    schedule, update = sched.schedule, sched.update_from_output

    def timed_schedule():
        start = time.perf_counter()
        out = schedule() if profile is None else profile.runcall(schedule)
        steps.append([all(i.num_new_tokens == 1 for i in out.scheduled), time.perf_counter() - start, 0.0])
        return out

    def timed_update(sched_out, result):
        start = time.perf_counter()
        touched = update(sched_out, result) if profile is None else profile.runcall(update, sched_out, result)
        steps[-1][2] += time.perf_counter() - start
        return touched

    sched.schedule, sched.update_from_output = timed_schedule, timed_update
    llm.generate(prompts, params, use_tqdm=False)
    return [tuple(s) for s in steps]


def ms(steps, i: int) -> float:
    return 1e3 * sum(s[i] for s in steps) / max(1, len(steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/cpumodel"))
    ap.add_argument("--kv-caches", default="vattention")
    ap.add_argument("--caching", default="off,on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--spread-outputs", action="store_true",
                    help="output lengths 16-256 (seeded) instead of 96 each, so requests finish at "
                         "different steps and new ones are admitted meanwhile, as in ShareGPT")
    ap.add_argument("--num-prompts", type=int, default=256)
    args = ap.parse_args()
    write_model(args.model_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 5000) for _ in range(rng.randrange(200, 600))] for _ in range(args.num_prompts)]
    if args.spread_outputs:
        params = [SamplingParams(temperature=0, max_tokens=rng.randrange(16, 257), ignore_eos=True) for _ in prompts]
    else:
        params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    runs = [(kv, c == "on") for kv in args.kv_caches.split(",") for c in args.caching.split(",")]
    profiles = {run: cProfile.Profile() for run in runs} if args.profile else {}
    for _ in range(args.repeats):
        for kv, caching in runs:  # in turn, so drift in the machine's load hits every run alike
            llm = LLM(model=str(args.model_dir), load_format="dummy", device="cpu", dtype="float32",
                      kv_cache_memory_gib=3.0, kv_cache=kv, max_num_seqs=256, max_num_batched_tokens=8192,
                      enable_prefix_caching=caching, page_size=128 << 10, warm_up="off")
            steps = timed(llm, prompts, params, profiles.get((kv, caching)))
            llm.close()
            dec, other = [s for s in steps if s[0]], [s for s in steps if not s[0]]
            print(f"{kv:>10} caching {'on ' if caching else 'off'}: decode-only steps {len(dec)}: schedule "
                  f"{ms(dec, 1):.3f} + update {ms(dec, 2):.3f} ms/step; other steps {len(other)}: "
                  f"schedule {ms(other, 1):.2f} + update {ms(other, 2):.2f} ms/step", flush=True)
    for (kv, caching), prof in profiles.items():
        print(f"\n== {kv}, caching {'on' if caching else 'off'}: top functions by own time ==")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
