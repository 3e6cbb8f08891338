"""Sampler: the batched fast path against a slow per-row float64 reference (penalties, greedy,
top-k/top-p/min-p, sampled distribution, seeded reproducibility, logprobs, mixed batches)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
import torch

from vattention.sampling import Sampler, SamplingBatch, apply_logit_bias, apply_penalties, sampling_probs
from vattention.sampling_params import SamplingParams as SP

from conftest import TEST_DEVICE

DEVICE = torch.device(TEST_DEVICE)
sampler = Sampler()


# ---- the slow reference: one row at a time, pure Python, float64 ----

def ref_penalize(logits: list[float], p: SP, prompt: list[int], output: list[int]) -> list[float]:
    vocab, out = len(logits), list(logits)
    counts = Counter(t for t in output if 0 <= t < vocab)
    for t in set(counts) | {t for t in prompt if 0 <= t < vocab}:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, c in counts.items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    return out


def ref_softmax(logits: list[float], keep: set[int]) -> list[float]:
    top = max(logits[i] for i in keep)
    e = [math.exp(x - top) if i in keep else 0.0 for i, x in enumerate(logits)]
    return [v / sum(e) for v in e]


def ref_probs(logits: list[float], p: SP) -> list[float]:
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    keep = set(range(len(scaled)))
    if 0 < p.top_k < len(scaled):
        keep = {i for i in keep if scaled[i] >= scaled[order[p.top_k - 1]]}
    if p.top_p < 1:
        probs, mass, needed = ref_softmax(scaled, keep), 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= p.top_p:
                break
            needed.add(i)
            mass += probs[i]
        keep = needed
    probs = ref_softmax(scaled, keep)
    return ref_softmax(scaled, {i for i in keep if probs[i] >= p.min_p * max(probs)})


def ref_log_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    log_z = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - log_z for x in logits]


# ---- helpers ----

def batch_of(params: list[SP], prompts=None, outputs=None) -> SamplingBatch:
    """Generators made fresh from each params.seed, as the engine does for a new request."""
    n = len(params)
    gens = [None if p.seed is None else torch.Generator(device=DEVICE).manual_seed(p.seed)
            for p in params]
    return SamplingBatch(params, prompts or [[] for _ in range(n)],
                         outputs or [[] for _ in range(n)], gens)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).float().to(DEVICE)


def short(p: SP) -> str:
    """The fields that differ from the defaults: a readable test id."""
    return ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(SP(), k)) or "defaults"


def assert_close(got: list[float], want: list[float], tol: float, what: str) -> None:
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}\n got  {got}\n want {want}"


# ---- penalties and greedy ----

HAND_LOGITS = [2.0, -1.0, 0.0, 3.0, -2.5, 0.5, 1.25]
HAND_PROMPT = [0, 1, 7, -3, 10**30]  # 7, -3 and 10**30 are outside the vocab: ignored
HAND_OUTPUT = [3, 3, 4, 1, 99, 3]


@pytest.mark.parametrize("params", [
    SP(repetition_penalty=1.5), SP(repetition_penalty=0.7), SP(presence_penalty=0.5),
    SP(presence_penalty=-0.5), SP(frequency_penalty=0.3), SP(frequency_penalty=-1.2),
    SP(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2), SP(),
], ids=short)
def test_each_penalty_matches_the_reference_rule(params):
    neutral = SP()  # a row without penalties in the same batch must come back untouched
    logits = torch.tensor([HAND_LOGITS, HAND_LOGITS], device=DEVICE)
    batch = batch_of([params, neutral], [HAND_PROMPT, HAND_PROMPT], [HAND_OUTPUT, HAND_OUTPUT])
    got = apply_penalties(logits, batch).cpu().tolist()
    assert_close(got[0], ref_penalize(HAND_LOGITS, params, HAND_PROMPT, HAND_OUTPUT), 1e-6,
                 "penalized row")
    assert got[1] == HAND_LOGITS, "a row without penalties changed"


def test_out_of_range_token_ids_are_ignored():
    params = [SP(temperature=0, repetition_penalty=2.0, presence_penalty=1.0,
                 frequency_penalty=1.0)]
    logits = torch.tensor([HAND_LOGITS], device=DEVICE)
    junk = [-1, -(10**40), len(HAND_LOGITS), 10**40]
    clean = apply_penalties(logits, batch_of(params, [[0, 3]], [[3, 5]]))
    noisy = apply_penalties(logits, batch_of(params, [junk + [0, 3]], [[3] + junk + [5]]))
    assert torch.equal(clean, noisy)
    sampler(logits, batch_of(params, [junk], [junk]))


def test_greedy_is_the_argmax_of_the_logits():
    logits = random_logits(16, 500, seed=1)
    out = sampler(logits, batch_of([SP(temperature=0, seed=i % 2 or None) for i in range(16)]))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_is_the_argmax_of_the_penalized_logits():
    rows, vocab = 12, 50
    logits = random_logits(rows, vocab, seed=2)
    params = [SP(temperature=0, repetition_penalty=1 + 0.5 * (i % 3),
                 presence_penalty=0.6 * (i % 2), frequency_penalty=0.4 * (i % 4))
              for i in range(rows)]
    # every row has already produced its top token (a few times), so penalties matter
    rng = random.Random(0)
    outputs = [[int(logits[i].argmax())] * 3 + [rng.randrange(vocab) for _ in range(5)]
               for i in range(rows)]
    prompts = [[rng.randrange(vocab) for _ in range(8)] for _ in range(rows)]
    out = sampler(logits, batch_of(params, prompts, outputs))
    raw = logits.cpu().double().tolist()
    penalized = [ref_penalize(raw[i], params[i], prompts[i], outputs[i]) for i in range(rows)]
    want = [max(range(vocab), key=row.__getitem__) for row in penalized]
    assert out.token_ids == want
    assert out.token_ids != logits.argmax(-1).tolist(), "the penalties never changed the argmax"


def test_temperature_below_the_greedy_threshold_is_greedy():
    logits = random_logits(8, 300, seed=3, scale=1e4)  # huge logits / 1e-9 would overflow to inf
    out = sampler(logits, batch_of([SP(temperature=1e-9, seed=i) for i in range(8)]))
    assert out.token_ids == logits.argmax(-1).tolist()


# ---- top-k / top-p / min-p ----

FILTERS = [SP(top_k=1), SP(top_k=3), SP(top_k=40), SP(top_p=0.3), SP(top_p=0.9), SP(min_p=0.1),
           SP(min_p=0.5, temperature=2.0), SP(temperature=0.6), SP(top_k=6, top_p=0.7),
           SP(top_k=10, top_p=0.95, min_p=0.05, temperature=0.7), SP(top_p=0.5, min_p=0.2), SP()]


def test_filtered_probabilities_match_the_reference():
    logits = random_logits(len(FILTERS), 32, seed=4, scale=2.0)
    got = sampling_probs(logits, FILTERS).cpu().tolist()  # all rows batched in one call
    raw = logits.cpu().double().tolist()
    for i, p in enumerate(FILTERS):
        want = ref_probs(raw[i], p)
        kept = {t for t, v in enumerate(got[i]) if v > 0}
        assert kept == {t for t, v in enumerate(want) if v > 0}, f"{short(p)}: kept set differs"
        assert_close(got[i], want, 1e-6, f"{short(p)}: probabilities")


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.55, {0, 1}), (0.85, {0, 1, 2}),
                                         (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, kept):
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], device=DEVICE).log()
    probs = sampling_probs(logits, [SP(top_p=top_p)])[0].cpu()
    assert {t for t, v in enumerate(probs.tolist()) if v > 0} == kept


def test_sampled_tokens_follow_the_reference_distribution():
    num_samples, vocab = 20_000, 8
    logits = random_logits(1, vocab, seed=5, scale=1.0)
    raw = logits[0].cpu().double().tolist()
    for p in [SP(), SP(top_k=5, temperature=0.8), SP(top_p=0.8), SP(min_p=0.3, temperature=1.5)]:
        with torch.random.fork_rng(devices=[DEVICE] if DEVICE.type == "cuda" else []):
            torch.manual_seed(0)
            out = sampler(logits.expand(num_samples, vocab), batch_of([p] * num_samples))
        want = ref_probs(raw, p)
        counts = Counter(out.token_ids)
        kept = {t for t, v in enumerate(want) if v > 0}
        assert set(counts) <= kept, f"{short(p)}: a filtered-out token was drawn"
        assert_close([counts[t] / num_samples for t in range(vocab)], want, 0.015,
                     f"{short(p)}: empirical frequencies")


def test_seeded_draws_follow_the_reference_distribution():
    num_samples, vocab = 3000, 6
    logits = random_logits(1, vocab, seed=6, scale=1.0)
    p = SP(top_k=4, temperature=0.9)
    params = [SP(top_k=4, temperature=0.9, seed=s) for s in range(num_samples)]
    out = sampler(logits.expand(num_samples, vocab), batch_of(params))
    counts = Counter(out.token_ids)
    assert_close([counts[t] / num_samples for t in range(vocab)],
                 ref_probs(logits[0].cpu().double().tolist(), p), 0.04, "seeded frequencies")


# ---- seeds ----

def test_seeded_rows_are_reproducible_across_calls_and_batch_order():
    vocab = 1000
    logits = random_logits(8, vocab, seed=7, scale=0.5)  # flat: a different draw gives another id
    params = [SP(seed=100 + i, top_k=(0, 200)[i % 2], top_p=(1.0, 0.9)[i % 3 == 0],
                 presence_penalty=0.5 * (i % 2)) for i in range(8)]
    outputs = [[i, i + 1] for i in range(8)]
    alone = [sampler(logits[i:i + 1], batch_of([params[i]], None, [outputs[i]])).token_ids[0]
             for i in range(8)]
    together = sampler(logits, batch_of(params, None, outputs)).token_ids
    assert together == alone
    again = sampler(logits, batch_of(params, None, outputs)).token_ids
    assert again == alone, "a second call with the same seeds differs"
    # reversed, with unseeded rows interleaved
    order = list(reversed(range(8)))
    mixed_logits = torch.cat([torch.cat([logits[i:i + 1], logits[i:i + 1]]) for i in order])
    mixed_params = [q for i in order for q in (params[i], SP())]
    mixed_outputs = [o for i in order for o in (outputs[i], [])]
    mixed = sampler(mixed_logits, batch_of(mixed_params, None, mixed_outputs)).token_ids
    assert mixed[0::2] == [alone[i] for i in order]
    assert len(set(alone)) > 1, "every seed drew the same token: the seed is not being used"


# ---- logprobs ----

def test_logprobs_and_top_logprobs_are_log_softmax_of_the_raw_logits():
    vocab = 64
    logits = random_logits(4, vocab, seed=8)
    params = [SP(logprobs=5, temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0, seed=1),
              SP(logprobs=0, seed=2), SP(), SP(logprobs=20, temperature=0, frequency_penalty=1.0)]
    outputs = [list(range(10)), [], [], [3, 3, 3]]
    out = sampler(logits, batch_of(params, [list(range(20))] * 4, outputs))
    for i, p in enumerate(params):
        ref = ref_log_softmax(logits[i].cpu().double().tolist())
        assert_close([out.logprobs[i]], [ref[out.token_ids[i]]], 1e-5, f"row {i} sampled logprob")
        want_ids = sorted(range(vocab), key=lambda t: -ref[t])[:p.logprobs or 0]
        assert [t for t, _ in out.top_logprobs[i]] == want_ids, f"row {i}: top ids or their order"
        assert_close([v for _, v in out.top_logprobs[i]] or [0.0],
                     [ref[t] for t in want_ids] or [0.0], 1e-5, f"row {i} top logprobs")


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host (each a device sync on a GPU)."""

    READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS or (name == "to" and "cpu" in map(str, [*args[1:], *(kwargs or {}).values()])):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("logprobs", [None, 0, 3], ids=["no-logprobs", "sampled-logprob", "top-3"])
def test_one_host_read_per_step_whatever_the_rows_ask(logprobs):
    """Greedy, top-k, top-p, min-p and seeded rows with penalties and logit bias in one batch:
    the ids (and logprobs, when asked) leave the device in a single read, and they are the
    values a separate read of each would give."""
    params = [SP(temperature=0, logprobs=logprobs), SP(temperature=0.7, top_k=5, logprobs=logprobs),
              SP(top_p=0.9, repetition_penalty=1.3, logprobs=logprobs), SP(min_p=0.1, seed=4),
              SP(temperature=0.5, top_k=8, top_p=0.5, logit_bias={3: 2.0}, frequency_penalty=0.4)]
    logits = random_logits(len(params), 50, seed=21)
    batch = batch_of(params, [[1, 2, 3]] * len(params), [[4, 4], [], [7], [], [3]])
    with HostReads() as mode:
        out = Sampler()(logits, batch)
    assert mode.reads == ["tolist"], f"host reads in one step: {mode.reads}"
    logprobs_all = logits.float().log_softmax(-1).cpu()
    if logprobs is None:
        assert out.logprobs is None and out.top_logprobs is None
        return
    for i, (token, p) in enumerate(zip(out.token_ids, params)):
        assert isinstance(token, int) and out.logprobs[i] == logprobs_all[i, token].item()  # exact
        top = logprobs_all[i].topk(p.logprobs) if p.logprobs else None
        want = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        assert out.top_logprobs[i] == want, f"row {i}"


# ---- mixed batches and inputs ----

MIXED = [SP(temperature=0), SP(temperature=0, repetition_penalty=1.4, frequency_penalty=0.5),
         SP(seed=11, top_k=50),
         SP(seed=12, top_p=0.8, min_p=0.05, presence_penalty=0.7, logprobs=3),
         SP(seed=13, temperature=1.3, logprobs=0), SP(temperature=1e-7, logprobs=2),
         SP(top_k=1, temperature=0.8, repetition_penalty=2.0)]  # unseeded but deterministic


def test_mixed_batch_gives_each_row_what_it_gets_alone():
    n, vocab = len(MIXED), 400
    logits = random_logits(n, vocab, seed=9, scale=1.0)
    prompts = [[(7 * i + j) % vocab for j in range(30)] for i in range(n)]
    outputs = [[(13 * i + j) % vocab for j in range(12)] for i in range(n)]
    alone = [sampler(logits[i:i + 1], batch_of([MIXED[i]], [prompts[i]], [outputs[i]]))
             for i in range(n)]
    for order in (list(range(n)), list(reversed(range(n)))):
        out = sampler(logits[order], batch_of([MIXED[i] for i in order],
                                              [prompts[i] for i in order],
                                              [outputs[i] for i in order]))
        for row, i in enumerate(order):
            a = alone[i]
            assert out.token_ids[row] == a.token_ids[0], f"row {i} {short(MIXED[i])}: token"
            want_lp = a.logprobs[0] if a.logprobs else None
            got_lp = out.logprobs[row] if MIXED[i].logprobs is not None else None
            assert got_lp == pytest.approx(want_lp, abs=1e-6), f"row {i}: logprob"
            want_top = a.top_logprobs[0] if a.top_logprobs else []
            assert [t for t, _ in out.top_logprobs[row]] == [t for t, _ in want_top], f"row {i}"


def test_input_logits_are_not_modified():
    logits = random_logits(3, 40, seed=10)
    before = logits.clone()
    params = [SP(temperature=0, repetition_penalty=1.5), SP(presence_penalty=1.0, top_k=5, seed=1),
              SP(frequency_penalty=2.0, min_p=0.1, logprobs=2)]
    sampler(logits, batch_of(params, [[1, 2]] * 3, [[3, 4]] * 3))
    assert torch.equal(logits, before)


def test_low_precision_logits_are_computed_in_float32():
    logits = random_logits(4, 100, seed=11).to(torch.bfloat16)
    out = sampler(logits, batch_of([SP(temperature=0, logprobs=3)] * 4))
    assert out.token_ids == logits.float().argmax(-1).tolist()
    ref = [ref_log_softmax(row) for row in logits.cpu().double().tolist()]
    assert_close(out.logprobs, [ref[i][t] for i, t in enumerate(out.token_ids)], 1e-5, "logprobs")


def test_malformed_batches_are_rejected_with_a_message():
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingBatch([SP(), SP()], [[]], [[], []], [None, None])
    with pytest.raises(ValueError, match="logits must be"):
        sampler(random_logits(3, 10, seed=0), batch_of([SP(), SP()]))
    assert sampler(torch.empty(0, 10, device=DEVICE), batch_of([])).token_ids == []


# ---- logit_bias ----

def test_logit_bias_steers_greedy_rows_and_leaves_logprobs_raw():
    """+100 on a token makes greedy pick it, -100 on the argmax makes greedy pick the runner-up;
    the reported logprob is still the raw model's."""
    logits = torch.tensor([HAND_LOGITS, HAND_LOGITS], device=DEVICE)
    out = sampler(logits, batch_of([SP(temperature=0, logit_bias={4: 100.0}, logprobs=0),
                                    SP(temperature=0, logit_bias={3: -100.0}, logprobs=0)]))
    assert out.token_ids == [4, 0]
    raw = ref_log_softmax(HAND_LOGITS)
    assert_close(out.logprobs, [raw[4], raw[0]], 1e-5, "logprobs")


def test_logit_bias_then_filters_match_the_reference():
    """Sampled rows: the probabilities are the reference's over penalized + biased logits."""
    params = [SP(logit_bias={1: 2.5, 5: -3.0}, top_k=4, presence_penalty=0.5),
              SP(logit_bias={0: -100.0}, top_p=0.7, temperature=0.8), SP(logit_bias={31: 1.0, 99: 5.0})]
    outputs = [[1, 1, 2], [0], []]
    logits = random_logits(len(params), 32, seed=11, scale=2.0)
    batch = batch_of(params, outputs=outputs)
    got = sampling_probs(apply_logit_bias(apply_penalties(logits, batch), params), params).cpu().tolist()
    raw = logits.cpu().double().tolist()
    for i, p in enumerate(params):
        biased = ref_penalize(raw[i], p, [], outputs[i])
        for token, bias in p.logit_bias.items():
            if token < len(biased):  # ids past the vocabulary are ignored
                biased[token] += bias
        assert_close(got[i], ref_probs(biased, p), 1e-6, f"{short(p)}: probabilities")


@pytest.mark.parametrize("bias, message", [({-1: 1.0}, "non-negative token ids"),
                                           ({3: 101.0}, "in [-100, 100]")])
def test_bad_logit_bias_is_refused(bias, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SP(logit_bias=bias)


def test_banned_ids_are_never_chosen_and_the_rest_keep_their_distribution():
    """min_tokens' bans: a row's banned ids get probability 0 (greedy never picks them, even as
    the argmax); the other tokens keep the reference distribution renormalized without them."""
    logits = random_logits(3, 12, seed=4)
    logits[:, 5] = 50.0  # the banned id would win everywhere
    params = [SP(temperature=0), SP(temperature=0.8, top_p=0.9), SP(temperature=0)]
    batch = SamplingBatch(params, [[]] * 3, [[]] * 3, [None] * 3, banned=[[5], [5, 7], []])
    ids = sampler(logits, batch).token_ids
    row0 = logits[0].clone()
    row0[5] = -float("inf")
    assert ids[0] == int(row0.argmax()) and ids[2] == 5  # row 2 bans nothing
    from vattention.sampling.sampler import apply_bans
    banned = apply_bans(logits.float(), batch.banned)
    probs = sampling_probs(banned[1:2], params[1:2])[0].tolist()
    assert probs[5] == 0 and probs[7] == 0
    want = ref_probs([x if i not in (5, 7) else -1e30 for i, x in enumerate(logits[1].double().tolist())], params[1])
    assert_close(probs, want, 1e-5, "banned row")
    for _ in range(50):
        assert sampler(logits, batch).token_ids[1] not in (5, 7)


def test_min_tokens_must_fit_max_tokens():
    assert SP(min_tokens=4, max_tokens=4).min_tokens == 4
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(ValueError, match="min_tokens"):
            SP(min_tokens=bad, max_tokens=4)
