"""Communication probes on a trained V5 or V6 (seed paper §4): is the channel used, and what does it carry?

Interventions replace what each agent *receives* at every chunk boundary, with everything else unchanged, and
report closed-loop success on the same reset seeds:

    none          the trained channel (also the recording pass for the others)
    zeros         the zero message (FiLM's identity: the V4 behaviour)
    gaussian      noise: N(0, I) for V5 (its prior), the recorded per-dimension mean/std for V6
    shuffle_time  the partner's message from another boundary of the same episode (recorded pass)
    shuffle_episode  the partner's message at the same boundary index of another episode (recorded pass)
    oracle        the partner's full π0 reference chunk (C x 7): V6's own channel; for V5 mapped into message
                  space by least squares fitted on the recorded pass
    compression   matched compression: the partner chunk through a 16-D PCA bottleneck (V6: reconstructed to C x 7;
                  V5: the 16 PCA codes mapped into message space by least squares)

The linear probe fits, on the messages each agent *sent* in the recorded pass, linear/logistic read-outs of the
sender's phase (5-way), gripper, readiness and 6-D pose (train/test split by episode), and reports test accuracy
against chance (the majority class of the test set, and uniform as the paper reports it) and the pose R²
(chance 0).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

PROBES = ("none", "zeros", "gaussian", "shuffle_time", "shuffle_episode", "oracle", "compression")
PCA_DIM = 16


class Recording:
    """What the recorded pass saw: per (seed, boundary, agent) the received message; per sample the sent message,
    the partner's chunk and the sender's labels."""

    def __init__(self, system):
        self.system = system
        self.received: dict[tuple[int, int, int], np.ndarray] = {}
        self.lengths: dict[int, int] = {}
        self.sent, self.partner_chunk, self.received_rows, self.labels, self.seeds, self.agent = [], [], [], [], [], []

    def __call__(self, b, ctx) -> None:
        names = self.system.agent_names
        sent, received = b.sent.cpu().numpy(), b.received.cpu().numpy()
        for row, (seed, k, labels) in enumerate(zip(ctx["seeds"], ctx["boundary_index"], ctx["labels"])):
            self.lengths[seed] = max(self.lengths.get(seed, 0), k + 1)
            for i, name in enumerate(names):
                j = names.index(self.system.spec.partner(name))
                self.received[(seed, k, i)] = received[row, i]
                self.received_rows.append(received[row, i])
                self.partner_chunk.append(b.ref[row, j].flatten().cpu().numpy())
                self.sent.append(sent[row, i])
                self.labels.append({"phase": int(labels[f"{name}_phase"]),
                                    "gripper": int(labels[f"{name}_gripper_closed"]),
                                    "ready": int(labels[f"{name}_ready"]), "pose": np.asarray(labels[f"{name}_pose"])})
                self.seeds.append(seed)
                self.agent.append(i)

    # A recording is saved beside the probe results so that an interrupted probe run resumes without the recorded
    # pass (an evaluation of its own): numpy arrays only, no pickle.
    def save(self, path) -> None:
        keys = sorted(self.received)
        np.savez_compressed(
            path, received_keys=np.array(keys, dtype=np.int64).reshape(-1, 3),
            received_values=np.stack([self.received[k] for k in keys]) if keys else np.zeros((0, 0), np.float32),
            length_seeds=np.array(sorted(self.lengths), dtype=np.int64),
            length_values=np.array([self.lengths[s] for s in sorted(self.lengths)], dtype=np.int64),
            sent=np.stack(self.sent), partner_chunk=np.stack(self.partner_chunk),
            received_rows=np.stack(self.received_rows), seeds=np.array(self.seeds, dtype=np.int64),
            agent=np.array(self.agent, dtype=np.int64),
            phase=np.array([lab["phase"] for lab in self.labels], dtype=np.int64),
            gripper=np.array([lab["gripper"] for lab in self.labels], dtype=np.int64),
            ready=np.array([lab["ready"] for lab in self.labels], dtype=np.int64),
            pose=np.stack([lab["pose"] for lab in self.labels]))

    @classmethod
    def load(cls, system, path) -> "Recording":
        rec = cls(system)
        with np.load(path, allow_pickle=False) as f:
            rec.received = {tuple(int(x) for x in k): v for k, v in zip(f["received_keys"], f["received_values"])}
            rec.lengths = {int(s): int(n) for s, n in zip(f["length_seeds"], f["length_values"])}
            rec.sent, rec.partner_chunk, rec.received_rows = list(f["sent"]), list(f["partner_chunk"]), list(
                f["received_rows"])
            rec.seeds, rec.agent = [int(x) for x in f["seeds"]], [int(x) for x in f["agent"]]
            rec.labels = [{"phase": int(p), "gripper": int(g), "ready": int(r), "pose": pose}
                          for p, g, r, pose in zip(f["phase"], f["gripper"], f["ready"], f["pose"])]
        return rec


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
    return np.linalg.lstsq(x1, y, rcond=None)[0]


def _apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], 1) @ w


class Interventions:
    """The message replacements, fitted on a recording."""

    def __init__(self, system, rec: Recording, seed: int = 0):
        self.system, self.rec, self.seed = system, rec, seed
        chunks = np.stack(rec.partner_chunk)
        received = np.stack(rec.received_rows)
        self.pca_mean = chunks.mean(0)
        _, _, vt = np.linalg.svd(chunks - self.pca_mean, full_matrices=False)
        self.pca = vt[:PCA_DIM]  # (16, C*7)
        self.msg_mean, self.msg_std = received.mean(0), received.std(0) + 1e-6
        self.learned = system.spec.message == "learned"
        if self.learned:
            self.w_oracle = _lstsq(chunks, received)
            self.w_compress = _lstsq((chunks - self.pca_mean) @ self.pca.T, received)

    def _partner_chunks(self, b) -> np.ndarray:
        names = self.system.agent_names
        partner = [names.index(self.system.spec.partner(n)) for n in names]
        return b.ref[:, partner].flatten(2).cpu().numpy()  # (E, A, C*7)

    def override(self, name: str):
        if name == "none":
            return None
        # Random draws from a stream of each (probe, episode, chunk boundary): a probe episode's outcome depends
        # neither on which probes ran before it nor on the episodes simulated beside it, so a probe cut off and
        # continued, or run with another number of workers, matches an uninterrupted one.
        index = PROBES.index(name) if name in PROBES else len(PROBES)

        def row_rng(seed, k) -> np.random.Generator:
            return np.random.default_rng([self.seed, index, int(seed), int(k)])

        def fn(b, ctx):
            e, a, m = b.received.shape
            if name == "zeros":
                return torch.zeros_like(b.received)
            if name == "gaussian":
                noise = np.stack([row_rng(seed, k).standard_normal((a, m))
                                  for seed, k in zip(ctx["seeds"], ctx["boundary_index"])])
                if not self.learned:  # V6's channel carries chunks: noise of their mean and spread
                    noise = noise * self.msg_std + self.msg_mean
                return torch.as_tensor(noise, dtype=torch.float32, device=b.received.device)
            if name in ("shuffle_time", "shuffle_episode"):
                out = np.empty((e, a, m), dtype=np.float32)
                seeds = sorted(self.rec.lengths)
                for row, (seed, k) in enumerate(zip(ctx["seeds"], ctx["boundary_index"])):
                    rng = row_rng(seed, k)
                    for i in range(a):
                        if name == "shuffle_time":
                            n = self.rec.lengths.get(seed, 1)
                            choices = [x for x in range(n) if x != k] or [0]
                            key = (seed, int(rng.choice(choices)), i)
                        else:
                            others = [s for s in seeds if s != seed] or seeds
                            other = int(rng.choice(others))
                            key = (other, min(k, self.rec.lengths[other] - 1), i)
                        out[row, i] = self.rec.received[key]
                return torch.as_tensor(out, device=b.received.device)
            chunks = self._partner_chunks(b).reshape(e * a, -1)
            if name == "oracle":
                out = _apply(self.w_oracle, chunks) if self.learned else chunks
            elif name == "compression":
                codes = (chunks - self.pca_mean) @ self.pca.T
                out = _apply(self.w_compress, codes) if self.learned else codes @ self.pca + self.pca_mean
            else:
                raise ValueError(f"unknown probe {name!r}; known: {PROBES}")
            return torch.as_tensor(out.reshape(e, a, m), dtype=torch.float32, device=b.received.device)

        return fn


# ------------------------------------------------------------------------------------------------ linear probe
def _logistic(x_train, y_train, x_test, classes: int, steps: int = 200, l2: float = 1e-3) -> np.ndarray:
    """Multinomial logistic regression (L-BFGS); returns test predictions."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.as_tensor((x_train - mean) / std, dtype=torch.float64)
    yt = torch.as_tensor(y_train, dtype=torch.long)
    w = torch.zeros(xt.shape[1] + 1, classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    x1 = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x1 @ w, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    xs = torch.as_tensor((x_test - mean) / std, dtype=torch.float64)
    with torch.no_grad():
        return (torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1) @ w).argmax(1).numpy()


def linear_probe(messages: np.ndarray, labels: list[dict], episodes: np.ndarray, train_fraction: float = 0.7
                 ) -> dict:
    """Test accuracy (and chance) of phase, gripper, readiness and R² of pose read linearly from messages."""
    uniq = np.unique(episodes)
    train_eps = set(uniq[: max(1, int(round(train_fraction * len(uniq))))].tolist())
    train = np.array([e in train_eps for e in episodes])
    test = ~train if (~train).any() else train
    out = {}
    for key, classes in (("phase", 5), ("gripper", 2), ("ready", 2)):
        y = np.array([lab[key] for lab in labels])
        pred = _logistic(messages[train], y[train], messages[test], classes)
        chance = np.bincount(y[test], minlength=classes).max() / test.sum()
        out[key] = {"accuracy": float((pred == y[test]).mean()), "chance": float(chance),
                    "uniform_chance": 1.0 / classes}  # the paper's chance (20% phase, 50% gripper / readiness)
    pose = np.stack([lab["pose"] for lab in labels])
    w = _lstsq(messages[train], pose[train])
    resid = ((_apply(w, messages[test]) - pose[test]) ** 2).sum(0)
    total = ((pose[test] - pose[test].mean(0)) ** 2).sum(0) + 1e-12
    out["pose"] = {"r2": float(np.mean(1.0 - resid / total)), "chance": 0.0}
    return out


# ----------------------------------------------------------------------------------------------------------- run
def against_none(probe: dict, none: dict) -> dict:
    """A probe paired with the unchanged message by reset seed: episodes it won (succeeded where the unchanged
    message failed) and lost, and the exact McNemar p (two-sided)."""
    from coop_transport.utils.stats import discordant_pairs, mcnemar_exact

    pairs = discordant_pairs(probe["outcome_by_reset_seed"], none["outcome_by_reset_seed"])
    return {**pairs, "p_mcnemar": mcnemar_exact(pairs["won"], pairs["lost"])}


def run_probes(config, seed: int, pool=None, probes: tuple[str, ...] = PROBES, started: float | None = None) -> dict:
    """All probes on a run's best checkpoint -> <run>/probes.json (and eval summaries under <run>/probes/).

    Resumable: each finished probe leaves its ``probes/<name>/summary.json`` and the recorded pass
    ``probes/recording.npz``; a rerun reads back the probes finished with the same checkpoint, weights and episode
    count (``train.finished_summary``), evaluates the others, and continues a probe that ``config.stop_after_s`` (counted
    from ``started``) or a kill cut off with the episodes it had not finished; it then returns
    ``{"out_of_time": True, ...}``. The recorded pass ("none") records every episode's messages, so it always runs
    whole.
    """
    from coop_transport.residual.checkpoint import load_policy, resolve_policy_dir
    from coop_transport.residual.rollout import make_pool
    from coop_transport.evaluation import outcome_by_reset_seed
    from coop_transport.residual.train import (call_deadline, continues_cut_off, evaluate_system, finished_summary,
                                               measured, sim_config_for)

    def row(summary: dict) -> dict:  # the figures, and each reset seed's outcome for the pairing with "none"
        return {**measured(summary), "outcome_by_reset_seed": outcome_by_reset_seed(summary)}

    deadline = call_deadline(config, started if started is not None else time.perf_counter())
    run = config.run_dir(seed)
    system = load_policy(run, config.device)
    if system.spec.message == "none":
        raise ValueError(f"{system.spec.name} has no message channel: probes apply to V5 and V6")
    checkpoint = str(resolve_policy_dir(run))
    weights = system.weights_digest()
    out_dir = run / "probes"
    out_dir.mkdir(parents=True, exist_ok=True)

    def args(name: str) -> dict:
        return {"checkpoint": checkpoint, "probe": name, "weights": weights}

    def done(name: str) -> dict | None:  # another checkpoint, its weights or episode count: evaluate again
        summary = finished_summary(out_dir / name, args(name), config.eval_episodes)
        return row(summary) if summary is not None else None

    results = {name: saved for name in dict.fromkeys(("none", *probes)) if (saved := done(name)) is not None}
    rec = None
    if "none" in results and (out_dir / "recording.npz").is_file():
        rec = Recording.load(system, out_dir / "recording.npz")
    else:
        results.pop("none", None)  # its recording is gone: the recorded pass runs again
    todo = [name for name in probes if name != "none" and name not in results]
    own = pool is None and (rec is None or todo)
    if own:
        pool = make_pool(config.envs, sim_config_for(config, system.vla.image_size, False), config.gamma,
                         config.ray_address)
    try:
        if rec is None:
            rec = Recording(system)
            summary = evaluate_system(system, pool, config.eval_episodes, out_dir / "none", "probe none",
                                      args("none"), recorder=rec, progress=config.progress)
            rec.save(out_dir / "recording.npz")
            results["none"] = row(summary)
        interventions = Interventions(system, rec, seed)
        for name in todo:
            out = out_dir / name
            summary = evaluate_system(system, pool, config.eval_episodes, out, f"probe {name}", args(name),
                                      message_override=interventions.override(name), progress=config.progress,
                                      resume=continues_cut_off(config, out), deadline=deadline)
            if summary is None:
                print(f"stopping the probes of {run} in '{name}' (--stop-after-s {config.stop_after_s:g}); the same "
                      "command continues it")
                return {"arch": system.spec.name, "seed": seed, "out_of_time": True, "done": sorted(results)}
            results[name] = row(summary)
    finally:
        if own:
            pool.close()
    sent, agent, seeds = np.stack(rec.sent), np.array(rec.agent), np.array(rec.seeds)
    per_agent = {}
    for i, name in enumerate(system.agent_names):
        sel = agent == i
        per_agent[name] = linear_probe(sent[sel], [lab for lab, s in zip(rec.labels, sel) if s], seeds[sel])
    mean = {key: {k: float(np.mean([per_agent[a][key][k] for a in per_agent])) for k in per_agent[
        system.agent_names[0]][key]} for key in ("phase", "gripper", "ready", "pose")}
    interventions = {name: dict(results[name]) for name in probes}
    for name, row_of_probe in interventions.items():
        if name != "none":  # the recorded pass is what every other probe is paired with
            row_of_probe["against_none"] = against_none(row_of_probe, results["none"])
    payload = {"arch": system.spec.name, "seed": seed, "checkpoint": checkpoint, "interventions": interventions,
               "linear_probe": {**mean, "per_agent": per_agent}, "samples": int(len(sent))}
    (run / "probes.json").write_text(json.dumps(payload, indent=2))
    return payload
