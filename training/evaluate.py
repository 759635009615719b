"""Closed-loop evaluation of policies on TwoArmTransport from fixed reset seeds, with Wilson 95% CIs.

Usage:
    python training/evaluate.py --episodes 100 --out runs/eval/default           # the shipped default policy
    python training/evaluate.py --policy runs/imitation/per-arm-small/checkpoints/step_010000 --out runs/eval/x
    python training/evaluate.py --policy runs/imitation/per-arm-small/checkpoints --select-best --out runs/eval/sel
    python training/evaluate.py --controller expert --episodes 100 --out runs/eval/expert
    python training/evaluate.py --controller residual --policy runs/residual/V4/seed_0 --out runs/eval/v4  # RL run
    python training/evaluate.py --recipe-ablation --out runs/eval/ablation       # the paper's Table 2 ladder
    python training/evaluate.py --policy-server 127.0.0.1:8000 --out runs/eval/served  # a served policy

``--policy-server host:port`` evaluates the policy a server (``python -m coop_transport.serve``) serves: each worker
connects as its own client (the server batches their requests), the recipe runs in the workers, and with
``--noise-seed`` the flow noise is drawn in the workers and sent, so the result matches an in-process evaluation
with the same ``--noise-seed``.

``--policy`` may name one checkpoint directory or a run's ``checkpoints/`` folder: every checkpoint in it is
evaluated on the same seeds, a success-versus-step plot is written, and (with ``--select-best``) the best one by
simulated success — not by loss — is reported and copied to ``<out>/best``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate, plot_success_vs_step
from coop_transport.recipe import ABLATION_LADDER


@dataclass
class Config:
    controller: str = "pi0"
    """pi0 (a π0 checkpoint) | expert (the scripted demonstrator) | residual (a residual-RL run directory, its best
    checkpoint, or one of its checkpoints/chunk_* directories, as --policy; the same π0 noise per episode as
    training/residual.py's own evaluation)."""
    expert_handover: str = "observed"
    """--controller expert: the demonstrator's hand-over protocol, observed (what demonstrations are made with) or
    planned (the first demonstrations', the shipped default's); see coop_transport.sim.expert.ExpertConfig."""
    gate_margin: float | None = None
    """--controller residual: evaluate with the critic gate at this margin (coop_transport.residual.config.
    ResidualConfig.gate_margin); default: the run's own setting."""
    candidates: int | None = None
    """--controller residual: the critics choose among this many π0 draws per agent and chunk (coop_transport.
    residual.config.ResidualConfig.candidates); default: the run's own setting."""
    policy: Path | None = None
    """Checkpoint directory, an export directory (export/export.py; with --backend onnxruntime or tensorrt), or a folder
    of step_* checkpoints; default: the shipped per-arm policy."""
    out: Path = Path("runs/eval")
    """Where summary.json / summary.md (and videos, plots) go."""
    episodes: int = 100
    """Episodes, from reset seeds first_seed .. first_seed + episodes - 1."""
    first_seed: int = 1
    """First reset seed (the paper: 1-100)."""
    workers: int = 2
    """Parallel worker processes."""
    video: int = 0
    """Save this many rollouts as mp4."""
    chunk: int | None = None
    """Recipe: actions executed per chunk (default 10 per-arm, 25 joint)."""
    samples: int | None = None
    """Recipe: mean-of-N samples (default 4)."""
    clip_sigma: float | None = None
    """Recipe: ±k·sigma clipping (default 2)."""
    no_clip: bool = False
    """Recipe: switch clipping off."""
    plain_clip: bool = False
    """Recipe: clip at mean ± k·sigma even inside the range the demonstrations span (the seed paper's plain rule;
    by default a bound is widened to the demonstrated min / max)."""
    gripper_latch: float | None = None
    """Recipe: execute the gripper as ±1 with this hysteresis threshold (default off; see RecipeConfig)."""
    temporal_ensemble: float | None = None
    """Recipe: ACT's temporal ensembling with weight exponent m (default off; see RecipeConfig): every step executes
    the weighted mean of all kept chunks' predictions for it (use with a short --chunk, e.g. 1)."""
    recipe_ablation: bool = False
    """Evaluate the paper's Table 2 ladder (baseline, +mean-of-4, +clipping, +chunk 25) instead of one recipe."""
    select_best: bool = False
    """With a folder of checkpoints: copy the best by success to <out>/best."""
    device: str = "cpu"
    """Device for the policy in each worker (cpu keeps many workers cheap; cuda for big models)."""
    backend: str = "torch"
    """Inference backend (coop_transport.export.backends): torch | cudagraph (with --device cuda: one captured
    graph per worker, ~10x faster than eager for the small model) | onnxruntime | tensorrt (exported policies)."""
    horizon: int = 500
    """Control steps per episode."""
    policy_server: str | None = None
    """host:port of a policy server to evaluate instead of loading --policy here."""
    noise_seed: int | None = None
    """Flow noise from a stream restarted at every episode (paired comparisons: backends, served vs in-process)."""
    resume: bool = False
    """Continue a killed evaluation in --out: episodes already in its episodes.jsonl (same policy, recipe and
    horizon) are not run again (without it, the evaluation starts over)."""
    progress: bool = True
    """Show a progress bar."""


def recipe_overrides(cfg: Config) -> dict:
    recipe = {}
    if cfg.chunk is not None:
        recipe["execute_steps"] = cfg.chunk
    if cfg.samples is not None:
        recipe["num_samples"] = cfg.samples
    if cfg.clip_sigma is not None:
        recipe["clip_sigma"] = cfg.clip_sigma
    if cfg.gripper_latch is not None:
        recipe["gripper_latch"] = cfg.gripper_latch
    if cfg.temporal_ensemble is not None:
        recipe["temporal_ensemble"] = cfg.temporal_ensemble
    if cfg.plain_clip:
        recipe["clip_beyond_demonstrated"] = False
    if cfg.no_clip:
        recipe["clip_sigma"] = None
    return recipe


def checkpoints_in(path: Path) -> list[Path]:
    """One checkpoint or export directory, or the step_* checkpoints inside a folder (sorted by step)."""
    from coop_transport.export.runtime import is_export_dir

    if (path / "config.json").exists() or is_export_dir(path):
        return [path]
    found = sorted(p for p in path.glob("step_*") if (p / "config.json").exists())
    if not found:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no config.json), an export directory (no manifest.json) "
                                "nor a folder of step_* checkpoints")
    return found


def policy_step(path: Path) -> int:
    """The training step of a checkpoint, or of the checkpoint an export directory was made from."""
    from coop_transport.export import read_manifest
    from coop_transport.export.runtime import is_export_dir

    if is_export_dir(path):
        return read_manifest(path)["source_checkpoint"].get("step", 0)
    return json.loads((path / "config.json").read_text()).get("step", 0)


def best_row(rows: list[dict]) -> dict:
    """The best evaluated checkpoint by simulated success. Ties (common while a policy rarely succeeds) go to the one
    that gets further through the task, then to the later step."""
    return max(rows, key=lambda r: (r["success_rate"], r["mean_milestones"], r["step"]))


def main(cfg: Config) -> dict:
    eval_config = EvalConfig(episodes=cfg.episodes, first_seed=cfg.first_seed, workers=cfg.workers, videos=cfg.video,
                             horizon=cfg.horizon)
    if cfg.gate_margin is not None and cfg.controller != "residual":
        raise ValueError("--gate-margin gates a residual policy's chunks by its critics: it needs --controller residual")
    if cfg.candidates is not None and cfg.controller != "residual":
        raise ValueError("--candidates lets a residual policy's critics choose among π0's draws: it needs "
                         "--controller residual")
    if cfg.candidates is not None and cfg.candidates < 1:
        raise ValueError(f"--candidates {cfg.candidates}: must be >= 1")
    if cfg.controller == "expert":
        spec = ControllerSpec("expert", {"handover": cfg.expert_handover}, label=f"expert ({cfg.expert_handover})")
        summary = evaluate(spec, eval_config, cfg.out, progress=cfg.progress, resume=cfg.resume)
        print(f"expert: {summary['successes']}/{summary['episodes']} -> {cfg.out / 'summary.md'}")
        return summary
    if cfg.controller == "residual":
        if cfg.policy is None or cfg.policy_server:
            raise ValueError("--controller residual needs --policy: a residual-RL run directory (its best checkpoint) "
                             "or one of its checkpoints/chunk_* directories (it is not served)")
        recipe = recipe_overrides(cfg)
        args = {"checkpoint": str(cfg.policy), "device": cfg.device, **({"recipe": recipe} if recipe else {}),
                **({"gate_margin": cfg.gate_margin} if cfg.gate_margin is not None else {}),
                **({"candidates": cfg.candidates} if cfg.candidates is not None else {})}
        spec = ControllerSpec("residual", args, label=f"residual {cfg.policy}")
        summary = evaluate(spec, eval_config, cfg.out, progress=cfg.progress, resume=cfg.resume)
        print(f"{spec.label}: {summary['successes']}/{summary['episodes']} "
              f"[{100 * summary['wilson95'][0]:.1f}, {100 * summary['wilson95'][1]:.1f}] -> {cfg.out / 'summary.md'}")
        return summary
    if cfg.controller != "pi0":
        raise ValueError(f"unknown controller {cfg.controller!r}; use pi0, expert or residual")

    if cfg.policy_server and cfg.policy:
        raise ValueError("give --policy or --policy-server, not both (the server's --policy decides)")
    policies = checkpoints_in(cfg.policy) if cfg.policy else [None]
    if cfg.recipe_ablation:
        recipes = {name: {k: v for k, v in asdict(r).items()} for name, r in ABLATION_LADDER.items()}
    else:
        recipes = {"recipe": recipe_overrides(cfg)}
    rows = []
    for policy in policies:
        for recipe_name, recipe in recipes.items():
            name = (policy.name if policy else "default") + ("" if len(recipes) == 1 else f" | {recipe_name}")
            args = {"policy": str(policy) if policy else None, "recipe": recipe, "device": cfg.device,
                    "backend": cfg.backend, "noise_seed": cfg.noise_seed}
            if cfg.policy_server:
                args["policy_server"] = cfg.policy_server
                name = f"served {cfg.policy_server}" + name[len("default"):]
            spec = ControllerSpec("pi0", args, label=name)
            out = cfg.out / (policy.name if policy and len(policies) > 1 else "") / (
                "" if len(recipes) == 1 else recipe_name.split(" (")[0].replace(" ", "_").replace("±", "pm"))
            summary = evaluate(spec, eval_config, out, progress=cfg.progress, resume=cfg.resume)
            source = policy
            if source is None and not cfg.policy_server:
                from coop_transport.pi0_policy import default_policy_dir

                source = default_policy_dir()
            step = policy_step(source) if source else 0
            rows.append({"name": name, "policy": str(policy) if policy else (
                         f"served {cfg.policy_server}" if cfg.policy_server else "default"), "recipe": recipe_name,
                         "step": step, "success_rate": summary["success_rate"], "wilson95": summary["wilson95"],
                         "successes": summary["successes"], "episodes": summary["episodes"],
                         "mean_length": summary["mean_length"], "clip_activation_rate": summary["clip_activation_rate"],
                         "mean_milestones": summary["mean_milestones"]})
            print(f"{name}: {summary['successes']}/{summary['episodes']} "
                  f"[{100 * summary['wilson95'][0]:.1f}, {100 * summary['wilson95'][1]:.1f}]")
    cfg.out.mkdir(parents=True, exist_ok=True)
    table = ["| policy | recipe | step | success | Wilson 95% CI | mean length | milestones reached (of 8) | clip rate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clip = "—" if r["clip_activation_rate"] is None else f"{100 * r['clip_activation_rate']:.1f}%"
        table.append(f"| {r['policy']} | {r['recipe']} | {r['step']} | {100 * r['success_rate']:.1f}% "
                     f"({r['successes']}/{r['episodes']}) | [{100 * r['wilson95'][0]:.1f}, {100 * r['wilson95'][1]:.1f}] "
                     f"| {r['mean_length']:.0f} | {r['mean_milestones']:.1f} | {clip} |")
    (cfg.out / "results.md").write_text("\n".join(table) + "\n")
    result = {"rows": rows}
    if len(policies) > 1 and len(recipes) == 1:
        plot_success_vs_step(rows, cfg.out / "success_vs_step.png")
        best = best_row(rows)
        result["best"] = best
        print(f"best by simulated success: {best['policy']} ({100 * best['success_rate']:.1f}%)")
        if cfg.select_best:
            target = cfg.out / "best"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(best["policy"], target)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
