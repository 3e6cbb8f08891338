"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

  SchedulerOutput ─> flat input_ids/positions + AttentionMetadata ─> model ─> hidden [T, H]
      ─> rows that sample (last token of each finishing chunk) ─> logits ─> Sampler ─> tokens
Before the forward it hands the next step's lengths to the KV manager, so pages for the next
step are mapped in the background while this one computes. Decode-only steps replay a CUDA graph
of the model body when the runner has them (graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..sampling import Sampler, SamplingBatch
from .graphs import DecodeGraphs
from ..kv import KVManager
from .scheduler import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # under the raw model distribution, when asked for
    top_logprobs: list[tuple[int, float]]  # (token, logprob), most likely first, when asked for


@dataclass
class StepResult:
    """What one step produced for its requests."""

    sampled: dict[str, SampledToken]  # request id -> its new token (requests whose chunk completed)
    failed: dict[str, str]  # request id -> why choosing its token failed (only that request ends)


@dataclass
class StepInputs:
    """One forward pass in plain values: what rank 0 sends every tensor-parallel rank."""

    token_ids: list[int]  # the step's tokens, sequence after sequence
    positions: list[int]  # each token's position in its sequence
    request_ids: list[str]  # the sequences, in batch order
    query_lens: list[int]  # tokens each sequence adds
    seq_lens: list[int]  # tokens each sequence holds after the step
    sample_rows: list[int]  # rows whose logits are sampled (last token of each finishing chunk)
    next_lengths: dict[str, int]  # what each sequence may hold after the next step (for prepare)


class ModelRunner:
    def __init__(self, model, kv: KVManager, backend, sampler: Sampler, device: torch.device,
                 max_num_batched_tokens: int, before_forward: Callable[[StepInputs], None] | None = None):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.max_num_batched_tokens = max_num_batched_tokens
        self.before_forward = before_forward  # tensor parallel: send the step to the other ranks
        self.graphs: DecodeGraphs | None = None  # CUDA graphs of decode-only steps, when enabled

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Run the step; returns the sampled token of every request whose chunk completed. A
        request whose sampling fails is reported in `failed`; the others keep their tokens."""
        inputs = self.step_inputs(sched)
        if self.before_forward is not None:
            self.before_forward(inputs)
        logits = self.forward(inputs)
        if logits is None:
            return StepResult({}, {})
        reqs = [item.request for item in sched.scheduled if item.samples]
        batch = SamplingBatch(params=[r.params for r in reqs],
                              prompt_token_ids=[r.prompt_token_ids for r in reqs],
                              output_token_ids=[r.output_token_ids for r in reqs],
                              generators=[r.generator for r in reqs])
        with torch.inference_mode():
            out, errors = self.sampler.sample_isolated(logits, batch)
        failed = {reqs[i].request_id: f"sampling failed: {type(e).__name__}: {e}" for i, e in errors.items()}
        sampled = {r.request_id: SampledToken(
                       out.token_ids[i], out.logprobs[i] if out.logprobs is not None else None,
                       out.top_logprobs[i] if out.top_logprobs is not None else [])
                   for i, r in enumerate(reqs) if i not in errors}
        return StepResult(sampled, failed)

    def step_inputs(self, sched: SchedulerOutput) -> StepInputs:
        inputs = StepInputs([], [], [], [], [], [], self._next_lengths(sched))
        row = 0
        for item in sched.scheduled:
            req, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            inputs.token_ids += req.token_ids(start, end)
            inputs.positions += range(start, end)
            inputs.request_ids.append(req.request_id)
            inputs.query_lens.append(item.num_new_tokens)
            inputs.seq_lens.append(end)
            row += item.num_new_tokens
            if item.samples:
                inputs.sample_rows.append(row - 1)
        return inputs

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model over the step's tokens; logits [num_sample_rows, vocab] float32, or None
        when no sequence samples this step. Every tensor-parallel rank runs this."""
        self.kv.prepare(inputs.next_lengths)
        meta = self.kv.build_metadata(inputs.request_ids, inputs.query_lens, inputs.seq_lens, self.device)
        ids = torch.tensor(inputs.token_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(inputs.positions, dtype=torch.long).to(self.device, non_blocking=True)
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.run(ids, pos, meta)  # [T, hidden]
        else:
            hidden = self.model(ids, pos, self.kv.layer_caches(), meta, self.backend)
        if not inputs.sample_rows:
            return None
        rows = torch.tensor(inputs.sample_rows).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden[rows])  # [num_sampling, vocab]

    def _next_lengths(self, sched: SchedulerOutput) -> dict[str, int]:
        """What each scheduled request will hold after the next step, if it runs again."""
        lengths = {}
        for item in sched.scheduled:
            req = item.request
            end = req.num_computed_tokens + item.num_new_tokens
            remaining = req.num_tokens - end
            lengths[req.request_id] = end + (1 if item.samples else min(remaining, self.max_num_batched_tokens))
        return lengths
