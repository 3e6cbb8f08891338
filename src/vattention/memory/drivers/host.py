"""Host (CPU) driver: real virtual-memory mapping with memfd + mmap, for CI and CPU serving.

    reservation   mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)   any access faults
    page          a page-sized slice of one memfd file (its offset is the handle)
    map           mmap(addr, PROT_NONE, MAP_FIXED|MAP_SHARED, memfd, offset)  still faults ...
    set_access    mprotect(READ|WRITE), or mprotect(READ) read-only           ... until access is set
    unmap         mmap(addr, PROT_NONE, MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS)  faults again
    release       fallocate(PUNCH_HOLE): the page's memory really goes back to the OS

This mirrors the CUDA VMM sequence (reserve, create, map, set-access, unmap, release) so that a
kernel which reads past what was mapped dies with SIGSEGV here, as it would fault on the GPU.
A freed reservation that tensors still view stays PROT_NONE until they are collected (see
`Reservations`), so a stale view faults instead of reading whatever is reserved there next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading

import torch

from .base import DriverError, check_page_size
from .reservations import Reservations

_PROT_NONE = 0x0
_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

OS_PAGE_SIZE = mmap.PAGESIZE
DEFAULT_HOST_PAGE_SIZE = 2 << 20  # the CUDA granularity, so CPU runs see the GPU's page math


def _errno_detail() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} (errno {err})"


class HostDriver:
    """Pages are slices of one memfd; handles are byte offsets into it.

    `page_size` may be any multiple of the OS page (4 KiB), e.g. 64 KiB to reproduce the
    paper's small-page results; the default matches CUDA's 2 MiB granularity.
    """

    name = "host"

    def __init__(self, page_size: int | None = None):
        self.granularity = OS_PAGE_SIZE
        self.page_size = DEFAULT_HOST_PAGE_SIZE if page_size is None else \
            check_page_size(page_size, "host", OS_PAGE_SIZE, "OS page")
        self._fd = os.memfd_create("vattention-kv", os.MFD_CLOEXEC)
        self._lock = threading.Lock()  # guards the offset free list and file size
        self._file_pages = 0  # pages the memfd spans; offsets beyond are never handed out
        self._free_offsets: list[int] = []  # released offsets, reused before the file grows
        self._reservations = Reservations(self._munmap_reservation)  # token: (raw addr, raw bytes)
        self.num_live_handles = 0  # pages created and not yet released
        self.num_live_mappings = 0  # pages mapped and not yet unmapped

    @property
    def max_mappings(self) -> int:
        """Pages this process can still map: each mapped page is one kernel mapping, and
        vm.max_map_count caps a process's mappings (65530 by default); keep a tenth spare."""
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            in_use = sum(1 for _ in f)
        return int(limit * 0.9) - in_use

    @property
    def num_live_reservations(self) -> int:
        return len(self._reservations)

    @property
    def fd(self) -> int:
        """The memfd behind every page; `os.fstat(fd).st_blocks` shows memory really held."""
        return self._fd

    def reserve(self, nbytes: int) -> int:
        self._check_aligned("reserve", nbytes, None)
        raw_bytes = nbytes + self.page_size  # slack so the base can be page_size aligned
        raw = _libc.mmap(None, raw_bytes, _PROT_NONE,
                         _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if raw in (None, _MAP_FAILED):
            raise DriverError("mmap(PROT_NONE reservation)", _errno_detail(),
                              hint=f"could not reserve {nbytes} bytes of address space; "
                                   "lower max_seqs or max_seq_len")
        addr = -(-raw // self.page_size) * self.page_size
        self._reservations.add(addr, nbytes, (raw, raw_bytes))
        return addr

    def free_reservation(self, addr: int, nbytes: int) -> None:
        self._reservations.free(addr)

    def _munmap_reservation(self, addr: int, token: tuple[int, int]) -> None:
        raw, raw_bytes = token  # munmap is thread-safe: a collected view may call this anywhere
        if _libc.munmap(raw, raw_bytes) != 0:
            raise DriverError("munmap(reservation)", _errno_detail(), addr)

    def create(self) -> int:
        with self._lock:
            if self._free_offsets:
                offset = self._free_offsets.pop()
            else:
                offset = self._file_pages * self.page_size
                try:
                    os.ftruncate(self._fd, offset + self.page_size)
                except OSError as e:
                    raise DriverError("ftruncate(memfd)", str(e),
                                      hint="the host is out of memory for new pages") from e
                self._file_pages += 1
            self.num_live_handles += 1
            return offset

    def release(self, handle: int) -> None:
        if _libc.fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           handle, self.page_size) != 0:
            raise DriverError("fallocate(PUNCH_HOLE)", _errno_detail(),
                              hint=f"page at memfd offset {handle}")
        with self._lock:
            self._free_offsets.append(handle)
            self.num_live_handles -= 1

    def map(self, addr: int, handle: int) -> None:
        self._check_aligned("map", addr, addr)
        got = _libc.mmap(addr, self.page_size, _PROT_NONE, _MAP_FIXED | _MAP_SHARED, self._fd, handle)
        if got != addr:
            raise DriverError("mmap(MAP_FIXED|MAP_SHARED)", _errno_detail(), addr,
                              hint="ENOMEM here usually means vm.max_map_count mappings; "
                                   "use larger pages")
        with self._lock:
            self.num_live_mappings += 1

    def set_access(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        prot, name = (_PROT_READ, "READ") if read_only else (_PROT_READ | _PROT_WRITE, "READ|WRITE")
        if _libc.mprotect(addr, nbytes, prot) != 0:
            raise DriverError(f"mprotect({name})", _errno_detail(), addr)

    def unmap(self, addr: int) -> None:
        got = _libc.mmap(addr, self.page_size, _PROT_NONE,
                         _MAP_FIXED | _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if got != addr:
            raise DriverError("mmap(PROT_NONE over a page)", _errno_detail(), addr)
        with self._lock:
            self.num_live_mappings -= 1

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype,
               strides: tuple[int, ...]) -> torch.Tensor:
        itemsize = dtype.itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        nbytes = max(span * itemsize, itemsize)
        raw = (ctypes.c_char * nbytes).from_address(addr)
        # The tensor's storage holds `raw`, and `raw` the keep-alive: while any view of this
        # tensor lives, a freed reservation stays reserved.
        raw.keep_alive = self._reservations.keep_alive(addr, nbytes)
        flat = torch.frombuffer(raw, dtype=dtype)  # wraps the address; touches no page
        return flat.as_strided(shape, strides)

    def fence(self) -> None:
        return None  # CPU work is synchronous: once a call returns, its pages are free to go

    def wait(self, fence: None) -> None:
        pass

    def bind_thread(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_aligned(self, call: str, value: int, addr: int | None) -> None:
        if value % self.page_size:
            raise DriverError(call, f"{value} is not a multiple of the page size {self.page_size}",
                              addr, hint="addresses and sizes must be page aligned")
