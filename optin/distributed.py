"""Scoring on several processes with torch.distributed, as ``torchrun`` starts them.

``torchrun --nproc-per-node N -m optin.cli score ...`` (or ``run``) starts N copies of the command with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set. Each process loads the model and computes the
calibration trace itself (cheap), does the share of the scoring work that ``ScoreContext.mine`` gives it
(round robin over chunks of masks or probes: the assignment is fixed, so the result is the same as one
process), and the partial sums are added up with an all-reduce (gloo on the CPU, NCCL on CUDA). Every process
keeps its own resumable checkpoint (``scores.partial.rank{r}-of-{n}.safetensors``). Only rank 0 writes the
outputs and goes on with the search, pruning and evaluation; the other ranks stop after scoring.

Several machines work the same way with torchrun's rendezvous (``torchrun --nnodes M --nproc-per-node N
--rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` on each machine): nothing in optin changes. It stops
at one model copy per process: every process holds the whole model and its own calibration trace (no
model parallelism), and the scores are one all-reduce at the end, so the speedup is the number of processes
until the machine's cores or memory run out.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: from an initialised process group, else torchrun's environment
    (``RANK``, ``WORLD_SIZE``), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ensure_group(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA), once per process."""
    if dist.is_initialized() or rank_and_world()[1] <= 1:
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def reducer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum a CPU tensor over the processes (the identity for one process)."""
    if rank_and_world()[1] <= 1:
        return lambda t: t
    ensure_group(device)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        on = t.to(device) if device.type == "cuda" else t.clone()
        dist.all_reduce(on, op=dist.ReduceOp.SUM)
        return on.cpu()

    return reduce


def leave_group() -> None:
    """Leave the process group at the end of a command (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
