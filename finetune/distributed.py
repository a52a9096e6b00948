"""Data-parallel training over processes that ``torchrun`` launches (PyTorch DDP).

``torchrun --nproc_per_node N -m samtune train RECIPE`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in each process; ``init_from_env`` joins them into one process group: NCCL when
the recipe trains on CUDA (process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``), gloo on the CPU. Without
those variables everything here is a no-op and a run is one process.

How a run is split (``samtune.finetune.train.loop``):
- **Batches:** ``train.batch_size`` is per process; step ``s`` of an N-process run trains on the
  same N·batch_size draws that one process with batch N·batch_size would take, batch ``k`` of that
  global batch on rank ``k`` (``DataOrder``). Gradients are averaged by DDP.
- **Random decisions** of the loop (prompted or automatic step, box or points) come from generators
  seeded alike on every rank, so every rank takes the same path; per-sample randomness (jitter,
  augmentation, clicks) is seeded per rank.
- **Evaluation:** each rank scores a contiguous run of whole validation batches (``shard``), and
  the accumulators are merged in rank order (``merge_across_ranks``): the merged counts and
  per-sample lists are the single process's, so per-class IoU is equal, not merely close.
- **Files:** only rank 0 writes (run folder, checkpoints, states, TensorBoard, metrics); states
  hold every rank's random states, so ``--resume`` works with the same number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from samtune import SamtuneError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place in the process group (one process when none was started)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device_name: str) -> tuple[Ranks, torch.device | None]:
    """Join the process group torchrun describes in the environment; returns the ranks and the
    device this process must use (None: one process, the recipe's ``train.device`` applies)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), None
    if dist.is_initialized():
        return current(), _device_of(device_name, current().local_rank)
    if not dist.is_available():
        raise SamtuneError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process.")
    if device_name == "mps":
        raise SamtuneError("train.device='mps' cannot train with several processes (no DDP backend on Metal); launch one process.")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_of(device_name, local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SamtuneError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs; lower --nproc_per_node.")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:  # one log: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    return Ranks(rank, world, local_rank), device


def _device_of(device_name: str, local_rank: int) -> torch.device:
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise SamtuneError(f"train.device={device_name!r}: CUDA is not available on this machine; use auto or cpu.")
    return torch.device("cuda", local_rank) if wants_cuda else torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may write caches or demo data), the others after it."""
    ranks = current()
    if ranks.world > 1 and not ranks.main:
        dist.barrier()
    try:
        yield
    finally:
        if ranks.world > 1 and ranks.main:
            dist.barrier()


def shard(n_items: int, batch_size: int) -> range:
    """This rank's contiguous run of whole batches of ``n_items`` (batch-aligned, so a batch is the
    same on every number of ranks); everything with one process."""
    ranks = current()
    if ranks.world == 1:
        return range(n_items)
    n_batches = -(-n_items // batch_size)
    first, last = (n_batches * ranks.rank) // ranks.world, (n_batches * (ranks.rank + 1)) // ranks.world
    return range(min(first * batch_size, n_items), min(last * batch_size, n_items))


def gather(obj) -> list:
    """``obj`` of every rank, in rank order (pickled; on every rank)."""
    ranks = current()
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def merge_across_ranks(*accumulators) -> None:
    """Replace each accumulator's content by the merge of every rank's, in rank order (their
    ``merge(other)``); with contiguous shards that order is the single process's order."""
    if current().world == 1:
        return
    everyone = gather(list(accumulators))
    for i, acc in enumerate(accumulators):
        first = everyone[0][i]
        for other in everyone[1:]:
            first.merge(other[i])
        acc.__dict__.update({k: v for k, v in first.__dict__.items() if k != "source"})


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (NaN/inf anywhere stays non-finite)."""
    if current().world == 1:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / current().world
