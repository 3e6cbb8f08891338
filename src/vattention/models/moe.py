"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top k experts
and the layer's output is their outputs weighted by the routing probabilities.

    x [T, H] ─ gate (router) ─ softmax (float32) ─ top k ─ [renormalize] ─> weights, experts [T, k]
      pairs p = (token p // k, its expert experts.flat[p]), sorted by expert (argsort, on the device)
      ─ x[token of each sorted pair] [T k, H]
      ─ grouped GEMM with each expert's gate_up [E, 2 I, H] ─ silu(gate) * up ─ grouped GEMM with down
      ─ back to pair order ─ (weights * outputs) summed over the k ─> [T, H]

Everything stays on the device, with no host sync, so decode steps are captured in CUDA graphs:
the per-expert row counts become the grouped GEMMs' offsets (`offs`, a device tensor) instead of
Python slices. The grouped GEMM is torch._grouped_mm, the one PyTorch ships for MoE training and
inference (private, so checked for at build time): measured on an H200 for Qwen3-30B-A3B's
layer shape (benchmarks/results/families/diag_grouped_mm_h200.txt), 0.33 / 0.54 / 0.62 ms at
T = 1 / 64 / 512 where a loop over experts (Hugging Face's) took 6.5 / 27 / 28 ms. On CUDA it runs
fused for bfloat16 only; other dtypes take a path that reads the offsets on the host, so the
engine captures no graphs for them (rank.py). On CPU it is exact in float32.

Under tensor parallelism every rank holds all experts, each with this rank's columns of gate/up
and rows of down (Megatron inside each expert); the router is whole on every rank, so ranks route
identically, and the partial outputs are summed once, after the weighting.

Weights are stacked per layer at load time (loader.py): checkpoint tensor
mlp.experts.{e}.gate_proj / up_proj / down_proj (Mixtral: block_sparse_moe.experts.{e}.w1 / w3 /
w2, renamed on load) fills expert e's rows of gate_up or its down.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelArchConfig
from .fused import silu_and_mul
from .sharding import Shard


class StackedExperts(nn.Module):
    """Every expert's weights of one layer, stacked: gate_up [E, 2 I, H] (gate rows, then up
    rows), down [E, H, I]; I is this rank's share of an expert's width."""

    def __init__(self, num_experts: int, hidden: int, width: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.width = width

    def checkpoint_parts(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the view of our parameter it fills."""
        parts = {}
        for e in range(self.gate_up.shape[0]):
            parts[f"{prefix}.{e}.gate_proj.weight"] = self.gate_up[e].narrow(0, 0, self.width)
            parts[f"{prefix}.{e}.up_proj.weight"] = self.gate_up[e].narrow(0, self.width, self.width)
            parts[f"{prefix}.{e}.down_proj.weight"] = self.down[e]
        return parts


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm):
        super().__init__()
        if not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"{cfg.architecture} needs torch._grouped_mm (torch >= 2.8); this torch "
                             f"{torch.__version__} has none")
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size,
                                      cfg.moe_intermediate_size // shard.world_size)
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        t, k = x.shape[0], self.top_k
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E], as HF: softmax in float32
        weights, experts = probs.topk(k, dim=-1)  # [T, k] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.flatten()  # [T k]: pair p is token p // k's (p % k)-th expert
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.zeros(self.gate.out_features, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat.int(), torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # [E]: end row of each expert's group
        rows = x[order // k]  # [T k, H], by expert
        h = torch._grouped_mm(rows, self.experts.gate_up.transpose(-2, -1), offs=offs)  # [T k, 2 I]
        h = torch._grouped_mm(silu_and_mul(h), self.experts.down.transpose(-2, -1), offs=offs)  # [T k, H]
        out = torch.empty_like(h).index_copy_(0, order, h).view(t, k, -1)  # back in pair order
        y = (out * weights[..., None]).sum(dim=1)  # [T, H]
        return self.comm.all_reduce(y) if self.comm is not None else y
