"""Prefix caching in the engine: the same greedy tokens and logprobs with caching on and off
(vattention in both layouts, paged), for prompts sharing nothing, part of a unit, exactly a
unit and many units with an earlier one; the hits that should happen do; salts keep tenants
apart; a tight budget evicts cached units (never one a running request maps) before it
preempts; every count returns to zero."""

from __future__ import annotations

import random

import pytest

from vattention import LLM, SamplingParams

from engine_helpers import hf_greedy, make_checkpoint

NUM_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
BYTES_PER_TOKEN = 2 * 2 * 3 * 16 * 4  # (K, V) x layers x KV heads x head dim x fp32
DESIGNS = [dict(kv_cache="vattention", layout="cross_layer"),
           dict(kv_cache="vattention", layout="per_layer"),
           dict(kv_cache="paged", block_size=8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """3 KV heads of 16 fp32 elements: with 4 KiB pages a unit is 3 pages (cross_layer: 16
    tokens; per_layer: 3 page groups, 64 tokens), so units span several pages."""
    path = tmp_path_factory.mktemp("prefix")
    hf = make_checkpoint("llama", path, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    return path, hf


def make_llm(path, caching: bool, **options) -> LLM:
    defaults = dict(device="cpu", dtype="float32", kv_cache_memory_gib=0.05, page_size=4096,
                    enable_prefix_caching=caching)
    return LLM(model=str(path), **{**defaults, **options})


def prompts_for(unit: int) -> list[list[int]]:
    """A base prompt of 3 units and 5 tokens, then prompts that share with it nothing, part of
    a unit, exactly one unit, many units and a tail, and all of it."""
    rng = random.Random(0)
    base = [rng.randrange(3, 320) for _ in range(3 * unit + 5)]
    tail = [rng.randrange(3, 320) for _ in range(7)]
    return [base,
            [rng.randrange(3, 320) for _ in range(2 * unit)],  # nothing
            base[:unit // 2] + tail,  # part of a unit
            base[:unit] + tail,  # exactly a unit
            base[:2 * unit + 3] + tail,  # many units and part of the next
            list(base)]  # all of it (the last token is always computed)


def expected_hit(design: dict, unit: int) -> list[int]:
    """Tokens each prompt should find cached (after the ones before it ran)."""
    if design["kv_cache"] == "paged":  # full blocks only
        bs = design["block_size"]
        return [0, 0, unit // 2 // bs * bs, unit, (2 * unit + 3) // bs * bs, (3 * unit + 4) // bs * bs]
    return [0, 0, unit // 2, unit, 2 * unit + 3, 3 * unit + 4]  # token-exact


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: d.get("layout", d["kv_cache"]))
def test_caching_changes_no_token_or_logprob(checkpoint, design):
    path, hf = checkpoint
    on, off = make_llm(path, True, **design), make_llm(path, False, **design)
    unit = on.engine.kv.cache_unit
    assert unit == {"cross_layer": 16, "per_layer": 64}.get(design.get("layout"), 8)
    assert off.engine.kv.cache_unit == 0
    hits = expected_hit(design, unit)
    for i, prompt in enumerate(prompts_for(unit)):  # one at a time: each sees the earlier ones cached
        got, = on.generate([prompt], GREEDY)
        want, = off.generate([prompt], GREEDY)
        assert got.num_cached_tokens == hits[i], (i, got.num_cached_tokens, hits[i])
        assert want.num_cached_tokens == 0
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, f"prompt {i}"
        diffs = [abs(a.logprob - b.logprob) for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs)]
        assert max(diffs) < 1e-4, f"prompt {i}: logprob differs by {max(diffs):.2e}"
        if i in (0, 4):
            assert got.outputs[0].token_ids == hf_greedy(hf, prompt, NUM_TOKENS)[0]
    stats = on.engine.stats()
    assert stats.prefix_cache_hits == sum(hits)
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts_for(unit))
    assert stats.num_prompt_tokens_computed == stats.prefix_cache_queries - stats.prefix_cache_hits
    assert stats.kv.num_cached_units > 0
    _assert_all_returned(on)


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: d.get("layout", d["kv_cache"]))
def test_a_batch_sharing_a_prefix_shares_its_memory(checkpoint, design):
    """Requests admitted after the shared prefix is cached map it once: the KV they hold
    physically is far below what they hold logically, and outputs equal caching off."""
    path, _ = checkpoint
    on, off = make_llm(path, True, **design), make_llm(path, False, **design)
    unit = on.engine.kv.cache_unit
    rng = random.Random(1)
    shared = [rng.randrange(3, 320) for _ in range(4 * unit)]
    prompts = [shared + [rng.randrange(3, 320) for _ in range(5)] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    on.generate(prompts[:1], params)  # caches the prefix
    engine = on.engine
    for p in prompts[1:]:
        engine.add_request(p, params)
    engine.step()  # all admitted together on the cached prefix
    usage = engine.kv.usage()
    assert usage.num_requests == 5
    assert usage.bytes_saved == 4 * 4 * unit * BYTES_PER_TOKEN  # 4 units, 5 users, held once
    assert usage.bytes_physical < usage.bytes_used / 2
    assert usage.pages_shared > 0
    while engine.has_unfinished():
        engine.step()
    got = [o.outputs[0].token_ids for o in on.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    assert got == want
    _assert_all_returned(on)


@pytest.mark.parametrize("design", DESIGNS[:1] + DESIGNS[2:], ids=["vattention", "paged"])
def test_salts_keep_prefixes_apart(checkpoint, design):
    path, _ = checkpoint
    llm = make_llm(path, True, **design)
    prompt = list(range(3, 3 + 3 * llm.engine.kv.cache_unit))
    engine = llm.engine
    for salt, want_hit in (("a", False), ("b", False), ("a", True), (None, False), (None, True)):
        rid = engine.add_request(prompt, GREEDY, cache_salt=salt)
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    assert (out.num_cached_tokens > 0) == want_hit, (salt, out.num_cached_tokens)
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request(prompt, GREEDY, cache_salt=7)


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: d.get("layout", d["kv_cache"]))
def test_a_tight_budget_evicts_cached_units_before_it_preempts_and_outputs_stay(checkpoint, design):
    """Many prompts with shared starts through a budget that holds few of them: cached units
    are evicted (never one a running request maps: outputs would differ), and every request
    ends with the tokens caching off gives."""
    path, _ = checkpoint
    unit = make_llm(path, True, **design).engine.kv.cache_unit
    rng = random.Random(2)
    stems = [[rng.randrange(3, 320) for _ in range(2 * unit + 3)] for _ in range(3)]
    prompts = [stems[i % 3][:unit + (i * 5) % (unit + 3)] + [rng.randrange(3, 320) for _ in range(3)]
               for i in range(18)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    per_request = (3 * unit + 20) * BYTES_PER_TOKEN
    budget = dict(kv_cache_memory_gib=2 * per_request / (1 << 30), max_num_seqs=4)
    on, off = make_llm(path, True, **design, **budget), make_llm(path, False, **design, **budget)
    checked = []
    kv = on.engine.kv
    if design["kv_cache"] == "vattention":
        evict = kv._index.evict

        def checked_evict(count, evictable):  # the predicate the manager passes, applied here too
            out = evict(count, evictable)
            checked.extend(e.payload.num_busy_maps for e in out)
            return out
        kv._index.evict = checked_evict
    for start in range(0, len(prompts), 6):  # waves, so later ones find earlier ones cached
        got = [o.outputs[0].token_ids for o in on.generate(prompts[start:start + 6], params)]
        want = [o.outputs[0].token_ids for o in off.generate(prompts[start:start + 6], params)]
        assert got == want
    assert on.engine.kv.usage().counters["prefix_evictions"] > 0
    assert all(n == 0 for n in checked)
    assert on.engine.stats().prefix_cache_hits > 0
    _assert_all_returned(on)


@pytest.mark.parametrize("design", DESIGNS[:2], ids=["cross_layer", "per_layer"])
def test_with_nothing_shared_slots_are_reused_as_they_are(checkpoint, design):
    """Once every slot holds cached units, a request that hits nothing takes over the coldest
    slot's units in place (evicting them) rather than mapping fresh pages: caching on maps
    no more pages from then on, like caching off, and outputs stay caching off's."""
    path, _ = checkpoint
    on, off = (make_llm(path, caching, **design, max_num_seqs=3) for caching in (True, False))
    rng = random.Random(3)
    unit = on.engine.kv.cache_unit
    prompts = [[rng.randrange(3, 320) for _ in range(2 * unit + 1)] for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    slots = on.engine.kv.cache.spec.max_seqs
    mapped = None
    for i, prompt in enumerate(prompts):
        if i == slots:
            mapped = on.engine.kv.usage().counters["pages_mapped_critical"]
        got, = on.generate([prompt], params)
        want, = off.generate([prompt], params)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.num_cached_tokens == 0
    counters = on.engine.kv.usage().counters
    assert counters["pages_mapped_critical"] == mapped, "caching on mapped fresh pages for a reused slot"
    assert counters["prefix_reclaimed"] >= (len(prompts) - slots) * 2
    _assert_all_returned(on)


@pytest.mark.parametrize("design", DESIGNS[:1] + DESIGNS[2:], ids=["vattention", "paged"])
def test_aborting_requests_on_a_shared_prefix_keeps_counts_exact(checkpoint, design):
    path, _ = checkpoint
    llm = make_llm(path, True, **design)
    engine, unit = llm.engine, llm.engine.kv.cache_unit
    shared = list(range(3, 3 + 3 * unit))
    llm.generate([shared + [1]], GREEDY)
    ids = [engine.add_request(shared + [i + 4], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
           for i in range(4)]
    for _ in range(3):
        engine.step()
    assert engine.kv.usage().bytes_saved > 0  # running on the shared prefix
    for rid in ids[:2]:
        engine.abort(rid)
    usage = engine.kv.usage()
    assert usage.num_requests == 2 and usage.bytes_saved > 0
    for rid in ids[2:]:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    _assert_all_returned(llm)


def _assert_all_returned(llm: LLM) -> None:
    """No request holds KV; once the cache lets go every page (block) is free again."""
    kv = llm.engine.kv
    usage = kv.usage()
    assert usage.num_requests == 0 and usage.bytes_used == 0 and usage.bytes_saved == 0
    if hasattr(kv, "cache"):  # units a new owner took over (reclaimed) left the index at once
        entries = list(kv._index._entries.values())
        assert not any(e.payload.dead for e in entries)
        assert sum(map(len, kv._entries_of.values())) == len(entries)
    kv.reset_prefix_cache()
    if hasattr(kv, "cache"):
        kv.cache.trim()
        st = kv.cache.stats()
        assert (st.pages_mapped, st.pages_held, st.num_units, st.num_mappings) == (0, 0, 0, 0), st
        assert st.pages_free == st.pages_total
    else:
        assert kv.usage().pages_free == kv.usage().pages_total
    assert kv.usage().num_cached_units == 0
