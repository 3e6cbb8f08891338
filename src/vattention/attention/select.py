"""Which attention backend serves which cache kind, and the `auto` choice per device."""

from __future__ import annotations

import math

import torch

from .backends import FlashBackend, ReferenceBackend, SDPABackend, TritonBackend
from .flex_paged import FlexPagedBackend

BACKENDS = {"contiguous": {"flash": FlashBackend, "triton": TritonBackend, "sdpa": SDPABackend,
                           "reference": ReferenceBackend},
            "paged": {"triton": TritonBackend, "flex": FlexPagedBackend, "sdpa": SDPABackend,
                      "reference": ReferenceBackend}}
CUDA_ONLY = ("flash", "triton")


def make_backend(name: str, kv_kind: str, head_dim: int, device: torch.device, block_size: int = 0):
    """`auto` = flash (contiguous) or triton (paged) on CUDA, sdpa on CPU. `block_size` is the
    paged cache's tokens per block (the flex backend's KV block)."""
    scale = 1.0 / math.sqrt(head_dim)
    choices = BACKENDS[kv_kind]
    if name == "auto":
        name = ("flash" if kv_kind == "contiguous" else "triton") if device.type == "cuda" else "sdpa"
    if name not in choices:
        raise ValueError(f"attention backend {name!r} does not serve a {kv_kind} cache; "
                         f"choose from {sorted(choices)} or auto")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"the {name} backend needs a CUDA device; use sdpa (or flex, paged) on CPU")
    if name == "flex":
        return FlexPagedBackend(scale, block_size, device)
    return choices[name](scale)
