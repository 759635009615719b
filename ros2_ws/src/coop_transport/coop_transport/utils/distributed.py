"""Data-parallel training over any number of processes, one per GPU, started by torchrun.

    torchrun --nproc-per-node 2 training/imitation.py --variant per-arm --batch-size 512 ...

Every rank holds the whole model and the whole training set; each draws its own share of the global batch, and
the gradients are averaged in one flat all-reduce before the (identical) optimizer step, so the ranks' weights stay
equal without DistributedDataParallel's hooks (which would also sit between torch.compile and the loss). Decisions
that end or reshape a run (a non-finite loss, a time budget, a stop) are taken collectively, so no rank waits
forever on a collective the others have left. Without torchrun's environment everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and summaries; the others only compute."""
        return self.rank == 0


def init_from_env(device: str = "auto") -> tuple[DistContext, torch.device | None]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); returns the context
    and this rank's device (``None`` when not distributed: the caller picks its device as usual). NCCL on GPUs,
    gloo on CPU (``device="cpu"``, or no GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} has local rank {local} but this host has {torch.cuda.device_count()} "
                               "GPUs: start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        rank_device = torch.device("cuda", local)
    else:
        rank_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local), rank_device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module, ctx: DistContext) -> None:
    """Make every rank's tensors in ``module.state_dict()`` rank 0's (a model's parameters and buffers, an EMA's
    shadow weights), in place: after initialization, a warm start or a resume."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def average_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of ``params`` over all ranks in one flat all-reduce (a missing gradient counts as
    zero on that rank, so every rank sends the same layout)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for p, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = synced.clone()
        else:
            p.grad.copy_(synced)


def mean_loss_and_finite(loss: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, bool]:
    """The loss averaged over ranks and whether it is finite on every rank (one collective for both)."""
    finite_here = torch.isfinite(loss.detach())
    if not ctx.enabled:
        return loss.detach(), bool(finite_here)
    packed = torch.stack([torch.where(finite_here, loss.detach().float(), torch.zeros_like(loss.float())),
                          (~finite_here).float()])
    dist.all_reduce(packed)
    finite = bool(packed[1] == 0)
    return (packed[0] / ctx.world_size if finite else torch.tensor(float("nan"))), finite


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. one rank's clock ran out)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_int(value: int, ctx: DistContext, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (e.g. the step count a time budget fits)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def check_in_sync(module: torch.nn.Module, ctx: DistContext, device: torch.device, rtol: float = 1e-6) -> None:
    """Raise if any rank's weights drifted from rank 0's (a checksum per rank, compared at every checkpoint):
    a silent divergence would make the saved rank-0 weights a model no rank trained."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        local = torch.stack([p.detach().double().abs().sum() for p in module.parameters()]).sum().reshape(1)
    local = local.to(device)
    sums = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(sums, local)
    ref = float(sums[0])
    bad = [r for r, s in enumerate(sums) if abs(float(s) - ref) > rtol * max(abs(ref), 1.0)]
    if bad:
        raise RuntimeError(f"data-parallel ranks {bad} hold weights different from rank 0's "
                           f"(checksums {[float(s) for s in sums]})")
