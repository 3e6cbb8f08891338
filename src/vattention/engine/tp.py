"""Tensor parallelism in the engine: rank 0 schedules, every rank computes.

  rank 0   Scheduler ─> RecordingKV (allocate/free, results logged) ─> StepPlan(kv_ops, inputs)
             ─broadcast─> ranks 1..N-1
  rank r   replay kv_ops on its own KV manager (its KV-head shard); each result must equal rank
           0's, so slots, pages and blocks are the same decisions on every rank
  all      agree (MIN over ranks of "replayed fine") ─> ModelRunner.forward (all-reduces inside)

A rank that fails writes its error to the store and leaves; the agreement, or rank 0's next
collective, fails on every other rank, and rank 0 raises TensorParallelError naming the rank and
its error: no rank waits for one that is gone.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from dataclasses import dataclass, field

import torch

from ..distributed import TPGroup, WorkerProcesses, init_group, local_store, torchrun_env
from ..kv import KVManager, KVUsage
from .step_io import StepInputs

REAP_WAIT_S = 5.0  # how long rank 0's error waits for a worker that has ended to be reaped


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed; the engine cannot continue and must be recreated."""


@dataclass
class StepPlan:
    kv_ops: list[tuple] = field(default_factory=list)  # ("allocate", id, n, ok, lookup) / ("free", id) /
    # ("cache_prefix", ...) / ("reset_prefix_cache",), in order
    inputs: StepInputs | None = None  # the forward pass; None: only KV bookkeeping (or stop)
    stop: bool = False  # the engine is closing: workers leave their loop


class RecordingKV:
    """Rank 0's KV manager, logging every decision so the other ranks can replay it."""

    def __init__(self, inner: KVManager):
        self.inner = inner
        self.kind = inner.kind
        self.max_tokens_per_request = inner.max_tokens_per_request
        self.cache_unit = inner.cache_unit
        self.ops: list[tuple] = []
        self._lookup: tuple | None = None  # the latest match_prefix's arguments and hit length

    def match_prefix(self, token_ids, keys, salt=None):
        """Every rank finds the same hit from the same tokens: replay redoes the lookup (each
        rank's cache holds the same units) and checks its length against rank 0's."""
        hit = self.inner.match_prefix(token_ids, keys, salt)
        self._lookup = (tuple(token_ids), list(keys), salt, hit.num_tokens if hit else 0)
        return hit

    def allocate(self, request_id: str, num_tokens: int, hit=None) -> bool:
        ok = self.inner.allocate(request_id, num_tokens, hit)
        lookup, self._lookup = (self._lookup if hit is not None else None), None
        self.ops.append(("allocate", request_id, num_tokens, ok, lookup))
        return ok

    def cache_prefix(self, request_id, token_ids, keys, num_tokens, final=False, salt=None) -> None:
        self.inner.cache_prefix(request_id, token_ids, keys, num_tokens, final, salt)
        self.ops.append(("cache_prefix", request_id, tuple(token_ids[:num_tokens]),
                         list(keys[:num_tokens // self.cache_unit]), num_tokens, final, salt))

    def reset_prefix_cache(self) -> None:
        self.inner.reset_prefix_cache()
        self.ops.append(("reset_prefix_cache",))

    def free(self, request_id: str) -> None:
        self.inner.free(request_id)
        self.ops.append(("free", request_id))

    def take_ops(self) -> list[tuple]:
        ops, self.ops = self.ops, []
        return ops

    def build_metadata(self, *args):
        return self.inner.build_metadata(*args)

    def layer_caches(self):
        return self.inner.layer_caches()

    def padding_row(self) -> int:
        return self.inner.padding_row()  # reserved by every rank at start, before any request

    def usage(self) -> KVUsage:
        return self.inner.usage()

    def close(self) -> None:
        self.inner.close()


def replay(kv: KVManager, ops: list[tuple], rank: int) -> None:
    """Apply rank 0's KV decisions; a different outcome here is a broken invariant."""
    for op in ops:
        if op[0] == "free":
            kv.free(op[1])
            continue
        if op[0] == "cache_prefix":
            _, request_id, token_ids, keys, num_tokens, final, salt = op
            kv.cache_prefix(request_id, list(token_ids), keys, num_tokens, final, salt)
            continue
        if op[0] == "reset_prefix_cache":
            kv.reset_prefix_cache()
            continue
        _, request_id, num_tokens, ok, lookup = op
        hit = None
        if lookup is not None:
            token_ids, keys, salt, want = lookup
            hit = kv.match_prefix(list(token_ids), keys, salt)
            if (hit.num_tokens if hit else 0) != want:
                raise TensorParallelError(
                    f"rank {rank}: the prefix cache has {hit.num_tokens if hit else 0} tokens of "
                    f"request {request_id} where rank 0 has {want}")
        if kv.allocate(request_id, num_tokens, hit) != ok:
            raise TensorParallelError(
                f"rank {rank}: KV memory for {num_tokens} tokens of request {request_id} "
                f"{'could not' if ok else 'could'} be allocated here, unlike on rank 0 (the ranks' "
                f"KV budgets or free device memory differ, or a driver call failed)")


class Coordinator:
    """Rank 0's side: sends plans, checks agreement, turns any rank's failure into one error."""

    def __init__(self, group: TPGroup, kv: RecordingKV, workers: WorkerProcesses | None):
        self.group, self.kv, self.workers = group, kv, workers
        self.dead: TensorParallelError | None = None
        if workers is not None:
            workers.on_failure(self._abort_compute)

    def send(self, inputs: StepInputs | None) -> None:
        """Before rank 0's forward: the plan out, then agreement that every rank replayed it."""
        self._check_alive()
        try:
            self.group.broadcast(StepPlan(self.kv.take_ops(), inputs))
            ok = self.group.min(1)
        except Exception as e:  # noqa: BLE001 - a rank that is gone shows up as any error
            raise self.fail(e) from e
        if not ok:
            raise self.fail(None)

    def fail(self, cause: Exception | None) -> TensorParallelError:
        """The error rank 0 raises (and keeps raising): which rank failed and why."""
        if self.dead is None:
            errors = self.group.errors(wait_s=5.0)
            exits = self.workers.exits(wait_s=REAP_WAIT_S) if self.workers else []
            parts = [f"rank {r}: {msg.strip().splitlines()[-1]}" for r, msg in sorted(errors.items())]
            parts += [str(e) for e in exits if e.rank not in errors]
            if not parts:
                parts = [f"{type(cause).__name__}: {cause}" if cause else "a rank failed"]
            full = "\n".join(errors.values())
            self.dead = TensorParallelError(
                "tensor-parallel engine stopped: " + "; ".join(parts) + (f"\n{full}" if full else ""))
        return self.dead

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead
        if self.workers is not None and self.workers.ended():
            raise self.fail(None)

    def _abort_compute(self) -> None:
        """Watcher thread, a worker died: unblock a rank-0 NCCL collective waiting on it (gloo
        collectives fail by themselves when a peer's connection closes)."""
        if self.group.compute is not None and torch.distributed.get_backend(self.group.compute) == "nccl":
            torch.distributed.distributed_c10d._abort_process_group(self.group.compute)

    def close(self) -> None:
        if self.dead is None and (self.workers is None or not self.workers.ended()):
            try:
                self.group.broadcast(StepPlan(stop=True))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        if self.workers is not None:
            self.workers.stop()
        self.group.close()


def run_worker(group: TPGroup, build) -> None:
    """Ranks 1..N-1: build the shard (model, KV manager, runner), then follow rank 0's plans
    until told to stop. Any failure is reported to the store and re-raised."""
    try:
        runner = build(group)
        while True:
            plan: StepPlan = group.broadcast()
            if plan.stop:
                break
            try:
                replay(runner.kv, plan.kv_ops, group.rank)
            except Exception:
                group.report_error(traceback.format_exc())
                group.min(0)
                raise
            group.min(1)
            if plan.inputs is not None:
                runner.forward(plan.inputs)
        runner.kv.close()
    except Exception:
        group.report_error(traceback.format_exc())
        raise
    finally:
        group.close()


def spawn_entry(config, rank: int, world_size: int, store_port: int) -> None:
    """Target of a spawned worker process (one machine); rank 0 hosts the store on store_port."""
    from .rank import build_rank
    pc = config.parallel
    _share_cpu_threads(world_size)
    store = local_store(world_size, pc.distributed_timeout_s, store_port)
    group = init_group(rank, world_size, rank, pc.distributed_backend, pc.distributed_timeout_s, store)
    try:
        run_worker(group, lambda g: build_rank(config, g).runner)
    except Exception:
        os._exit(1)  # the traceback is in the store and on stderr; skip teardown that may block


def _share_cpu_threads(world_size: int) -> None:
    """Ranks on one machine split its cores (as torchrun does), instead of each taking all."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def start_group(config) -> tuple[TPGroup, WorkerProcesses | None]:
    """Rank 0's group: join a torchrun launch, or start ranks 1..N-1 here. Under torchrun the
    other ranks never return from here: they serve plans, then the process exits."""
    pc = config.parallel
    if pc.distributed_backend == "auto":
        backend = "nccl" if config.model.torch_device().type == "cuda" else "gloo"
        config = dataclasses.replace(config, parallel=dataclasses.replace(pc, distributed_backend=backend))
        pc = config.parallel
    env = torchrun_env()
    if env is not None:
        rank, world_size, local_rank = env
        if world_size != pc.tensor_parallel_size:
            raise ValueError(f"torchrun started {world_size} processes but tensor_parallel_size is "
                             f"{pc.tensor_parallel_size}; make them equal")
        group = init_group(rank, world_size, local_rank, pc.distributed_backend, pc.distributed_timeout_s)
        if rank != 0:
            from .rank import build_rank
            run_worker(group, lambda g: build_rank(config, g).runner)
            raise SystemExit(0)
        return group, None
    n = pc.tensor_parallel_size
    store = local_store(n, pc.distributed_timeout_s)
    _share_cpu_threads(n)
    workers = WorkerProcesses(spawn_entry, lambda r: (config, r, n, store.port), n)
    try:
        group = init_group(0, n, 0, pc.distributed_backend, pc.distributed_timeout_s, store)
    except Exception:
        workers.stop(timeout_s=1.0)
        raise
    return group, workers
