"""The training loop of cooperative residual RL (seed paper §3.3), resumable, and the evaluation of a run.

``run(config)`` does every seed of ``config`` (``--seeds``) with one pool of simulations; ``train(config, seed)`` is
one seed:

    load the frozen π0 -> build the agents -> demonstration buffer (+ encoder pre-training) -> [offline warm start]
    loop until ``config.chunks`` chunks are collected:
        one chunk in every environment (Collector.step), finished transitions into the FIFO online buffer
        ``updates_per_chunk`` updates per collected chunk on RLPD batches (once ``learning_starts`` are online)
        every ``eval_every`` chunks: evaluate (seeds 1..n), save a policy checkpoint, keep the best by success
        every ``save_every`` chunks: save the resumable training state
    write result.json (best checkpoint, its success, the evaluation history, speeds)

B1 and B2 train nothing: they are evaluated once and written in the same format.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from coop_transport.evaluation import outcome_by_reset_seed
from coop_transport.residual.architectures import get_arch
from coop_transport.residual.buffers import ReplayBuffer, RLPDSampler, transition_fields
from coop_transport.residual.checkpoint import (BEST_JSON, STATE_JSON, load_train_state, save_policy,
                                                save_train_state)
from coop_transport.residual.config import ResidualConfig, config_to_json
from coop_transport.residual.policy import EPISODE_NOISE_SEED
from coop_transport.residual.rollout import Collector, EnvPool, make_pool, run_episodes

# π0 noise of every evaluation: checkpoints are compared on the same noise, episode by episode, and the registry's
# residual controller (training/evaluate.py's worker processes) draws the same (rollout.episode_generator)
EVAL_NOISE_SEED = EPISODE_NOISE_SEED
RESULT_JSON = "result.json"


def load_vla(config: ResidualConfig, device: str):
    from coop_transport.pi0_policy import Pi0Policy

    spec = get_arch(config.arch)
    if spec.vla_variant == "joint":
        if config.vla_joint is None:
            raise ValueError(f"{spec.name} runs on the joint π0 policy: pass --vla-joint DIR (train one with "
                             "python training/imitation.py --variant joint)")
        return Pi0Policy.load(config.vla_joint, device=device)
    return Pi0Policy.load(config.vla, device=device)


def sim_config_for(config: ResidualConfig, image_size: int, training: bool = True):
    from coop_transport.sim import SimConfig

    return SimConfig(wrist_cameras=True, agentview=True, image_size=image_size, horizon=config.horizon,
                     shaped_reward=config.shaped_reward and training, shaping_gamma=config.gamma)


def evaluate_system(system, pool: EnvPool, episodes: int, out: Path | None, label: str, args: dict,
                    message_override=None, recorder=None, progress: bool = False, resume: bool = False,
                    deadline: float | None = None) -> dict | None:
    """Closed-loop success of ``system`` on reset seeds 1..episodes; summary.json/.md under ``out``.

    Each episode draws π0's noise from its own stream (``rollout.episode_generator``), so its outcome does not
    depend on the episodes beside it, and each is appended to ``out/episodes.jsonl`` as it ends. ``resume`` keeps
    the episodes already there (an evaluation cut off by ``deadline``, a time.perf_counter() value, or by a kill
    continues where it stopped, with the outcomes an uninterrupted one gives); without it the file starts afresh.
    Returns None when ``deadline`` came before every episode ended. The clipping rate and wall time of a resumed
    evaluation cover its last call's episodes only.
    """
    from tqdm import tqdm

    from coop_transport.evaluation import (ControllerSpec, EpisodeLog, EvalConfig, stats_delta, summarize,
                                           write_summary)
    from coop_transport.utils.jsonable import to_jsonable

    seeds = list(range(1, episodes + 1))
    key = {"controller": {"kind": "residual", "args": to_jsonable(args)}, "label": label,
           "horizon": system.config.horizon, "noise_seed": EVAL_NOISE_SEED, "weights": system.weights_digest()}
    log = EpisodeLog(Path(out), key, seeds, resume) if out is not None else None
    if log is not None and not resume:  # afresh: an earlier evaluation's summary goes with its episodes
        (Path(out) / "summary.json").unlink(missing_ok=True)
    done = log.done if log is not None else {}
    todo = [s for s in seeds if s not in done]

    before = {"clip_actions": system.counters.actions, "clip_clipped_actions": system.counters.clipped_actions,
              **system.choice_stats()}
    start = time.perf_counter()
    bar = tqdm(total=episodes, initial=len(done), desc=f"eval {label}", disable=not progress, leave=False,
               dynamic_ncols=True)

    def tick(results):
        bar.update(1)
        wins = sum(r["success"] for r in results) + sum(r["success"] for r in done.values())
        bar.set_postfix(success=f"{wins}/{len(results) + len(done)}")

    timing = {}
    new = run_episodes(system, pool, todo, EVAL_NOISE_SEED, message_override=message_override, recorder=recorder,
                       progress=tick, on_episode=log.append if log is not None else None, deadline=deadline,
                       timing=timing)
    bar.close()
    if len(new) < len(todo):
        return None
    results = sorted([*done.values(), *new], key=lambda r: r["seed"])
    for r in results:
        r["stats"] = {}
    after = {"clip_actions": system.counters.actions, "clip_clipped_actions": system.counters.clipped_actions,
             **system.choice_stats()}
    results[0]["stats"] = stats_delta(before, after)  # this call's counters, summed by summarize
    spec = ControllerSpec("residual", args, label)
    summary = summarize(spec, EvalConfig(episodes=episodes, workers=pool.num_envs,
                                         horizon=system.config.horizon), results, time.perf_counter() - start)
    summary["resumed_episodes"] = len(done)
    summary["time_split"] = timing
    summary["this_call_only"] = ["clip activation rate", "wall time", "time split"]
    if system.config.gate_margin is not None:
        summary["this_call_only"].append("critic gate share")
    if system.config.candidates > 1:
        summary["this_call_only"].append("critics' choice share")
    if out is not None:
        write_summary(summary, Path(out))
    return summary


def measured(summary: dict) -> dict:
    """The figures of an evaluation summary that a result.json, best.json and the report carry."""
    return {k: summary[k] for k in ("success_rate", "successes", "episodes", "wilson95", "milestone_rates",
                                    "handover_outcomes")}


def continues_cut_off(config: ResidualConfig, out: Path) -> bool:
    """Whether the evaluation under ``out`` continues: one that a deadline or a kill cut off (an episode log without
    a summary) does; a finished one runs anew."""
    from coop_transport.evaluation import EPISODE_LOG

    return config.resume and (out / EPISODE_LOG).exists() and not (out / "summary.json").exists()


def finished_summary(out: Path, args: dict, episodes: int) -> dict | None:
    """The summary of the evaluation under ``out`` if it finished with these controller arguments (checkpoint,
    weights, and what else distinguishes it: a recipe, a probe) and this episode count, else None: the probes and
    Table 2's ladder read their finished rows back with it."""
    from coop_transport.utils.jsonable import to_jsonable

    path = out / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    same = summary.get("controller", {}).get("args") == json.loads(json.dumps(to_jsonable(args)))
    return summary if same and summary.get("episodes") == episodes else None


def _write_result(run: Path, payload: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{RESULT_JSON}.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(run / RESULT_JSON)


def _write_log(run: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "chunks", k))
    with open(run / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def evaluate_baseline(config: ResidualConfig, seed: int, pool: EnvPool, vla, device,
                      deadline: float | None = None) -> dict:
    """B1 / B2: the π0 policy under the recipe, no residual; written like a trained run's result. An evaluation
    cut off by ``deadline`` returns ``{"out_of_time": True}``; the same command continues it (``config.resume``)."""
    from coop_transport.residual.system import ResidualSystem

    from coop_transport.pi0_policy import default_policy_dir

    spec = config.spec
    run = config.run_dir(seed)
    system = ResidualSystem(spec, config, vla, None, device)
    start = time.perf_counter()
    out = run / "eval" / "final"
    prior = config.vla_joint if spec.vla_variant == "joint" else (config.vla or default_policy_dir())
    summary = evaluate_system(system, pool, config.eval_episodes, out, spec.name,
                              {"arch": spec.name, "vla": str(prior)}, progress=config.progress,
                              resume=continues_cut_off(config, out), deadline=deadline)
    if summary is None:
        print(f"stopping {run} in its evaluation (--stop-after-s {config.stop_after_s:g}); the same command "
              "continues it")
        return {"arch": spec.name, "seed": seed, "out_of_time": True}
    result = {"arch": spec.name, "seed": seed, "trains": False, "best_checkpoint": None, **measured(summary),
              "outcome_by_reset_seed": outcome_by_reset_seed(summary), "evals": [],
              "wall_s": time.perf_counter() - start, "config": config_to_json(config)}
    _write_result(run, result)
    return result


def train(config: ResidualConfig, seed: int, pool: EnvPool | None = None, stop_after: int | None = None,
          started: float | None = None) -> dict:
    """Train (or resume) one seed; returns the result dict (also <run>/result.json).

    ``stop_after``: return after that many chunks as if killed there (tests of resumption), without evaluating.
    ``config.stop_after_s``: save the training state and return ``{"stopped_at": chunks, "out_of_time": True}``
    once that much wall time has passed since ``started`` (time.perf_counter(); default: this call's start), also
    in the middle of an evaluation (``"eval_pending": True``: its finished episodes are kept); the same command
    resumes, with the rest of the pending evaluation first. A seed with a
    result.json of ``config.chunks`` chunks returns it without training (unless ``config.resume`` is off).
    """
    call_start = time.perf_counter() if started is None else started
    from tqdm import tqdm

    from coop_transport.pi0_policy import resolve_device
    from coop_transport.residual.demos import build_demo_buffer
    from coop_transport.residual.system import ResidualSystem, make_agents
    from coop_transport.residual.update import Learner

    spec = config.spec
    run = config.run_dir(seed)
    done = run / RESULT_JSON
    if config.resume and spec.residual and done.is_file():
        result = json.loads(done.read_text())
        if result.get("chunks", 0) >= config.chunks:  # finished, evaluation included: nothing to resume
            print(f"{run} is finished ({result['chunks']} chunks, success {result['success_rate']:.2f}); "
                  "--no-resume trains it again")
            return result
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    vla = load_vla(config, str(device))
    own_pool = pool is None
    if own_pool:
        pool = make_pool(config.envs, sim_config_for(config, vla.image_size), config.gamma, config.ray_address)
    try:
        if not spec.residual:
            return evaluate_baseline(config, seed, pool, vla, device, call_deadline(config, call_start))
        system = ResidualSystem(spec, config, vla, make_agents(spec, config, vla), device)
        learner = Learner(system, config)
        generator = torch.Generator().manual_seed(seed)  # batch sampling, message noise in updates, demo π0 noise
        collector = Collector(system, pool, seed, config.gamma)
        fields = transition_fields(len(spec.agents), config.latent_dim, spec.proprio_dim, config.chunk,
                                   spec.action_dim)
        online = ReplayBuffer(fields, config.online_capacity, device)
        state_dir = run / "train_state"
        t_start = time.perf_counter()
        if config.resume and (state_dir / STATE_JSON).is_file():
            saved = json.loads((state_dir / STATE_JSON).read_text())
            demo = ReplayBuffer(fields, saved["demo_buffer"]["capacity"], device)
            meta = load_train_state(state_dir, system, learner, demo, online, collector, generator)
            for agent in system.agents.values():
                agent.encoder.requires_grad_(False)
            progress_state = meta["progress"]
            print(f"resuming {run} at chunk {progress_state['chunks']}")
            if progress_state.pop("eval_pending", False):  # cut off by --stop-after-s: the networks of that chunk
                if not _evaluate_checkpoint(config, seed, run, system, pool, progress_state, resume=True,
                                            deadline=call_deadline(config, call_start)):
                    print(f"stopping {run} in the evaluation at chunk {progress_state['chunks']} (--stop-after-s "
                          f"{config.stop_after_s:g}); the same command continues it")
                    return {"arch": spec.name, "seed": seed, "stopped_at": progress_state["chunks"],
                            "out_of_time": True, "eval_pending": True}
                if progress_state["chunks"] < config.chunks:
                    collector.restore_envs()
        else:
            demo, demo_info = build_demo_buffer(system, config, pool, generator, config.progress)
            progress_state = {"chunks": 0, "updates": 0, "debt": 0.0, "episodes": [], "evals": [], "log": [],
                              "demo": demo_info, "env_steps": 0, "collect_s": 0.0, "update_s": 0.0,
                              "prepare_s": time.perf_counter() - t_start, "window": {}}
            if config.pretrain_updates:
                offline = RLPDSampler(demo, online, config.batch_size, 1.0)
                for _ in range(config.pretrain_updates):
                    learner.update(offline.sample(generator), generator)
            collector.start()
        sampler = RLPDSampler(demo, online, config.batch_size, config.demo_fraction)
        ps = progress_state
        bar = tqdm(total=config.chunks, initial=ps["chunks"], desc=f"{spec.name} seed {seed}",
                   disable=not config.progress, dynamic_ncols=True)
        window = ps["window"]
        while ps["chunks"] < config.chunks:
            before = ps["chunks"]
            t0 = time.perf_counter()
            transitions, episodes, n = collector.step()
            ps["collect_s"] += time.perf_counter() - t0
            ps["env_steps"] += n * config.chunk  # upper bound: chunks that ended an episode ran fewer steps
            if transitions is not None:
                online.add(transitions)
            ps["chunks"] += n
            ps["episodes"] += episodes
            t0 = time.perf_counter()
            if len(online) >= config.learning_starts:
                ps["debt"] += n * config.updates_per_chunk
                while ps["debt"] >= 1.0:
                    metrics = learner.update(sampler.sample(generator), generator)
                    ps["updates"] += 1
                    ps["debt"] -= 1.0
                    for k, v in metrics.items():
                        window[k] = window.get(k, 0.0) + v
                    window["_n"] = window.get("_n", 0) + 1
            ps["update_s"] += time.perf_counter() - t0
            bar.update(n)
            recent = ps["episodes"][-20:]
            q = _agent_mean(window, "charts/q")
            bar.set_postfix(success=f"{np.mean([e['success'] for e in recent]) if recent else 0:.2f}",
                            episodes=len(ps["episodes"]), Q=f"{q:.3f}", V=f"{_agent_mean(window, 'charts/v'):.3f}",
                            res=f"{_agent_mean(window, 'charts/residual_magnitude'):.4f}",
                            radius=f"{_agent_mean(window, 'charts/residual_radius'):.3f}")
            if _crossed(before, ps["chunks"], config.log_every) or ps["chunks"] >= config.chunks:
                ps["log"].append(_log_row(ps, window, recent))
                window.clear()
            final = ps["chunks"] >= config.chunks
            eval_due = (config.eval_every and _crossed(before, ps["chunks"], config.eval_every)) or (
                final and (config.eval_every or not ps["evals"]))
            # An evaluation runs until --stop-after-s at most; one cut off there is pending, and the same command
            # continues it first (its finished episodes are kept).
            eval_cut = False
            if eval_due:
                eval_cut = not _evaluate_checkpoint(config, seed, run, system, pool, ps,
                                                    deadline=call_deadline(config, call_start))
                if not final and not eval_cut:
                    collector.restore_envs()
            out_of_time = eval_cut or (config.stop_after_s is not None and not final
                                       and time.perf_counter() - call_start >= config.stop_after_s)
            if eval_cut:
                ps["eval_pending"] = True
            if _crossed(before, ps["chunks"], config.save_every) or final or out_of_time:
                ps["window"] = window
                save_train_state(state_dir, system, learner, demo, online, collector, {"progress": ps,
                                 "config": config_to_json(config)}, generator)
                _write_log(run, ps["log"])
            if out_of_time:
                bar.close()
                what = f"in the evaluation at chunk {ps['chunks']}" if eval_cut else f"at chunk {ps['chunks']}"
                print(f"stopping {run} {what} after {time.perf_counter() - call_start:.0f} s (--stop-after-s "
                      f"{config.stop_after_s:g}); the same command resumes")
                return {"arch": spec.name, "seed": seed, "stopped_at": ps["chunks"], "out_of_time": True,
                        "eval_pending": eval_cut}
            if stop_after is not None and ps["chunks"] >= stop_after and not final:
                bar.close()
                return {"stopped_at": ps["chunks"]}
        bar.close()
        if not ps["evals"]:  # a state saved at the last chunk before its evaluation ran (older runs)
            _evaluate_checkpoint(config, seed, run, system, pool, ps)
        best = max(ps["evals"], key=lambda e: (e["success_rate"], e["chunks"]))
        best_summary = run / "eval" / Path(best["checkpoint"]).name / "summary.json"
        wall = ps["prepare_s"] + ps["collect_s"] + ps["update_s"]
        result = {
            "arch": spec.name, "seed": seed, "trains": True, "best_checkpoint": best["checkpoint"],
            "success_rate": best["success_rate"], "successes": best["successes"], "episodes": best["episodes"],
            "wilson95": best["wilson95"], "milestone_rates": best.get("milestone_rates"),
            "handover_outcomes": best.get("handover_outcomes"),
            "outcome_by_reset_seed": (outcome_by_reset_seed(json.loads(best_summary.read_text()))
                                      if best_summary.is_file() else None),
            "evals": ps["evals"], "chunks": ps["chunks"], "updates": ps["updates"],
            "training_episodes": len(ps["episodes"]),
            "training_success_rate": float(np.mean([e["success"] for e in ps["episodes"]])) if ps["episodes"] else 0.0,
            "speed": {"env_steps_per_s": ps["env_steps"] / max(ps["collect_s"], 1e-9),
                      "updates_per_s": ps["updates"] / max(ps["update_s"], 1e-9),
                      "collect_s": ps["collect_s"], "update_s": ps["update_s"], "prepare_s": ps["prepare_s"],
                      "train_wall_s": wall, "envs": pool.num_envs, "device": str(device)},
            "demo": ps["demo"], "config": config_to_json(config),
        }
        _write_result(run, result)
        _write_log(run, ps["log"])
        return result
    finally:
        if own_pool:
            pool.close()


def call_deadline(config: ResidualConfig, call_start: float) -> float | None:
    """The time.perf_counter() value at which --stop-after-s ends this call (None: no limit)."""
    return None if config.stop_after_s is None else call_start + config.stop_after_s


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


def _agent_mean(window: dict, key: str) -> float:
    values = [v for k, v in window.items() if k.endswith("/" + key)]
    n = window.get("_n", 0)
    return float(np.mean(values) / n) if values and n else 0.0


def _log_row(ps: dict, window: dict, recent: list[dict]) -> dict:
    n = window.get("_n", 0)
    row = {"chunks": ps["chunks"], "updates": ps["updates"], "episodes": len(ps["episodes"]),
           "charts/success_recent": float(np.mean([e["success"] for e in recent])) if recent else 0.0,
           "charts/return_recent": float(np.mean([e["return"] for e in recent])) if recent else 0.0,
           "charts/env_steps_per_s": ps["env_steps"] / max(ps["collect_s"], 1e-9),
           "charts/updates_per_s": ps["updates"] / max(ps["update_s"], 1e-9)}
    if n:
        row.update({k: v / n for k, v in window.items() if k != "_n"})
    return row


def _evaluate_checkpoint(config, seed, run: Path, system, pool, ps: dict, resume: bool = False,
                         deadline: float | None = None) -> bool:
    """Save the current networks as a policy checkpoint, evaluate it, keep best.json pointing at the best; False
    when ``deadline`` cut the evaluation off (``resume`` continues it, with the same networks)."""
    name = f"chunk_{ps['chunks']:06d}"
    ckpt = run / "checkpoints" / name
    save_policy(ckpt, system, config, ps["chunks"])
    for agent in system.agents.values():
        agent.eval()
    summary = evaluate_system(system, pool, config.eval_episodes, run / "eval" / name, f"{config.arch}/{name}",
                              {"checkpoint": str(ckpt)}, progress=config.progress, resume=resume,
                              deadline=deadline)
    if summary is None:
        return False
    entry = {"chunks": ps["chunks"], "checkpoint": f"checkpoints/{name}", **measured(summary)}
    ps["evals"].append(entry)
    best = max(ps["evals"], key=lambda e: (e["success_rate"], e["chunks"]))
    (run / BEST_JSON).write_text(json.dumps(best, indent=2))
    return True


def run(config: ResidualConfig, pool: EnvPool | None = None) -> list[dict]:
    """Every seed of ``config`` in ``config.mode``; one simulation pool serves all of them."""
    seeds = list(range(config.seed, config.seed + config.seeds))
    started = time.perf_counter()  # --stop-after-s counts from here, across seeds
    if config.mode == "train":
        if pool is None:
            from coop_transport.pi0_policy import resolve_device

            vla = load_vla(config, str(resolve_device(config.device)))
            pool = make_pool(config.envs, sim_config_for(config, vla.image_size), config.gamma, config.ray_address)
            del vla
            try:
                return _train_seeds(config, seeds, pool, started)
            finally:
                pool.close()
        return _train_seeds(config, seeds, pool, started)
    if config.mode == "ablation":
        from coop_transport.residual.report import run_ablation

        return [run_ablation(config, s, pool, started=started) for s in seeds]
    if config.mode == "probes":
        from coop_transport.residual.probes import run_probes

        return [run_probes(config, s, pool, started=started) for s in seeds]
    return [reevaluate(config, s, pool, started) for s in seeds]


def _train_seeds(config: ResidualConfig, seeds: list[int], pool: EnvPool, started: float) -> list[dict]:
    """Seeds one after the other; a seed stopped by --stop-after-s ends the call. The next call resumes it (the rest
    of an evaluation cut off by the deadline first); seeds with a result.json are finished and only read back."""
    results = []
    for s in seeds:
        results.append(train(config, s, pool, started=started))
        if results[-1].get("out_of_time"):
            break
    return results


def selection_name(margin: float | None, candidates: int = 1) -> str | None:
    """The name of an evaluation in which the critics choose (``gate_M``, ``best_of_K``, ``best_of_K_gate_M``), or
    None for the run's plain evaluation."""
    parts = ([f"best_of_{candidates}"] if candidates > 1 else []) + ([f"gate_{margin:g}"] if margin is not None
                                                                      else [])
    return "_".join(parts) or None


def gated_run_dir(run: Path, margin: float | None, candidates: int = 1) -> Path:
    """Where ``--mode eval --gate-margin M`` and / or ``--candidates K`` write a run's result (a result.json that
    report.py reads as the method "<arch> gate M", "<arch> best-of-K" or "<arch> best-of-K gate M")."""
    name = selection_name(margin, candidates)
    if name is None:
        raise ValueError("neither a gate margin nor more than one candidate: the run's own result.json is its result")
    return run / name


def reevaluate(config: ResidualConfig, seed: int, pool: EnvPool | None = None, started: float | None = None) -> dict:
    """Evaluate a run's best checkpoint again (``--mode eval``), under <run>/eval/best; with ``--gate-margin M``
    and / or ``--candidates K``, the critics choosing, under <run>/eval/best_<selection_name>, and its result.json
    under ``gated_run_dir``. The episodes are logged as they end: a rerun after ``--stop-after-s`` (or a kill)
    continues the evaluation; a rerun of a finished one evaluates anew."""
    from coop_transport.residual.checkpoint import load_policy, resolve_policy_dir

    run = config.run_dir(seed)
    system = load_policy(run, config.device)
    checkpoint = resolve_policy_dir(run)
    name, args = "best", {"checkpoint": str(checkpoint)}
    selection = selection_name(config.gate_margin, config.candidates)
    if selection is not None:
        if config.gate_margin is not None:
            system = system.with_gate(config.gate_margin)
        if config.candidates > 1:
            system = system.with_candidates(config.candidates)
        name = f"best_{selection}"
        args = {**args, **({"gate_margin": config.gate_margin} if config.gate_margin is not None else {}),
                **({"candidates": config.candidates} if config.candidates > 1 else {})}
    own = pool is None
    pool = pool or make_pool(config.envs, sim_config_for(config, system.vla.image_size, False), config.gamma,
                             config.ray_address)
    try:
        out = run / "eval" / name
        summary = evaluate_system(system, pool, config.eval_episodes, out, f"{config.arch}/{name}", args,
                                  progress=config.progress, resume=continues_cut_off(config, out),
                                  deadline=call_deadline(config, time.perf_counter() if started is None else started))
    finally:
        if own:
            pool.close()
    if summary is None:
        print(f"stopping the evaluation of {run} after --stop-after-s {config.stop_after_s:g}; the same command "
              "continues it")
        return {"arch": config.arch, "seed": seed, "out_of_time": True}
    if selection is not None:
        trained = json.loads((run / RESULT_JSON).read_text()) if (run / RESULT_JSON).is_file() else {}
        result = {"arch": system.spec.name, "seed": seed, "trains": True, "gated": config.gate_margin is not None,
                  "evaluated_checkpoint": str(checkpoint.relative_to(run)) if checkpoint.is_relative_to(run)
                  else str(checkpoint),
                  **measured(summary), "outcome_by_reset_seed": outcome_by_reset_seed(summary),
                  **{k: summary[k] for k in ("gate", "candidates") if k in summary},
                  "ungated_success_rate": trained.get("success_rate"),
                  "config": config_to_json(system.config)}
        _write_result(gated_run_dir(run, config.gate_margin, config.candidates), result)
    return summary
