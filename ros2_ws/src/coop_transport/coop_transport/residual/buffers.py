"""Replay data: chunk transitions, the FIFO online buffer, the demonstration buffer and the RLPD batch sampler.

A chunk transition (all agents of one environment at one chunk boundary; A agents, Z latent, P proprio, C chunk,
D action width)::

    latent      (A, Z)     RL token z of each agent (frozen encoder)        stored as float16
    proprio     (A, P)     normalized proprioception
    ref         (A, C, D)  π0 reference chunk (recipe applied)
    action      (A, C, D)  executed chunk
    reward      ()         discounted chunk return sum_j γ^j r_j (sparse + shaping during training)
    discount    ()         γ^k, k = steps the chunk ran (< C when the episode ended inside it)
    done        ()         1 when the episode terminated (success); 0 on time-outs (they bootstrap)
    next_latent (A, Z), next_proprio (A, P), next_ref (A, C, D)   the same at the next boundary
    phase (2,) int64, gripper (2,), ready (2,), pose (2, 6)          per-arm labels at the boundary (robot0, robot1)

The demonstration buffer holds the demonstrations cut into chunks (stride C), with the frozen π0's reference at each
chunk start and the demonstrated actions as ``action``; the online buffer is a FIFO ring. ``RLPDSampler`` draws
each batch half from each (Ball et al., 2023).
"""

from __future__ import annotations

import torch

from coop_transport.constants import ARMS

LABEL_FIELDS = ("phase", "gripper", "ready", "pose")


def transition_fields(agents: int, latent: int, proprio: int, chunk: int, action: int) -> dict[str, tuple]:
    """name -> (per-transition shape, storage dtype)."""
    arms = len(ARMS)
    return {
        "latent": ((agents, latent), torch.float16),
        "proprio": ((agents, proprio), torch.float32),
        "ref": ((agents, chunk, action), torch.float32),
        "action": ((agents, chunk, action), torch.float32),
        "reward": ((), torch.float32),
        "discount": ((), torch.float32),
        "done": ((), torch.float32),
        "next_latent": ((agents, latent), torch.float16),
        "next_proprio": ((agents, proprio), torch.float32),
        "next_ref": ((agents, chunk, action), torch.float32),
        "phase": ((arms,), torch.int64),
        "gripper": ((arms,), torch.float32),
        "ready": ((arms,), torch.float32),
        "pose": ((arms, 6), torch.float32),
    }


class ReplayBuffer:
    """A fixed-capacity ring of transitions on one device; the oldest are overwritten first (FIFO)."""

    def __init__(self, fields: dict[str, tuple], capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.fields = fields
        self.capacity = capacity
        self.device = torch.device(device)
        self.data = {k: torch.zeros((capacity, *shape), dtype=dtype, device=self.device)
                     for k, (shape, dtype) in fields.items()}
        self.ptr = 0  # next slot to write
        self.size = 0
        self.added = 0  # transitions ever added

    def __len__(self) -> int:
        return self.size

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Append n transitions (every field with a leading dimension n)."""
        missing = sorted(set(self.fields) - set(batch))
        if missing:
            raise ValueError(f"transitions lack fields {missing}")
        n = int(batch["reward"].shape[0])
        if n == 0:
            return
        for key, (shape, _) in self.fields.items():
            if tuple(batch[key].shape) != (n, *shape):
                raise ValueError(f"field {key!r} has shape {tuple(batch[key].shape)}, expected ({n}, *{shape})")
        if n > self.capacity:  # only the newest capacity transitions survive
            batch = {k: v[-self.capacity:] for k, v in batch.items()}
            n = self.capacity
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for key in self.fields:
            self.data[key][idx.to(self.device)] = batch[key].to(self.device, self.data[key].dtype)
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.added += n

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transitions at ``idx`` (latents cast back to float32)."""
        idx = idx.to(self.device)
        return {k: (v[idx].float() if v.dtype == torch.float16 else v[idx]) for k, v in self.data.items()}

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        return self.get(torch.randint(self.size, (n,), generator=generator))

    # ---- checkpoints: tensors for safetensors, scalars for JSON
    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}/{k}": v[: self.size].detach().cpu().contiguous() for k, v in self.data.items()}

    def state_meta(self) -> dict:
        return {"ptr": self.ptr, "size": self.size, "added": self.added, "capacity": self.capacity}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> None:
        if meta["capacity"] != self.capacity:
            raise ValueError(f"buffer capacity {meta['capacity']} in the checkpoint, {self.capacity} configured")
        self.size, self.ptr, self.added = int(meta["size"]), int(meta["ptr"]), int(meta["added"])
        for k in self.data:
            self.data[k][: self.size] = tensors[f"{prefix}/{k}"].to(self.device, self.data[k].dtype)


class RLPDSampler:
    """Batches of ``batch_size``: round(batch_size * demo_fraction) from the demonstrations, the rest online.

    While one buffer is empty the whole batch comes from the other. ``sample`` also returns which rows came from the
    demonstrations (``from_demo``, bool) so that the ratio can be checked and logged.
    """

    def __init__(self, demo: ReplayBuffer | None, online: ReplayBuffer, batch_size: int = 256,
                 demo_fraction: float = 0.5):
        self.demo, self.online = demo, online
        self.batch_size, self.demo_fraction = batch_size, demo_fraction

    def split(self) -> tuple[int, int]:
        """(rows from the demonstrations, rows online) of the next batch."""
        has_demo = self.demo is not None and len(self.demo) > 0
        has_online = len(self.online) > 0
        if not has_demo and not has_online:
            raise ValueError("both buffers are empty")
        if not has_online:
            return self.batch_size, 0
        if not has_demo:
            return 0, self.batch_size
        n_demo = int(round(self.batch_size * self.demo_fraction))
        return n_demo, self.batch_size - n_demo

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n_demo, n_online = self.split()
        parts = []
        if n_demo:
            parts.append(self.demo.sample(n_demo, generator))
        if n_online:
            parts.append(self.online.sample(n_online, generator))
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        device = batch["reward"].device
        batch["from_demo"] = torch.cat([torch.ones(n_demo, dtype=torch.bool), torch.zeros(n_online, dtype=torch.bool)
                                        ]).to(device)
        return batch
