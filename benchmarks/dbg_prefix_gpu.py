import sys, tempfile, pathlib, torch
sys.path.insert(0, "tests")
from engine_helpers import make_checkpoint
from vattention import LLM, SamplingParams
CHECKPOINT = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, initializer_range=0.1)
p = pathlib.Path(tempfile.mkdtemp()); make_checkpoint("llama", p, **CHECKPOINT)
g = torch.Generator().manual_seed(0)
shared = torch.randint(3, 2048, (600,), generator=g).tolist()
prompts = [shared + torch.randint(3, 2048, (n,), generator=g).tolist() for n in (5, 40, 300, 1)]
prompts += [shared[:37] + [9, 9, 9], shared[:300]]
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
for opts in (dict(), dict(enforce_eager=True), dict(enforce_eager=True, async_scheduling=False)):
    llm = LLM(model=str(p), device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0,
              max_num_batched_tokens=512, **opts)
    kv = llm.engine.kv
    first = llm.generate(prompts[:1], params)
    print(opts, "unit", kv.cache_unit, "index", len(kv._index), [(e.payload.index, e.payload.complete, e.payload.dead, sorted(e.payload.slots), e.payload.holds) for e in kv._index._entries.values()])
    rest = llm.generate(prompts[1:], params)
    print([o.num_cached_tokens for o in first + rest], [o.outputs[0].error for o in rest])
    print("index", len(kv._index), kv.usage().counters.get("prefix_evictions"))
    llm.close()
