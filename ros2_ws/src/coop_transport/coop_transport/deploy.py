"""Policies as deployed robots use them: one arm, its own observations, the recipe applied, chunks out.

``load_arm_policy`` is the one call the ROS policy node (and any other deployment client) makes; it hides which
checkpoint, architecture and inference backend sit behind it.
"""

from __future__ import annotations

import numpy as np

from coop_transport.export.backends import BACKENDS, canonical_backend  # noqa: F401  (numpy-only import)
from coop_transport.recipe import ChunkedActor, RecipeConfig


class ArmPolicy:
    """One arm's policy under the inference recipe.

    ``plan(arm_obs)`` returns the (C, 7) actions to execute next (mean-of-N and clipping applied); ``arm_obs`` is
    ``coop_transport.sim.env.arm_observation``'s format: ``proprio`` (18,), ``wrist_image`` and ``agentview_image``
    (S, S, 3) uint8, and ``partner_message`` where the architecture has one.
    """

    uses_agentview = True
    accepts_message = False
    architecture = "B1"  # per-arm imitation policy, no residual, no message

    # Threading: plan, message and reset are called from one worker thread of the policy node, never concurrently.
    # A missing or stale partner message is an absent ``partner_message`` key (the no-message input).

    def __init__(self, policy, arm: str, recipe: RecipeConfig):
        self.policy = policy
        self.arm = arm
        if recipe.temporal_ensemble is not None:  # the node executes whole chunks, planned ahead of their use
            raise ValueError("temporal_ensemble is an evaluation-side recipe switch (training/evaluate.py "
                             "--temporal-ensemble); the policy node executes chunks as planned")
        self.recipe = recipe
        self._actor = ChunkedActor.for_arm(policy, arm, recipe)

    @property
    def image_size(self) -> int:
        return self.policy.image_size

    def plan(self, arm_obs: dict) -> np.ndarray:
        return self._actor.plan(arm_obs)

    def message(self, arm_obs: dict) -> np.ndarray | None:
        """The outgoing message to the partner (none for imitation-only per-arm policies)."""
        return None

    def reset(self) -> None:
        self._actor.reset()

    def stats(self) -> dict:
        c = self._actor.counters
        backend = getattr(getattr(self.policy, "backend", None), "name", None) or getattr(self.policy, "name", "torch")
        out = {"chunks": self._actor.chunks_planned, "clip_action_rate": c.action_rate,
               "clipped_actions": c.clipped_actions, "backend": backend}
        for key, value in getattr(self.policy, "counters", {}).items():  # a served policy's connection counters
            out[f"server_{key}"] = value
        timing = getattr(self.policy, "last_server_timing", {})
        if "infer_ms" in timing:
            out["server_infer_ms"] = round(float(timing["infer_ms"]), 2)
        return out


def auto_backend(path: str | None, export: str | None = None, device: str = "auto") -> str:
    """The fastest backend available for this checkpoint here (measured, bench/policy_latency.py): CUDA graphs on
    a GPU; on a CPU, ONNX Runtime (2.1-2.5x faster than eager for the small default) when the checkpoint has an
    export (``python export/export.py --out <checkpoint>/export``; setup.sh makes the default's), else PyTorch
    eager. An export made from another checkpoint is refused later by the exported backend, never used silently."""
    import importlib.util

    from coop_transport.export.runtime import checkpoint_and_export, is_export_dir

    if is_export_dir(path):
        return "onnxruntime"
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return "torch-cudagraph"
    _, export_dir = checkpoint_and_export(path, export)
    if is_export_dir(export_dir) and importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime"
    return "torch"


def load_arm_policy(path: str | None, arm: str, recipe: RecipeConfig = RecipeConfig(), backend: str = "torch",
                    device: str = "auto", threads: int | None = None, export: str | None = None,
                    policy_server: str | None = None, server_timeout: float = 1.0,
                    server_wait: float = 30.0) -> ArmPolicy:
    """The policy for ``arm`` from a checkpoint directory (the shipped default when ``path`` is empty) or an export
    directory (``python export/export.py --out DIR``), run by ``backend`` (``coop_transport.export.backends``:
    torch, torch-cudagraph, torch-compile, torch-compile-cudagraph, onnxruntime[-cpu|-cuda|-tensorrt], tensorrt;
    alias onnx; or auto, see ``auto_backend``). Exported
    backends given a checkpoint use ``export`` (default ``<checkpoint>/export``) and refuse an export made from
    another checkpoint.

    ``policy_server`` (``host:port``) instead queries a policy server (``python -m coop_transport.serve``) through
    ``serving.client.RemotePolicy``: waiting up to ``server_wait`` s for it at start, each request answered within
    ``server_timeout`` s or raising ``PolicyUnavailable``; the recipe still runs here. ``path`` must then be empty
    (the server's ``--policy`` decides)."""
    from coop_transport.constants import ARMS

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    if policy_server:
        if path:
            raise ValueError(f"policy_path {path!r} and policy_server {policy_server!r} both given; the server's "
                             f"--policy decides which policy a remote node runs")
        from coop_transport.serving.client import RemotePolicy

        remote = RemotePolicy(policy_server, timeout=server_timeout, connect_wait=server_wait)
        if remote.variant != "per-arm":
            raise ValueError(f"{policy_server} serves a {remote.variant!r} policy; one arm's node needs a per-arm one")
        return ArmPolicy(remote, arm, recipe)
    if backend == "auto":
        backend = auto_backend(path, export, device)
    backend = canonical_backend(backend)  # ValueError naming the available backends
    from coop_transport.residual.checkpoint import is_residual_checkpoint

    if is_residual_checkpoint(path):  # a residual-RL checkpoint or run (V4, V5, V6): coop_transport.residual.policy
        from coop_transport.residual.policy import load_residual_arm_policy

        return load_residual_arm_policy(path, arm, recipe, device=device, threads=threads)
    from coop_transport.export.runtime import is_export_dir, load_backend_policy

    if backend == "torch" and not is_export_dir(path):
        import torch

        from coop_transport.pi0_policy import Pi0Policy

        if threads:
            torch.set_num_threads(threads)
        policy = Pi0Policy.load(path or None, device=device)
    else:
        policy = load_backend_policy(path or None, backend, device=device, threads=threads, export_dir=export)
    if policy.variant != "per-arm":
        raise ValueError(f"{path}: a per-arm policy is needed for one arm's node, this one is {policy.variant!r}")
    return ArmPolicy(policy, arm, recipe)
