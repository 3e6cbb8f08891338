"""Bad arguments to the memory library fail at once with an error naming the argument, its value
and what is valid, instead of being accepted or failing deep inside."""

from __future__ import annotations

import pytest
import torch

from vattention.memory import HostDriver, VirtualKVCache, make_driver
from vattention.memory.drivers.cuda import CudaDriver

from conftest import make_cache, new_driver, small_spec


@pytest.mark.parametrize("budget, error, message", [
    (-1, ValueError, r"memory_budget_bytes must be a positive number of bytes.*got -1"),
    (0, ValueError, r"memory_budget_bytes must be a positive number of bytes.*got 0"),
    (1.5e9, TypeError, r"memory_budget_bytes must be an int, got 1500000000.0"),
    (True, TypeError, r"memory_budget_bytes must be an int, got True"),
])
def test_budget_must_be_a_positive_int(budget, error, message):
    with pytest.raises(error, match=message):
        VirtualKVCache(small_spec(), driver=new_driver(), memory_budget_bytes=budget)


def test_eager_cushion_must_be_an_int():
    with pytest.raises(TypeError, match="eager_cushion_groups must be an int, got 0.5"):
        make_cache(eager_cushion_groups=0.5)


@pytest.mark.parametrize("page_size, error, message", [
    (0, ValueError, r"host page_size must be a positive multiple of the OS page \(4096 bytes\), got 0"),
    (-4096, ValueError, r"host page_size must be a positive multiple of the OS page.*got -4096"),
    (6000, ValueError, r"host page_size must be a positive multiple of the OS page.*got 6000"),
    (65536.0, TypeError, r"host page_size must be an int number of bytes, got 65536.0"),
])
def test_host_page_size_is_checked_on_every_path(page_size, error, message):
    """The driver, make_driver and VirtualKVCache(device="cpu") all refuse it: 0 is no longer
    silently the 2 MiB default."""
    with pytest.raises(error, match=message):
        HostDriver(page_size)
    with pytest.raises(error, match=message):
        make_driver("cpu", page_size)
    with pytest.raises(error, match=message):
        VirtualKVCache(small_spec(), device="cpu", page_size=page_size, memory_budget_bytes=1 << 30)


@pytest.mark.parametrize("page_size, error", [(0, ValueError), (-(2 << 20), ValueError),
                                              (1.5, TypeError), (True, TypeError)])
def test_cuda_page_size_type_and_sign_fail_before_cuda_is_touched(page_size, error):
    """The CUDA driver checks what it can before initialising CUDA, so this runs without a GPU
    (and without cuda-bindings): 0 was silently the granularity, -2 MiB passed as a multiple."""
    with pytest.raises(error, match=f"CUDA page_size must be .*got {page_size!r}"):
        CudaDriver("cuda", page_size=page_size)


def test_cuda_granularity_check_names_the_granularity():
    """The check the CUDA driver makes once it knows its granularity (2 MiB on Hopper)."""
    from vattention.memory.drivers.base import check_page_size
    message = r"multiple of the driver granularity \(2097152 bytes\), got 3145728"
    with pytest.raises(ValueError, match=message):
        check_page_size(3 << 20, "CUDA", 2 << 20)
    assert check_page_size(4 << 20, "CUDA", 2 << 20) == 4 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_page_size_off_the_granularity_is_refused():
    with pytest.raises(ValueError, match="CUDA page_size must be a positive multiple"):
        make_driver("cuda", (2 << 20) + 4096)


def test_page_size_contradicting_the_given_driver_is_refused():
    """page_size used to be ignored when a driver was passed too."""
    with pytest.raises(ValueError, match=r"page_size=4096 differs from the given driver's page_size 65536"):
        VirtualKVCache(small_spec(), driver=HostDriver(65536), page_size=4096, memory_budget_bytes=1 << 26)


@pytest.mark.parametrize("num_tokens, error, message", [
    (-5, ValueError, r"num_tokens=-5 is outside \[0, max_seq_len=2000\]"),
    (2001, ValueError, r"num_tokens=2001 is outside \[0, max_seq_len=2000\]"),
    (1.5, TypeError, r"num_tokens must be an int, got 1.5"),
    (True, TypeError, r"num_tokens must be an int, got True"),
])
def test_token_counts_are_checked_everywhere(num_tokens, error, message):
    """alloc_slot, ensure and prepare refuse the same bad counts with the same message."""
    with make_cache() as cache:
        with pytest.raises(error, match=message):
            cache.alloc_slot(num_tokens)
        slot = cache.alloc_slot()
        with pytest.raises(error, match=message):
            cache.ensure(slot, num_tokens)
        with pytest.raises(error, match=message):
            cache.prepare({slot: num_tokens})
        assert cache.stats().pages_mapped == 0


def test_prepare_with_one_bad_length_queues_nothing():
    with make_cache() as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        with pytest.raises(ValueError, match="num_tokens=-1"):
            cache.prepare({a: 100, b: -1})
        cache.wait()
        assert cache.stats().pages_mapped == 0


def test_integer_like_counts_and_slots_are_accepted():
    """Anything with __index__ (a 0-d integer tensor, a numpy int) is an int; bool is not."""
    with make_cache() as cache:
        slot = cache.alloc_slot(torch.tensor(10))
        assert cache.ensure(torch.tensor(slot), torch.tensor(100))
        assert cache.slot_capacity(slot) >= 100


@pytest.mark.parametrize("slot, error, message", [
    ("0", TypeError, r"slot must be an int, got '0'"),
    (0.0, TypeError, r"slot must be an int, got 0.0"),
    (-1, IndexError, r"slot -1 out of range \[0, max_seqs=4\)"),
    (4, IndexError, r"slot 4 out of range \[0, max_seqs=4\)"),
])
def test_slot_arguments_are_checked(slot, error, message):
    with make_cache() as cache:
        cache.alloc_slot()
        for call in (lambda: cache.ensure(slot, 10), lambda: cache.free(slot),
                     lambda: cache.prepare({slot: 10}), lambda: cache.slot_capacity(slot)):
            with pytest.raises(error, match=message):
                call()


@pytest.mark.parametrize("layer, error, message", [
    (-1, IndexError, r"layer -1 out of range \[0, num_layers=3\)"),
    (3, IndexError, r"layer 3 out of range \[0, num_layers=3\)"),
    (1.0, TypeError, r"layer must be an int, got 1.0"),
])
def test_layer_index_is_checked(layer, error, message):
    """A negative layer used to count from the end silently, like a list index."""
    with make_cache() as cache:
        with pytest.raises(error, match=message):
            cache.kv(layer)
        with pytest.raises(error, match=message):
            cache.kv_flat(layer)
        assert cache.kv(2)[0].shape[0] == cache.spec.max_seqs
