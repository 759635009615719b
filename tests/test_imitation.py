"""Imitation training end to end on a tiny real demonstration file: checkpoints, resume, evaluation, policy API."""

import json

import numpy as np
import pytest
import torch

from coop_transport.imitation import ImitationConfig, lr_at, train


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    from coop_transport.data.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("demos") / "tiny.hdf5"
    generate(GenerateConfig(out=out, episodes=2, workers=1, images=True, image_size=32, horizon=16,
                            successful_only=False, progress=False))
    return out


def _config(demo_file, out, steps, **kw):
    return ImitationConfig(model="tiny", data=demo_file, out=out, steps=steps, batch_size=4, action_horizon=12,
                           save_every=2, log_every=1, warmup_steps=2, progress=False, device="cpu", **kw)


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "train_state" / "state.safetensors"))


def test_train_checkpoints_and_resume_is_exact(demo_file, tmp_path):
    straight = tmp_path / "straight"
    summary = train(_config(demo_file, straight, 6))
    assert summary["steps"] == 6 and summary["trajectories"] >= 2  # per-arm: two trajectories per demo
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_000002", "step_000004",
                                                                          "step_000006"]
    assert (straight / "loss.csv").exists()

    resumed = tmp_path / "resumed"
    train(_config(demo_file, resumed, 6, stop_at=3))  # stops between checkpoints, with its training state saved
    assert json.loads((resumed / "train_state" / "state.json").read_text())["step"] == 3
    train(_config(demo_file, resumed, 6, stop_after_s=0.0))  # out of time after one more step: saved, stopped
    assert json.loads((resumed / "train_state" / "state.json").read_text())["step"] == 4
    train(_config(demo_file, resumed, 6))  # the same command continues from step 4
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_runs_as_a_policy(demo_file, tmp_path):
    from coop_transport.constants import ARM_ACTION_DIM, PROPRIO_DIM
    from coop_transport.pi0_policy import Pi0Policy

    run = tmp_path / "run"
    train(_config(demo_file, run, 2))
    policy = Pi0Policy.load(run / "checkpoints" / "step_000002", device="cpu")
    assert policy.variant == "per-arm" and policy.horizon == 12
    obs = {"proprio": np.zeros(PROPRIO_DIM, np.float32), "wrist_image": np.zeros((32, 32, 3), np.uint8),
           "agentview_image": np.zeros((32, 32, 3), np.uint8)}
    chunks, prefix = policy.sample_arm(obs, "robot0", num_samples=4, return_prefix=True)
    assert chunks.shape == (4, 12, ARM_ACTION_DIM) and np.all(np.isfinite(chunks))
    assert prefix.prefix_embeddings.shape[0] == 1  # one observation's prefix, for the residual token encoder
    bad = dict(obs, proprio=np.full(PROPRIO_DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        policy.sample_arm(bad, "robot0")
    with pytest.raises(ValueError, match="RGB"):
        policy.sample_arm(dict(obs, wrist_image=np.zeros((32, 32), np.uint8)), "robot0")


def test_state_history_by_hand():
    from coop_transport.adapters import StateHistory, policy_state

    proprio = np.arange(20, dtype=np.float32)[:, None] * np.array([1.0, -2.0], np.float32)  # s_t = (t, -2t)
    history = StateHistory(frames=3, stride=5, encoding="delta")
    states = history.from_trajectory(proprio)
    assert states.shape == (20, 6)
    np.testing.assert_array_equal(states[12], [12, -24, 5, -10, 10, -20])  # s_12, s_12 - s_7, s_12 - s_2
    np.testing.assert_array_equal(states[3], [3, -6, 3, -6, 3, -6])  # before step 0 the first state stands in
    np.testing.assert_array_equal(StateHistory(3, 5, "absolute").from_trajectory(proprio)[12], [12, -24, 7, -14, 2, -4])
    for t in range(20):  # what the simulation and the policy node record, newest first, gives training's state
        np.testing.assert_array_equal(history.from_recent(proprio[t::-1]), states[t])
    obs = {"proprio": proprio[12]}
    np.testing.assert_array_equal(policy_state(obs, StateHistory()), proprio[12])
    with pytest.raises(ValueError, match="no proprio_history"):
        policy_state(obs, history)
    with pytest.raises(ValueError, match="current proprio first"):
        policy_state({**obs, "proprio_history": proprio[11::-1]}, history)
    for bad in ({"frames": 0}, {"stride": 0}, {"encoding": "velocity"}):
        with pytest.raises(ValueError):
            StateHistory(**bad)


def test_training_with_a_state_history(demo_file, tmp_path):
    """--state-history: the policy state is the current state plus displacements since earlier ones, z-scored with
    statistics of its own; the checkpoint carries the history, inference needs the earlier states, a closed-loop
    episode runs (the simulation records them), and a resume with another history is refused."""
    from coop_transport.adapters import StateHistory
    from coop_transport.constants import PROPRIO_DIM
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate
    from coop_transport.imitation import DELTA_STD_FLOOR
    from coop_transport.pi0_policy import Pi0Policy

    plain, run = tmp_path / "plain", tmp_path / "history"
    train(_config(demo_file, plain, 2))
    train(_config(demo_file, run, 2, state_history=3, state_history_stride=2))
    policy = Pi0Policy.load(run / "checkpoints" / "step_000002", device="cpu")
    assert policy.state_history == StateHistory(3, 2, "delta")
    assert policy.state_dim == policy.config.state_dim == 3 * PROPRIO_DIM and policy.config.state_pad_dim == 54
    base = Pi0Policy.load(plain / "checkpoints" / "step_000002", device="cpu")
    np.testing.assert_allclose(policy.state_std[:PROPRIO_DIM], base.state_std, rtol=1e-5)  # the current state's
    assert policy.state_std[PROPRIO_DIM:].min() >= DELTA_STD_FLOOR

    size = policy.image_size
    obs = {"proprio": np.zeros(PROPRIO_DIM, np.float32), "wrist_image": np.zeros((size, size, 3), np.uint8),
           "agentview_image": np.zeros((size, size, 3), np.uint8)}
    with pytest.raises(ValueError, match="no proprio_history"):
        policy.sample_arm(obs, "robot0")
    chunks = policy.sample_arm({**obs, "proprio_history": np.zeros((5, PROPRIO_DIM), np.float32)}, "robot0", 2)
    assert chunks.shape == (2, 12, 7) and np.all(np.isfinite(chunks))

    spec = ControllerSpec("pi0", {"policy": str(run / "checkpoints" / "step_000002"), "device": "cpu"})
    summary = evaluate(spec, EvalConfig(episodes=1, workers=1, horizon=12), tmp_path / "eval", progress=False)
    assert summary["per_seed"][0]["length"] == 12
    with pytest.raises(ValueError, match="state history"):
        train(_config(demo_file, run, 4))


def test_object_state_auxiliary_loss_end_to_end(demo_file, tmp_path):
    """--object-state-weight: the head takes the file's object-state width, its error is logged beside the total,
    the checkpoint keeps its statistics and runs as a policy, and a resume without the weight is refused."""
    import csv

    from coop_transport.data.dataset import load_demonstrations
    from coop_transport.pi0_policy import Pi0Policy

    with load_demonstrations(demo_file) as demos:
        object_dim = demos.object_states(demos.demos[0]).shape[1]
    run = tmp_path / "aux"
    summary = train(_config(demo_file, run, 4, object_state_weight=1.0, stop_at=2))
    assert summary["steps"] == 2
    train(_config(demo_file, run, 4, object_state_weight=1.0))
    rows = list(csv.DictReader(open(run / "loss.csv")))
    assert len(rows) == 4 and all(float(r["object_state_mse"]) > 0 for r in rows)
    policy = Pi0Policy.load(run / "checkpoints" / "step_000004", device="cpu")
    assert policy.config.object_state_dim == object_dim
    meta = json.loads((run / "checkpoints" / "step_000004" / "config.json").read_text())
    assert len(meta["norm_stats"]["object_state"]["mean"]) == object_dim
    obs = {"proprio": np.zeros(18, np.float32), "wrist_image": np.zeros((32, 32, 3), np.uint8),
           "agentview_image": np.zeros((32, 32, 3), np.uint8)}
    assert np.all(np.isfinite(policy.sample_arm(obs, "robot0", num_samples=2)))
    with pytest.raises(ValueError, match="object-state head"):
        train(_config(demo_file, run, 6))

    # A warm start may add the head to a checkpoint without one, or drop it: the rest of the weights carry over.
    from coop_transport.policy.checkpoint import load_checkpoint

    plain = tmp_path / "plain"
    train(_config(demo_file, plain, 2))
    added, dropped = tmp_path / "added", tmp_path / "dropped"
    train(_config(demo_file, added, 1, init_from=plain / "checkpoints" / "step_000002", lr=1e-30,
                  object_state_weight=1.0))
    train(_config(demo_file, dropped, 1, init_from=run / "checkpoints" / "step_000004", lr=1e-30))
    for source, warm in ((plain / "checkpoints" / "step_000002", added), (run / "checkpoints" / "step_000004", dropped)):
        before = load_checkpoint(source).model.state_dict()
        after = load_checkpoint(warm / "checkpoints" / "step_000001").model.state_dict()
        shared = [k for k in before if not k.startswith("object_state_head.")]
        assert shared and all(torch.allclose(after[k], before[k], atol=1e-6) for k in shared)
        assert any(k.startswith("object_state_head.") for k in after) == (warm == added)
    with pytest.raises(ValueError, match="object_state_weight"):
        _config(demo_file, run, 6, object_state_weight=float("nan"))


def test_ema_decay_option_sets_what_checkpoints_hold(demo_file, tmp_path):
    """--ema-decay: 0 makes checkpoints hold the raw weights, another decay is recorded in the checkpoint's
    configuration, and a resume with a different decay is refused."""
    from coop_transport.policy.checkpoint import load_checkpoint

    raw = tmp_path / "raw"
    train(_config(demo_file, raw, 2, ema_decay=0.0))
    checkpoint = load_checkpoint(raw / "checkpoints" / "step_000002")
    assert checkpoint.config.ema_decay is None
    state = _weights(raw)
    for key, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, state[f"model/{key}"]), key

    averaged = tmp_path / "averaged"
    train(_config(demo_file, averaged, 4, ema_decay=0.5, stop_at=2))
    assert load_checkpoint(averaged / "checkpoints" / "step_000002").config.ema_decay == 0.5
    state = _weights(averaged)
    weights = load_checkpoint(averaged / "checkpoints" / "step_000002").model.state_dict()
    assert any(not torch.equal(weights[k[len("model/"):]], v) for k, v in state.items() if k.startswith("model/"))
    with pytest.raises(ValueError, match="EMA decay 0.5"):
        train(_config(demo_file, averaged, 4, ema_decay=0.9))
    with pytest.raises(ValueError, match="ema_decay"):
        _config(demo_file, averaged, 4, ema_decay=1.0)


def test_closed_loop_evaluation_of_a_checkpoint(demo_file, tmp_path):
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate

    run = tmp_path / "run"
    train(_config(demo_file, run, 2))
    spec = ControllerSpec("pi0", {"policy": str(run / "checkpoints" / "step_000002"), "device": "cpu",
                                  "recipe": {"execute_steps": 5}})
    summary = evaluate(spec, EvalConfig(episodes=2, workers=1, horizon=8), tmp_path / "eval", progress=False)
    assert summary["episodes"] == 2 and [r["seed"] for r in summary["per_seed"]] == [1, 2]
    assert all(r["length"] == 8 for r in summary["per_seed"])
    assert summary["clip_activation_rate"] is not None
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["successes"] == summary["successes"]
    assert "Wilson" in (tmp_path / "eval" / "summary.md").read_text()


def test_checkpoint_selection_over_a_run(demo_file, tmp_path):
    """training/evaluate.py over a run's checkpoints: every one on the same seeds, the best copied out; with equal
    success (none solves 6 steps) the tie goes to the one that reached more milestones, then the later step."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("evaluate_cli", root / "training" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_cli"] = cli  # dataclasses look their module up while the file executes
    spec.loader.exec_module(cli)
    run = tmp_path / "run"
    train(_config(demo_file, run, 4))
    result = cli.main(cli.Config(policy=run / "checkpoints", out=tmp_path / "sel", episodes=1, workers=1, horizon=6,
                                 chunk=3, select_best=True, progress=False))
    assert [r["step"] for r in result["rows"]] == [2, 4]
    assert all(r["mean_milestones"] == 0 for r in result["rows"])
    assert result["best"]["step"] == 4
    assert json.loads((tmp_path / "sel" / "best" / "config.json").read_text())["step"] == 4
    assert "milestones reached" in (tmp_path / "sel" / "results.md").read_text()


def test_learning_rate_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 1.0, 10, 100, 0.1) < 1.0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="variant"):
        ImitationConfig(variant="both")
    with pytest.raises(ValueError, match="steps"):
        ImitationConfig(steps=0)


def test_warm_start_begins_from_the_checkpoint_and_keeps_its_statistics(demo_file, tmp_path):
    from coop_transport.policy.checkpoint import load_checkpoint

    first = tmp_path / "first"
    train(_config(demo_file, first, 2, num_checkpoints=1))
    source = load_checkpoint(first / "checkpoints" / "step_000002")
    warm = tmp_path / "warm"
    # lr=0: the warm run's weights must stay exactly the source checkpoint's
    train(_config(demo_file, warm, 1, init_from=first / "checkpoints" / "step_000002", lr=1e-30, num_checkpoints=1))
    result = load_checkpoint(warm / "checkpoints" / "step_000001")
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(result.norm_stats["actions"]["mean"], source.norm_stats["actions"]["mean"])

    with pytest.raises(ValueError, match="configuration differs"):
        train(ImitationConfig(model="tiny", data=demo_file, out=tmp_path / "bad", steps=1, batch_size=4,
                              action_horizon=8, init_from=first / "checkpoints" / "step_000002", progress=False,
                              device="cpu"))


def test_resuming_a_warm_start_keeps_the_warm_start_statistics(demo_file, tmp_path):
    """A warm-started run z-scores with its source checkpoint's statistics; its resume must keep them (it once
    recomputed them from the data, so a resumed run's targets moved under its weights)."""
    from coop_transport.policy.checkpoint import load_checkpoint, save_checkpoint

    first = tmp_path / "first"
    train(_config(demo_file, first, 2, num_checkpoints=1))
    source = load_checkpoint(first / "checkpoints" / "step_000002")
    shifted = {group: {k: (np.asarray(v) + 0.5 if k == "mean" else v) for k, v in stats.items()}
               for group, stats in source.norm_stats.items()}  # unlike anything computed from the data
    other = save_checkpoint(tmp_path / "other_stats", source.model, source.config, shifted, step=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(demo_file, straight, 4, init_from=other))
    train(_config(demo_file, resumed, 4, init_from=other, stop_at=1))
    train(_config(demo_file, resumed, 4, init_from=other))
    for step in ("step_000002", "step_000004"):
        stats = load_checkpoint(resumed / "checkpoints" / step).norm_stats
        np.testing.assert_allclose(stats["actions"]["mean"], shifted["actions"]["mean"], rtol=1e-6)
        np.testing.assert_allclose(stats["state"]["mean"], shifted["state"]["mean"], rtol=1e-6)
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_dagger_episodes_are_the_learners_and_labelled_by_the_expert(demo_file, tmp_path):
    """training/demos.py --learner: the policy drives, the expert labels what it would do there, failures are kept,
    and imitation trains on them through --extra-data."""
    import h5py

    from coop_transport.data import hdf5_format as fmt
    from coop_transport.data.dataset import read_meta
    from coop_transport.data.generate import GenerateConfig, generate

    run = tmp_path / "run"
    first = train(_config(demo_file, run, 2, num_checkpoints=1))
    policy = run / "checkpoints" / "step_000002"
    out = generate(GenerateConfig(out=tmp_path / "dagger.hdf5", episodes=1, workers=1, images=True, image_size=32,
                                  horizon=10, seed_offset=500, learner=policy, learner_device="cpu",
                                  progress=False))  # successful_only stays on: a learner's failures are kept anyway
    with h5py.File(out, "r") as f:
        demo = f["data/demo_0"]
        executed, labels = demo[fmt.ACTIONS][:], demo[fmt.EXPERT_ACTIONS][:]
        assert executed.shape == labels.shape == (10, 14) and not bool(demo.attrs["success"])
        assert demo.attrs["seed"] == fmt.demo_seed(500)
        assert demo["obs/agentview_image"].shape == (10, 32, 32, 3)
    # An untrained tiny policy does not do what the expert would: the labels are the expert's, not the actions.
    assert np.abs(executed - labels).max() > 0.1
    meta = read_meta(out)
    assert meta["fingerprint"]["learner"]["weights_sha256"] == json.loads(
        (policy / "config.json").read_text())["weights_sha256"]
    # The expert labels in its labelling mode: it follows the learner's grasps and never backs off on a timeout.
    assert meta["expert_config"]["labelling"] is True and meta["expert_config"]["stage_timeout"] >= 10**9
    assert meta["learner_success_rate"] == 0.0 and meta["expert_success_rate"] is None  # the learner's episodes

    summary = train(_config(demo_file, tmp_path / "aggregated", 1, extra_data=(out,)))
    assert summary["trajectories"] == first["trajectories"] + 2  # both arms of the learner's episode joined
    # An extra file without images is refused, naming that file (not --data).
    bare = generate(GenerateConfig(out=tmp_path / "bare.hdf5", episodes=1, workers=1, horizon=4, seed_offset=600,
                                   learner=policy, learner_device="cpu", progress=False))
    with pytest.raises(ValueError, match="bare.hdf5: demonstration demo_0 has no images"):
        train(_config(demo_file, tmp_path / "bare_run", 1, extra_data=(bare,)))

    with pytest.raises(ValueError, match="not a π0 policy directory"):
        GenerateConfig(out=tmp_path / "x.hdf5", learner=tmp_path)


@pytest.mark.slow
def test_shipped_default_policy_runs_a_short_closed_loop_episode():
    """The committed per-arm default loads from the package and drives both arms for a few control steps."""
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate
    from coop_transport.pi0_policy import Pi0Policy, default_policy_dir

    policy = Pi0Policy.load(device="cpu")
    assert policy.variant == "per-arm" and default_policy_dir().is_dir()
    summary = evaluate(ControllerSpec("pi0", {"device": "cpu"}), EvalConfig(episodes=1, workers=1, horizon=12),
                       progress=False)
    assert summary["episodes"] == 1 and summary["mean_length"] == 12
    assert 0.0 <= summary["clip_activation_rate"] <= 1.0


def test_data_parallel_training_with_torchrun(demo_file, tmp_path):
    """Two processes (gloo on CPU) share each global batch; the ranks' weights are compared at every checkpoint
    (a rank whose gradients were not averaged would diverge and stop the run); the run stops and resumes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "training" / "imitation.py"), "--model", "tiny", "--data", str(demo_file), "--out", str(run),
           "--steps", "4", "--batch-size", "8", "--action-horizon", "12", "--save-every", "2", "--log-every", "1",
           "--warmup-steps", "2", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd + ["--stop-at", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    state = json.loads((run / "train_state" / "state.json").read_text())
    assert state["step"] == 3 and len(state["rank_generator_states"]) == 2
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["batch_size_per_process"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_reproduce_script_selects_the_best_checkpoint_over_training_seeds(demo_file, tmp_path):
    """training/reproduce_default.sh with the tiny model on CPU: two training seeds of one variant, every checkpoint
    of both evaluated on the selection seeds, the best over both copied to select-per-arm/best, then evaluated."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, STAGES="train select eval", DATA=str(demo_file), SEEDS="0 1",
               VARIANTS="per-arm", MODEL="tiny", ACTION_HORIZON="12", STEPS="4", BATCH="4", CHECKPOINTS="2",
               WARMUP="2", COMPILE="0", HISTORY="2", HISTORY_STRIDE="2", SELECT_EPISODES="1", EVAL_EPISODES="1",
               HORIZON="2", WORKERS="1", DEVICE="cpu", BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", str(root / "training" / "reproduce_default.sh"), str(tmp_path)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = []
    for seed in (0, 1):
        run = tmp_path / f"per-arm-tiny-seed{seed}"
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
        assert json.loads((run / "checkpoints" / "step_000004" / "config.json").read_text())["step"] == 4
        rows += json.loads((tmp_path / "select-per-arm" / f"seed{seed}" / "results.json").read_text())["rows"]
    assert len(rows) == 4  # every checkpoint of both seeds was a candidate
    best = max(rows, key=lambda r: (r["success_rate"], r["mean_milestones"], r["step"]))["policy"]  # hand-written
    assert f"best per-arm checkpoint by simulated success: {best}" in done.stdout
    chosen = tmp_path / "select-per-arm" / "best" / "model.safetensors"
    assert chosen.read_bytes() == (Path(best) / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "eval-per-arm" / "summary.json").read_text())["episodes"] == 1
