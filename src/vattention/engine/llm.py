"""LLM: the offline Python API. `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses

from ..config import EngineConfig
from ..outputs import RequestOutput, RequestOutputKind
from ..sampling_params import SamplingParams
from .engine import LLMEngine


class GenerationError(RuntimeError):
    """Some prompts of a generate() call failed (each alone: the others finished normally).
    `outputs` holds every prompt's output in prompt order; a failed one has finish_reason
    "error" and says why in `error`."""

    def __init__(self, outputs: list[RequestOutput]):
        failed = [(i, out.error) for i, out in enumerate(outputs) if out.error is not None]
        lines = "; ".join(f"prompt {i}: {error}" for i, error in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        super().__init__(f"{len(failed)} of {len(outputs)} prompts failed: {lines}{more}")
        self.outputs = outputs


class LLM:
    """model=None runs the built-in SmolLM2-135M-Instruct; other options are EngineConfig fields."""

    def __init__(self, model: str | None = None, kv_cache: str = "vattention", device: str = "auto",
                 dtype: str = "auto", **kwargs):
        config = EngineConfig.from_kwargs(model=model, kv_cache=kv_cache, device=device, dtype=dtype,
                                          **kwargs)
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order. Without
        sampling_params: the model's sampling defaults (generation_config.json), else SamplingParams().
        A prompt that fails on its own (finish_reason "error") does not stop the others; once they
        are done, GenerationError is raised with every output. A failed step as a whole raises
        its error after aborting this call's requests, so the engine stays usable."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.engine.default_sampling_params()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        # generate returns each prompt's final state: the engine builds no output before it
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for request_id in ids:  # nothing half-submitted stays queued
                self.engine.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for request_id in ids:  # a failed step leaves nothing queued behind for later calls
                self.engine.abort(request_id)
            raise
        outs = [done[i] for i in ids]
        if any(out.error is not None for out in outs):
            raise GenerationError(outs)
        return outs

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        # The template already holds the BOS text; encode without adding special tokens again.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(ids, sampling_params)
        for out, text in zip(outs, prompts):
            out.prompt = text
        return outs

    def close(self) -> None:
        self.engine.close()
