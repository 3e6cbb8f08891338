"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

  SchedulerOutput ─> flat input_ids/positions + AttentionMetadata ─> model ─> hidden [T, H]
      ─> rows that sample (last token of each finishing chunk) ─> logits ─> Sampler ─> tokens
Before the forward it hands the next step's lengths to the KV manager, so pages for the next
step are mapped in the background while this one computes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..sampling import Sampler, SamplingBatch
from .kv_manager import KVManager
from .scheduler import SchedulerOutput


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # under the raw model distribution, when asked for
    top_logprobs: list[tuple[int, float]]  # (token, logprob), most likely first, when asked for


class ModelRunner:
    def __init__(self, model, kv: KVManager, backend, sampler: Sampler, device: torch.device,
                 max_num_batched_tokens: int):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.max_num_batched_tokens = max_num_batched_tokens

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, SampledToken]:
        """Run the step; returns the sampled token of every request whose chunk completed."""
        items = sched.scheduled
        token_ids: list[int] = []
        positions: list[int] = []
        request_ids, query_lens, seq_lens = [], [], []
        for item in items:
            req, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            token_ids += req.token_ids(start, end)
            positions += range(start, end)
            request_ids.append(req.request_id)
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
        self.kv.prepare(self._next_lengths(sched))
        meta = self.kv.build_metadata(request_ids, query_lens, seq_lens, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids, pos, self.kv.layer_caches(), meta, self.backend)  # [T, hidden]
        sampling = [i for i, item in enumerate(items) if item.samples]
        if not sampling:
            return {}
        ends = list(itertools.accumulate(query_lens))  # row after each sequence's last token
        last_rows = torch.tensor([ends[i] - 1 for i in sampling]).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampling, vocab]
        reqs = [items[i].request for i in sampling]
        batch = SamplingBatch(params=[r.params for r in reqs],
                              prompt_token_ids=[r.prompt_token_ids for r in reqs],
                              output_token_ids=[r.output_token_ids for r in reqs],
                              generators=[r.generator for r in reqs])
        out = self.sampler(logits, batch)
        return {r.request_id: SampledToken(
                    out.token_ids[i], out.logprobs[i] if out.logprobs is not None else None,
                    out.top_logprobs[i] if out.top_logprobs is not None else [])
                for i, r in enumerate(reqs)}

    def _next_lengths(self, sched: SchedulerOutput) -> dict[str, int]:
        """What each scheduled request will hold after the next step, if it runs again."""
        lengths = {}
        for item in sched.scheduled:
            req = item.request
            end = req.num_computed_tokens + item.num_new_tokens
            remaining = req.num_tokens - end
            lengths[req.request_id] = end + (1 if item.samples else min(remaining, self.max_num_batched_tokens))
        return lengths
