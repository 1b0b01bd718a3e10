"""Training on several processes with PyTorch's DistributedDataParallel, started by ``torchrun``.

``torchrun --nproc_per_node N -m cyclereg train CONFIG --out RUN`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` for each process; :func:`session` sees them and joins the process group (NCCL on GPUs,
gloo on CPU). Without them, training runs in one process and nothing here does anything.

How the work is shared, so that N processes with ``train.batch_size = B`` compute what one process
computes with a batch of ``N·B``:

- each process draws only its own part of the global batch, every pair from its own seed
  (:mod:`cyclereg.training.loader`: a distributed sampler over random pairs; ``--resume`` stays exact);
- gradients are averaged across processes by DistributedDataParallel;
- the global random generator (random points of the ICON losses, map noise) is seeded per rank, and
  every rank's state goes into the checkpoint;
- rank 0 alone writes the log, the checkpoint and the model; losses in the log are the mean over ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cyclereg.core.errors import UsageError

__all__ = ["Context", "environment", "session"]


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (a copy; every rank gets it)."""
        value = value.detach().clone()
        if self.active:
            dist.all_reduce(value)
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def default_device() -> torch.device:
    """CUDA where there is a GPU, else the CPU: the device when none is named."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device | None) -> Context:
    """This process's rank, number of processes and device as ``torchrun`` describes them in the
    environment (one process on ``device`` without it), without joining a process group.
    ``device``: the user's choice (``cuda`` means this rank's GPU ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=device or default_device())
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    if not use_cuda:
        return Context(rank, world, torch.device("cpu"))
    if local >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPUs; "
                         "use --nproc_per_node at most that, or --device cpu")
    torch.cuda.set_device(local)
    return Context(rank, world, torch.device("cuda", local))


@contextlib.contextmanager
def session(device: torch.device | None):
    """:func:`environment`, with the process group it describes joined for the ``with`` block, if
    there is one. On a normal exit the ranks first wait for each other: a rank that tore down its
    gloo group while rank 0 was still writing its results was seen to abort at exit."""
    ctx = environment(device)
    if ctx.active and not dist.is_initialized():
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    try:
        yield ctx
        ctx.barrier()
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()
