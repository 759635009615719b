"""Imitation diagnostics of the seed paper (sections 3.5, 4.1): teacher-forced error, the sampler's spread across flow
samples, and the single-trajectory overfit probe.

Teacher-forced analysis feeds the policy the *demonstration's* observations (never its own rollout) and compares
the first ``chunk`` actions of each predicted chunk with what the demonstrator did next. It separates "the network
did not learn the mapping" (low r, large error here) from "it learned it but compounding errors break closed loop"
(good here, failure in closed loop). Errors are reported per action dimension: Pearson r, mean and max absolute
error, and the number of predicted actions whose error exceeds ``outlier_fraction`` of the dimension's nominal
range (OSC deltas and the gripper command span [-1, 1], a range of 2). Where the file has task-phase labels (files
this project writes do), the errors are also broken down by each arm's phase at the predicted step: where in the
task the mapping is weak (e.g. the hand-over, which needs the partner's state) shows there.

The overfit probe trains a fresh policy on one demonstration only, then reports its teacher-forced fit on that
demonstration and its closed-loop success from that demonstration's exact initial state (the reset seed recorded
in the file) over several runs with different flow noise: if even this fails, the architecture or the action
interface is at fault, not the amount of data. Scored beside a policy trained on every demonstration, it tells a
capacity limit (the same error profile at 1 and at 200 demonstrations) from a data limit.

The sample spread draws many chunks for one observation and measures how much they differ per dimension, and how
much of that the recipe's mean-of-N removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coop_transport.adapters import StateHistory
from coop_transport.constants import ARM_ACTION_DIM, ARMS, PHASES

ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
NOMINAL_RANGE = 2.0  # every action dimension is nominally in [-1, 1]


@dataclass
class TeacherForcedReport:
    """Per-dimension agreement of predicted and demonstrated actions over held-out demonstrations."""

    dims: list[str]
    pearson_r: list[float]
    mae: list[float]
    max_abs_error: list[float]
    outliers: list[int]
    outlier_threshold: float
    predictions: int
    demos: list[str] = field(default_factory=list)
    chunk: int = 10
    num_samples: int = 4
    by_phase: list[dict] = field(default_factory=list)
    """Per (arm, task phase): predicted actions, MAE of translation / rotation / gripper, and wrong gripper commands
    (error > 1: the opposite of what the demonstrator commanded). Empty without phase labels."""

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    def markdown(self) -> str:
        lines = [f"teacher-forced on {len(self.demos)} demonstrations, {self.predictions} predicted actions "
                 f"(first {self.chunk} of each chunk, mean of {self.num_samples} samples); outlier: |error| > "
                 f"{self.outlier_threshold:g}", "",
                 "| dim | Pearson r | MAE | max abs error | outliers |", "|---|---|---|---|---|"]
        for i, name in enumerate(self.dims):
            lines.append(f"| {name} | {self.pearson_r[i]:.3f} | {self.mae[i]:.4f} | {self.max_abs_error[i]:.3f} | "
                         f"{self.outliers[i]} |")
        if self.by_phase:
            lines += ["", "by task phase (the arm's phase at the predicted step):", "",
                      "| arm | phase | actions | MAE translation | MAE rotation | MAE gripper | wrong gripper |",
                      "|---|---|---|---|---|---|---|"]
            for row in self.by_phase:
                lines.append(f"| {row['arm']} | {row['phase']} | {row['actions']} | {row['mae_translation']:.4f} | "
                             f"{row['mae_rotation']:.4f} | {row['mae_gripper']:.4f} | {row['wrong_gripper']} |")
        return "\n".join(lines)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-12 or b.std() < 1e-12:
        return float("nan")  # a constant column has no correlation (e.g. a gripper that never moves)
    return float(np.corrcoef(a, b)[0, 1])


def _demo_observations(policy, data: str | Path, split: str | None, demos: list[str] | None, stride: int,
                       chunk: int) -> tuple[list[tuple], list[str]]:
    """(images, proprio, prompt, the demonstrator's next `chunk` actions, {arm: its phase index at those steps})
    at every stride-th step of the selected demonstrations, in the policy's variant (per-arm: each arm's
    trajectory; joint: the bimanual one); and the names. The phases are {} where the file has no phase labels."""
    from coop_transport.data.dataset import load_demonstrations

    if chunk < 1 or stride < 1:
        raise ValueError("chunk and stride must be >= 1")
    if chunk > policy.horizon:
        raise ValueError(f"chunk {chunk} exceeds the policy's action horizon {policy.horizon}")
    # What the demonstrator meant to do next: its noise-free actions where the file records them.
    with load_demonstrations(data, action_labels="auto") as file:
        names = list(demos) if demos else (file.demo_names(split) if split else file.demo_names())
        unknown = sorted(set(names) - set(file.demo_names()))
        if unknown:
            raise ValueError(f"{data} has no demonstrations {unknown}")
        # The policy's state at every step (its earlier states too, for a policy with a state history).
        history = getattr(policy, "state_history", None) or StateHistory()
        if policy.variant == "per-arm":
            trajs = [t for t in file.arm_trajectories(None, images="memory") if t.demo in set(names)]
            observations = [
                ({"wrist": t.wrist_image[i], "agentview": t.agentview_image[i]}, state, policy.prompts[t.arm],
                 t.actions[i:i + chunk], {t.arm: t.labels["phase"][i:i + chunk]} if "phase" in t.labels else {})
                for t in trajs for i, state in _strided_states(t.proprio, history, stride)]
        else:
            from coop_transport.constants import AGENTVIEW_CAMERA, WRIST_CAMERA, image_key

            trajs = [t for t in file.joint_trajectories(None, images="memory") if t.demo in set(names)]
            slots = {"robot0_wrist": image_key(WRIST_CAMERA["robot0"]),
                     "robot1_wrist": image_key(WRIST_CAMERA["robot1"]), "agentview": image_key(AGENTVIEW_CAMERA)}
            observations = [
                ({slot: t.images[key][i] for slot, key in slots.items()}, state, policy.prompts["joint"],
                 t.actions[i:i + chunk],
                 {a: t.labels[f"{a}_phase"][i:i + chunk] for a in ARMS if f"{a}_phase" in t.labels})
                for t in trajs for i, state in _strided_states(t.proprio, history, stride)]
    if not observations:
        raise ValueError(f"no observations selected from {data} (split {split!r}, demos {demos})")
    return observations, names


def _strided_states(proprio: np.ndarray, history: StateHistory, stride: int):
    """(step, raw policy state) at steps 0, stride, 2 stride, ... of one trajectory."""
    states = history.from_trajectory(proprio)
    return [(i, states[i]) for i in range(0, len(proprio), stride)]


def _dim_names(width: int) -> list[str]:
    return list(ACTION_NAMES) if width == ARM_ACTION_DIM else [f"{a}_{n}" for a in ARMS for n in ACTION_NAMES]


def teacher_forced(policy, data: str | Path, split: str | None = "valid", demos: list[str] | None = None,
                   stride: int = 5, chunk: int = 10, num_samples: int = 4, batch_size: int = 32,
                   outlier_fraction: float = 0.25) -> TeacherForcedReport:
    """Teacher-forced error of ``policy`` (a Pi0Policy) on the demonstrations of ``split`` (or ``demos``).

    Every ``stride``-th step of each trajectory is an observation; its chunk's first ``chunk`` actions are
    compared with the demonstration's next ``chunk`` actions (fewer at the end of a trajectory).
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    observations, names = _demo_observations(policy, data, split, demos, stride, chunk)
    predicted, demonstrated, phases = [], [], []
    for start in range(0, len(observations), batch_size):
        part = observations[start:start + batch_size]
        batch = policy.make_batch([o[0] for o in part], [o[1] for o in part], [o[2] for o in part])
        chunks = policy.sample_batch(batch, num_samples).mean(axis=1)  # (B, H, D): the recipe's mean of N
        for (_, _, _, truth, phase), pred in zip(part, chunks):
            predicted.append(pred[:len(truth)])
            demonstrated.append(truth)
            phases.append(phase)
    p, q = np.concatenate(predicted), np.concatenate(demonstrated)
    err = np.abs(p - q)
    threshold = outlier_fraction * NOMINAL_RANGE
    dims = _dim_names(q.shape[1])
    return TeacherForcedReport(
        dims=dims, pearson_r=[_pearson(p[:, d], q[:, d]) for d in range(q.shape[1])],
        mae=err.mean(0).tolist(), max_abs_error=err.max(0).tolist(), outliers=(err > threshold).sum(0).tolist(),
        outlier_threshold=threshold, predictions=len(p), demos=sorted(set(names)), chunk=chunk,
        num_samples=num_samples, by_phase=_errors_by_phase(err, phases, [len(t) for t in demonstrated]))


def _errors_by_phase(err: np.ndarray, phases: list[dict], lengths: list[int]) -> list[dict]:
    """Rows of TeacherForcedReport.by_phase. err: (rows, 7) for a per-arm policy (each observation one arm's),
    (rows, 14) for a joint one (robot0's dims, then robot1's, each grouped by its own arm's phase)."""
    if not phases or any(not p for p in phases):
        return []  # no phase labels (a robomimic file)
    groups: dict[tuple[str, int], list[np.ndarray]] = {}
    row = 0
    for phase, n in zip(phases, lengths):
        for arm, index in phase.items():
            offset = 0 if err.shape[1] == ARM_ACTION_DIM else ARMS.index(arm) * ARM_ACTION_DIM
            block = err[row:row + n, offset:offset + ARM_ACTION_DIM]
            for k in np.unique(index):
                groups.setdefault((arm, int(k)), []).append(block[index == k])
        row += n
    out = []
    for (arm, k), blocks in sorted(groups.items(), key=lambda item: (ARMS.index(item[0][0]), item[0][1])):
        e = np.concatenate(blocks)
        out.append({"arm": arm, "phase": PHASES[arm][k] if 0 <= k < len(PHASES[arm]) else str(k),
                    "actions": len(e), "mae_translation": float(e[:, 0:3].mean()),
                    "mae_rotation": float(e[:, 3:6].mean()), "mae_gripper": float(e[:, 6].mean()),
                    "wrong_gripper": int((e[:, 6] > 1.0).sum())})
    return out


@dataclass
class SampleSpreadReport:
    """How much the flow-matching sampler's chunks vary for one observation, per action dimension."""

    dims: list[str]
    sample_std: list[float]
    """std across the N samples of one observation (ddof 1), averaged over observations and chunk steps"""
    mean_of_group_std: list[float]
    """std across the N / group means of `group` samples each (what mean-of-`group` leaves), averaged likewise"""
    observations: int
    num_samples: int
    group: int
    chunk: int
    demos: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    def markdown(self) -> str:
        lines = [f"sample spread on {len(self.demos)} demonstrations, {self.observations} observations, "
                 f"{self.num_samples} flow samples each (first {self.chunk} actions of each chunk; action units)", "",
                 f"| dim | σ across samples | σ of the mean of {self.group} | ratio |", "|---|---|---|---|"]
        for i, name in enumerate(self.dims):
            ratio = self.mean_of_group_std[i] / self.sample_std[i] if self.sample_std[i] > 0 else float("nan")
            lines.append(f"| {name} | {self.sample_std[i]:.4f} | {self.mean_of_group_std[i]:.4f} | {ratio:.2f} |")
        return "\n".join(lines)


def sample_spread(policy, data: str | Path, split: str | None = "valid", demos: list[str] | None = None,
                  stride: int = 25, chunk: int = 10, num_samples: int = 20, group: int = 4,
                  batch_size: int = 8) -> SampleSpreadReport:
    """The paper's sampler-variability figure (σ(dx) ≈ 0.029 over N = 20 samples, section 3.5): draw
    ``num_samples`` chunks per demonstration observation and report, per dimension, their spread, and the spread
    left after averaging ``group`` of them (mean-of-N's denoising: 1/sqrt(group) of it for independent samples)."""
    if num_samples < 2 or group < 1 or num_samples // group < 2:
        raise ValueError(f"need num_samples >= 2 and at least two groups of {group} (num_samples={num_samples})")
    observations, names = _demo_observations(policy, data, split, demos, stride, chunk)
    groups = num_samples // group
    sample_std, group_std = [], []
    for start in range(0, len(observations), batch_size):
        part = observations[start:start + batch_size]
        batch = policy.make_batch([o[0] for o in part], [o[1] for o in part], [o[2] for o in part])
        samples = np.asarray(policy.sample_batch(batch, num_samples))[:, :, :chunk]  # (B, N, C, D)
        sample_std.append(samples.std(axis=1, ddof=1).mean(axis=1))  # (B, D)
        means = samples[:, :groups * group].reshape(len(part), groups, group, *samples.shape[2:]).mean(axis=2)
        group_std.append(means.std(axis=1, ddof=1).mean(axis=1))
    s, g = np.concatenate(sample_std), np.concatenate(group_std)
    return SampleSpreadReport(dims=_dim_names(s.shape[1]), sample_std=s.mean(0).tolist(),
                              mean_of_group_std=g.mean(0).tolist(), observations=len(s), num_samples=num_samples,
                              group=group, chunk=chunk, demos=sorted(set(names)))


def demo_reset_seed(data: str | Path, demo: str) -> int:
    """The reset seed a demonstration was recorded from (TransportSim.reset(seed) reproduces its first state)."""
    import h5py

    with h5py.File(data, "r") as f:
        if f"data/{demo}" not in f:
            raise ValueError(f"{data} has no demonstration {demo!r}")
        seed = f[f"data/{demo}"].attrs.get("seed")
    if seed is None:
        raise ValueError(f"{data}: {demo} records no reset seed (a robomimic file?); the closed-loop part of the "
                         "overfit probe needs our generator's files")
    return int(seed)


def overfit_probe(data: str | Path, demo: str, out: str | Path, model: str = "small", steps: int = 5000,
                  batch_size: int = 32, runs: int = 10, horizon: int = 500, device: str = "auto",
                  variant: str = "joint", progress: bool = True, reference_policy: str | Path | None = None,
                  action_horizon: int | None = None) -> dict:
    """Train on one demonstration, then teacher-forced fit on it and closed-loop success from its initial state.

    Defaults as the paper's probe (the joint policy, 5k steps). ``reference_policy``: a checkpoint trained on all
    demonstrations, scored teacher-forced on the same demonstration, so the two error profiles sit side by side
    (the paper: max abs gripper error 2.03 after overfitting against 2.06 for the 200-demo policy).
    ``action_horizon``: None keeps the model configuration's; it must cover the recipe's chunk (per-arm 10, joint
    25) for the teacher-forced comparison and the closed-loop runs."""
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate
    from coop_transport.imitation import ImitationConfig, train
    from coop_transport.pi0_policy import Pi0Policy

    out = Path(out)
    seed = demo_reset_seed(data, demo)
    ref = None
    if reference_policy is not None:  # checked before training, not after it
        ref = Pi0Policy.load(reference_policy, device="cpu")
        if ref.variant != variant:
            raise ValueError(f"reference policy {reference_policy} is {ref.variant!r}, the probe is {variant!r}")
    summary = train(ImitationConfig(variant=variant, model=model, data=Path(data), out=out / "train", steps=steps,
                                    action_horizon=action_horizon,
                                    batch_size=batch_size, demo_names=(demo,), num_checkpoints=1, device=device,
                                    warmup_steps=min(200, steps // 10 + 1), progress=progress, log_every=50))
    checkpoint = sorted((out / "train" / "checkpoints").glob("step_*"))[-1]
    policy = Pi0Policy.load(checkpoint, device="cpu")
    fit = teacher_forced(policy, data, split=None, demos=[demo], stride=2)
    # The same initial state every run; the runs differ only in the flow noise (the recipe samples N=4 per chunk).
    results = []
    for run in range(runs):
        spec = ControllerSpec("pi0", {"policy": str(checkpoint), "device": "cpu", "seed": run}, label=f"run {run}")
        results.append(evaluate(spec, EvalConfig(episodes=1, first_seed=seed, workers=1, horizon=horizon),
                                progress=False)["successes"])
    reference = None if ref is None else teacher_forced(ref, data, split=None, demos=[demo], stride=2).to_dict()
    return {"demo": demo, "reset_seed": seed, "train": summary, "checkpoint": str(checkpoint),
            "teacher_forced": fit.to_dict(), "closed_loop_successes": int(sum(results)), "closed_loop_runs": runs,
            "reference_policy": None if reference_policy is None else str(reference_policy),
            "reference_teacher_forced": reference}


def compare_markdown(overfit: dict, reference: dict) -> str:
    """Per-dimension teacher-forced errors of the overfit policy and the reference policy on the same demo."""
    lines = ["| dim | r (overfit / reference) | MAE (overfit / reference) | max abs error (overfit / reference) |",
             "|---|---|---|---|"]
    for i, name in enumerate(overfit["dims"]):
        lines.append(f"| {name} | {overfit['pearson_r'][i]:.3f} / {reference['pearson_r'][i]:.3f} | "
                     f"{overfit['mae'][i]:.4f} / {reference['mae'][i]:.4f} | "
                     f"{overfit['max_abs_error'][i]:.3f} / {reference['max_abs_error'][i]:.3f} |")
    return "\n".join(lines)
