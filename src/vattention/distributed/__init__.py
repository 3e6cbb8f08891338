"""Tensor parallelism on torch.distributed: the process group a sharded model sums over, the
channel rank 0 sends each step's plan on, and starting ranks (worker processes on one machine,
or a torchrun launch across machines).

    rank 0: engine ─ scheduler ─ plan ─broadcast(control, gloo)─> ranks 1..N-1
    every rank: replay the plan's KV decisions ─ agree (control) ─ forward with all-reduces (compute)

Who owns what: group.py owns the process groups and error reports; launch.py owns the worker
processes. What a worker runs each step is the engine's (vattention.engine.tp).
"""

from .group import TPGroup, init_group, torchrun_env
from .launch import WorkerProcesses, free_port

__all__ = ["TPGroup", "init_group", "torchrun_env", "WorkerProcesses", "free_port"]
