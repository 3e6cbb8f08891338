"""The output processor on a real tokenizer: incremental text equals a full decode, stop strings
cut exactly, and each output kind hands out what it promises (deltas concatenate to the final
text and never retract, FINAL_ONLY gives one output, CUMULATIVE the whole state each time)."""

from __future__ import annotations

import pytest

from vattention.engine.output_processor import OutputProcessor, make_request_output
from vattention.engine.request import Request, RequestStatus
from vattention.engine.step_io import SampledToken
from vattention.models.tokenizer import Tokenizer
from vattention.outputs import RequestOutputKind
from vattention.sampling_params import SamplingParams

from conftest import needs_model

TEXT = "Hello wörld! 日本語 and emoji 🎉🎉 end. The stop is here; more text after it."


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def feed(tokenizer, ids: list[int], **params) -> tuple[Request, list]:
    """Append ids one at a time as the scheduler would; returns the request and every output."""
    processor = OutputProcessor(tokenizer, 10_000)
    p = SamplingParams(max_tokens=len(ids), ignore_eos=True, **params)
    req = Request("r#0", [1], p, set(), p.max_tokens)
    outs = []
    for token in ids:
        reason = processor.append(req, SampledToken(token, None, []))
        if reason is not None:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
        out = make_request_output([req])
        if out is not None:
            outs.append(out)
        if reason is not None:
            break
    return req, outs


@needs_model
def test_incremental_text_equals_a_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    req, _ = feed(tokenizer, ids)
    assert req.text == tokenizer.decode(ids) == TEXT


@needs_model
@pytest.mark.parametrize("stop", [["here"], ["; more", "emoji"], ["🎉"], ["not in it"]])
def test_deltas_concatenate_to_the_final_text_and_never_retract(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    want, _ = feed(tokenizer, ids, stop=stop)
    req, outs = feed(tokenizer, ids, stop=stop, output_kind=RequestOutputKind.DELTA)
    streamed = "".join(c.text for o in outs for c in o.outputs)
    assert streamed == req.text == want.text
    cut = min((TEXT.find(s) for s in stop if s in TEXT), default=len(TEXT))
    assert req.text == TEXT[:cut]
    assert sum(len(c.token_ids) for o in outs for c in o.outputs) == len(req.output_token_ids)
    assert outs[-1].finished and outs[-1].outputs[0].num_tokens == len(req.output_token_ids)
    for o in outs[:-1]:  # text a stop string could still cut is held back until it cannot
        sent = "".join(c.text for c in o.outputs)
        assert not any(s in sent for s in stop)


@needs_model
def test_final_only_and_cumulative(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    _, finals = feed(tokenizer, ids, output_kind=RequestOutputKind.FINAL_ONLY)
    assert len(finals) == 1 and finals[0].finished and finals[0].outputs[0].text == TEXT
    _, cumulative = feed(tokenizer, ids)
    assert len(cumulative) == len(ids)
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, len(ids) + 1))
    assert all(TEXT.startswith(o.outputs[0].text) for o in cumulative)
