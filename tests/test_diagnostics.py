"""Imitation diagnostics: teacher-forced alignment and statistics, and the single-trajectory overfit probe."""

import numpy as np
import pytest

from coop_transport import diagnostics


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    from coop_transport.data.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("demos") / "tiny.hdf5"
    generate(GenerateConfig(out=out, episodes=2, workers=1, images=True, image_size=32, horizon=24,
                            successful_only=False, progress=False))
    return out


class OraclePolicy:
    """Predicts exactly what the demonstrator meant to do next (its noise-free actions, the diagnostic's reference;
    found by its proprio), optionally with an offset."""

    variant, horizon, prompts = "per-arm", 12, {"robot0": "a", "robot1": "b"}

    def __init__(self, demo_file, offset=0.0):
        from coop_transport.data.dataset import load_demonstrations

        with load_demonstrations(demo_file, action_labels="expert") as f:
            self.trajs = f.arm_trajectories(None, images="none")
        self.offset = offset

    def make_batch(self, images, states, prompts):
        return list(states)

    def sample_batch(self, batch, num_samples):
        out = []
        for state in batch:
            for t in self.trajs:
                hits = np.flatnonzero(np.all(t.proprio == state, axis=1))
                if len(hits):
                    i = hits[0]
                    chunk = t.actions[i:i + self.horizon]
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.horizon - len(chunk), 0)])
                    out.append(np.repeat(chunk[None] + self.offset, num_samples, 0))
                    break
            else:
                raise AssertionError("observation not from the file")
        return np.stack(out)


def test_teacher_forced_compares_each_chunk_with_the_actions_that_followed(demo_file):
    report = diagnostics.teacher_forced(OraclePolicy(demo_file), demo_file, split=None, stride=3, chunk=5)
    assert report.dims == list(diagnostics.ACTION_NAMES)
    assert max(report.mae) == 0.0 and sum(report.outliers) == 0
    assert all(r == pytest.approx(1.0) or np.isnan(r) for r in report.pearson_r)
    # 2 demos x 2 arms x 24 steps: 8 observations per trajectory, the last chunks cut at the trajectory end
    assert report.predictions == 4 * sum(min(5, 24 - i) for i in range(0, 24, 3))

    shifted = diagnostics.teacher_forced(OraclePolicy(demo_file, offset=0.6), demo_file, split=None, chunk=5)
    assert np.allclose(shifted.mae, 0.6) and all(n == shifted.predictions for n in shifted.outliers)
    assert "| gripper |" in shifted.markdown()
    # broken down by each arm's task phase at the predicted step (the files carry phase labels)
    rows = shifted.by_phase
    assert {r["arm"] for r in rows} == {"robot0", "robot1"} and sum(r["actions"] for r in rows) == shifted.predictions
    assert all(np.isclose(r["mae_translation"], 0.6) and np.isclose(r["mae_gripper"], 0.6) for r in rows)
    assert all(r["wrong_gripper"] == 0 for r in rows) and "by task phase" in shifted.markdown()


def test_errors_by_phase_groups_each_arms_dimensions_by_its_own_phase():
    from coop_transport.constants import PHASES

    # joint layout: 3 predicted actions of one observation; robot0 in phase 0 then 1, robot1 in phase 2 throughout
    err = np.zeros((3, 14))
    err[:, 0:3], err[2, 6] = 0.3, 1.5  # robot0: translation error everywhere, a wrong gripper command at its last step
    err[:, 10] = 0.9  # robot1: rotation error
    rows = diagnostics._errors_by_phase(err, [{"robot0": np.array([0, 0, 1]), "robot1": np.array([2, 2, 2])}], [3])
    by = {(r["arm"], r["phase"]): r for r in rows}
    assert set(by) == {("robot0", PHASES["robot0"][0]), ("robot0", PHASES["robot0"][1]),
                       ("robot1", PHASES["robot1"][2])}
    first, second = by["robot0", PHASES["robot0"][0]], by["robot0", PHASES["robot0"][1]]
    assert first["actions"] == 2 and first["wrong_gripper"] == 0 and np.isclose(first["mae_translation"], 0.3)
    assert second["actions"] == 1 and second["wrong_gripper"] == 1 and np.isclose(second["mae_gripper"], 1.5)
    receiver = by["robot1", PHASES["robot1"][2]]
    assert receiver["actions"] == 3 and np.isclose(receiver["mae_rotation"], 0.3) and receiver["mae_translation"] == 0
    assert diagnostics._errors_by_phase(err, [{}], [3]) == []  # no labels (a robomimic file): no breakdown


def test_teacher_forced_rejects_unknown_demos_and_a_chunk_beyond_the_horizon(demo_file):
    with pytest.raises(ValueError, match="no demonstrations"):
        diagnostics.teacher_forced(OraclePolicy(demo_file), demo_file, demos=["demo_9"])
    with pytest.raises(ValueError, match="exceeds the policy's action horizon"):
        diagnostics.teacher_forced(OraclePolicy(demo_file), demo_file, split=None, chunk=13)


class NoisyOraclePolicy(OraclePolicy):
    """The demonstrator's next actions plus Gaussian noise of std `sigma`, drawn per sample (or once, shared)."""

    def __init__(self, demo_file, sigma, shared=False):
        super().__init__(demo_file)
        self.sigma, self.shared, self.rng = sigma, shared, np.random.default_rng(0)

    def sample_batch(self, batch, num_samples):
        clean = super().sample_batch(batch, num_samples)
        shape = (clean.shape[0], 1 if self.shared else num_samples, *clean.shape[2:])
        return clean + self.sigma * self.rng.standard_normal(shape)


def test_sample_spread_measures_the_flow_noise_and_what_mean_of_n_leaves(demo_file):
    report = diagnostics.sample_spread(NoisyOraclePolicy(demo_file, 0.1), demo_file, split=None, stride=1, chunk=5,
                                       num_samples=20, group=4)
    assert report.observations == 4 * 24 and report.dims == list(diagnostics.ACTION_NAMES)
    assert np.allclose(report.sample_std, 0.1, rtol=0.05)
    assert np.allclose(report.mean_of_group_std, 0.05, rtol=0.15)  # 0.1 / sqrt(4)
    assert "σ of the mean of 4" in report.markdown()
    same = diagnostics.sample_spread(NoisyOraclePolicy(demo_file, 0.1, shared=True), demo_file, split=None,
                                     stride=4, chunk=5)
    assert max(same.sample_std) < 1e-12  # identical samples: no spread at all
    with pytest.raises(ValueError, match="two groups"):
        diagnostics.sample_spread(NoisyOraclePolicy(demo_file, 0.1), demo_file, split=None, num_samples=6, group=4)


@pytest.mark.slow
def test_overfit_probe_trains_on_one_demo_and_replays_its_initial_state(demo_file, tmp_path):
    result = diagnostics.overfit_probe(demo_file, "demo_1", tmp_path, model="tiny", steps=4, batch_size=4, runs=2,
                                       horizon=6, device="cpu", progress=False, variant="per-arm",
                                       action_horizon=12)
    assert result["train"]["trajectories"] == 2  # one demonstration, both arms
    assert result["reset_seed"] == 1001 and result["closed_loop_runs"] == 2
    assert 0 <= result["closed_loop_successes"] <= 2
    assert result["teacher_forced"]["demos"] == ["demo_1"] and result["reference_teacher_forced"] is None
    with pytest.raises(ValueError, match="no demonstration 'demo_7'"):
        diagnostics.overfit_probe(demo_file, "demo_7", tmp_path / "x", model="tiny", steps=1)

    # the paper's default (joint), scored beside a reference policy; a reference of the other variant is refused
    joint = diagnostics.overfit_probe(demo_file, "demo_0", tmp_path / "joint", model="tiny", steps=2, batch_size=2,
                                      runs=1, horizon=4, device="cpu", progress=False, action_horizon=25)
    assert joint["train"]["trajectories"] == 1  # one demonstration, one bimanual trajectory
    with pytest.raises(ValueError, match="is 'per-arm', the probe is 'joint'"):
        diagnostics.overfit_probe(demo_file, "demo_0", tmp_path / "j2", model="tiny", steps=1, batch_size=2, runs=0,
                                  device="cpu", progress=False, reference_policy=result["checkpoint"],
                                  action_horizon=25)
    again = diagnostics.overfit_probe(demo_file, "demo_0", tmp_path / "j3", model="tiny", steps=1, batch_size=2,
                                      runs=0, device="cpu", progress=False, reference_policy=joint["checkpoint"],
                                      action_horizon=25)
    assert again["reference_teacher_forced"]["dims"] == again["teacher_forced"]["dims"]
    assert len(again["teacher_forced"]["dims"]) == 14
    assert "max abs error (overfit / reference)" in diagnostics.compare_markdown(again["teacher_forced"],
                                                                                again["reference_teacher_forced"])


def _diagnostics_cli(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "training" / "diagnostics.py"
    spec = importlib.util.spec_from_file_location("diagnostics_cli", path)
    cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, cli)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(cli)
    return cli


def test_command_line_reaches_every_diagnostic(monkeypatch):
    import tyro

    cli = _diagnostics_cli(monkeypatch)
    spread = tyro.cli(cli.COMMAND, args=["spread", "--data", "d.hdf5", "--demos", "demo_3"])
    assert isinstance(spread, cli.Spread) and (spread.samples, spread.group, spread.stride) == (20, 4, 25)
    assert spread.selection() == {"split": None, "demos": ["demo_3"], "chunk": 10}
    forced = tyro.cli(cli.COMMAND, args=["teacher-forced", "--data", "d.hdf5"])
    assert isinstance(forced, cli.TeacherForced) and forced.selection()["split"] == "valid" and forced.stride == 5
    overfit = tyro.cli(cli.COMMAND, args=["overfit", "--data", "d.hdf5"])
    assert (overfit.variant, overfit.steps) == ("joint", 5000)
    reference = tyro.cli(cli.COMMAND, args=["state-bc", "--data", "d.hdf5"])
    assert (reference.episodes, reference.execute, reference.train.steps) == (50, 1, 16000)


def test_state_history_stacks_newest_first_and_repeats_the_first_state():
    from coop_transport.state_bc import PROPRIO_DIM, StateBCConfig, history_columns, stack_history

    states = np.arange(5, dtype=float)[:, None] * [1.0, 10.0]  # (5, 2)
    out = stack_history(states, history=3, stride=2)
    assert out.shape == (5, 6)
    assert out[4].tolist() == [4, 40, 2, 20, 0, 0] and out[1].tolist() == [1, 10, 0, 0, 0, 0]
    assert np.array_equal(stack_history(states, 1, 1), states)
    only_first = stack_history(states, history=2, stride=1, columns=np.array([0]))  # the whole state, then column 0
    assert only_first.shape == (5, 3) and only_first[3].tolist() == [3, 30, 2]
    assert history_columns(PROPRIO_DIM + 4, "objects").tolist() == list(range(PROPRIO_DIM, PROPRIO_DIM + 4))
    assert len(history_columns(PROPRIO_DIM + 4, "arms")) == PROPRIO_DIM
    with pytest.raises(ValueError, match="history_of"):
        StateBCConfig(history_of="partner")
    with pytest.raises(ValueError, match="history"):
        StateBCConfig(history=0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="handover_weight"):
            StateBCConfig(handover_weight=bad)
    with pytest.raises(ValueError, match="view"):
        StateBCConfig(view="telepathic")


def test_per_arm_view_hides_the_partner_arm():
    from coop_transport.state_bc import PROPRIO_DIM, view_models

    joint = view_models(PROPRIO_DIM + 5, "joint")
    assert list(joint) == ["joint"] and joint["joint"][0].tolist() == list(range(PROPRIO_DIM + 5))
    per_arm = view_models(PROPRIO_DIM + 5, "per-arm")
    objects = list(range(PROPRIO_DIM, PROPRIO_DIM + 5))
    assert per_arm["robot0"][0].tolist() == list(range(18)) + objects  # its own 18 proprio features, the objects
    assert per_arm["robot1"][0].tolist() == list(range(18, 36)) + objects
    assert (per_arm["robot0"][1], per_arm["robot1"][1]) == (slice(0, 7), slice(7, 14))  # its own action dims
    assert per_arm["robot0"][2] == 18


def test_state_bc_reference_trains_round_trips_and_runs_closed_loop(demo_file, tmp_path, monkeypatch):
    import json

    import tyro

    from coop_transport import state_bc
    from coop_transport.sim import SimConfig, TransportSim

    states, actions, layout, labels, handover = state_bc.load_states(demo_file, None, "auto")
    assert labels == "expert" and layout and len(states) == 2 and states[0].shape == (24, 36 + 41)
    policy = state_bc.train(demo_file, tmp_path / "policy", state_bc.StateBCConfig(steps=400, chunk=4), split=None,
                            progress=False)
    meta = json.loads((policy / state_bc.CONFIG_FILE).read_text())
    assert meta["samples"] == 48 and meta["final_loss"] < 0.05  # 48 states: the MLP fits them

    # The simulator's state at a demonstration's reset is the file's first state, feature for feature.
    from coop_transport.data.dataset import load_demonstrations
    from coop_transport.data.generate import object_state_keys

    with load_demonstrations(demo_file) as demos:
        seed = demos.joint_trajectories(None, images="none")[0].seed
    controller = state_bc.StateBCController(policy, execute=2)
    with TransportSim(SimConfig(horizon=6)) as sim:
        sim.reset(seed)
        np.testing.assert_allclose(state_bc.state_from_sim(sim, object_state_keys(sim)), states[0][0], atol=1e-5)
        controller.reset(sim, seed)
        first = controller.act(sim)
        np.testing.assert_allclose(first, np.clip(actions[0][0], -1, 1), atol=0.15)  # it learned the first action
        assert first.shape == (14,) and np.all(np.isfinite(first)) and len(controller._queue) == 1

    # With a state history the controller stacks what training stacked: the first state repeated at the start.
    # the phase labels, demonstration for demonstration
    assert [len(h) for h in handover] == [len(x) for x in states] and all(h.dtype == bool for h in handover)
    stacked = state_bc.train(demo_file, tmp_path / "history", state_bc.StateBCConfig(steps=400, chunk=4, history=3,
                                                                                    history_stride=2,
                                                                                    history_of="objects",
                                                                                    handover_weight=5.0),
                             split=None, progress=False)
    width = states[0].shape[1]
    assert json.loads((stacked / state_bc.CONFIG_FILE).read_text())["models"]["joint"]["state_dim"] == (
        width + 2 * (width - 36))
    controller = state_bc.StateBCController(stacked, execute=1)
    with TransportSim(SimConfig(horizon=6)) as sim:
        sim.reset(seed)
        controller.reset(sim, seed)
        first = controller.act(sim)
        np.testing.assert_allclose(first, np.clip(actions[0][0], -1, 1), atol=0.15)
        for _ in range(5):
            sim.step(controller.act(sim))
        assert len(controller._states) == 5  # the newest and the two strides of 2 before it

    # A damaged or foreign checkpoint is refused with a clear error.
    with pytest.raises(ValueError, match="not a state-bc checkpoint"):
        state_bc.StateBCController(tmp_path / "missing")
    with pytest.raises(ValueError, match="execute"):
        state_bc.StateBCController(policy, execute=5)
    bad = json.loads((policy / state_bc.CONFIG_FILE).read_text())
    bad["format"] = "something/else"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / state_bc.CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format"):
        state_bc.StateBCController(tmp_path / "foreign")
    old = json.loads((policy / state_bc.CONFIG_FILE).read_text())
    del old["models"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / state_bc.CONFIG_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match="before per-arm views"):
        state_bc.StateBCController(tmp_path / "old")

    # Per-arm view: one MLP per arm, each seeing its own proprioception and the objects, never the partner's.
    per_arm = state_bc.train(demo_file, tmp_path / "per-arm", state_bc.StateBCConfig(steps=400, chunk=4,
                                                                                    view="per-arm", history=2),
                             split=None, progress=False)
    models = json.loads((per_arm / state_bc.CONFIG_FILE).read_text())["models"]
    objects = width - 36
    assert {name: m["state_dim"] for name, m in models.items()} == {"robot0": 2 * (18 + objects),
                                                                    "robot1": 2 * (18 + objects)}
    controller = state_bc.StateBCController(per_arm, execute=1)
    with TransportSim(SimConfig(horizon=6)) as sim:
        sim.reset(seed)
        controller.reset(sim, seed)
        first = controller.act(sim)
        assert first.shape == (14,)
        np.testing.assert_allclose(first, np.clip(actions[0][0], -1, 1), atol=0.15)  # both halves learned

    # The command line: train, then evaluate through the registered controller, funnel included.
    cli = _diagnostics_cli(monkeypatch)
    command = tyro.cli(cli.COMMAND, args=["state-bc", "--data", str(demo_file), "--out", str(tmp_path / "run"),
                                          "--split", "None", "--episodes", "2", "--horizon", "5", "--workers", "1",
                                          "--train.steps", "20"])
    summary = cli.main(command)
    assert summary["episodes"] == 2 and "milestone_rates" in json.loads((tmp_path / "run" / "eval" / "summary.json")
                                                                   .read_text())
