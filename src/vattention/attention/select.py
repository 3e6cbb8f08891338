"""Which attention backend serves which cache kind, and the `auto` choice per device."""

from __future__ import annotations

import math

import torch

from .backends import FlashBackend, ReferenceBackend, SDPABackend, TritonBackend
from .base import AttentionBackend
from .flex_paged import FlexPagedBackend

BACKENDS = {"contiguous": {"flash": FlashBackend, "triton": TritonBackend, "sdpa": SDPABackend,
                           "reference": ReferenceBackend},
            "paged": {"triton": TritonBackend, "flex": FlexPagedBackend, "sdpa": SDPABackend,
                      "reference": ReferenceBackend}}
CUDA_ONLY = ("flash", "triton")


def make_backend(name: str, kv_kind: str, head_dim: int, device: torch.device,
                 block_size: int = 0, scale: float | None = None, softcapped: bool = False) -> AttentionBackend:
    """`auto` = triton on CUDA (our split-KV decode, FA2 for prefill chunks), sdpa on CPU.
    `block_size` is the paged cache's tokens per block (the flex backend's KV block); `scale`
    the model's, where it is not head_dim ** -0.5 (Gemma); `softcapped`: the model soft-caps its
    attention scores, which flash (aten's FA2 entry point) cannot do.

    Why triton for the contiguous cache too, by measurement (one H200, dummy Llama-3-8B bf16,
    CUDA graphs, 512-token prompts, GPU-busy ms per decode step, ../shared PERF.md 2026-12-01):
    FA2's aten decode 7.21 / 8.51 / 10.27 / 18.97 at batch 1 / 16 / 64 / 256, our kernel on the
    same cache 6.69 / 7.94 / 9.18 / 15.27 (at batch 256 the attention alone: 7.8 vs 4.4 ms). With
    FA2 as its default the vattention design lost to paged (whose default is this kernel's twin)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    choices = BACKENDS[kv_kind]
    if name == "auto":
        name = "triton" if device.type == "cuda" else "sdpa"
    if name not in choices:
        raise ValueError(f"attention backend {name!r} does not serve a {kv_kind} cache; "
                         f"choose from {sorted(choices)} or auto")
    if name == "flash" and softcapped:
        raise ValueError("the flash backend cannot soft-cap this model's attention scores; "
                         "use --attention-backend triton, sdpa or auto")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"the {name} backend needs a CUDA device; use sdpa (or flex, paged) on CPU")
    if name == "flex":
        return FlexPagedBackend(scale, block_size, device)
    return choices[name](scale)
