"""``torch.distributed`` for the key statistics: which share of the corpus a process reads, and
how the shares are summed.

Launch any ``metake stats`` command under ``torchrun --nproc-per-node N`` (or ``accelerate
launch``): each process runs every N-th batch of the texts, accumulates ``sum k k^T`` and its
token count, and the sums are all-reduced before the mean (docs/distributed.md). A plain
single process needs none of this: every helper here is a no-op without a process group.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("metake.distributed")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` a launcher (torchrun, accelerate launch) set; 1 when none did."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ValueError(
            f"WORLD_SIZE must be a whole number, got {os.environ['WORLD_SIZE']!r}"
        ) from e


def init_from_environment(device: str) -> str:
    """Join the process group a launcher describes (``gloo`` on CPUs, ``nccl`` on CUDA) and
    return this process's device (``cuda:LOCAL_RANK`` for a CUDA ``device``). Without a
    launcher (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` comes back."""
    if launched_world_size() == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run one process")
    cuda = device.startswith("cuda")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    log.info("process %d of %d on %s", rank, world, device)
    return device


def close() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_processes(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over every process of the group (in place)."""
    if rank_and_world()[1] == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def union_across_processes(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (``[n]`` bool) or-ed over every process: what any process lacks, all compute."""
    if rank_and_world()[1] == 1:
        return flags
    as_int = flags.to(torch.int64).clone()
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()
