"""CUDA driver: the VMM API through `cuda.bindings.driver`. The only module that calls cuda.bindings.

    reserve      cuMemAddressReserve        free_reservation  cuMemAddressFree
    create       cuMemCreate(PINNED, DEVICE) release          cuMemRelease
    map          cuMemMap                    unmap            cuMemUnmap
    set_access   cuMemSetAccess(READWRITE, or READ for a read-only alias) over a contiguous run
                 (the expensive call: batch it)

Every CUresult is checked and raised as a DriverError naming the call and address. Torch must
have created the device's primary context first (we make sure); a background thread makes that
context current with `bind_thread` before its first call. A freed reservation that tensors still
view stays reserved with nothing mapped (an access is a CUDA error) until they are collected.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .base import DriverError, check_page_size
from .reservations import Reservations, ViewKeepAlive


def _driver_module():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - exercised only without the extra installed
        raise ImportError("the CUDA KV cache needs cuda-bindings: pip install 'vattention[cuda]'") from e
    return driver


class _CudaArray:
    """Carries `__cuda_array_interface__` so `torch.as_tensor` wraps memory without a copy.
    The tensor's storage holds this object, and this object the reservation's keep-alive."""

    def __init__(self, addr: int, shape: tuple[int, ...], typestr: str, byte_strides: tuple[int, ...],
                 keep_alive: ViewKeepAlive):
        self.keep_alive = keep_alive
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (addr, False),
            "strides": byte_strides, "version": 3, "stream": None,
        }


_TYPESTR = {
    torch.float16: "<f2", torch.bfloat16: "<f2", torch.float32: "<f4", torch.float64: "<f8",
    torch.uint8: "|u1", torch.int8: "|i1", torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8",
}


class CudaDriver:
    """Physical pages of `granularity` bytes (2 MiB on Hopper) on one CUDA device."""

    name = "cuda"

    def __init__(self, device: int | str | torch.device = "cuda", page_size: int | None = None):
        if page_size is not None:  # a wrong type or sign fails before CUDA is touched
            check_page_size(page_size, "CUDA")
        self._cu = _driver_module()
        dev = torch.device(device)
        self.device_index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.device_index)
        with torch.cuda.device(self.device_index):
            torch.cuda.init()
            torch.empty(1, device=self.device)  # torch creates and binds the primary context
            self._ctx = self._check("cuCtxGetCurrent", self._cu.cuCtxGetCurrent())
        cu = self._cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        self._prop = prop
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device_index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        read = cu.CUmemAccessDesc()
        read.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        read.location.id = self.device_index
        read.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
        self._read_access = [read]
        self.granularity = int(self._check("cuMemGetAllocationGranularity",
                                           cu.cuMemGetAllocationGranularity(
                                               prop, cu.CUmemAllocationGranularity_flags
                                               .CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        self.page_size = self.granularity if page_size is None else \
            check_page_size(page_size, "CUDA", self.granularity)
        self._counter_lock = threading.Lock()
        self.num_live_handles = 0  # pages created and not yet released (leak checks)
        self.num_live_mappings = 0  # pages mapped and not yet unmapped
        self._reservations = Reservations(self._address_free)  # token: reserved bytes

    def _check(self, call: str, result: tuple, addr: int | None = None, hint: str = "") -> Any:
        err = result[0]
        if err != self._cu.CUresult.CUDA_SUCCESS:
            _, name = self._cu.cuGetErrorName(err)
            _, text = self._cu.cuGetErrorString(err)
            detail = f"{name.decode() if name else err}: {text.decode() if text else ''}"
            if not hint and err == self._cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                hint = "the GPU is out of memory; lower memory_budget_bytes"
            raise DriverError(call, detail, addr, hint)
        return result[1] if len(result) == 2 else result[1:] or None

    @property
    def num_live_reservations(self) -> int:
        return len(self._reservations)

    def reserve(self, nbytes: int) -> int:
        ptr = self._check("cuMemAddressReserve", self._cu.cuMemAddressReserve(nbytes, self.page_size, 0, 0),
                          hint=f"reserving {nbytes} bytes of address space")
        self._reservations.add(int(ptr), nbytes, nbytes)
        return int(ptr)

    def free_reservation(self, addr: int, nbytes: int) -> None:
        self._reservations.free(addr)

    def _address_free(self, addr: int, nbytes: int) -> None:
        # The last view may die on any thread, bound to any context or none: push ours for the
        # call and pop it, leaving that thread as it was.
        self._check("cuCtxPushCurrent", self._cu.cuCtxPushCurrent(self._ctx))
        try:
            self._check("cuMemAddressFree", self._cu.cuMemAddressFree(addr, nbytes), addr)
        finally:
            self._check("cuCtxPopCurrent", self._cu.cuCtxPopCurrent())

    def create(self) -> Any:
        handle = self._check("cuMemCreate", self._cu.cuMemCreate(self.page_size, self._prop, 0))
        self._count("num_live_handles", 1)
        return handle

    def release(self, handle: Any) -> None:
        self._check("cuMemRelease", self._cu.cuMemRelease(handle))
        self._count("num_live_handles", -1)

    def map(self, addr: int, handle: Any) -> None:
        self._check("cuMemMap", self._cu.cuMemMap(addr, self.page_size, 0, handle, 0), addr)
        self._count("num_live_mappings", 1)

    def set_access(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        access = self._read_access if read_only else self._access
        self._check("cuMemSetAccess", self._cu.cuMemSetAccess(addr, nbytes, access, 1), addr)

    def unmap(self, addr: int) -> None:
        self._check("cuMemUnmap", self._cu.cuMemUnmap(addr, self.page_size), addr)
        self._count("num_live_mappings", -1)

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype,
               strides: tuple[int, ...]) -> torch.Tensor:
        itemsize = dtype.itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        keep_alive = self._reservations.keep_alive(addr, max(span * itemsize, itemsize))
        carrier = _CudaArray(addr, shape, _TYPESTR[dtype], tuple(s * itemsize for s in strides),
                             keep_alive)
        t = torch.as_tensor(carrier, device=self.device)
        # The interface has no bfloat16; the bits are the same width, so reinterpret.
        return t.view(dtype) if t.dtype != dtype else t

    def fence(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, fence: torch.cuda.Event | None) -> None:
        if fence is not None:
            fence.synchronize()

    def bind_thread(self) -> None:
        self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))
        torch.cuda.set_device(self.device_index)

    def close(self) -> None:
        pass

    def _count(self, name: str, delta: int) -> None:
        with self._counter_lock:
            setattr(self, name, getattr(self, name) + delta)
