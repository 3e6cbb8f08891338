"""Structured outputs: a request's tokens held to a JSON schema, any JSON, a regex or a choice.

The grammar engine is xgrammar (an optional dependency: `pip install 'vattention[structured]'`):
vLLM's default; its wheel installs offline beside what we already need (torch, transformers,
triton, pydantic); it precomputes which tokens each grammar state allows, so a step's mask costs
microseconds a row; and its `apply_token_bitmask_inplace` has CPU, Triton and CUDA kernels, so
the mask is applied on the logits' device.

    StructuredOutputs (in SamplingParams)  -- Grammars.matcher() -->  one GrammarMatcher a sample
    each step: the rows' matchers fill one host bitmask [rows, vocab/32] -> one copy -> applied
               to the logits in the sampler (sampler.apply_allowed), before greedy argmax or the draw
    each token: OutputProcessor.append -> matcher.accept_token; a grammar that is complete
               finishes the sample ("stop")

Compiled grammars are cached by their definition (a JSON schema compiles once, however many
requests send it). The vocabulary is the tokenizer's, padded to the model's logit width.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch

from ..sampling_params import StructuredOutputs


def xgrammar_missing() -> str | None:
    """Why structured outputs cannot run here, or None."""
    if importlib.util.find_spec("xgrammar") is None:
        return "structured outputs need xgrammar: pip install 'vattention[structured]'"
    return None


class Grammars:
    """The engine's grammar compiler and compiled-grammar cache (made on first use)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        self._xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._compiled: dict[tuple, Any] = {}

    def matcher(self, spec: StructuredOutputs):
        """A fresh matcher for one sample; ValueError when the spec does not compile."""
        key = spec.key()
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = self._compile(spec)
            except Exception as e:  # xgrammar raises RuntimeError/ValueError with its reason
                raise ValueError(f"structured_outputs does not compile: {e}") from None
            self._compiled[key] = compiled
        return self._xgr.GrammarMatcher(compiled)

    def _compile(self, spec: StructuredOutputs):
        c = self._compiler
        if spec.json is not None:
            return c.compile_json_schema(spec.json if isinstance(spec.json, str) else json.dumps(spec.json),
                                         any_whitespace=spec.whitespace)
        if spec.json_object:
            return c.compile_json_schema('{"type": "object"}', any_whitespace=spec.whitespace)
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        return c.compile_regex("|".join(_regex_escape(s) for s in spec.choice))

    def bitmask(self, matchers: list) -> torch.Tensor:
        """[rows, words] int32 on the host: which tokens each row's matcher (None: any token)
        allows next."""
        mask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # all allowed
        for row, m in enumerate(matchers):
            if m is not None:
                m.fill_next_token_bitmask(mask, row)
        return mask


def _regex_escape(text: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?()[]{}|\/" else ch for ch in text)
