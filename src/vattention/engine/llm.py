"""LLM: the offline Python API. `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

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
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order. Without
        sampling_params: the model's sampling defaults (generation_config.json), else SamplingParams().
        A prompt that fails on its own (finish_reason "error") does not stop the others; once they
        are done, GenerationError is raised with every output. A failed step as a whole raises
        its error after aborting this call's requests, so the engine stays usable. With
        `use_tqdm` (as vLLM's), more than one prompt shows a progress bar on stderr."""
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
        bar = _progress(len(ids)) if use_tqdm and len(ids) > 1 else None
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in ids:  # a failed step leaves nothing queued behind for later calls
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        outs = [done[i] for i in ids]
        if any(out.error is not None for out in outs):
            raise GenerationError(outs)
        return outs

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        rendered = [self._render_chat(c) for c in conversations]
        outs = self.generate([ids for _, ids in rendered], sampling_params, use_tqdm)
        for out, (text, _) in zip(outs, rendered):
            out.prompt = text
        return outs

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[RequestOutput]:
        """One prompt's output as it is made: each yielded RequestOutput holds only what is new
        since the one before (outputs[0].text and token_ids; the last one is `finished`). With
        `chat`, `prompt` is a list of messages run through the chat template. An error of the
        request's own ends the stream with that output (finish_reason "error"); stopping early
        (closing the iterator) aborts the request."""
        if chat:
            prompt = self._render_chat(prompt)[1]
        params = sampling_params or self.engine.default_sampling_params()
        if params.n != 1:
            raise ValueError(f"stream() takes n=1 (got n={params.n}); generate() returns n samples")
        request_id = self.engine.add_request(prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
        finished = False
        try:
            while not finished and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(request_id)
            while self.engine.has_unfinished() and not self.engine.scheduler.has_unfinished():
                self.engine.step()  # collect a step still on the device, so the next call starts clean

    def _render_chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        """(the chat template's text, its token ids) for one conversation."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template already holds the BOS text; encode without adding special tokens again.
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def close(self) -> None:
        self.engine.close()


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)
