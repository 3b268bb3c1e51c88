"""The process group of a data-parallel training run under torchrun.

torchrun starts one process per device and tells each where it stands through environment
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` or its
rendezvous); :func:`init` joins them into PyTorch's default process group, NCCL for CUDA devices and
gloo for the CPU, with a timeout on every collective so that a process that died or stalls stops the
others with an error instead of a hang. Without torchrun, or with one process, nothing is
initialised and every helper here is the single-process identity.

:func:`global_batch` makes the DDER balance loss a function of the global batch: inside it, the
per-expert importance and load of each training forward are summed over the processes (with their
gradient) before the cv², see :func:`m2restore.modules.dder.balance_loss`.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import warnings

import torch
import torch.distributed as dist

from .options import DIST_TIMEOUT

# The process group the balance loss is summed over while global_batch() is active. A group of its
# own, so that these sums never interleave with DistributedDataParallel's gradient buckets.
_BALANCE_GROUP: contextvars.ContextVar = contextvars.ContextVar("m2restore_balance_group", default=None)
_groups: dict[str, object] = {}


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device, timeout: float = DIST_TIMEOUT) -> torch.device:
    """Join torchrun's process group when it started more than one process; returns the device
    this process trains on: ``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``."""
    if env_world_size() <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _groups["balance"] = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return device


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the process that logs and writes checkpoints."""
    return rank() == 0


def cleanup() -> None:
    """Leave the process group (after a run that ended normally)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _groups.clear()


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """values (K,) -> (W, K) float64 on the CPU: every process's values, in rank order."""
    values = values.detach().to(torch.float64).reshape(1, -1)
    if not active():
        return values.cpu()
    local = values.to(_comm_device())
    rows = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(rows, local)
    return torch.cat(rows).cpu()


def gather_objects(obj) -> list:
    """Every process's picklable ``obj``, in rank order ([obj] with one process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any of them."""
    return bool(gather_rows(torch.tensor([float(flag)])).max() > 0)


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def global_batch():
    """Within this block, training forwards of the DDERs sum their balance statistics over the
    processes (see :func:`batch_reducer`); outside it (validation, inference) they do not."""
    token = _BALANCE_GROUP.set(_groups.get("balance") if active() else None)
    try:
        yield
    finally:
        _BALANCE_GROUP.reset(token)


def batch_reducer():
    """The function that sums a tensor over the processes' shares of the global batch, with its
    gradient, inside :func:`global_batch` of a multi-process run; None otherwise."""
    group = _BALANCE_GROUP.get()
    if group is None:
        return None
    return lambda tensor: _sum_over_ranks(tensor, group)


@torch.compiler.disable
def _sum_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """Σ over the processes of ``tensor``; its backward sums the gradients over the processes in
    turn, so each process gets the gradient of the loss of every process with respect to its share.
    Run eagerly under torch.compile (a graph break), where this autograd collective is refused."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # torch >= 2.9 marks it deprecated for a private functional API; it is the public one.
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
