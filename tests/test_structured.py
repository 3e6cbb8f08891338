"""Structured outputs (xgrammar): a random-weight model's outputs, sampled, always follow the
JSON schema, the regex or the choice; any-JSON outputs always parse once finished; the mask is
the one the sampler applies; the server takes OpenAI's response_format and vLLM's field."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")

import torch  # noqa: E402

from vattention import LLM, SamplingParams  # noqa: E402
from vattention.sampling import Sampler, SamplingBatch  # noqa: E402
from vattention.sampling_params import StructuredOutputs  # noqa: E402

from conftest import needs_model  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "n", "tags"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def valid(doc) -> bool:
    """SCHEMA, checked by hand."""
    return (isinstance(doc, dict) and set(doc) == {"color", "ok", "n", "tags"}
            and doc["color"] in ("red", "green", "blue") and isinstance(doc["ok"], bool)
            and isinstance(doc["n"], int) and not isinstance(doc["n"], bool) and 0 <= doc["n"] <= 99
            and isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and set(doc["tags"]) <= {"a", "b"})


@pytest.fixture(scope="module")
def random_llm(converted):
    """The default model's tokenizer with random weights: outputs no training would give."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VATTENTION_CACHE", str(converted["cache"]))
        llm = LLM(device="cpu", load_format="dummy", warm_up="off")
    yield llm
    llm.close()


pytestmark = needs_model


def sample(llm, spec: StructuredOutputs, n: int = 12, max_tokens: int = 80, seed: int = 1):
    params = SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens, structured_outputs=spec)
    return llm.generate(["Answer:"], params, use_tqdm=False)[0].outputs


def test_json_schema_outputs_always_validate(random_llm):
    for seed in (1, 2):
        for out in sample(random_llm, StructuredOutputs(json=SCHEMA), seed=seed):
            assert out.finish_reason == "stop", out.text
            assert valid(json.loads(out.text)), out.text


def test_regex_and_choice_outputs_always_match(random_llm):
    for out in sample(random_llm, StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out.text) and out.finish_reason == "stop", out.text
    choices = ("yes", "no", "not sure")
    texts = [o.text for o in sample(random_llm, StructuredOutputs(choice=list(choices)))]
    assert set(texts) <= set(choices) and len(set(texts)) > 1


def test_any_json_object_parses_once_finished(random_llm):
    outs = sample(random_llm, StructuredOutputs(json_object=True), max_tokens=200)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished, "no any-JSON output finished within 200 tokens"
    for out in finished:
        assert isinstance(json.loads(out.text), dict), out.text


def test_greedy_with_a_grammar_is_the_argmax_of_the_allowed_tokens(random_llm):
    """The masked logits: greedy picks the most likely token the grammar allows at every step,
    which the sampler's own mask also gives (bitmask vs. a hand-made -inf mask)."""
    import xgrammar
    logits = torch.randn(2, 300)
    mask = xgrammar.allocate_token_bitmask(2, 300)
    mask[0].zero_()
    mask[0, 0] = 0b1010  # row 0 allows tokens 1 and 3 only; row 1 everything
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    batch = SamplingBatch(params, [[]] * 2, [[]] * 2, [None] * 2, allowed=mask)
    ids = Sampler()(logits, batch).token_ids
    assert ids[0] == (1 if logits[0, 1] > logits[0, 3] else 3) and ids[1] == int(logits[1].argmax())


def test_bad_specs_are_refused_by_name(random_llm):
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="does not compile"):
        random_llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputs(regex="(unclosed")))
    assert not random_llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def http(converted):
    """The server's app on the default model's tokenizer with random weights."""
    from fastapi.testclient import TestClient

    from vattention.config import EngineConfig
    from vattention.server.app import build_app
    from vattention.server.async_engine import AsyncEngine
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VATTENTION_CACHE", str(converted["cache"]))
        engine = AsyncEngine(EngineConfig.from_kwargs(device="cpu", load_format="dummy", warm_up="off"))
    engine.start()
    try:
        with TestClient(build_app(engine, "m")) as c:
            yield c
    finally:
        engine.shutdown(5)


def test_server_takes_response_format_and_structured_outputs(http):
    body = {"model": "m", "messages": [{"role": "user", "content": "JSON please"}],
            "max_tokens": 80, "temperature": 1.0, "seed": 4, "n": 3,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert valid(json.loads(choice["message"]["content"]))
    r = http.post("/v1/completions", json={"model": "m", "prompt": "Pick:", "max_tokens": 10,
                                           "structured_outputs": {"choice": ["left", "right"]}})
    assert r.json()["choices"][0]["text"] in ("left", "right"), r.text
    bad = http.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_schema"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    bad = http.post("/v1/completions", json={"model": "m", "prompt": "x",
                                             "structured_outputs": {"regex": "(", "choice": ["a"]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs", bad.text


def test_a_grammar_that_does_not_compile_is_a_400(http):
    r = http.post("/v1/completions", json={"model": "m", "prompt": "x", "structured_outputs": {"regex": "("}})
    assert r.status_code == 400 and "does not compile" in r.json()["error"]["message"], r.text
    ok = http.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200  # the engine goes on
