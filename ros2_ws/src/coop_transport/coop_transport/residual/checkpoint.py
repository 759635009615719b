"""Residual checkpoints: safetensors + JSON only (never pickle), written atomically.

Policy checkpoint (what evaluation, the ROS node and the probes load), a directory with::

    residual.json       format_version, arch, the resolved ResidualConfig, the π0 checkpoint(s) it was trained on
                        (path + weights sha256, verified on load), chunk, step (chunks collected), the V5 pose
                        statistics, evaluation results, sha256 of the weights
    agents.safetensors  every agent's networks (encoder, message head, actor, critics), "<agent>/<module>..."

A run directory may stand in for a checkpoint: ``best.json`` in it names the best checkpoint by success.

Training state (``<run>/train_state``, resumable after a kill): networks with target critics, Adam moments, both
replay buffers, the collector's running episodes (their executed chunks are replayed on resume) and pending
transitions, all random generators, counters and the log; ``state.safetensors`` + ``state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coop_transport.utils.atomic import replace_directory

FORMAT_VERSION = 1
POLICY_JSON = "residual.json"
POLICY_WEIGHTS = "agents.safetensors"
BEST_JSON = "best.json"
STATE_JSON = "state.json"
STATE_WEIGHTS = "state.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vla_identity(path: Path | None) -> dict:
    """Where a π0 checkpoint is and the sha256 of its weights (from its own config.json)."""
    from coop_transport.pi0_policy import default_policy_dir

    resolved = Path(path) if path else default_policy_dir()
    meta = json.loads((resolved / "config.json").read_text())
    return {"path": str(resolved.resolve()), "default": path is None, "weights_sha256": meta.get("weights_sha256")}


def _atomic_dir(directory: Path, write) -> Path:
    """Write into a temporary sibling, then swap it in: the directory is complete or absent/old, never half."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def inference_state(agents) -> dict[str, torch.Tensor]:
    """The agents' weights a policy checkpoint holds: everything but the target critics and the prefix decoder
    (training-only), on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in agents.state_dict().items()
            if ".q_target." not in f".{k}" and ".decoder." not in f".{k}"}


# ---------------------------------------------------------------------------------------------- policy checkpoints
def save_policy(directory: Path, system, config, step: int, extra: dict | None = None) -> Path:
    """A self-describing policy checkpoint of ``system`` (see the module docstring)."""
    from coop_transport.residual.config import config_to_json

    def write(tmp: Path):
        weights = inference_state(system.agents) if system.agents is not None else {}
        save_file(weights or {"_empty": torch.zeros(1)}, str(tmp / POLICY_WEIGHTS), metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION, "arch": system.spec.name, "config": config_to_json(config),
            "vla": vla_identity(config.vla_joint if system.spec.vla_variant == "joint" else config.vla),
            "chunk": system.chunk, "step": int(step),
            "pose_mean": system.pose_mean.tolist(), "pose_std": system.pose_std.tolist(),
            "extra": extra or {}, "weights_sha256": sha256(tmp / POLICY_WEIGHTS),
        }
        (tmp / POLICY_JSON).write_text(json.dumps(meta, indent=2, allow_nan=False))

    return _atomic_dir(Path(directory), write)


def resolve_policy_dir(path: Path) -> Path:
    """A checkpoint directory itself, or the best checkpoint of a run directory (``best.json``)."""
    path = Path(path)
    if (path / POLICY_JSON).is_file():
        return path
    if (path / BEST_JSON).is_file():
        return path / json.loads((path / BEST_JSON).read_text())["checkpoint"]
    raise FileNotFoundError(f"{path} is neither a residual checkpoint ({POLICY_JSON}) nor a run with {BEST_JSON}")


def is_residual_checkpoint(path) -> bool:
    if not path:
        return False
    path = Path(path)
    return (path / POLICY_JSON).is_file() or (path / BEST_JSON).is_file()


def load_policy(path: Path, device: str = "auto", recipe=None, vla_path: Path | None = None):
    """Rebuild a ``ResidualSystem`` from a checkpoint (or a run's best): π0 from the recorded path, verified by its
    weights' sha256; ``recipe`` overrides the inference recipe (B1/B2 and the Table 2 ablation)."""
    from coop_transport.pi0_policy import Pi0Policy, resolve_device
    from coop_transport.residual.config import config_from_json
    from coop_transport.residual.system import ResidualSystem, make_agents

    path = resolve_policy_dir(path)
    meta = json.loads((path / POLICY_JSON).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / POLICY_JSON}: format_version {meta.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}")
    if sha256(path / POLICY_WEIGHTS) != meta["weights_sha256"]:
        raise ValueError(f"{path / POLICY_WEIGHTS} does not match the sha256 in {POLICY_JSON} (truncated or corrupt)")
    config = config_from_json(meta["config"])
    vla_dir = Path(vla_path) if vla_path else Path(meta["vla"]["path"])
    if meta["vla"].get("default") and not vla_dir.exists():
        from coop_transport.pi0_policy import default_policy_dir

        vla_dir = default_policy_dir()
    vla_meta = json.loads((vla_dir / "config.json").read_text())
    if meta["vla"].get("weights_sha256") and vla_meta.get("weights_sha256") != meta["vla"]["weights_sha256"]:
        raise ValueError(f"π0 checkpoint {vla_dir} is not the one {path} was trained on (weights sha256 differs)")
    dev = resolve_device(device)
    vla = Pi0Policy.load(vla_dir, device=str(dev))
    spec = config.spec
    agents = None
    if spec.residual:
        agents = make_agents(spec, config, vla)
        state = load_file(str(path / POLICY_WEIGHTS))
        missing, unexpected = agents.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".q_target." not in f".{k}" and ".decoder." not in f".{k}"]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match {spec.name}'s networks: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
        agents.eval()
    system = ResidualSystem(spec, config, vla, agents, dev, recipe)
    system.pose_mean = torch.tensor(meta["pose_mean"], device=dev)
    system.pose_std = torch.tensor(meta["pose_std"], device=dev)
    system.checkpoint_meta = meta
    return system


# -------------------------------------------------------------------------------------------------- train state
def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{prefix}/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{prefix}/{index}/{key}"] = float(value)
    return tensors, scalars


def _load_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "/"):
            index, key = name[len(prefix) + 1:].split("/")
            state.setdefault(int(index), {})[key] = value
    for name, value in scalars.items():
        if name.startswith(prefix + "/"):
            index, key = name[len(prefix) + 1:].split("/")
            state.setdefault(int(index), {})[key] = torch.tensor(value, dtype=torch.float32)
    sd["state"] = state
    optimizer.load_state_dict(sd)


def save_train_state(directory: Path, system, learner, demo, online, collector, meta: dict,
                     generator: torch.Generator) -> Path:
    def write(tmp: Path):
        tensors = {f"agents/{k}": v.detach().cpu().contiguous() for k, v in system.agents.state_dict().items()}
        scalars = {}
        for name, agent_learner in learner.learners.items():
            for opt_name, opt in agent_learner.optimizers.items():
                t, s = _optimizer_tensors(f"opt/{name}/{opt_name}", opt)
                tensors.update(t)
                scalars.update(s)
        tensors.update(demo.state_tensors("demo"))
        tensors.update(online.state_tensors("online"))
        collector_meta, collector_tensors = collector.state()
        tensors.update(collector_tensors)
        tensors["system/pose_mean"] = system.pose_mean.detach().cpu()
        tensors["system/pose_std"] = system.pose_std.detach().cpu()
        save_file(tensors, str(tmp / STATE_WEIGHTS))
        full = {**meta, "format_version": FORMAT_VERSION, "optimizer_scalars": scalars,
                "demo_buffer": demo.state_meta(), "online_buffer": online.state_meta(), "collector": collector_meta,
                "generator": generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
                "weights_sha256": sha256(tmp / STATE_WEIGHTS)}
        (tmp / STATE_JSON).write_text(json.dumps(full))

    return _atomic_dir(Path(directory), write)


def load_train_state(directory: Path, system, learner, demo, online, collector, generator: torch.Generator) -> dict:
    directory = Path(directory)
    meta = json.loads((directory / STATE_JSON).read_text())
    if sha256(directory / STATE_WEIGHTS) != meta["weights_sha256"]:
        raise ValueError(f"{directory / STATE_WEIGHTS} does not match {STATE_JSON} (corrupt training state)")
    tensors = load_file(str(directory / STATE_WEIGHTS))
    system.agents.load_state_dict({k[len("agents/"):]: v for k, v in tensors.items() if k.startswith("agents/")})
    for name, agent_learner in learner.learners.items():
        for opt_name, opt in agent_learner.optimizers.items():
            _load_optimizer(f"opt/{name}/{opt_name}", opt, tensors, meta["optimizer_scalars"])
    demo.load_state(tensors, "demo", meta["demo_buffer"])
    online.load_state(tensors, "online", meta["online_buffer"])
    system.pose_mean = tensors["system/pose_mean"].to(system.device)
    system.pose_std = tensors["system/pose_std"].to(system.device)
    generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    collector.load_state(meta["collector"], tensors, system.device)
    return meta
