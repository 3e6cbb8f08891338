"""vattention.memory: contiguous virtual KV tensors backed by physical pages mapped on demand.

Data flows down, one layer per module (see README.md beside this file):

    VirtualKVCache (cache.py)      public API: slots, ensure/prepare, views, stats
      ├─ slots.py / mapper.py      who owns which page groups; the background mapping thread
      ├─ PagePool (pool.py)        physical pages up to a byte budget, created ahead
      ├─ KVLayout (spec.py)        where (layer, K/V, slot, token) lives in virtual memory
      └─ Driver (drivers/)         host (memfd + mmap) or CUDA (cuMem*) page mapping

Depends only on torch (and cuda-bindings for the CUDA driver).
"""

from .cache import VirtualKVCache
from .drivers import Driver, DriverError, HostDriver, make_driver
from .spec import LAYOUTS, KVCacheSpec, KVLayout
from .stats import CacheStats, MapCounters

__all__ = ["VirtualKVCache", "KVCacheSpec", "KVLayout", "LAYOUTS", "CacheStats", "MapCounters",
           "Driver", "DriverError", "HostDriver", "make_driver"]
