"""Serve a coop_transport policy over openpi's websocket protocol (see ``coop_transport.serving.protocol``).

    python -m coop_transport.serve                                  # the shipped per-arm default on 127.0.0.1:8000
    python -m coop_transport.serve --policy runs/joint/step_30000 --host 0.0.0.0 --port 9000 --api-key SECRET
    python -m coop_transport.serve --policy exports/small --backend onnxruntime

Clients: ``openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port, api_key)``, the ROS policy node
with ``-p policy_server:=host:port``, ``training/evaluate.py --policy-server host:port``. The API key may also come
from the environment variable COOP_TRANSPORT_API_KEY (kept out of process listings).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from coop_transport.serving.protocol import API_KEY_ENV
from coop_transport.serving.server import PolicyRunner, PolicyServer, ResidualRunner, ServerConfig


@dataclass
class ServeConfig:
    policy: Path | None = None
    """Checkpoint or export directory of a per-arm or joint π0 policy, or a residual-RL run or checkpoint (V4, V5,
    V6); default: the shipped per-arm small policy."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0: every interface; give an API key then)."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed)."""
    api_key: str | None = None
    """Require 'Authorization: Api-Key <key>' from clients; default: $COOP_TRANSPORT_API_KEY when set."""
    backend: str = "torch"
    """Inference backend (coop_transport.export.backends): torch, onnxruntime, tensorrt, ..."""
    device: str = "auto"
    """cpu | cuda | auto."""
    threads: int = 0
    """CPU threads for inference; 0 = the library default."""
    max_batch: int = 8
    """Most requests (from concurrent clients) run in one model call."""
    batch_wait_ms: float = 2.0
    """With several clients connected, wait up to this long for their requests to share a model call (0: never)."""
    max_num_samples: int = 16
    """Largest num_samples a request may ask for."""
    max_message_bytes: int = 4 * 2 ** 20
    """Largest request accepted (two 224 px images are about 0.3 MB); larger ones close their connection (1009)."""
    seed: int | None = None
    """Seed of the noise drawn for requests that bring neither noise nor noise_seed."""


def load_policy(path: Path | None, backend: str = "torch", device: str = "auto", threads: int = 0):
    """A Pi0Policy (torch) or BackendPolicy (exported backends), as the evaluator loads them."""
    from coop_transport.export.backends import canonical_backend
    from coop_transport.export.runtime import is_export_dir, load_backend_policy
    from coop_transport.residual.checkpoint import is_residual_checkpoint

    if path is not None and is_residual_checkpoint(str(path)):
        raise ValueError(f"{path} is a residual-RL checkpoint: serve it with make_runner (python -m "
                         "coop_transport.serve --policy RUN does)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    backend = canonical_backend(backend)
    if backend == "torch" and not is_export_dir(path):
        from coop_transport.pi0_policy import Pi0Policy

        return Pi0Policy.load(path, device=device)
    return load_backend_policy(path, backend, device=device, threads=threads or None)


def make_runner(cfg: ServeConfig):
    """The runner of ``cfg.policy``: a residual-RL run or checkpoint (V4, V5, V6; PyTorch) or a π0 policy."""
    from coop_transport.pi0_policy import default_policy_dir
    from coop_transport.residual.checkpoint import is_residual_checkpoint

    if cfg.policy is not None and is_residual_checkpoint(str(cfg.policy)):
        from coop_transport.residual.checkpoint import load_policy as load_residual

        if cfg.backend not in ("torch", "eager"):
            raise ValueError(f"residual policies are served with the torch backend, not {cfg.backend!r}")
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        system = load_residual(cfg.policy, cfg.device)
        return ResidualRunner(system, seed=cfg.seed, description=f"{cfg.policy} ({system.spec.name}, residual)")
    policy = load_policy(cfg.policy, cfg.backend, cfg.device, cfg.threads)
    description = f"{cfg.policy or default_policy_dir()} ({policy.variant}, {cfg.backend})"
    return PolicyRunner(policy, max_num_samples=cfg.max_num_samples, seed=cfg.seed, description=description)


def main(cfg: ServeConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = make_runner(cfg)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    server = PolicyServer(runner, ServerConfig(cfg.host, cfg.port, api_key, cfg.max_message_bytes, cfg.max_batch,
                                                 cfg.batch_wait_ms))
    # One line on stdout once listening: scripts and tests read the port from it.
    server.run(on_ready=lambda s: print(f"listening on ws://{cfg.host}:{s.port}", flush=True))
    print(f"stopped: {server.stats}", file=sys.stderr)


if __name__ == "__main__":
    main(tyro.cli(ServeConfig))
