"""Closed-loop evaluation: n episodes from fixed reset seeds, in parallel worker processes, with Wilson CIs.

The evaluated thing is a *controller*: anything that turns the simulation's current observation into the joint
(14,) action (the scripted expert, two per-arm policies under the recipe, one joint policy, a residual policy).
Controllers are described by a picklable ``ControllerSpec`` so that each worker process builds its own copy
(its own simulator, its own model) — the runner never ships live objects between processes.

Results are written as ``summary.json`` and ``summary.md``: success rate with the Wilson 95% interval, mean
episode length, clip activation rate, and every seed's outcome; ``--video K`` saves K rollouts as mp4.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from coop_transport.utils.stats import format_rate, wilson_interval
from coop_transport.utils.jsonable import to_jsonable


class Controller(Protocol):
    """Maps the simulation's state to a joint action, one control step at a time."""

    def reset(self, sim, seed: int) -> None: ...

    def act(self, sim) -> np.ndarray: ...  # (14,) in [-1, 1]

    def stats(self) -> dict: ...  # e.g. clip counters; merged across episodes by the runner


@dataclass(frozen=True)
class ControllerSpec:
    """A picklable recipe for building a controller in a worker: a registered kind and its arguments."""

    kind: str
    args: dict = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.kind


# kind -> (args -> (Controller, SimConfig overrides)). Modules register their kinds at import.
_CONTROLLERS: dict[str, Callable[..., tuple[Controller, dict]]] = {}


def register_controller(kind: str):
    def wrap(factory):
        _CONTROLLERS[kind] = factory
        return factory
    return wrap


def build_controller(spec: ControllerSpec) -> tuple[Controller, dict]:
    _import_builtin_controllers()
    if spec.kind not in _CONTROLLERS:
        raise ValueError(f"unknown controller kind {spec.kind!r}; known: {sorted(_CONTROLLERS)}")
    return _CONTROLLERS[spec.kind](**spec.args)


def _import_builtin_controllers() -> None:
    # Importing registers them; done lazily so that the runner itself needs no model code.
    import coop_transport.controllers  # noqa: F401


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate."""

    episodes: int = 100
    """Number of episodes; episode i runs from reset seed first_seed + i."""
    first_seed: int = 1
    """Reset seed of the first episode (the paper evaluates seeds 1-100)."""
    workers: int = 2
    """Worker processes (each builds its own simulator and controller)."""
    videos: int = 0
    """Save this many rollouts (the first seeds) as mp4 under out/videos/."""
    video_camera: str = "frontview"
    """Camera shown in the videos, beside the arms' wrist views when rendered."""
    video_size: int = 256
    """Video frame height and width in pixels."""
    horizon: int = 500
    """Control steps per episode."""

    def __post_init__(self):
        if self.episodes < 1 or self.workers < 1:
            raise ValueError(f"episodes and workers must be >= 1, got {self.episodes}, {self.workers}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.episodes))


def run_episode(sim, controller: Controller, seed: int, video_path: Path | None = None,
                video_camera: str = "frontview", video_size: int = 256) -> dict:
    """One closed-loop episode; returns {seed, success, length, wall_s, milestones, handover}: ``milestones`` lists
    the task milestones (``sim.labels.MILESTONES``) the episode reached at any step, in task order; ``handover``
    says how robot0's hold of the lifted payload ended (``sim.labels.HandoverMonitor``)."""
    from coop_transport.constants import ARMS, WRIST_CAMERA, image_key
    from coop_transport.sim.labels import EpisodeRecord
    from coop_transport.utils.video import VideoWriter

    start = time.perf_counter()
    obs = sim.reset(seed)
    controller.reset(sim, seed)
    writer = VideoWriter(video_path, fps=sim.config.control_freq) if video_path else None

    def frame():
        main = sim.render(video_camera, video_size, video_size)
        wrists = [obs[image_key(WRIST_CAMERA[a])] for a in ARMS if image_key(WRIST_CAMERA[a]) in obs]
        if not wrists:
            return main
        # Wrist views stacked in a column at the right, scaled up by whole pixels to the frame height.
        column = np.concatenate(wrists, axis=0)
        scale = max(1, video_size // column.shape[0])
        column = column.repeat(scale, 0).repeat(scale, 1)[:video_size]
        column = np.pad(column, ((0, video_size - column.shape[0]), (0, 0), (0, 0)))
        return np.concatenate([main, column], axis=1)

    if writer:
        writer.add(frame())
    success, done, t = False, False, 0
    record = EpisodeRecord()
    while not done:
        action = controller.act(sim)
        # Cameras are rendered when something reads them (a controller re-planning, the video), not at every step.
        obs, _, done, info = sim.step(action, render=writer is not None)
        success = success or info["success"]
        record.update(sim, action)
        t += 1
        if writer:
            writer.add(frame())
    if writer:
        writer.close()
    return {"seed": int(seed), "success": bool(success), "length": t, "wall_s": time.perf_counter() - start,
            "milestones": record.milestones(), "handover": record.handover()}


# ------------------------------------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _worker_init(spec: ControllerSpec, horizon: int) -> None:
    from coop_transport.sim import SimConfig, TransportSim

    controller, sim_overrides = build_controller(spec)
    _WORKER["controller"] = controller
    _WORKER["sim"] = TransportSim(SimConfig(horizon=horizon, **sim_overrides))


def _worker_run(job: tuple[int, str | None, str, int]) -> dict:
    seed, video, camera, size = job
    controller = _WORKER["controller"]
    before = controller.stats()
    result = run_episode(_WORKER["sim"], controller, seed, Path(video) if video else None, camera, size)
    result["stats"] = stats_delta(before, controller.stats())
    return result


def stats_delta(before: dict, after: dict) -> dict:
    """Per-episode counter increments (controllers keep running totals); other values (settings) pass as they are."""
    out = {}
    for key, value in after.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in before:
            out[key] = value - before[key]
        elif isinstance(value, list) and key in before and len(before[key]) == len(value):
            out[key] = [a - b for a, b in zip(value, before[key])]
        else:
            out[key] = value
    return out


EPISODE_LOG = "episodes.jsonl"
"""Each finished episode's result, one JSON line, appended as it arrives: an evaluation killed part-way (a machine
that limits one command's time) keeps what it measured, and ``evaluate(..., resume=True)`` runs only the seeds
left."""


def _episode_key(spec: ControllerSpec, config: EvalConfig) -> dict:
    """What makes two episodes of one reset seed the same measurement (not the worker count or the videos)."""
    return {"controller": {"kind": spec.kind, "args": to_jsonable(spec.args)}, "horizon": config.horizon}


def _logged_episodes(log: Path, key: dict, seeds: list[int]) -> dict[int, dict]:
    """Results already in ``log`` for ``seeds`` (a torn last line, from a kill mid-write, is skipped). A log of
    another evaluation is refused rather than mixed in or overwritten."""
    done: dict[int, dict] = {}
    if not log.exists():
        return done
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("key") != key:
            raise ValueError(f"{log} holds episodes of another evaluation ({record.get('key')}, not {key}): "
                             "give another output directory, or remove that file to start over")
        if record["result"]["seed"] in seeds:
            done[record["result"]["seed"]] = record["result"]
    return done


class EpisodeLog:
    """``out/episodes.jsonl``: each finished episode appended at once under ``key`` (what makes two episodes of one
    reset seed the same measurement). ``resume`` keeps the episodes already there for ``seeds`` (``done``);
    otherwise the log starts over. This evaluator and the residual pipeline's (``residual.train``) share it."""

    def __init__(self, out: Path, key: dict, seeds: list[int], resume: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.key = out / EPISODE_LOG, key
        self.done: dict[int, dict] = {}
        if resume:
            self.done = _logged_episodes(self.path, key, seeds)
        else:
            self.path.unlink(missing_ok=True)

    def append(self, result: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": self.key, "result": to_jsonable(result)}) + "\n")


def evaluate(spec: ControllerSpec, config: EvalConfig, out: Path | None = None, progress: bool = True,
             resume: bool = False) -> dict:
    """Run ``config.episodes`` episodes of ``spec`` from fixed seeds; write summary.json/.md under ``out``.

    With ``out``, every finished episode is appended to ``out/episodes.jsonl`` at once. ``resume``: episodes
    already there (same controller and horizon) are not run again, so a killed evaluation continues where it
    stopped; without it the log starts over, as the summaries do (a rerun is a new measurement)."""
    from tqdm import tqdm

    out = Path(out) if out else None
    log = EpisodeLog(out, _episode_key(spec, config), config.seeds, resume) if out else None
    done = log.done if log else {}
    if done:
        print(f"resuming: {len(done)} of {len(config.seeds)} episodes already in {log.path}")
    videos = config.videos
    if videos and out:
        from coop_transport.utils.video import mp4_writer_available

        reason = mp4_writer_available()
        if reason:  # checked before any episode runs: a missing encoder must not cost the evaluation
            print(f"warning: evaluating without videos: {reason}")
            videos = 0
    jobs = []
    for i, seed in enumerate(config.seeds):
        video = str(out / "videos" / f"seed_{seed:04d}.mp4") if out and i < videos else None
        if seed not in done:
            jobs.append((seed, video, config.video_camera, config.video_size))
    start = time.perf_counter()
    results = list(done.values())

    def finished(result: dict) -> None:
        results.append(result)
        if log:
            log.append(result)
        _update_bar(bar, results)

    bar = tqdm(total=len(config.seeds), initial=len(done), desc=f"eval {spec.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        if jobs and config.workers == 1:
            _worker_init(spec, config.horizon)
            for job in jobs:
                finished(_worker_run(job))
            _WORKER["sim"].close()
            _WORKER.clear()
        elif jobs:
            ctx = mp.get_context("spawn")  # fresh interpreters: no inherited GL contexts or torch threads
            with ctx.Pool(min(config.workers, len(jobs)), initializer=_worker_init,
                          initargs=(spec, config.horizon)) as pool:
                for result in pool.imap_unordered(_worker_run, jobs):
                    finished(result)
    finally:
        bar.close()
    results.sort(key=lambda r: r["seed"])
    summary = summarize(spec, config, results, time.perf_counter() - start)
    summary["resumed_episodes"] = len(done)
    summary["this_call_only"] = ["wall time"]  # the clip counters travel with each logged episode
    if out:
        write_summary(summary, out)
    return summary


def _update_bar(bar, results):
    wins = sum(r["success"] for r in results)
    bar.set_postfix(success=f"{wins}/{len(results)}")
    bar.update(1)


def summarize(spec: ControllerSpec, config: EvalConfig, results: list[dict], wall_s: float) -> dict:
    n = len(results)
    wins = sum(r["success"] for r in results)
    lo, hi = wilson_interval(wins, n)
    clip_actions = sum(r["stats"].get("clip_actions", 0) for r in results)
    clipped = sum(r["stats"].get("clip_clipped_actions", 0) for r in results)
    gate = choice_summary(results, "gate", "residual", "residual_rate", "margin")  # residual policies' critic gate
    candidates = choice_summary(results, "candidate", "switched", "switch_rate", "candidates",  # choice of π0 draws
                                means=("value_spread", "critic_gap", "critic_gap_spread", "critics_agree"))
    return {
        "controller": {"kind": spec.kind, "label": spec.name, "args": to_jsonable(spec.args)},
        "config": asdict(config),
        "episodes": n,
        "successes": wins,
        "success_rate": wins / n,
        "wilson95": [lo, hi],
        "mean_length": float(np.mean([r["length"] for r in results])),
        "mean_length_success": float(np.mean([r["length"] for r in results if r["success"]])) if wins else None,
        "clip_activation_rate": clipped / clip_actions if clip_actions else None,
        "milestone_rates": milestone_rates(results),
        "handover_outcomes": handover_outcomes(results),
        "mean_milestones": float(np.mean([len(r.get("milestones", ())) for r in results])),
        "wall_s": wall_s,
        **({"gate": gate} if gate else {}),
        **({"candidates": candidates} if candidates else {}),
        "per_seed": results,
    }


def outcome_by_reset_seed(summary: dict) -> dict[str, bool]:
    """Each evaluated reset seed's success in a summary (keys are the seeds as strings, JSON's keys): what pairs two
    evaluations episode by episode (``residual.report.selection_pairs``, ``residual.probes.against_none``)."""
    return {str(r["seed"]): bool(r["success"]) for r in sorted(summary["per_seed"], key=lambda r: r["seed"])}


def choice_summary(results: list[dict], name: str, hit: str, rate: str, setting: str,
                   means: tuple[str, ...] = ()) -> dict | None:
    """A residual policy's per-chunk choice over the episodes (the critic gate, the critics' choice among π0's
    draws): the episodes' ``<name>_chunks`` and ``<name>_<hit>_chunks`` counters summed into agent chunks and
    ``rate``, each of ``means`` (``<name>_<mean>``, a sum over agent chunks) as ``mean_<mean>`` per agent chunk, and
    the ``setting`` passed through from ``<name>_settings`` (a setting, not summed like the counters). None for a
    policy without it; a policy with it and no chunk at all (every episode came from an earlier call) keeps its
    setting. A mean counts only the episodes that recorded it (episodes logged before it existed lack it), and is
    None where none did."""
    chunks = sum(r["stats"].get(f"{name}_chunks", 0) for r in results)
    hits = sum(r["stats"].get(f"{name}_{hit}_chunks", 0) for r in results)
    settings = {r["stats"][f"{name}_settings"][setting] for r in results if f"{name}_settings" in r["stats"]}
    if not (chunks or settings):
        return None
    out = {"agent_chunks": chunks, rate: hits / chunks if chunks else None}
    for key in means:
        have = [r["stats"] for r in results if f"{name}_{key}" in r["stats"]]
        counted = sum(st.get(f"{name}_chunks", 0) for st in have)
        out[f"mean_{key}"] = sum(st[f"{name}_{key}"] for st in have) / counted if counted else None
    if len(settings) == 1:
        out[setting] = settings.pop()
    return out


def milestone_rates(results: list[dict]) -> dict[str, float]:
    """Share of episodes that reached each task milestone (the stage funnel), in task order."""
    from coop_transport.sim.labels import MILESTONES

    n = max(len(results), 1)
    return {m: sum(m in r.get("milestones", ()) for r in results) / n for m in MILESTONES}


def handover_outcomes(results: list[dict]) -> dict[str, int]:
    """Episodes per way robot0's hold of the lifted payload ended (``sim.labels.HANDOVER_OUTCOMES``, in its order);
    empty when no episode recorded one (results from before the monitor existed)."""
    from coop_transport.sim.labels import HANDOVER_OUTCOMES

    recorded = [r["handover"]["outcome"] for r in results if r.get("handover")]
    return {o: recorded.count(o) for o in HANDOVER_OUTCOMES} if recorded else {}


def time_split_lines(split: dict | None) -> list[str]:
    """The summary line that splits a batched evaluation's wall time between the policy (π0 and the networks, per
    batched chunk boundary) and the simulation workers; none where it was not measured (the registry's
    evaluations, older summaries) or no boundary ran."""
    if not split or not split.get("boundaries"):
        return []
    per = 1000 * split["policy_s"] / split["boundaries"]
    return [f"| time split | policy {split['policy_s']:.0f} s ({per:.1f} ms per batched chunk boundary, "
            f"{split['boundaries']} boundaries), simulation {split['simulation_s']:.0f} s |"]


def markdown_summary(summary: dict) -> str:
    rate = format_rate(summary["successes"], summary["episodes"])
    clip = summary["clip_activation_rate"]
    lines = [
        f"# Evaluation: {summary['controller']['label']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| success (Wilson 95% CI) | {rate} |",
        f"| reset seeds | {summary['config']['first_seed']}–{summary['config']['first_seed'] + summary['episodes'] - 1} |",
        f"| mean episode length | {summary['mean_length']:.1f} steps |",
        f"| clip activation rate | {'—' if clip is None else f'{100 * clip:.1f}% of executed actions'} |",
        f"| wall time | {summary['wall_s']:.0f} s ({summary['config']['workers']} workers) |",
        *time_split_lines(summary.get("time_split")),
    ]
    resumed = summary.get("resumed_episodes") or 0
    if resumed:  # a continued evaluation: some figures saw this call's episodes only
        partial = ", ".join(summary.get("this_call_only", ["wall time"]))
        lines.append(f"| resumed | {resumed} of the {summary['episodes']} episodes came from an earlier call; "
                     f"counted over the other {summary['episodes'] - resumed} alone: {partial} |")
    gate = summary.get("gate")
    if gate:
        margin = f"margin {gate['margin']:g}: " if gate.get("margin") is not None else ""
        rate = "—" if gate["residual_rate"] is None else f"{100 * gate['residual_rate']:.1f}%"
        lines.append(f"| critic gate | {margin}{rate} of {gate['agent_chunks']} agent chunks kept their residual |")
    chosen = summary.get("candidates")
    if chosen:
        draws = f"{chosen['candidates']} π0 draws: " if chosen.get("candidates") is not None else ""
        rate = "—" if chosen["switch_rate"] is None else f"{100 * chosen['switch_rate']:.1f}%"
        k = chosen.get("candidates")
        # π0's draws are exchangeable, so any ranking of them, informed or random, keeps the first in 1/K of chunks:
        # this share checks the plumbing, not the critics (the twin critics' agreement below does that)
        at_random = f" (any ranking of exchangeable draws: {100 * (1 - 1 / k):.1f}%)" if k else ""
        lines.append(f"| critics' choice | {draws}{rate} of {chosen['agent_chunks']} agent chunks took another "
                     f"than the first{at_random} |")
        if chosen.get("mean_value_spread") is not None:
            lines.append(f"| critics' values over the draws | spread {chosen['mean_value_spread']:.4g} (max − min of "
                         f"the lower critic, mean per agent chunk); the twin critics differ by "
                         f"{chosen['mean_critic_gap']:.4g} (mean abs(Q1 − Q2)) |")
        if chosen.get("mean_critics_agree") is not None:  # evaluations from before these counters lack them
            # An offset shared by a chunk's draws cannot reorder them; what changes from draw to draw can, and
            # whether the twins pick the same draw more often than chance says if the ranking is more than noise.
            lines.append(f"| twin critics on the draws | their difference changes by "
                         f"{chosen['mean_critic_gap_spread']:.4g} from draw to draw (max − min of Q1 − Q2); Q1 and "
                         f"Q2 alone pick the same draw in {100 * chosen['mean_critics_agree']:.1f}% of agent chunks"
                         + (f" (at random: {100 / k:.1f}%)" if k else "") + " |")
    lines.append("")
    rates = summary.get("milestone_rates") or {}
    if rates:
        lines += ["Episodes that reached each task milestone (the stage funnel):", "",
                  "| " + " | ".join(rates) + " |", "|" + "---|" * len(rates),
                  "| " + " | ".join(f"{100 * v:.0f}%" for v in rates.values()) + " |", ""]
    outcomes = summary.get("handover_outcomes") or {}
    if outcomes:
        from coop_transport.sim.labels import HANDOVER_OUTCOMES

        lines += ["How robot0's hold of the lifted payload ended:", "", "| outcome | episodes | meaning |",
                  "|---|---|---|"]
        lines += [f"| {o} | {n} | {HANDOVER_OUTCOMES[o]} |" for o, n in outcomes.items() if n]
        lines += [""]
    lines += [
        "| seed | success | length | last milestone | hand-over |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['seed']} | {'yes' if r['success'] else 'no'} | {r['length']} | "
              f"{(r.get('milestones') or ['—'])[-1]} | {(r.get('handover') or {}).get('outcome', '—')} |"
              for r in summary["per_seed"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(summary, indent=2)), ("summary.md", markdown_summary(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def plot_success_vs_step(rows: list[dict], path: Path) -> Path:
    """Success rate (with Wilson CI) against training step: the paper's non-monotonic curve."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not written")
        return path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    rate = [100 * r["success_rate"] for r in rows]
    lo = [100 * r["wilson95"][0] for r in rows]
    hi = [100 * r["wilson95"][1] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rate, "o-", label="closed-loop success")
    ax.fill_between(steps, lo, hi, alpha=0.2, label="Wilson 95% CI")
    ax.set_xlabel("training step")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
