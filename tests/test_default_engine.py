"""The engine on the built-in default model (SmolLM2-135M-Instruct): greedy tokens equal HF's on
the same weights, text-level features (stop strings, chat template, logprob text) and the CLI."""

from __future__ import annotations

import io

import pytest

from vattention import LLM, SamplingParams
from vattention.cli import main as cli_main

from conftest import needs_model
from engine_helpers import hf_greedy

pytestmark = needs_model
QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def default_llm(converted):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VATTENTION_CACHE", str(converted["cache"]))
        llm = LLM(device="cpu")  # model=None: the built-in default
    yield llm
    llm.close()


def chat_ids(llm: LLM, question: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_greedy_tokens_and_logprobs_match_hf(default_llm, hf_model):
    prompts = [chat_ids(default_llm, q) for q in QUESTIONS]
    outs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, logprobs=0,
                                                        ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        want, want_lp = hf_greedy(hf_model, prompt, 16)
        got = out.outputs[0]
        assert got.token_ids == want
        assert max(abs(a.logprob - b) for a, b in zip(got.logprobs, want_lp)) < 1e-3


def test_chat_answers_and_stops_at_end_of_turn(default_llm):
    out = default_llm.chat([{"role": "user", "content": QUESTIONS[0]}],
                           SamplingParams(temperature=0, max_tokens=40))[0]
    c = out.outputs[0]
    assert "Paris" in c.text
    assert c.finish_reason == "stop" and c.token_ids[-1] in default_llm.engine.eos_token_ids
    assert out.prompt.startswith("<|im_start|>")


def test_stop_string_truncates_the_text(default_llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = [chat_ids(default_llm, QUESTIONS[1])]
    full = default_llm.generate(prompt, params)[0].outputs[0].text
    words = full.split()
    stop = " ".join(words[3:5])
    assert stop and stop in full
    c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    stop=[stop, "never appears"]))[0].outputs[0]
    assert c.text == full[:full.index(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop


def test_logprobs_carry_decoded_token_text(default_llm):
    c = default_llm.generate(QUESTIONS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                          ignore_eos=True))[0].outputs[0]
    assert "".join(lp.decoded for lp in c.logprobs) == default_llm.tokenizer.decode(
        c.token_ids, skip_special_tokens=False)
    for sampled, top in zip(c.logprobs, c.top_logprobs):
        assert len(top) == 3 and top[0].token_id == sampled.token_id  # greedy picks the top one
        assert top[0].logprob >= top[1].logprob >= top[2].logprob


def test_cli_generate_prints_answer_and_kv_summary(converted, capsys, monkeypatch):
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    assert cli_main(["generate", QUESTIONS[0], "--temperature", "0", "--max-tokens", "20",
                     "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "MiB used /" in captured.err and "MiB mapped" in captured.err


def test_cli_chat_keeps_the_conversation(converted, capsys, monkeypatch):
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n\n"))
    assert cli_main(["chat", "--temperature", "0", "--max-tokens", "30", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "Rome" in out


def test_cli_reports_bad_input_clearly(converted, capsys, monkeypatch):
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    assert cli_main(["generate", "hi", "--temperature", "-1", "--device", "cpu"]) == 2
    assert "temperature must be a finite number >= 0" in capsys.readouterr().err


def test_stream_yields_what_generate_returns_piece_by_piece(default_llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    want = default_llm.chat(messages, params)[0].outputs[0]
    pieces = list(default_llm.stream(messages, params, chat=True))
    assert len(pieces) > 3 and pieces[-1].finished and not any(p.finished for p in pieces[:-1])
    assert "".join(p.outputs[0].text for p in pieces) == want.text
    assert [t for p in pieces for t in p.outputs[0].token_ids] == want.token_ids
    assert pieces[-1].outputs[0].finish_reason == want.finish_reason


def test_stopping_a_stream_early_aborts_its_request(default_llm):
    it = default_llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    next(it), next(it)
    it.close()
    assert not default_llm.engine.has_unfinished()
    assert default_llm.engine.kv.usage().num_requests == 0
    with pytest.raises(ValueError, match="n=1"):
        next(default_llm.stream("x", SamplingParams(n=2)))


def test_generate_shows_progress_for_many_prompts(default_llm, capsys):
    params = SamplingParams(temperature=0, max_tokens=2)
    default_llm.generate(QUESTIONS, params)
    assert "Processed prompts" in capsys.readouterr().err
    default_llm.generate(QUESTIONS, params, use_tqdm=False)
    default_llm.generate(QUESTIONS[0], params)  # one prompt: no bar
    assert "Processed prompts" not in capsys.readouterr().err


def test_cli_generate_streams_a_whole_answer_by_default(converted, capsys, monkeypatch, default_llm):
    """Without --max-tokens the CLI answers up to 512 tokens (not SamplingParams' 16), printed
    as it is generated: the same text the API gives."""
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    question = "Write three sentences about the sea."
    assert cli_main(["generate", question, "--temperature", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    want = default_llm.chat([{"role": "user", "content": question}],
                            SamplingParams(temperature=0, max_tokens=512))[0].outputs[0]
    assert len(want.token_ids) > 16 and printed == want.text + "\n"


def test_a_chat_template_given_replaces_the_models(converted, monkeypatch, tmp_path):
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    source = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    path = tmp_path / "template.jinja"
    path.write_text(source)
    for value in (source, str(path)):
        llm = LLM(device="cpu", chat_template=value, warm_up="off")
        out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=2))[0]
        assert out.prompt == "<user>Hi<assistant>"
        assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
        llm.close()
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        LLM(device="cpu", chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse"):
        LLM(device="cpu", chat_template="{% for m in messages %}")
