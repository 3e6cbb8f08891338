"""TPGroup: one rank's handle on its tensor-parallel group.

  compute  the default process group (nccl on CUDA, gloo on CPU): the model's all-reduces and the
           logits all-gather, inside a step
  control  a gloo group: rank 0's step plans (Python objects) and the per-step agreement; it waits
           without a deadline, because an idle server sends no plans
  store    the rendezvous store: a failing rank writes its error here before it exits, so rank 0
           can say which rank failed and why
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..models.sharding import Shard

ERROR_KEY = "vattention/error/{}"
IDLE_TIMEOUT = timedelta(days=365)  # the control group waits for the next plan as long as rank 0 lives


@dataclass
class TPGroup:
    rank: int  # 0 runs the scheduler and sends plans
    world_size: int
    local_rank: int  # which GPU of this machine
    compute: dist.ProcessGroup
    control: dist.ProcessGroup
    store: dist.Store

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    # ---- what a sharded model needs (models.llama.Collectives) ----
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.compute)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.compute)
        return torch.cat(parts, dim=-1)

    # ---- control ----
    def broadcast(self, obj=None):
        """Rank 0's obj, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest of every rank's value (agreement: 0 anywhere means someone failed)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def report_error(self, message: str) -> None:
        try:
            self.store.set(ERROR_KEY.format(self.rank), message)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; exiting says enough
            pass

    def errors(self, wait_s: float = 5.0) -> dict[int, str]:
        """Errors the other ranks reported, waiting up to wait_s for the first one."""
        deadline = time.monotonic() + wait_s
        found: dict[int, str] = {}
        while True:
            for r in range(self.world_size):
                key = ERROR_KEY.format(r)
                if r != self.rank and r not in found and self.store.check([key]):
                    found[r] = self.store.get(key).decode(errors="replace")
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a group a failed rank broke (or one aborted) may not tear down cleanly
                pass


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def local_store(world_size: int, timeout_s: float, port: int | None = None) -> dist.TCPStore:
    """The rendezvous store of ranks started on this machine. Rank 0 hosts it (port None) on a
    port the OS picks, which is then passed to the workers: a free port found first and bound
    later could be taken in between by any other process."""
    return dist.TCPStore("127.0.0.1", port or 0, world_size, is_master=port is None,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def init_group(rank: int, world_size: int, local_rank: int, backend: str, timeout_s: float,
               store: dist.Store | None = None) -> TPGroup:
    """Join the group (every rank calls this) through store, or torchrun's env:// rendezvous when
    None; NCCL_NVLS_ENABLE is left as the machine sets it."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    rendezvous = dict(store=store) if store is not None else dict(init_method="env://")
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **rendezvous)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    store = dist.distributed_c10d._get_default_store()
    return TPGroup(rank, world_size, local_rank, dist.group.WORLD, control, store)
