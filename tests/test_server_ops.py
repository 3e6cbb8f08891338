"""Operations a vLLM user reaches for: /version, CORS, the periodic stats line, and the
OpenAI fields that are accepted and ignored or refused by name (on a random-weight model)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import needs_model  # noqa: E402

from vattention import __version__  # noqa: E402
from vattention.config import EngineConfig  # noqa: E402
from vattention.engine.stats import EngineStats  # noqa: E402
from vattention.kv.base import KVUsage  # noqa: E402
from vattention.server.app import build_app  # noqa: E402
from vattention.server.async_engine import AsyncEngine  # noqa: E402
from vattention.server.cli import ServerConfig  # noqa: E402
from vattention.server.stats_log import stats_line  # noqa: E402


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


def app_client(engine, **options) -> TestClient:
    return TestClient(build_app(engine, "tiny", options=ServerConfig(**options)))


BODY = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0}


def test_version_and_cors(engine):
    with app_client(engine, stats_log_interval_s=0, allowed_origins=["https://app.example"]) as c:
        assert c.get("/version").json() == {"version": __version__}
        pre = c.options("/v1/completions", headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    with app_client(engine, stats_log_interval_s=0) as c:  # no origins configured: no CORS headers
        r = c.get("/version", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers
    with pytest.raises(ValueError, match="allow_credentials"):
        ServerConfig(allowed_origins=["*"], allow_credentials=True)


def test_openai_fields_accepted_or_refused_by_name(engine):
    with app_client(engine, stats_log_interval_s=0) as c:
        ok = c.post("/v1/completions", json={**BODY, "metadata": {"k": "v"}, "store": False,
                                             "service_tier": "auto", "user": "u", "best_of": 1})
        assert ok.status_code == 200, ok.text
        best = c.post("/v1/completions", json={**BODY, "best_of": 3, "logprobs": 0})
        assert best.status_code == 200 and len(best.json()["choices"]) == 1, best.text
        for field, value in (("suffix", "end"), ("best_of", 0)):
            r = c.post("/v1/completions", json={**BODY, field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = c.post("/v1/completions", json={**BODY, "no_such_field": 1})
        assert r.status_code == 400  # still strict about what nobody defines


def _stats(**changes) -> EngineStats:
    kv = KVUsage(bytes_used=250, bytes_committed=500, bytes_capacity=1000, num_requests=2, page_bytes=1,
                 pages_total=1000, pages_mapped=500, pages_free=500)
    base = EngineStats(num_running=2, num_waiting=1, num_decoding=2, num_context_tokens=10, num_preemptions=0,
                       kv=kv, last_step=None, prefix_cache_queries=200, prefix_cache_hits=50,
                       num_prompt_tokens_computed=100, num_generated_tokens=40)
    return dataclasses.replace(base, **changes)


def test_stats_line_reports_the_interval():
    before = _stats(num_prompt_tokens_computed=0, num_generated_tokens=0)
    line = stats_line(before, _stats(), 2.0)
    assert line == ("prompt throughput 50.0 tok/s, generation throughput 20.0 tok/s, running 2 reqs, "
                    "waiting 1 reqs, KV used 25.0% (committed 50.0%), prefix cache hit rate 25.0%")
    idle = _stats(num_running=0, num_waiting=0)
    assert stats_line(idle, idle, 1.0) is None  # a quiet interval logs nothing


def test_the_server_logs_stats_while_busy(engine, caplog):
    caplog.set_level(logging.INFO, logger="vattention.stats")
    with app_client(engine, stats_log_interval_s=0.05) as c:
        for _ in range(3):
            assert c.post("/v1/completions", json={**BODY, "max_tokens": 40}).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "vattention.stats"]
    assert lines and all("generation throughput" in line for line in lines)


def test_metrics_under_vllm_names_with_the_request_phases(engine):
    from prometheus_client import parser
    with app_client(engine, stats_log_interval_s=0) as c:
        assert c.post("/v1/completions", json={**BODY, "n": 2, "max_tokens": 5}).status_code == 200
        text = c.get("/metrics").text
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for smp in family.samples:
            samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    tiny = (("model_name", "tiny"),)
    for phase in ("queue", "prefill", "decode", "inference"):
        assert samples[(f"vllm:request_{phase}_time_seconds_count", tiny)] == 1
        assert samples[(f"vattention:request_{phase}_time_seconds_count", ())] == 1
    assert samples[("vllm:generation_tokens_total", tiny)] == 10 == samples[("vattention:generation_tokens_total", ())]
    assert samples[("vllm:prompt_tokens_total", tiny)] == 4
    assert samples[("vllm:request_success_total", (("finished_reason", "length"),) + tiny)] == 2
    assert samples[("vllm:num_requests_running", tiny)] == 0
    assert samples[("vllm:num_preemptions_total", tiny)] == 0 == samples[("vattention:num_preemptions_total", ())]
    assert ("vllm:kv_cache_usage_perc", tiny) in samples and ("vllm:prefix_cache_hits_total", tiny) in samples
    assert samples[("vllm:request_queue_time_seconds_sum", tiny)] <= samples[("vllm:e2e_request_latency_seconds_sum", tiny)]


def test_min_tokens_reaches_the_engine_and_is_checked(engine):
    with app_client(engine, stats_log_interval_s=0) as c:
        forced = {**BODY, "max_tokens": 8, "logit_bias": {"9": 100}, "stop_token_ids": [9]}
        short = c.post("/v1/completions", json=forced).json()
        assert short["usage"]["completion_tokens"] == 1 and short["choices"][0]["finish_reason"] == "stop"
        long = c.post("/v1/completions", json={**forced, "min_tokens": 5}).json()
        assert long["usage"]["completion_tokens"] == 6 and long["choices"][0]["finish_reason"] == "stop"
        r = c.post("/v1/completions", json={**BODY, "min_tokens": 9})  # more than max_tokens (3)
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


@needs_model
def test_echo_with_logprobs_scores_the_prompt_as_harnesses_ask(converted, monkeypatch):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 1. The prompt's tokens come
    first in logprobs (the first one null), each logprob the engine's prompt_logprobs."""
    from vattention import LLM, SamplingParams
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    config = EngineConfig.from_kwargs(device="cpu", load_format="dummy", warm_up="off")
    engine = AsyncEngine(config)
    engine.start()
    text = "The capital of France is Paris"
    try:
        with TestClient(build_app(engine, "m")) as c:
            r = c.post("/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 1, "echo": True,
                                                "logprobs": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            streamed = c.post("/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 1,
                                                       "echo": True, "logprobs": 1, "stream": True})
            assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "echo"
    finally:
        engine.shutdown(5)
    llm = LLM(device="cpu", load_format="dummy", warm_up="off")
    ids = llm.tokenizer.encode(text)
    want = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for got, expected in zip(lp["token_logprobs"][1:len(ids)], want.prompt_logprobs[1:]):
        assert abs(got - expected.logprob) < 1e-5
    assert "".join(lp["tokens"][:len(ids)]) == text
    assert lp["text_offset"][len(ids)] == len(text)  # the completion starts after the echo
