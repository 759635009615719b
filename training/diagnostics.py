"""Imitation diagnostics as tables: teacher-forced error on held-out demonstrations, the sampler's spread across flow
samples, the single-trajectory overfit probe, and the privileged-state BC reference.

Usage:
    python training/diagnostics.py teacher-forced --data runs/default/transport_scripted_96.hdf5   # shipped default
    python training/diagnostics.py teacher-forced --policy runs/x/checkpoints/step_010000 --data d.hdf5 --split valid
    python training/diagnostics.py spread --data runs/default/transport_scripted_96.hdf5      # σ over 20 samples
    python training/diagnostics.py overfit --data d.hdf5 --demo demo_0 --out runs/overfit      # joint, 5k steps
    python training/diagnostics.py overfit --data d.hdf5 --variant per-arm --reference-policy runs/x/step_030000
    python training/diagnostics.py state-bc --data data/transport_scripted.hdf5 --out runs/state-bc      # 50 episodes
    python training/diagnostics.py state-bc --data d.hdf5 --train.view per-arm   # one MLP per arm, no partner state

See coop_transport.diagnostics for what each measures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from coop_transport import diagnostics, state_bc


@dataclass
class _OnDemonstrations:
    """What the policy-on-demonstrations diagnostics share: a policy, a demonstration file and a selection of it."""

    data: Path
    """Demonstration file with images at the policy's resolution."""
    policy: Path | None = None
    """Checkpoint directory (default: the shipped per-arm policy)."""
    split: str | None = "valid"
    """Mask of the file to use (the training run held these out); None: every demonstration."""
    demos: tuple[str, ...] = ()
    """Exactly these demonstrations (overrides --split)."""
    chunk: int = 10
    """The first C actions of each chunk (the recipe's executed part)."""
    device: str = "cpu"
    json_out: Path | None = None
    """Also write the report as JSON here."""

    def selection(self) -> dict:
        """The demonstration selection as keyword arguments of the diagnostics functions."""
        return {"split": None if self.demos else self.split, "demos": list(self.demos) or None, "chunk": self.chunk}


@dataclass
class TeacherForced(_OnDemonstrations):
    """Teacher-forced error of a policy on demonstrations it did not train on."""

    stride: int = 5
    """Predict at every stride-th step."""
    samples: int = 4
    """Mean of N samples per chunk (the recipe's)."""
    outlier_fraction: float = 0.25
    """An error above this fraction of the nominal range [-1, 1] counts as an outlier."""


@dataclass
class Spread(_OnDemonstrations):
    """How much the sampler's chunks vary per dimension for one observation (the paper: σ(dx) ≈ 0.029 over N = 20),
    and what the mean of a group of samples leaves."""

    stride: int = 25
    """One observation every stride-th step."""
    samples: int = 20
    """Flow samples per observation."""
    group: int = 4
    """Size of the averaged groups (the recipe's mean-of-N)."""


@dataclass
class Overfit:
    """Train on one demonstration; report teacher-forced fit on it and closed-loop success from its initial state.
    Defaults as the paper's probe: the joint policy, 5,000 steps."""

    data: Path
    demo: str = "demo_0"
    out: Path = Path("runs/overfit")
    model: str = "small"
    variant: str = "joint"
    steps: int = 5000
    batch_size: int = 32
    runs: int = 10
    """Closed-loop runs from the demonstration's exact initial state (different flow noise)."""
    horizon: int = 500
    device: str = "auto"
    reference_policy: Path | None = None
    """A checkpoint of the same variant trained on all demonstrations: its teacher-forced errors on the same
    demonstration are printed beside the overfit policy's (capacity limit vs data limit)."""
    action_horizon: int | None = None
    """Predicted chunk length (None: the model configuration's; must cover the recipe's chunk, 10 / 25)."""


@dataclass
class StateBC:
    """Privileged-state BC reference: an MLP on the exact simulator state (both arms, object poses), trained on the
    demonstrations and evaluated closed loop without cameras, with its stage funnel. Where it passes a stage that
    π0 fails, perception or the per-arm view is at fault there; where it fails too, the demonstrations are."""

    data: Path
    """Demonstration file (no images needed: robosuite's object state is read from obs/object)."""
    out: Path = Path("runs/state-bc")
    """The checkpoint goes to OUT/policy, the evaluation's summary.json and summary.md to OUT/eval."""
    split: str | None = "train"
    """Mask to train on (all demonstrations when the file has no such mask)."""
    train: state_bc.StateBCConfig = field(default_factory=state_bc.StateBCConfig)
    execute: int = 1
    """Actions executed per predicted chunk (1: re-plan at every step)."""
    episodes: int = 50
    """Closed-loop episodes, from reset seeds first_seed, first_seed + 1, ..."""
    first_seed: int = 1
    horizon: int = 400
    """Control steps per episode (the evaluations of π0 in this project use 400)."""
    workers: int = 2
    """Evaluation worker processes."""


def run_state_bc(cmd: StateBC) -> dict:
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate, markdown_summary

    policy = state_bc.train(cmd.data, cmd.out / "policy", cmd.train, split=cmd.split)
    meta = json.loads((policy / state_bc.CONFIG_FILE).read_text())
    print(f"state-bc: {meta['demos']} demonstrations ({meta['samples']} states, {meta['action_labels']} actions), "
          f"{cmd.train.steps} steps in {meta['train_seconds']:.0f} s, final loss {meta['final_loss']:.4f}")
    spec = ControllerSpec("state-bc", {"policy": str(policy), "execute": cmd.execute}, label="state-bc")
    summary = evaluate(spec, EvalConfig(episodes=cmd.episodes, first_seed=cmd.first_seed, workers=cmd.workers,
                                        horizon=cmd.horizon), out=cmd.out / "eval")
    print(markdown_summary(summary))
    return summary


def main(cmd: TeacherForced | Spread | Overfit | StateBC) -> dict:
    if isinstance(cmd, StateBC):
        return run_state_bc(cmd)
    if isinstance(cmd, _OnDemonstrations):
        from coop_transport.pi0_policy import Pi0Policy

        policy = Pi0Policy.load(cmd.policy, device=cmd.device)
        if isinstance(cmd, TeacherForced):
            report = diagnostics.teacher_forced(policy, cmd.data, **cmd.selection(), stride=cmd.stride,
                                                num_samples=cmd.samples, outlier_fraction=cmd.outlier_fraction)
        else:
            report = diagnostics.sample_spread(policy, cmd.data, **cmd.selection(), stride=cmd.stride,
                                               num_samples=cmd.samples, group=cmd.group)
        print(report.markdown())
        if cmd.json_out:
            cmd.json_out.parent.mkdir(parents=True, exist_ok=True)
            cmd.json_out.write_text(json.dumps(report.to_dict(), indent=2))
        return report.to_dict()
    result = diagnostics.overfit_probe(cmd.data, cmd.demo, cmd.out, model=cmd.model, steps=cmd.steps,
                                       batch_size=cmd.batch_size, runs=cmd.runs, horizon=cmd.horizon,
                                       device=cmd.device, variant=cmd.variant, reference_policy=cmd.reference_policy,
                                       action_horizon=cmd.action_horizon)
    report = diagnostics.TeacherForcedReport(**result["teacher_forced"])
    print(f"overfit probe on {cmd.demo} (reset seed {result['reset_seed']}), {cmd.steps} steps of {cmd.model}: "
          f"final loss {result['train']['final_loss']:.4f}")
    print(report.markdown())
    print(f"\nclosed loop from the demonstration's initial state: {result['closed_loop_successes']}/{cmd.runs} "
          "successes")
    if result["reference_teacher_forced"]:
        print(f"\nthe same demonstration, teacher-forced: overfit policy / {cmd.reference_policy}")
        print(diagnostics.compare_markdown(result["teacher_forced"], result["reference_teacher_forced"]))
    cmd.out.mkdir(parents=True, exist_ok=True)
    (cmd.out / "overfit.json").write_text(json.dumps(result, indent=2, default=str))
    return result


COMMAND = Annotated[TeacherForced | Spread | Overfit | StateBC, tyro.conf.OmitSubcommandPrefixes]

if __name__ == "__main__":
    main(tyro.cli(COMMAND))
