"""Every attention backend satisfies the AttentionBackend protocol (attention/base.py), and every
one is reachable by its name through select.py."""

from __future__ import annotations

import inspect

import pytest
import torch

import vattention.attention as attention
from vattention.attention import BACKENDS, AttentionBackend, FlexPagedBackend, make_backend
from vattention.attention.select import CUDA_ONLY

CLASSES = sorted({getattr(attention, name) for name in attention.__all__
                  if name.endswith("Backend") and name != "AttentionBackend"}, key=lambda c: c.__name__)


def build(cls) -> AttentionBackend:
    """Constructing a backend touches no GPU, so the CUDA-only ones are built on CPU too."""
    return cls(0.125, 16, torch.device("cpu")) if cls is FlexPagedBackend else cls(0.125)


def test_every_backend_class_is_exported_and_registered():
    assert len(CLASSES) == 5, CLASSES
    registered = {cls for choices in BACKENDS.values() for cls in choices.values()}
    assert registered == set(CLASSES), f"registered in select.py: {registered}, exported: {CLASSES}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_backend_satisfies_the_protocol(cls):
    """An instance is an AttentionBackend, its forward takes the protocol's parameters in the
    protocol's order, and its name is the one select.py files it under."""
    backend = build(cls)
    assert isinstance(backend, AttentionBackend)
    want = list(inspect.signature(AttentionBackend.forward).parameters)
    got = list(inspect.signature(cls.forward).parameters)
    assert got == want, f"{cls.__name__}.forward{got} differs from the protocol's {want}"
    kinds = [kind for kind, choices in BACKENDS.items() if backend.name in choices]
    assert kinds and all(BACKENDS[kind][backend.name] is cls for kind in kinds)


def test_an_object_missing_name_or_forward_is_no_backend():
    class NoForward:
        name = "none"

    class NoName:
        def forward(self, q, k, v, cache, meta):
            return q

    assert not isinstance(NoForward(), AttentionBackend)
    assert not isinstance(NoName(), AttentionBackend)


@pytest.mark.parametrize("kv_kind", ["contiguous", "paged"])
def test_make_backend_returns_a_protocol_instance(kv_kind):
    """Every backend that runs on CPU, built the way the engine builds it."""
    names = [n for n in BACKENDS[kv_kind] if n not in CUDA_ONLY] + ["auto"]
    for name in names:
        backend = make_backend(name, kv_kind, 64, torch.device("cpu"), block_size=16)
        assert isinstance(backend, AttentionBackend), name
        assert backend.name == ("sdpa" if name == "auto" else name)
