"""Tensor parallelism on torch.distributed: the process group a sharded model sums over, the
channel rank 0 sends each step's plan on, and starting ranks (worker processes on one machine,
or a torchrun launch across machines).

    rank 0: engine ─ scheduler ─ plan ─broadcast(control, gloo)─> ranks 1..N-1
    every rank: replay the plan's KV decisions ─ agree (control) ─ forward with all-reduces (compute)

Who owns what: group.py owns the process groups, the rendezvous store and error reports;
launch.py owns the worker processes and reads how they ended. What a worker runs each step is
the engine's (vattention.engine.tp).
"""

from .group import TPGroup, init_group, local_store, torchrun_env
from .launch import WorkerExit, WorkerProcesses

__all__ = ["TPGroup", "init_group", "local_store", "torchrun_env", "WorkerExit", "WorkerProcesses"]
