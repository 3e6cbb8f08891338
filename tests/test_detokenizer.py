"""IncrementalDetokenizer against the slow reference, a full Tokenizer.decode of every id so far.

Three tokenizers: the default model's (SmolLM2, byte-level BPE) and two small Llama-like ones
built here (Metaspace / "legacy" Replace+Strip, both with ByteFallback byte tokens).
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from vattention.engine.detokenizer import IncrementalDetokenizer
from vattention.models.tokenizer import Tokenizer

from conftest import needs_model

# Characters of several byte lengths; the synthetic vocabularies never saw the emoji or 語,
# so those come out as <0xXX> byte tokens there.
MULTIBYTE_TEXT = "Hello café 日本語 naïve 😀🎉 crème brûlée, ü façade 🚀!"
TRAINING_TEXT = ["Hello world, this is a small corpus.", "The café serves crème brûlée.",
                 "日本のテキスト", "naïve façade"]


def llama_like(style: str) -> Tokenizer:
    """A tiny BPE with the 256 <0xXX> byte-fallback tokens, a Llama-style decoder (Metaspace, or
    the legacy Replace/ByteFallback/Fuse/Strip chain), special <s> </s> <|im_end|> and plain
    added tokens."""
    trained = BackendTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(TRAINING_TEXT * 10, trainers.BpeTrainer(vocab_size=200,
                                                                        show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in model["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                          byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.ByteFallback(),
                                             decoders.Metaspace(prepend_scheme="first")])
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True),
                                "<|im_end|>"])
    backend.add_tokens(["<tool>", " spaced", "ü"])
    return Tokenizer(backend)


@pytest.fixture(scope="module",
                params=[pytest.param("smollm2", marks=needs_model), "metaspace", "legacy"])
def tokenizer(request) -> Tokenizer:
    if request.param == "smollm2":
        return Tokenizer.from_dir(request.getfixturevalue("model_dir"))
    return llama_like(request.param)


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """SmolLM2's kind: bytes spelled as characters, no <0xXX> byte-fallback tokens."""
    return tokenizer.backend.token_to_id("<0x00>") is None


def detokenize(tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str, str]:
    """(each step's text, flush's text, .text at the end)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    steps = [detok.step(i) for i in ids]
    return steps, detok.flush(), detok.text


def spell(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The ids as vocabulary entries, for failure messages."""
    return [tokenizer.backend.id_to_token(i) for i in ids]


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_full_decode(tokenizer, skip):
    """step()s + flush() == decode(ids) for random ids, a third of them special or added."""
    rng = random.Random(1234)
    added = list(tokenizer.backend.get_added_tokens_decoder())
    for trial in range(1500):
        ids = [rng.choice(added) if rng.random() < 0.3 else rng.randrange(tokenizer.vocab_size)
               for _ in range(rng.randrange(0, 20))]
        steps, tail, text = detokenize(tokenizer, ids, skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(steps) + tail == full == text, (
            f"trial {trial}: tokens {spell(tokenizer, ids)}\n"
            f"steps {steps} + flush {tail!r}\n != decode {full!r}")


@pytest.mark.parametrize("skip", [True, False])
def test_split_characters_never_emitted_partially(tokenizer, skip):
    """With characters split across tokens, every step's text is whole characters and the text so
    far is a prefix of the full decode; with byte-level BPE, all of it once nothing is split."""
    ids = tokenizer.encode("<|im_end|>" + MULTIBYTE_TEXT + "<s>" + MULTIBYTE_TEXT,
                           add_special_tokens=False)
    split = [t for t in ids if "\ufffd" in tokenizer.token_to_str(t)]
    assert len(split) >= 4, f"no characters split across tokens in {spell(tokenizer, ids)}"
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "\ufffd" not in full
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    for k, token in enumerate(ids, 1):
        piece = detok.step(token)
        assert "\ufffd" not in piece, f"step {k} ({spell(tokenizer, [token])}) gave {piece!r}"
        assert full.startswith(detok.text), f"after step {k}: {detok.text!r} not a prefix"
        so_far = tokenizer.decode(ids[:k], skip_special_tokens=skip)
        if is_byte_level(tokenizer) and not so_far.endswith("\ufffd"):
            assert detok.text == so_far, f"after step {k}: text held back with nothing split"
    assert detok.text + detok.flush() == full


@pytest.mark.parametrize("text", ["日本語", "naïve 😀", "🎉"])
def test_ending_mid_character_flushes_what_decode_gives(tokenizer, text):
    """A sequence cut inside its last character: flush() gives the full decode's tail, U+FFFD
    included, and the steps never showed it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, f"{text!r} has no cut inside a character: {spell(tokenizer, ids)}"
    ids = ids[:cuts[-1]]
    full = tokenizer.decode(ids)
    steps, tail, _ = detokenize(tokenizer, ids, skip=True)
    assert "\ufffd" not in "".join(steps), steps
    assert tail.endswith("\ufffd") and "".join(steps) + tail == full, (steps, tail, full)


def test_byte_run_turned_invalid_later_matches_decode():
    """ByteFallback decodes a run of <0xXX> tokens as a whole: a valid é followed by a stray
    continuation byte makes all three bytes U+FFFD, so é must not have been emitted early."""
    tokenizer = llama_like("metaspace")
    tokens = ["▁Hello", "<0xC3>", "<0xA9>", "<0x80>", "▁Hello"]
    ids = [tokenizer.backend.token_to_id(t) for t in tokens]
    assert tokenizer.decode(ids) == "Hello\ufffd\ufffd\ufffd Hello"  # the quirk tested here
    steps, tail, _ = detokenize(tokenizer, ids, skip=True)
    assert steps == ["Hello", "", "", "", "\ufffd\ufffd\ufffd Hello"] and tail == "", steps


class CountingBackend:
    """A backend that records how many ids each decode() is given."""

    def __init__(self, backend):
        self._backend = backend
        self.decoded_lengths: list[int] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def decode(self, ids, skip_special_tokens):
        self.decoded_lengths.append(len(ids))
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_per_step_decode_does_not_grow_with_history(tokenizer):
    """Over a long output, each step decodes at most twice, each time a window of a few ids
    (bounded by the longest run of byte tokens), never the output so far; a run of skipped
    special tokens is not decoded at all."""
    ids = tokenizer.encode((MULTIBYTE_TEXT + "<|im_end|>" * 20) * 100, add_special_tokens=False)
    counting = CountingBackend(tokenizer.backend)
    detok = IncrementalDetokenizer(SimpleNamespace(backend=counting), skip_special_tokens=True)
    for k, token in enumerate(ids):
        before = len(counting.decoded_lengths)
        detok.step(token)
        calls = counting.decoded_lengths[before:]
        assert len(calls) <= 2 and max(calls, default=0) <= 12, f"step {k} decoded {calls} ids"
    detok.flush()
    assert len(ids) > 2000 and detok.text == tokenizer.decode(ids)
