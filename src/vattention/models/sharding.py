"""Megatron-style tensor-parallel sharding of a Llama-family model: which slice of each
checkpoint tensor one rank holds. Pure arithmetic on shapes; the collectives live in
vattention.distributed.

  q_proj, k_proj, v_proj, gate_proj, up_proj   split by output rows  (column parallel; each rank
                                               stacks its q, k, v rows into its qkv_proj and its
                                               gate, up rows into its gate_up_proj: loader.py)
  o_proj, down_proj                            split by input columns (row parallel: all-reduce after)
  embed_tokens, lm_head                        split by vocabulary rows (padded to a multiple of ranks)
  norms, MoE routers                           whole on every rank
  experts.{e}.gate_proj / up_proj / down_proj  each expert split like the dense MLP (moe.py)

KV heads: with at least as many KV heads as ranks each rank holds num_kv_heads / ranks of them;
with fewer, each rank holds one, and ranks / num_kv_heads ranks share (replicate) each:

  8 q heads, 2 kv heads, 4 ranks:  rank     0    1    2    3
                                   q heads  0,1  2,3  4,5  6,7
                                   kv head  0    0    1    1
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelArchConfig


@dataclass(frozen=True)
class Shard:
    """One rank's place in a tensor-parallel group (rank 0 of 1 = the whole model)."""

    rank: int = 0
    world_size: int = 1

    def check(self, cfg: ModelArchConfig) -> None:
        """Raise, with what to change, when the model cannot be split this many ways."""
        n = self.world_size
        problems = []
        if cfg.num_heads % n:
            problems.append(f"{cfg.num_heads} attention heads")
        if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
            problems.append(f"{cfg.num_kv_heads} KV heads (neither divides the other)")
        if cfg.intermediate_size % n:
            problems.append(f"an MLP width of {cfg.intermediate_size}")
        if cfg.moe_intermediate_size % n:
            problems.append(f"an expert width of {cfg.moe_intermediate_size}")
        if problems:
            raise ValueError(f"tensor_parallel_size {n} does not divide {' and '.join(problems)} of "
                             f"{cfg.architecture}; choose a size that divides them")

    def num_heads(self, cfg: ModelArchConfig) -> int:
        return cfg.num_heads // self.world_size

    def num_kv_heads(self, cfg: ModelArchConfig) -> int:
        return max(1, cfg.num_kv_heads // self.world_size)

    def kv_head_start(self, cfg: ModelArchConfig) -> int:
        if cfg.num_kv_heads >= self.world_size:
            return self.rank * self.num_kv_heads(cfg)
        return self.rank * cfg.num_kv_heads // self.world_size  # replicated: ranks share a head

    def vocab_per_rank(self, cfg: ModelArchConfig) -> int:
        return -(-cfg.vocab_size // self.world_size)

    def slice_of(self, name: str, cfg: ModelArchConfig) -> tuple[int, int, int] | None:
        """(dim, start, length) of this rank's part of the checkpoint tensor `name`, or None
        when every rank holds all of it. The vocabulary slice of the last rank may run past the
        real vocabulary: the loader reads what exists and leaves the padding rows zero."""
        if self.world_size == 1:
            return None
        d = cfg.head_dim
        leaf = name.split(".")[-2]  # e.g. "q_proj" of model.layers.0.self_attn.q_proj.weight
        if leaf == "q_proj":
            n = self.num_heads(cfg) * d
            return 0, self.rank * n, n
        if leaf in ("k_proj", "v_proj"):
            n = self.num_kv_heads(cfg) * d
            return 0, self.kv_head_start(cfg) * d, n
        if leaf == "o_proj" and name.endswith("weight"):
            n = self.num_heads(cfg) * d
            return 1, self.rank * n, n
        width = cfg.moe_intermediate_size if ".experts." in name else cfg.intermediate_size
        if leaf in ("gate_proj", "up_proj"):
            n = width // self.world_size
            return 0, self.rank * n, n
        if leaf == "down_proj" and name.endswith("weight"):
            n = width // self.world_size
            return 1, self.rank * n, n
        if leaf in ("embed_tokens", "lm_head"):
            n = self.vocab_per_rank(cfg)
            return 0, self.rank * n, n
        return None  # norms, row-parallel biases (added once, after the all-reduce)
