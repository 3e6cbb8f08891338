"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens, in two halves
so that the engine can collect the previous step in between:

  launch(sched): StepInputs ─> StepStaging (pinned, one copy per dtype) ─> model ─> logits
      token ids still on the device (the previous step's samples) are gathered there
  sample(launched, alive): Sampler on the device ─> PendingSample (ids stay on the device for the
      next step's inputs; one non-blocking copy to pinned host memory)
  PendingSample.result(): waits for that copy ─> StepResult

Nothing in launch or sample waits for the device. Decode-only steps replay a CUDA graph of the
model body when the runner has them (graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import StepStaging, to_device
from ..kv import KVManager
from ..sampling import HostCopy, Sampler, SamplingBatch
from .graphs import DecodeGraphs
from .step_io import SampledToken, SchedulerOutput, StepInputs, StepResult

PROMPT_LOGPROB_ROWS = 256  # rows of prompt logits made at a time


@dataclass
class LaunchedStep:
    """A step whose forward is queued on the device."""

    sched: SchedulerOutput
    logits: torch.Tensor | None  # [sampling rows, vocab]; None when no sequence samples
    prompt: PromptLogprobs | None = None  # the step's prompt logprobs, still on the device


@dataclass
class PromptLogprobs:
    """Prompt logprobs of a step: for each asked-for row, the next prompt token's logprob and
    the most likely tokens; on the device until host() (called when the step is collected)."""

    spans: list[tuple[str, int, int]]  # (request id, first position, rows), in row order
    target: torch.Tensor  # [rows] float32
    top_ids: torch.Tensor  # [rows, k] int64
    top_lp: torch.Tensor  # [rows, k] float32
    event: torch.cuda.Event | None = None  # recorded after the copies to the host

    def start_copy(self) -> PromptLogprobs:
        """The tensors on their way to pinned host memory (CUDA), so collecting waits for this
        step only, not for the step launched behind it."""
        if self.target.device.type != "cuda":
            return self
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (self.target, self.top_ids, self.top_lp)]
        for h, t in zip(host, (self.target, self.top_ids, self.top_lp)):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PromptLogprobs(self.spans, *host, event)

    def host(self) -> dict[str, tuple[int, list]]:
        if self.event is not None:
            self.event.synchronize()
        target, ids, lps = self.target.tolist(), self.top_ids.tolist(), self.top_lp.tolist()
        out, row = {}, 0
        for request_id, first, n in self.spans:
            out[request_id] = (first, [(target[r], list(zip(ids[r], lps[r]))) for r in range(row, row + n)])
            row += n
        return out


@dataclass
class PendingSample:
    """A step's sampled tokens on their way to the host."""

    request_ids: list[str]  # the sampled rows' requests, in row order
    copy: HostCopy | None  # None: nothing was sampled
    errors: dict[str, str]  # request id -> why its sampling failed
    prompt: PromptLogprobs | None = None

    def result(self) -> StepResult:
        prompt = self.prompt.host() if self.prompt is not None else {}
        if self.copy is None:
            return StepResult({}, self.errors, prompt)
        out = self.copy.result()
        sampled = {}
        for i, request_id in enumerate(self.request_ids):
            if request_id not in self.errors:
                sampled[request_id] = SampledToken(
                    out.token_ids[i], out.logprobs[i] if out.logprobs is not None else None,
                    out.top_logprobs[i] if out.top_logprobs is not None else [])
        return StepResult(sampled, self.errors, prompt)


class ModelRunner:
    def __init__(self, model, kv: KVManager, backend, sampler: Sampler, device: torch.device,
                 max_num_batched_tokens: int, max_num_seqs: int,
                 before_forward: Callable[[StepInputs], None] | None = None):
        self.model = model
        self.kv = kv
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.max_num_batched_tokens = max_num_batched_tokens
        self.before_forward = before_forward  # tensor parallel: send the step to the other ranks
        self.graphs: DecodeGraphs | None = None  # CUDA graphs of decode-only steps, when enabled
        self.grammars = None  # structured outputs' Grammars (engine/structured.py), once a request asks
        # int64: ids, positions, write rows, sample rows, pending rows; int32: per-sequence
        # arrays and (paged) block tables of every sequence at the longest context
        per_token, per_seq = 5 * max_num_batched_tokens, 4 * (max_num_seqs + 1)
        self.staging = StepStaging(device, per_token + per_seq)
        self._last_ids: torch.Tensor | None = None  # the latest step's sampled ids, on the device
        self._last_rows: dict[str, int] = {}  # request id -> its row in _last_ids
        self._prompt: PromptLogprobs | None = None  # what the latest forward computed of prompt logprobs

    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        inputs = self.step_inputs(sched)
        if self.before_forward is not None:
            self.before_forward(inputs)
        logits = self.forward(inputs, self._last_ids)
        prompt, self._prompt = self._prompt, None
        return LaunchedStep(sched, logits, prompt.start_copy() if prompt is not None else None)

    def sample(self, launched: LaunchedStep, alive: list[bool]) -> PendingSample:
        """Sample the rows of the step's requests that are still alive (alive[i] for scheduled
        item i; a request that finished since the step was scheduled samples nothing). A request
        whose sampling fails is reported in `errors`; the others keep their tokens."""
        rows, reqs = [], []
        row = 0
        for item, keep in zip(launched.sched.scheduled, alive):
            if item.samples:
                if keep:
                    rows.append(row)
                    reqs.append(item.request)
                row += 1
        self._last_rows = {r.request_id: i for i, r in enumerate(reqs)}
        if not reqs:
            self._last_ids = None
            return PendingSample([], None, {}, launched.prompt)
        logits = launched.logits
        if len(rows) < logits.shape[0]:
            logits = logits[to_device(rows, torch.long, self.device)]
        batch = SamplingBatch(params=[r.params for r in reqs],
                              prompt_token_ids=[r.prompt_token_ids for r in reqs],
                              output_token_ids=[r.output_token_ids for r in reqs],
                              generators=[r.generator for r in reqs],
                              banned=[_banned(r) for r in reqs],
                              allowed=self._allowed(reqs))
        with torch.inference_mode():
            sample, errors = self.sampler.sample_isolated(logits, batch)
        self._last_ids = sample.token_ids
        failed = {reqs[i].request_id: f"sampling failed: {type(e).__name__}: {e}" for i, e in errors.items()}
        return PendingSample([r.request_id for r in reqs], sample.start_copy(), failed, launched.prompt)

    def _allowed(self, reqs) -> torch.Tensor | None:
        """Structured outputs: the rows' next-token bitmask (rows without a grammar allow all)."""
        matchers = [r.matcher for r in reqs]
        if self.grammars is None or all(m is None for m in matchers):
            return None
        return self.grammars.bitmask(matchers)

    def step_inputs(self, sched: SchedulerOutput) -> StepInputs:
        """The step in plain values. A token past what the host knows (prompt + output so far)
        is pending: its id is read on the device from the previous step's sample."""
        inputs = StepInputs([], [], [], [], [], [])
        row = 0
        for item in sched.scheduled:
            req, start = item.request, item.start
            end = start + item.num_new_tokens
            known = min(end, req.num_tokens)
            inputs.token_ids += req.token_ids(start, known)
            for pos in range(max(start, known), end):
                inputs.pending_rows.append(row + pos - start)
                inputs.pending_from.append(self._last_rows[req.request_id])
                inputs.token_ids.append(0)
            inputs.positions += range(start, end)
            inputs.request_ids.append(req.request_id)
            inputs.query_lens.append(item.num_new_tokens)
            inputs.seq_lens.append(end)
            k = req.params.prompt_logprobs
            if k is not None:  # each position of the chunk scores the prompt token after it
                last = min(end, len(req.prompt_token_ids) - 1)
                if last > start:
                    inputs.prompt_rows += range(row, row + last - start)
                    inputs.prompt_targets += req.prompt_token_ids[start + 1:last + 1]
                    inputs.prompt_spans.append((req.request_id, start, last - start))
                    inputs.prompt_top = max(inputs.prompt_top, k)
            row += item.num_new_tokens
            if item.samples:
                inputs.sample_rows.append(row - 1)
        return inputs

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, last_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model over the step's tokens; logits [num_sample_rows, vocab] float32, or None
        when no sequence samples this step. Every tensor-parallel rank runs this (never with
        pending tokens: those ranks have no sampled ids)."""
        staging = self.staging
        staging.begin()
        meta = self.kv.build_metadata(inputs.request_ids, inputs.query_lens, inputs.seq_lens, self.device,
                                      staging)
        ids = staging.add(inputs.token_ids, torch.int64)
        pos = staging.add(inputs.positions, torch.int64)
        rows = staging.add(inputs.sample_rows, torch.int64)
        if inputs.pending_rows:
            dst = staging.add(inputs.pending_rows, torch.int64)
            src = staging.add(inputs.pending_from, torch.int64)
        staging.commit()
        if inputs.pending_rows:
            ids.index_copy_(0, dst, last_ids.index_select(0, src))
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.run(ids, pos, meta)  # [T, hidden]
        else:
            hidden = self.model(ids, pos, self.kv.layer_caches(), meta, self.backend)
        if inputs.prompt_rows:
            self._prompt = self._prompt_logprobs(hidden, inputs)
        if not inputs.sample_rows:
            return None
        return self.model.compute_logits(hidden[rows])  # [num_sampling, vocab]

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> PromptLogprobs:
        """log_softmax over the vocabulary at the asked-for rows, a few hundred rows at a time
        (a whole chunk's [rows, vocab] float32 could take gigabytes); every rank runs it."""
        rows = torch.tensor(inputs.prompt_rows, dtype=torch.long, device=hidden.device)
        targets = torch.tensor(inputs.prompt_targets, dtype=torch.long, device=hidden.device)
        k = max(1, inputs.prompt_top)
        target, top_ids, top_lp = [], [], []
        for i in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            lp = torch.log_softmax(self.model.compute_logits(hidden[rows[i:i + PROMPT_LOGPROB_ROWS]]), dim=-1)
            target.append(lp.gather(1, targets[i:i + PROMPT_LOGPROB_ROWS, None])[:, 0])
            values, ids = lp.topk(k, dim=-1)
            top_ids.append(ids)
            top_lp.append(values)
        cat = torch.cat
        return PromptLogprobs(inputs.prompt_spans, cat(target), cat(top_ids)[:, :inputs.prompt_top],
                              cat(top_lp)[:, :inputs.prompt_top])


def _banned(req) -> list[int]:
    """Ids the request may not sample now: below min_tokens, its EOS and stop token ids."""
    if len(req.output_token_ids) >= req.params.min_tokens:
        return []
    return sorted(set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else req.eos_token_ids))

