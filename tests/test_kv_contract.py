"""The KVManager contract (kv/base.py), checked the same way for every design: vattention (host
driver, both layouts), paged and static, on CPU.

Each test names the property; a design that breaks one fails here whatever its internals."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from vattention.attention import write_kv
from vattention.attention.backends import sequence_kv
from vattention.kv import KVManager, make_kv_manager
from vattention.memory import KVCacheSpec

PAGE = 64 << 10  # small host pages: a tiny spec still spans several page groups
BUDGET = 12 * PAGE  # 3072 tokens of SPEC; cross_layer: 12 groups of 256 tokens, paged: 192 blocks of 16
BLOCK = 16
CPU = torch.device("cpu")
# 2 layers x K/V x 2 heads x 8 x fp32 = 256 bytes a token; static reserves 3 requests of 1024
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, max_seqs=8,
                   max_seq_len=1024)
DESIGNS = ["vattention", "vattention-per-layer", "paged", "static"]


def make(design: str, max_seq_len: int = SPEC.max_seq_len) -> KVManager:
    spec = dataclasses.replace(SPEC, max_seq_len=max_seq_len,
                               layout="per_layer" if design.endswith("per-layer") else "cross_layer")
    kind = design.split("-")[0]
    # no eager cushion: nothing maps in the background, so usage() is exact after every call
    return make_kv_manager(kind, spec, CPU, BUDGET, PAGE, block_size=BLOCK)


@pytest.fixture(params=DESIGNS)
def design(request) -> str:
    return request.param


@pytest.fixture
def kv(design):
    manager = make(design)
    yield manager
    manager.close()


def token_values(tag: int, positions: range, layer: int, kv: int) -> torch.Tensor:
    """[len(positions), H_kv, D]: one value per (request tag, token position, layer, K/V), exact in fp32."""
    pos = torch.tensor(list(positions), dtype=torch.float32)
    value = ((tag * 8192 + pos) * SPEC.num_layers + layer) * 2 + kv
    return value[:, None, None].expand(-1, SPEC.num_kv_heads, SPEC.head_dim)


def write(kv: KVManager, tags: dict[str, int], steps: dict[str, tuple[int, int]]):
    """One step: request r adds tokens [start, end) = steps[r]; its K/V go through
    meta.kv_write_index into every layer. Returns the step's metadata."""
    ids = list(steps)
    query_lens = [end - start for start, end in steps.values()]
    seq_lens = [end for _, end in steps.values()]
    meta = kv.build_metadata(ids, query_lens, seq_lens, CPU)
    for layer, cache in enumerate(kv.layer_caches()):
        k, v = (torch.cat([token_values(tags[r], range(*steps[r]), layer, t) for r in ids]) for t in (0, 1))
        write_kv(cache, k, v, meta)
    return meta


def check(kv: KVManager, tags: dict[str, int], lengths: dict[str, int]) -> None:
    """Every request reads back, per sequence and in order, the values written for its tokens."""
    ids = list(lengths)
    meta = kv.build_metadata(ids, [1] * len(ids), [lengths[r] for r in ids], CPU)
    for layer, cache in enumerate(kv.layer_caches()):
        for i, r in enumerate(ids):
            for t, got in enumerate(sequence_kv(cache, meta, i)):
                want = token_values(tags[r], range(lengths[r]), layer, t)
                bad = (got != want).any(-1).any(-1).nonzero().flatten()
                assert bad.numel() == 0, (f"request {r} layer {layer} {'KV'[t]}: {bad.numel()} tokens wrong, "
                                          f"first at position {bad[0].item()}: {got[bad[0], 0, 0].item()} "
                                          f"!= {want[bad[0], 0, 0].item()}")


def fill(kv: KVManager, num_tokens: int, prefix: str = "r") -> list[str]:
    """Admit requests of num_tokens until one is refused; returns those admitted."""
    admitted = []
    while kv.allocate(f"{prefix}{len(admitted)}", num_tokens):
        admitted.append(f"{prefix}{len(admitted)}")
        assert len(admitted) <= BUDGET // (num_tokens * SPEC.bytes_per_token), "admitted past the budget"
    return admitted


def assert_consistent(kv: KVManager, lengths: dict[str, int]) -> None:
    """usage() equals a recount of what the requests hold."""
    u = kv.usage()
    assert u.bytes_used == sum(lengths.values()) * SPEC.bytes_per_token, (u, lengths)
    assert u.num_requests == len(lengths), u
    assert u.pages_mapped + u.pages_free == u.pages_total, u
    assert u.bytes_committed == u.pages_mapped * u.page_bytes, u
    assert u.bytes_capacity == u.pages_total * u.page_bytes <= BUDGET, u
    assert u.bytes_used <= u.bytes_committed, u


def test_every_design_is_a_kv_manager(kv):
    """Each manager has the protocol's shape, and its layer caches are of the kind it declares."""
    assert isinstance(kv, KVManager)
    caches = kv.layer_caches()
    assert len(caches) == SPEC.num_layers
    if kv.kind == "paged":
        assert all(c.k_blocks is not None and c.v_blocks is not None for c in caches)
    else:
        assert kv.kind == "contiguous" and all(c.k is not None and c.v is not None for c in caches)


def test_an_object_missing_part_of_the_protocol_is_no_kv_manager(kv):
    class NoUsage:  # everything but usage()
        kind, max_tokens_per_request = kv.kind, kv.max_tokens_per_request
        allocate, free = kv.allocate, kv.free
        build_metadata, layer_caches, padding_row, close = (kv.build_metadata, kv.layer_caches,
                                                            kv.padding_row, kv.close)

    assert not isinstance(NoUsage(), KVManager)


def test_rows_hold_each_requests_tokens_in_order_across_growth(kv):
    """Chunked prefill, whole prompts and decode steps, requests growing between steps: what each
    step writes through kv_write_index, every request reads back in order, untouched by the others."""
    tags = {"a": 1, "b": 2, "c": 3}
    lengths: dict[str, int] = {}
    decodes = [{"a": (250 + i, 251 + i), "b": (41 + i, 42 + i), "c": (300 + i, 301 + i)} for i in range(3)]
    for step in ({"a": (0, 100), "b": (0, 40)},  # a's first chunk, b's whole prompt
                 {"a": (100, 250), "b": (40, 41), "c": (0, 300)},  # a continues, b decodes, c arrives
                 *decodes):
        for r, (_, end) in step.items():
            assert kv.allocate(r, end), f"{r} could not grow to {end} tokens"
            lengths[r] = end
        write(kv, tags, step)
        check(kv, tags, lengths)
        assert_consistent(kv, lengths)


def test_refused_allocate_changes_nothing(design, kv):
    """When memory is short allocate returns False: usage, the refused request and every other
    request's data are as they were."""
    num_tokens = 600
    admitted = fill(kv, num_tokens)
    assert len(admitted) >= 2, "the budget should hold a few requests"
    tags = {r: i + 1 for i, r in enumerate(admitted)}
    lengths = dict.fromkeys(admitted, num_tokens)
    write(kv, tags, {r: (0, num_tokens) for r in admitted})
    before = kv.usage()
    for _ in range(2 * SPEC.max_seqs):  # more refusals than slots: a leak on refusal would show below
        assert not kv.allocate("refused", num_tokens)
        assert kv.usage() == before
    kv.free("refused")  # holds nothing: a no-op
    assert kv.usage() == before
    for r in admitted:  # growing to the most a request may hold: refused, or it really grew
        before = kv.usage()
        if kv.allocate(r, kv.max_tokens_per_request):
            lengths[r] = kv.max_tokens_per_request
        else:
            assert kv.usage() == before, f"a refused growth of {r} changed usage"
        assert_consistent(kv, lengths)
    check(kv, tags, dict.fromkeys(admitted, num_tokens))
    for r in admitted:
        kv.free(r)
    fresh = make(design)  # small requests run into every limit: memory, slots
    assert len(fill(kv, 100, prefix="small")) == len(fill(fresh, 100)), "refusals left memory or slots taken"
    fresh.close()


def test_free_returns_everything(design, kv):
    """After freeing every request nothing is used, and the same requests fit again."""
    first = fill(kv, 500)
    assert first and len(first) < SPEC.max_seqs, "memory, not the slot count, should refuse"
    for r in first:
        kv.free(r)
    assert_consistent(kv, {})
    u = kv.usage()
    if design in ("paged", "static"):  # vattention keeps freed pages mapped for reuse
        assert u.pages_mapped == 0 and u.pages_free == u.pages_total, u
    again = fill(kv, 500, prefix="again")
    assert len(again) == len(first)
    assert_consistent(kv, dict.fromkeys(again, 500))


def test_padding_row_is_stable_and_never_a_requests(kv):
    """padding_row() is the same row on every call, holds no request's tokens, and no request
    (the budget filled with requests of the most tokens one may hold) is handed that row."""
    row = kv.padding_row()
    assert kv.padding_row() == row
    assert_consistent(kv, {})
    n = kv.max_tokens_per_request
    admitted = fill(kv, n)
    assert len(admitted) >= 2
    assert kv.padding_row() == row
    tags = {r: i + 1 for i, r in enumerate(admitted)}
    meta = write(kv, tags, {r: (0, n) for r in admitted})
    rows = meta.kv_write_index.tolist()  # every token of every request
    assert row not in rows
    assert len(set(rows)) == len(rows), "two tokens share a row"
    check(kv, tags, dict.fromkeys(admitted, n))


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding-reserved"])
def test_max_tokens_per_request_is_honoured(design, padding):
    """One request can hold max_tokens_per_request tokens (never more than max_seq_len), with the
    padding row reserved or not; where the budget is the limit, one token more is refused."""
    budget_limited = design != "static"  # static reserves max_seq_len per request: never the budget's limit
    kv = make(design, max_seq_len=4096 if budget_limited else SPEC.max_seq_len)
    if padding:
        kv.padding_row()
    n = kv.max_tokens_per_request
    assert 0 < n <= (4096 if budget_limited else SPEC.max_seq_len)
    assert kv.allocate("big", n), f"a request of max_tokens_per_request={n} was refused"
    write(kv, {"big": 1}, {"big": (0, n)})
    check(kv, {"big": 1}, {"big": n})
    assert_consistent(kv, {"big": n})
    if budget_limited:
        assert n < 4096, "this budget, not max_seq_len, should be the limit"
        assert not kv.allocate("big", n + 1)
        assert_consistent(kv, {"big": n})
    kv.close()


@pytest.mark.parametrize("seed", range(3))
def test_usage_equals_a_recount_after_every_call(design, kv, seed):
    """Random admissions, growth and frees: after each call usage() equals a recount from what
    the calls returned, and paged/static units held equal what the requests need exactly."""
    rng = random.Random(seed)
    lengths: dict[str, int] = {}
    for i in range(300):
        held = sorted(lengths)
        op = rng.random()
        if held and op < 0.3:
            r = rng.choice(held)
            kv.free(r)
            del lengths[r]
        elif held and op < 0.7:
            r = rng.choice(held)
            n = rng.randint(lengths[r], min(lengths[r] + 300, SPEC.max_seq_len))
            if kv.allocate(r, n):
                lengths[r] = n
        elif kv.allocate(f"r{i}", n := rng.randint(1, SPEC.max_seq_len)):
            lengths[f"r{i}"] = n
        assert_consistent(kv, lengths)
        need = {"paged": sum(-(-n // BLOCK) for n in lengths.values()), "static": len(lengths)}.get(design)
        if need is not None:
            assert kv.usage().pages_mapped == need, (kv.usage(), lengths)
