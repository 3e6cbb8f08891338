"""Sampler: one token per row from a step's logits, under each row's SamplingParams.

Per row, in this order (vLLM / HF / OpenAI semantics):

    raw logits ──► penalties ──► logit_bias ──► bans (min_tokens) ──► grammar mask ──► greedy rows: argmax
        │          (repetition, frequency, presence)
        │                   └──► sampled rows: / temperature ─► top-k ─► top-p ─► min-p ─► draw
        └──► logprobs / top_logprobs (log_softmax of the raw logits, never of the processed ones)

Everything runs batched on the logits' device with per-row parameter tensors (sent through
pinned memory: nothing here waits for the device); the only per-row loop is the draw for seeded
rows, so that a seeded row's token depends on nothing but its own logits, params and generator
(not on the other rows or their order).

    sample(logits, batch) ─> DeviceSample: the ids stay on the device (the next step's inputs
        read them there); .start_copy() ─> HostCopy: one non-blocking transfer of ids and
        asked-for logprobs into pinned memory; .result() waits for it ─> SamplerOutput
    Sampler()(logits, batch) is the three at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattention.sampling_params import SamplingParams

from ..attention.staging import to_device

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): argmax is the limit of the softmax as
# temperature -> 0, and dividing by a tinier one can overflow float32 logits to inf (then NaN).
GREEDY_TEMPERATURE = 1e-5
# Every value validation accepts must leave a row a valid distribution. In float32 a repetition
# penalty of 1e-40 is subnormal (a positive logit divided by it overflows to inf) and 1e40 is inf
# (a zero logit times it is NaN); beyond these bounds the penalty's effect is already total, so they
# are clamped into a range where logit / r and logit * r stay finite. Processed logits are then held
# to +-LOGIT_LIMIT, which even the smallest sampled temperature cannot push past float32's max.
PENALTY_RANGE = (1e-20, 1e20)
LOGIT_LIMIT = 1e30
MAX_TEMPERATURE = 1e30  # float32 has no larger finite value worth dividing by; hotter is uniform anyway


@dataclass
class SamplingBatch:
    """The rows that sample a token this step, all lists indexed by row (row i = logits[i])."""

    params: list[SamplingParams]  # how each row chooses its token
    prompt_token_ids: list[list[int]]  # the prompt: repetition_penalty also covers its tokens
    output_token_ids: list[list[int]]  # tokens generated so far: all three penalties count these
    generators: list[torch.Generator | None]  # seeded rows' own generator (on the logits' device)
    banned: list[list[int]] | None = None  # per row, ids it may not sample now (min_tokens: EOS, stop ids)
    allowed: torch.Tensor | None = None  # structured outputs: [rows, vocab/32] int32 bitmask (xgrammar's) of allowed ids

    def __post_init__(self):
        lengths = {len(self.params), len(self.prompt_token_ids), len(self.output_token_ids),
                   len(self.generators)}
        if len(lengths) != 1:
            raise ValueError(
                "SamplingBatch fields must have one entry per row: got "
                f"{len(self.params)} params, {len(self.prompt_token_ids)} prompt_token_ids, "
                f"{len(self.output_token_ids)} output_token_ids, {len(self.generators)} generators")

    @property
    def num_rows(self) -> int:
        return len(self.params)


@dataclass
class SamplerOutput:
    """What the sampler chose, as host lists the engine appends to each sequence."""

    token_ids: list[int]  # the sampled token per row
    # log-prob of each sampled token under the raw model distribution; None when no row asked
    logprobs: list[float] | None
    # per row: its params.logprobs most likely (token id, logprob), most likely first; [] when the
    # row did not ask (or asked for 0); None when no row asked
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class DeviceSample:
    """The chosen tokens of a step, still on the device."""

    token_ids: torch.Tensor  # [num_rows] long
    packed: torch.Tensor  # what the host needs: token_ids, or [num_rows, 2 + 2 * max_top] float64 (_pack)
    wanted: list[int | None]  # each row's params.logprobs
    max_top: int  # top-logprob columns packed per row
    ready: SamplerOutput | None = None  # already on the host (the row-by-row fallback)

    def start_copy(self) -> HostCopy:
        """Start the one transfer to the host; returns at once on CUDA."""
        if self.ready is not None or self.packed.device.type != "cuda":
            return HostCopy(self, self.packed, None)
        host = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
        host.copy_(self.packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostCopy(self, host, event)


@dataclass
class HostCopy:
    sample: DeviceSample
    host: torch.Tensor  # pinned host memory the copy lands in (or the CPU tensor itself)
    event: torch.cuda.Event | None  # recorded after the copy

    def result(self) -> SamplerOutput:
        """Wait for the copy, then unpack it into host lists."""
        s = self.sample
        if s.ready is not None:
            return s.ready
        if self.event is not None:
            self.event.synchronize()
        return _unpack(self.host.tolist(), s.wanted, s.max_top)


class Sampler:
    """Stateless: call once per engine step with the logits of the rows that sample."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.sample(logits, batch).start_copy().result()

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """Choose each row's token on the logits' device; nothing waits for the device."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [num_rows={batch.num_rows}, vocab], "
                             f"got {list(logits.shape)}")
        if batch.num_rows == 0:
            ids = torch.empty(0, dtype=torch.long, device=logits.device)
            return DeviceSample(ids, ids, [], 0)
        # [num_rows, vocab]; aliases the caller's tensor when already float32: nothing in-place
        raw = logits.to(torch.float32)
        penalized = apply_bans(apply_logit_bias(apply_penalties(raw, batch), batch.params), batch.banned)
        if batch.allowed is not None:
            penalized = apply_allowed(penalized.clone() if penalized is raw else penalized, batch.allowed)
        token_ids = penalized.argmax(dim=-1)  # [num_rows]; kept for the greedy rows
        sampled = [i for i, p in enumerate(batch.params) if p.temperature >= GREEDY_TEMPERATURE]
        if sampled:
            rows = to_device(sampled, torch.long, logits.device)
            probs = sampling_probs(penalized[rows], [batch.params[i] for i in sampled])
            token_ids[rows] = draw(probs, [batch.generators[i] for i in sampled])
        return _pack(raw, token_ids, batch.params)

    def sample_isolated(self, logits: torch.Tensor, batch: SamplingBatch
                        ) -> tuple[DeviceSample, dict[int, Exception]]:
        """As sample(), but a row whose sampling raises fails alone: the other rows get the
        tokens a batch without it would give them. Returns the sample (a failed row's entries
        are placeholders: token -1, logprob nan, no top logprobs) and the error of each failed row.

        The batch is tried whole first; only if it raises is each row sampled on its own, after
        the seeded rows' generators are put back where they were, so that their draws are the
        ones they would have made had the batch succeeded."""
        states = [g.get_state() if g is not None else None for g in batch.generators]
        try:
            return self.sample(logits, batch), {}
        except Exception:  # noqa: BLE001 - which row failed is found below, row by row
            pass
        for generator, state in zip(batch.generators, states):
            if generator is not None:
                generator.set_state(state)
        wants_logprobs = any(p.computed_logprobs is not None for p in batch.params)
        out = SamplerOutput([], [] if wants_logprobs else None, [] if wants_logprobs else None)
        errors: dict[int, Exception] = {}
        for i in range(batch.num_rows):
            row = SamplingBatch([batch.params[i]], [batch.prompt_token_ids[i]],
                                [batch.output_token_ids[i]], [batch.generators[i]],
                                [batch.banned[i]] if batch.banned is not None else None,
                                batch.allowed[i:i + 1] if batch.allowed is not None else None)
            try:
                one = self.sample(logits[i:i + 1], row).start_copy().result()
            except Exception as e:  # noqa: BLE001 - this row's own error, reported for it alone
                errors[i] = e
                one = SamplerOutput([-1], [float("nan")], [[]])
            out.token_ids += one.token_ids
            if wants_logprobs:
                out.logprobs += one.logprobs if one.logprobs is not None else [float("nan")]
                out.top_logprobs += one.top_logprobs if one.top_logprobs is not None else [[]]
        ids = to_device(out.token_ids, torch.long, logits.device)
        return DeviceSample(ids, ids, [p.computed_logprobs for p in batch.params], 0, ready=out), errors


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[num_rows, vocab] float32 -> a new tensor with each row's penalties applied.

    repetition (HF): every token in prompt + output: logit / r if logit > 0 else logit * r;
    then frequency and presence (OpenAI): logit -= frequency * count_in_output + presence * [seen].
    Only rows with a non-neutral penalty are touched; ids outside [0, vocab) are ignored.
    """
    rows = [i for i, p in enumerate(batch.params) if _has_penalty(p)]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    params = [batch.params[i] for i in rows]
    coeffs = to_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                        for p in params], torch.float32, device)
    repetition, frequency, presence = (c[:, None] for c in coeffs.unbind(dim=1))  # each [rows, 1]
    output_counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)
    in_output = output_counts > 0  # [rows, vocab]
    prompts = [batch.prompt_token_ids[i] if p.repetition_penalty != 1.0 else []
               for i, p in zip(rows, params)]
    seen = in_output | (_token_counts(prompts, vocab, device) > 0)

    index = to_device(rows, torch.long, device)
    x = logits[index]  # [rows, vocab]
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x = x - frequency * output_counts - presence * in_output
    return logits.index_copy(0, index, x.clamp(-LOGIT_LIMIT, LOGIT_LIMIT))


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[num_rows, vocab] float32 -> each row's logit_bias added to its tokens (a new tensor when
    any row has one; ids outside [0, vocab) are ignored)."""
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias.items()
               if token < logits.shape[1]]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    device = logits.device
    return logits.index_put((to_device(rows, torch.long, device), to_device(tokens, torch.long, device)),
                            to_device(biases, torch.float32, device), accumulate=True)


def apply_bans(logits: torch.Tensor, banned: list[list[int]] | None) -> torch.Tensor:
    """[num_rows, vocab] -> each row's banned ids at -LOGIT_LIMIT (never argmax, probability 0
    once scaled); a new tensor when any row bans something, ids outside [0, vocab) ignored."""
    entries = [(row, t) for row, ids in enumerate(banned or ()) for t in ids if 0 <= t < logits.shape[1]]
    if not entries:
        return logits
    rows, tokens = zip(*entries)
    device = logits.device
    index = (to_device(rows, torch.long, device), to_device(tokens, torch.long, device))
    return logits.index_put(index, torch.full((len(rows),), -LOGIT_LIMIT, device=device))


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[num_rows, vocab], in place: tokens the bitmask disallows to -inf, with xgrammar's kernel
    for the logits' device (the mask crosses to it in one copy)."""
    import xgrammar
    if logits.device.type == "cuda":
        allowed = allowed.pin_memory().to(logits.device, non_blocking=True)
    xgrammar.apply_token_bitmask_inplace(logits, allowed, vocab_size=logits.shape[1])
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[num_rows, vocab] penalized float32 logits of sampled rows -> [num_rows, vocab] probabilities
    after temperature, top-k, top-p and min-p; filtered-out tokens have probability exactly 0."""
    device, vocab = logits.device, logits.shape[1]
    values = to_device([[p.temperature, p.top_p, p.min_p] for p in params], torch.float32, device)
    temperature, top_p, min_p = (v[:, None] for v in values.unbind(dim=1))  # each [rows, 1]
    logits = logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT) / temperature.clamp(GREEDY_TEMPERATURE, MAX_TEMPERATURE)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k) or any(p.top_p < 1.0 for p in params):
        top_k_t = to_device(top_k, torch.long, device)[:, None]
        logits = _mask_top_k_top_p(logits, top_k_t, top_p)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        # After top-k/top-p the kept probabilities are only rescaled, so the ratio to the most
        # likely token (always kept) is the same as it would be before them.
        too_unlikely = probs < min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(too_unlikely, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits outside each row's top_k ([rows, 1], vocab = all) and then outside
    the smallest prefix whose renormalized probability reaches top_p ([rows, 1], 1 = all).

    Ties at the k-th value are all kept; among tied logits the lower id ranks first (stable sort),
    so the kept set is deterministic on every device.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [rows, vocab]
    kth_largest = sorted_logits.gather(1, top_k - 1)  # [rows, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Probability of the strictly better-ranked tokens; a token is needed while it is < top_p.
    # Shifting the cumsum (not subtracting probs from it) keeps the first token at exactly 0.
    mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    not_needed = (mass_before >= top_p) & (top_p < 1.0)  # top_p = 1 keeps all despite rounding
    # The most likely token is always kept (as vLLM does): a top_p that rounds to 0 in float32
    # (1e-50) would otherwise mask every token and leave nothing to draw.
    not_needed[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(not_needed, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[num_rows, vocab] probabilities -> [num_rows] token ids: unseeded rows in one call on the
    default generator, each seeded row alone on its own generator (so its draw is the same in
    any batch)."""
    token_ids = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = to_device(unseeded, torch.long, probs.device)
        token_ids[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            token_ids[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return token_ids


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each id occurs per list (ids outside
    [0, vocab) ignored)."""
    kept = [[t for t in ids if 0 <= t < vocab] for ids in token_lists]
    width = max((len(ids) for ids in kept), default=0)
    counts = torch.zeros(len(kept), vocab + 1, dtype=torch.float32, device=device)
    if width:
        # id `vocab` pads the ragged lists into one column that is dropped below
        padded = to_device([ids + [vocab] * (width - len(ids)) for ids in kept],
                           torch.long, device)  # [len(token_lists), width]
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _pack(raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> DeviceSample:
    """The chosen ids and, for rows that asked, logprobs under log_softmax of the raw logits
    ([num_rows, vocab]), ready to go to the host in one transfer: ids, the chosen token's logprob
    and the top ids and logprobs as columns of one float64 tensor (exact for ids < 2^53 and for
    every float32 logprob); just the ids when no row asked."""
    wanted = [p.computed_logprobs for p in params]
    if all(n is None for n in wanted):
        return DeviceSample(token_ids, token_ids, wanted, 0)
    logprobs = raw.log_softmax(dim=-1)  # [num_rows, vocab]
    columns = [token_ids[:, None].double(), logprobs.gather(1, token_ids[:, None]).double()]
    max_top = min(max(n or 0 for n in wanted), raw.shape[1])
    if max_top:
        top_values, top_ids = logprobs.topk(max_top, dim=-1)  # [num_rows, max_top], most likely first
        columns += [top_ids.double(), top_values.double()]
    return DeviceSample(token_ids, torch.cat(columns, dim=1), wanted, max_top)


def _unpack(host: list, wanted: list[int | None], max_top: int) -> SamplerOutput:
    """SamplerOutput from the host list of what _pack packed."""
    if all(n is None for n in wanted):
        return SamplerOutput(host, None, None)
    ids = [int(row[0]) for row in host]
    chosen = [row[1] for row in host]
    top = [list(zip(map(int, row[2:2 + n]), row[2 + max_top:2 + max_top + n])) if n else []
           for row, n in zip(host, wanted)]
    return SamplerOutput(ids, chosen, top)
