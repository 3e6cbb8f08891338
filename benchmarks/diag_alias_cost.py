"""What aliasing a cached prefix into a slot costs on the GPU, call by call (diagnostic).

Prefix caching maps a cached prefix's pages a second time into each new slot: one cuMemMap
per page, then cuMemSetAccess over the run. This times, on 2 MiB pages of one device:
  - map and set-access per page, with one set-access over the whole run vs one per page,
    read-only vs read-write, and unmap;
  - the same aliasing from several threads at once (cuda-bindings releases the GIL);
  - the same aliasing while the device is busy with a long kernel;
  - one handle as large as the prefix mapped instead (is set-access paid per page or per mapping?);
  - the main thread's kernel launches while another thread aliases.

    python benchmarks/diag_alias_cost.py [--pages 128] [--slots 16] [--threads 4]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from vattention.memory.drivers.cuda import CudaDriver


def alias(driver: CudaDriver, base: int, handles: list, read_only: bool = True,
          one_call: bool = True) -> tuple[float, float]:
    """Map every handle at base + i * page, then set access; (map s, set-access s)."""
    page = driver.page_size
    t0 = time.perf_counter()
    for i, h in enumerate(handles):
        driver.map(base + i * page, h)
    t1 = time.perf_counter()
    if one_call:
        driver.set_access(base, len(handles) * page, read_only=read_only)
    else:
        for i in range(len(handles)):
            driver.set_access(base + i * page, page, read_only=read_only)
    return t1 - t0, time.perf_counter() - t1


def unmap_all(driver: CudaDriver, base: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        driver.unmap(base + i * driver.page_size)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=128, help="pages of the prefix (128: 2048 tokens of Llama-3-8B)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--threads", type=int, default=4)
    ns = p.parse_args()
    driver = CudaDriver("cuda")
    page, n = driver.page_size, ns.pages
    handles = [driver.create() for _ in range(n)]
    stride = n * page
    base = driver.reserve(stride * ns.slots)
    slots = [base + s * stride for s in range(ns.slots)]
    print(f"{torch.cuda.get_device_name()}: {n} pages of {page >> 20} MiB aliased into {ns.slots} slots")

    def per_page_us(seconds: float) -> float:
        return 1e6 * seconds / (n * ns.slots)

    alias(driver, slots[0], handles)  # warm-up
    unmap_all(driver, slots[0], n)
    for label, ro, one in (("read-only, one set-access per slot", True, True),
                           ("read-write, one set-access per slot", False, True),
                           ("read-only, one set-access per page", True, False)):
        m = a = u = 0.0
        for s in slots:
            dm, da = alias(driver, s, handles, ro, one)
            m, a = m + dm, a + da
        torch.cuda.synchronize()
        for s in slots:
            u += unmap_all(driver, s, n)
        print(f"  {label:38s} map {per_page_us(m):6.1f} us/page  set-access {per_page_us(a):6.1f}  "
              f"unmap {per_page_us(u):6.1f}  -> {1e3 * (m + a) / ns.slots:6.2f} ms per slot")

    t0 = time.perf_counter()
    for s in slots:
        alias(driver, s, handles)
    serial = time.perf_counter() - t0
    for s in slots:
        unmap_all(driver, s, n)
    chunks = [slots[i::ns.threads] for i in range(ns.threads)]

    def work(mine: list[int]) -> None:
        driver.bind_thread()
        for s in mine:
            alias(driver, s, handles)
    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = time.perf_counter() - t0
    for s in slots:
        unmap_all(driver, s, n)
    print(f"  {ns.slots} slots serially {1e3 * serial:7.1f} ms; from {ns.threads} threads {1e3 * parallel:7.1f} ms "
          f"({serial / parallel:.2f}x)")

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        x @ x
    torch.cuda.synchronize()
    kernel = (time.perf_counter() - t0) / 20
    reps = max(1, int(1.5 * serial / kernel) + 1)
    for _ in range(reps):  # keep the device busy for longer than the aliasing takes
        x @ x
    t0 = time.perf_counter()
    for s in slots:
        alias(driver, s, handles)
    busy = time.perf_counter() - t0
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    for s in slots:
        unmap_all(driver, s, n)
    print(f"  {ns.slots} slots while the device runs {reps} GEMMs of {1e3 * kernel:.1f} ms: {1e3 * busy:7.1f} ms "
          f"(idle: {1e3 * serial:.1f}; device still busy after: {still_busy})")
    # one handle as large as the whole prefix, mapped at a second address: is set-access paid
    # per 2 MiB page or per mapping?
    cu = driver._cu
    big = driver._check("cuMemCreate", cu.cuMemCreate(stride, driver._prop, 0))
    t0 = time.perf_counter()
    for s in slots:
        driver._check("cuMemMap", cu.cuMemMap(s, stride, 0, big, 0))
    t1 = time.perf_counter()
    for s in slots:
        driver.set_access(s, stride, read_only=True)
    t2 = time.perf_counter()
    for s in slots:
        driver._check("cuMemUnmap", cu.cuMemUnmap(s, stride))
    t3 = time.perf_counter()
    driver._check("cuMemRelease", cu.cuMemRelease(big))
    print(f"  one {stride >> 20} MiB handle per slot instead: map {1e3 * (t1 - t0) / ns.slots:6.3f} ms, "
          f"set-access {1e3 * (t2 - t1) / ns.slots:6.3f} ms, unmap {1e3 * (t3 - t2) / ns.slots:6.3f} ms per slot")

    # the engine thread's launches while another thread aliases: does the driver block them?
    y = torch.randn(256, device="cuda")

    def launches(k: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(k):
            y.add_(1.0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    alone = launches(20000)
    done = threading.Event()

    def aliasing() -> None:
        driver.bind_thread()
        while not done.is_set():
            for s in slots:
                alias(driver, s, handles)
            for s in slots:
                unmap_all(driver, s, n)
    t = threading.Thread(target=aliasing)
    t.start()
    time.sleep(0.01)
    beside = launches(20000)
    done.set()
    t.join()
    print(f"  20000 small launches: {1e3 * alone:7.1f} ms alone, {1e3 * beside:7.1f} ms while a thread aliases "
          f"({beside / alone:.2f}x)")
    for h in handles:
        driver.release(h)
    driver.free_reservation(base, stride * ns.slots)


if __name__ == "__main__":
    main()
