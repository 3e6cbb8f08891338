"""CUDA-graph decode steps (engine/graphs.py) everywhere but the capture itself: on CPU the
static-buffer path runs eagerly (capture=False) and must give the eager engine's outputs as
batches shrink and grow across graph sizes, for every KV design; the padded decode attention it
relies on equals the float64 reference; padding rows are reserved once and owned by no request.
The captured graphs themselves are tested on the GPU (tests/gpu/test_decode_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.attention import AttentionMetadata, LayerKV, build_contiguous_metadata, build_paged_metadata
from vattention.attention.backends import ReferenceBackend, padded_decode
from vattention.engine.graphs import DecodeGraphs, graph_batch_sizes, use_graphs

from engine_helpers import make_checkpoint

# Different output lengths: the decode batch shrinks 6 -> 1 as requests finish, crossing sizes.
PROMPTS = [[5, 9, 13], list(range(20, 61)), [7], list(range(100, 117)), [3, 4], list(range(200, 230))]
MAX_TOKENS = [3, 20, 9, 14, 6, 25]


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35


def test_graphs_are_used_on_one_gpu_with_flash_or_triton_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_graphs(False, cuda, "flash", 1) and use_graphs(False, cuda, "triton", 1)
    assert not use_graphs(True, cuda, "flash", 1)  # enforce_eager
    assert not use_graphs(False, cpu, "sdpa", 1) and not use_graphs(False, cuda, "flex", 1)
    assert not use_graphs(False, cuda, "sdpa", 1)  # its long decode steps loop over host lists
    assert not use_graphs(False, cuda, "flash", 2)  # tensor parallel ranks run eagerly


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path)
    return path


def _run(path, graphs: int | None, graphs_cls=DecodeGraphs, **options):
    """Greedy outputs (tokens and logprobs); graphs = the largest graph batch, None = eager."""
    llm = LLM(model=str(path), device="cpu", dtype="float32", kv_cache_memory_gib=0.05,
              page_size=64 << 10, **options)
    engine = llm.engine
    if graphs is not None:
        engine.runner.graphs = graphs_cls(engine.model, engine.kv, engine.runner.backend, engine.device,
                                            graphs, engine.max_model_len, capture=False)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=0) for m in MAX_TOKENS]
    outs = llm.generate(PROMPTS, params)
    replays = engine.runner.graphs.num_replays if graphs is not None else 0
    usage = engine.kv.usage()
    llm.close()
    return [o.outputs[0].token_ids for o in outs], [[lp.logprob for lp in o.outputs[0].logprobs]
                                                      for o in outs], replays, usage


@pytest.mark.parametrize("options", [
    dict(kv_cache="vattention"),
    dict(kv_cache="vattention", layout="per_layer"),
    dict(kv_cache="paged", block_size=4),
    dict(kv_cache="static", max_num_seqs=6),
], ids=["vattention", "per-layer", "paged-4", "static"])
@pytest.mark.parametrize("graphs", [6, 3], ids=["all-in-graphs", "big-batches-eager"])
def test_graph_path_gives_the_eager_outputs(checkpoint, options, graphs):
    """Decode steps through the static buffers (padded to 1/2/4/6 rows, or up to 3 with larger
    batches eager) give the eager engine's greedy tokens, logprobs within 1e-5."""
    options = dict(max_model_len=128, **options)
    want_tokens, want_lps, _, _ = _run(checkpoint, None, **options)
    tokens, lps, replays, usage = _run(checkpoint, graphs, **options)
    assert tokens == want_tokens
    worst = max(abs(a - b) for got, want in zip(lps, want_lps) for a, b in zip(got, want))
    assert worst < 1e-5, f"logprobs differ by {worst:.2e}"
    # all-in-graphs: nearly every decode step went through the graph path; otherwise the steps of
    # up to 3 sequences (the last 11+ steps: 25 tokens vs the next-longest 20, 14, ...)
    assert replays >= (max(MAX_TOKENS) - 2 if graphs == 6 else 11), replays
    assert usage.num_requests == 0  # the padding row is no request's


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_rows_a_larger_step_left_are_pointed_at_the_padding_row(checkpoint, kv_cache):
    """After a step of 4 sequences, a step of 3 (padded to 4) sends row 3 to the padding row:
    left as it was, it would write the 4th request's old position, in a slot or block that a new
    request may own by then."""
    llm = LLM(model=str(checkpoint), device="cpu", dtype="float32", kv_cache_memory_gib=0.05,
              page_size=64 << 10, kv_cache=kv_cache, max_model_len=128, block_size=4)
    engine = llm.engine
    kv = engine.kv
    graphs = DecodeGraphs(engine.model, kv, engine.runner.backend, engine.device, 6, engine.max_model_len,
                          capture=False)
    ids = [f"r{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        assert kv.allocate(rid, 10 + i)
    cpu = torch.device("cpu")
    for n in (4, 3):
        meta = kv.build_metadata(ids[:n], [1] * n, [10 + i for i in range(n)], cpu)
        hidden = graphs.run(torch.arange(n), torch.tensor([9 + i for i in range(n)]), meta)
        assert hidden.shape == (n, engine.model.config.hidden_size)
        assert graphs.write_rows[:n].tolist() == meta.kv_write_index.tolist()
    assert graphs.write_rows[3] == graphs.pad_row and graphs.seq_lens[3] == 1
    if kv_cache == "paged":
        assert graphs.block_tables[3, 0] == graphs.pad_row // 4
    else:
        assert graphs.kv_starts[3] == graphs.pad_row
    assert graphs.num_replays == 2
    llm.close()


def _random_cache(num_rows: int, heads: int, dim: int) -> LayerKV:
    g = torch.Generator().manual_seed(0)
    return LayerKV(torch.randn(num_rows, heads, dim, generator=g), torch.randn(num_rows, heads, dim, generator=g))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_padded_decode_equals_the_reference(paged):
    """padded_decode over sequences of 1..90 tokens, padded to 128 keys (GQA 3), equals the
    float64 reference attention within 1e-5."""
    heads_kv, group, dim, block = 2, 3, 16, 8
    seq_lens = [1, 7, 8, 9, 64, 90]
    q = torch.randn(len(seq_lens), heads_kv * group, dim, generator=torch.Generator().manual_seed(1))
    if paged:
        perm = torch.randperm(80, generator=torch.Generator().manual_seed(2)).tolist()
        tables, used = [], 0
        for n in seq_lens:
            tables.append(perm[used:used + -(-n // block)])
            used += len(tables[-1])
        meta = build_paged_metadata(tables, block, [1] * len(seq_lens), seq_lens, torch.device("cpu"))
        cache = _random_cache(80 * block, heads_kv, dim)
        cache.k_blocks = cache.k_flat.view(80, block, heads_kv, dim)
        cache.v_blocks = cache.v_flat.view(80, block, heads_kv, dim)
    else:
        starts = [i * 100 for i in range(len(seq_lens))]
        meta = build_contiguous_metadata(starts, [1] * len(seq_lens), seq_lens, torch.device("cpu"))
        cache = _random_cache(100 * len(seq_lens), heads_kv, dim)
    padded = AttentionMetadata(**{**vars(meta), "max_seq_len": 128})
    got = padded_decode(q, cache, padded, 0.25)
    k_new = cache.k_flat[meta.kv_write_index]  # the step's K/V, already in the cache
    v_new = cache.v_flat[meta.kv_write_index]
    want = ReferenceBackend(0.25).forward(q, k_new, v_new, cache, meta)
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"padded_decode differs from the reference by {err:.2e}"


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_padding_row_is_reserved_once_and_owned_by_no_request(checkpoint, kv_cache):
    """The padding row stays the same, and no request's token is ever written or read there."""
    llm = LLM(model=str(checkpoint), device="cpu", dtype="float32", kv_cache_memory_gib=0.05,
              page_size=64 << 10, kv_cache=kv_cache, max_num_seqs=4, max_model_len=128, block_size=4)
    kv = llm.engine.kv
    row = kv.padding_row()
    assert kv.padding_row() == row
    seen = []
    build = kv.build_metadata

    def spy(*args):
        meta = build(*args)
        # copied now: the metadata's arrays live in the runner's staging buffers, which the
        # next step overwrites
        seen.append((meta, meta.kv_write_index.tolist()))
        return meta

    kv.build_metadata = spy
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs) and len(seen) >= 30
    for meta, write_rows in seen:
        assert row not in write_rows
        if meta.block_tables_host is not None:
            assert all(row // 4 not in table for table in meta.block_tables_host)
        else:  # each sequence's rows [start, start + len) miss it
            assert all(not s <= row < s + n for s, n in zip(meta.starts, meta.seq_lens))
    assert kv.usage().num_requests == 0
    llm.close()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_graph_path_survives_preemption(checkpoint, kv_cache):
    """A budget too small for all requests (48 x 4 KiB) preempts mid-decode; with the graph path
    (padding row reserved first, out of that budget) greedy outputs still equal a roomy eager run."""
    prompts = [list(range(10 + i, 50 + i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    roomy = LLM(model=str(checkpoint), device="cpu", dtype="float32", kv_cache_memory_gib=0.05,
                page_size=64 << 10, max_model_len=256)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    roomy.close()
    tight = LLM(model=str(checkpoint), device="cpu", dtype="float32", kv_cache=kv_cache, page_size=4096,
                block_size=8, kv_cache_memory_gib=48 * 4096 / (1 << 30), max_model_len=256)
    engine = tight.engine
    engine.runner.graphs = DecodeGraphs(engine.model, engine.kv, engine.runner.backend, engine.device, 4,
                                        engine.max_model_len, capture=False)
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert preempted and engine.runner.graphs.num_replays > 50
    tight.close()
