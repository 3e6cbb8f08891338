"""What every tensor-parallel rank builds: its shard of the model, its KV manager, its runner.
Rank 0's LLMEngine (engine.py) and the other ranks' worker loop (tp.py) both start here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import make_backend
from ..config import EngineConfig
from ..distributed import TPGroup
from ..kv import make_kv_manager
from ..memory import KVCacheSpec
from ..models.loader import load_model
from ..models.sharding import Shard
from ..sampling import Sampler
from .graphs import DecodeGraphs, use_graphs
from .runner import ModelRunner

GIB = 1 << 30


@dataclass
class RankState:
    """What every tensor-parallel rank holds (all of it when there is one rank)."""

    device: torch.device
    dtype: torch.dtype
    model_path: str
    model: torch.nn.Module  # this rank's shard
    max_model_len: int  # context length: the model's (LongRoPE: its original), capped by the config
    runner: ModelRunner  # with this rank's KV manager (runner.kv) and attention backend


def build_rank(config: EngineConfig, group: TPGroup | None) -> RankState:
    """Load this rank's shard of the model and size its KV cache. Ranks agree on one KV budget
    (the smallest), so that the same requests fit on every rank."""
    mc, cc, sc = config.model, config.cache, config.scheduler
    device = _rank_device(mc, group)
    dtype = mc.torch_dtype(device)
    model_path = resolve_model_path(mc.model)
    shard = group.shard if group is not None else Shard()
    model = load_model(model_path, mc.load_format, device, dtype, mc.dummy_seed, shard, group)
    arch = model.config
    limits = [arch.max_position_embeddings, arch.rope_context_limit, mc.max_model_len]
    max_model_len = min(x for x in limits if x)
    spec = KVCacheSpec(num_layers=arch.num_layers, num_kv_heads=shard.num_kv_heads(arch),
                       head_dim=arch.head_dim, dtype=dtype, max_seqs=sc.max_num_seqs,
                       max_seq_len=max_model_len, layout=cc.layout)
    budget = _kv_budget(cc, device)
    if group is not None:
        budget = group.min(budget)
    kv = make_kv_manager(cc.kv_cache, spec, device, budget, cc.page_size, cc.block_size,
                         cc.enable_prefix_caching)
    backend = make_backend(cc.attention_backend, kv.kind, arch.head_dim, device, cc.block_size,
                           scale=arch.attention_scale, softcapped=arch.attn_logit_softcapping is not None)
    runner = ModelRunner(model, kv, backend, Sampler(), device, sc.max_num_batched_tokens, sc.max_num_seqs)
    # torch._grouped_mm (MoE layers) reads its offsets on the host on CUDA except in bfloat16
    moe_graphable = not arch.num_experts or dtype == torch.bfloat16
    if use_graphs(mc.enforce_eager, device, backend.name, shard.world_size) and moe_graphable:
        runner.graphs = DecodeGraphs(model, kv, backend, device, min(mc.max_graph_batch_size, sc.max_num_seqs),
                                     max_model_len)
    return RankState(device, dtype, model_path, model, max_model_len, runner)


def _rank_device(mc, group: TPGroup | None) -> torch.device:
    device = mc.torch_device()
    if group is None or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"device {mc.device} names one GPU, but tensor parallelism puts rank r on "
                         f"GPU r of its machine; use --device cuda")
    return torch.device("cuda", group.local_rank)


def _kv_budget(cc, device: torch.device) -> int:
    if cc.kv_cache_memory_gib is not None:
        return int(cc.kv_cache_memory_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9) - GIB  # leave room for activations and the allocator
    return 4 * GIB


def resolve_model_path(model: str | None) -> str:
    if model is None:
        from ..models.gguf_import import default_model_dir
        return str(default_model_dir())
    return model
