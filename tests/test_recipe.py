"""The inference recipe's three switches: chunk length, mean-of-N, ±kσ clipping (and its counters)."""

import numpy as np
import pytest

from coop_transport.recipe import (ABLATION_LADDER, ChunkedActor, ClipCounters, RecipeConfig, demonstrated_range,
                                   reduce_chunk)
from coop_transport.utils.stats import wilson_interval


class RecordingSampler:
    """Returns chunk k filled with k (plus a per-sample offset), and records each call's N."""

    def __init__(self, horizon=16, dim=7):
        self.calls = []
        self.horizon, self.dim = horizon, dim

    def __call__(self, obs, n):
        self.calls.append(n)
        k = len(self.calls)
        offsets = np.arange(n, dtype=float)[:, None, None]  # sample i is k + i
        return np.full((n, self.horizon, self.dim), float(k)) + offsets


def test_chunk_length_replans_every_c_steps():
    sampler = RecordingSampler()
    actor = ChunkedActor(sampler, RecipeConfig(execute_steps=5, num_samples=1, clip_sigma=None))
    actions = [actor.act({}) for _ in range(12)]
    assert len(sampler.calls) == 3  # steps 0, 5, 10
    assert [a[0] for a in actions] == [1.0] * 5 + [2.0] * 5 + [3.0] * 2
    actor.reset()
    actor.act({})
    assert len(sampler.calls) == 4  # reset drops the rest of the chunk


def test_only_replanning_steps_need_an_observation():
    """Callers skip making (rendering) observations mid-chunk: act(None) then runs from the queue, and a step that
    re-plans without one is refused."""
    sampler = RecordingSampler()
    actor = ChunkedActor(sampler, RecipeConfig(execute_steps=3, num_samples=1, clip_sigma=None))
    assert actor.needs_plan
    with pytest.raises(ValueError, match="needs an observation"):
        actor.act(None)
    actions = [actor.act({} if actor.needs_plan else None) for _ in range(7)]
    assert len(sampler.calls) == 3 and [a[0] for a in actions] == [1.0] * 3 + [2.0] * 3 + [3.0]


def test_mean_of_n_averages_one_batched_call():
    sampler = RecordingSampler()
    actor = ChunkedActor(sampler, RecipeConfig(execute_steps=10, num_samples=4, clip_sigma=None))
    a = actor.act({})
    assert sampler.calls == [4]  # one call for all four samples
    assert a[0] == pytest.approx(1.0 + np.mean([0, 1, 2, 3]))


def test_clipping_to_k_sigma_and_counters():
    mean, std = np.zeros(3), np.array([1.0, 0.5, 2.0])
    samples = np.array([[[3.0, 0.2, -5.0], [0.1, -2.0, 1.0]]])  # (N=1, H=2, D=3)
    counters = ClipCounters()
    plain = RecipeConfig(execute_steps=2, num_samples=1, clip_sigma=2.0, clip_beyond_demonstrated=False)
    out = reduce_chunk(samples, plain, mean, std, counters)
    np.testing.assert_allclose(out, [[2.0, 0.2, -4.0], [0.1, -1.0, 1.0]])
    assert counters.actions == 2 and counters.clipped_actions == 2
    assert counters.clipped_values == 3 and counters.per_dim == [1, 1, 1]
    assert counters.action_rate == 1.0
    # Switched off: values pass through untouched, counters still count executed actions.
    off = ClipCounters()
    out = reduce_chunk(samples, RecipeConfig(execute_steps=2, num_samples=1, clip_sigma=None), mean, std, off)
    np.testing.assert_allclose(out, samples[0])
    assert off.actions == 2 and off.clipped_actions == 0


def test_clipping_never_cuts_inside_the_demonstrated_range():
    # A dimension with a few large demonstrated values has a small sigma: plain 2 sigma would cut them.
    mean, std = np.zeros(3), np.array([1.0, 0.1, 2.0])
    lo, hi = np.array([-1.0, -0.6, -3.0]), np.array([1.0, 0.3, 3.0])  # demonstrated min / max
    samples = np.array([[[1.5, 0.5, -3.5], [-2.5, -0.4, 3.9]]])
    counters = ClipCounters()
    out = reduce_chunk(samples, RecipeConfig(execute_steps=2, num_samples=1, clip_sigma=2.0), mean, std, counters,
                       lo, hi)
    # dim 0: ±2 sigma (2.0) is wider than the range, so it is the bound; dim 1: widened to [-0.6, 0.3] (not ±0.2);
    # dim 2: widened to 2 sigma = 4 above, the demonstrated -3 below.
    np.testing.assert_allclose(out, [[1.5, 0.3, -3.5], [-2.0, -0.4, 3.9]])
    assert counters.per_dim == [1, 1, 0] and counters.clipped_actions == 2
    # Without the demonstrated range (statistics that lack it, with a warning at load) it is the plain ±2 sigma.
    out = reduce_chunk(samples, RecipeConfig(execute_steps=2, num_samples=1), mean, std)
    np.testing.assert_allclose(out, [[1.5, 0.2, -3.5], [-2.0, -0.2, 3.9]])
    stats = {"actions": {"mean": [0.0], "std": [1.0], "min": [-0.5], "max": [2.0]}}
    np.testing.assert_allclose(demonstrated_range(stats)[1], [2.0])
    with pytest.warns(UserWarning, match="min / max"):
        assert demonstrated_range({"actions": {"mean": [0.0], "std": [1.0]}}) == (None, None)


class GripperSampler:
    """Each call returns the next scripted chunk (its gripper columns; other dimensions zero)."""

    def __init__(self, chunks, dim=7):
        self.chunks, self.dim = list(chunks), dim

    def __call__(self, obs, n):
        values = np.asarray(self.chunks.pop(0), dtype=float)  # (H, grippers)
        chunk = np.zeros((len(values), self.dim))
        chunk[:, 6::7] = values
        return np.repeat(chunk[None], n, 0)


def test_gripper_latch_executes_crisp_commands_with_hysteresis():
    config = RecipeConfig(execute_steps=4, num_samples=1, clip_sigma=None, gripper_latch=0.5)
    actor = ChunkedActor(GripperSampler([[[0.9], [0.2], [-0.3], [-0.6]], [[0.1], [0.7], [-0.4], [0.0]]]), config)
    assert [actor.act({})[6] for _ in range(8)] == [1, 1, 1, -1, -1, 1, 1, 1]  # the state carries across chunks
    actor.reset()  # a new episode starts from the sign of its first command
    actor.sampler.chunks = [[[-0.2], [0.4], [0.6], [0.1]]]
    assert [actor.act({})[6] for _ in range(4)] == [-1, -1, 1, 1]
    # A joint chunk latches each arm's gripper (dims 6 and 13) on its own; other dimensions are untouched.
    joint = ChunkedActor(GripperSampler([[[0.8, -0.8], [-0.2, 0.3], [-0.9, 0.6]]], dim=14),
                         config.with_(execute_steps=3))
    out = np.stack([joint.act({}) for _ in range(3)])
    assert out[:, 6].tolist() == [1, 1, -1] and out[:, 13].tolist() == [-1, -1, 1] and not out[:, :6].any()
    # Off (the default): the predicted value passes through.
    plain = ChunkedActor(GripperSampler([[[0.2], [0.3]]]), RecipeConfig(execute_steps=2, num_samples=1,
                                                                        clip_sigma=None))
    assert [plain.act({})[6] for _ in range(2)] == pytest.approx([0.2, 0.3])


class PositionSampler:
    """Chunk k (from 0) predicts 10·k + j for its j-th step, in every dimension: which chunk said what is readable."""

    def __init__(self, horizon=3, dim=7):
        self.horizon, self.dim, self.calls = horizon, dim, 0

    def __call__(self, obs, n):
        chunk = 10.0 * self.calls + np.arange(self.horizon, dtype=float)
        self.calls += 1
        return np.broadcast_to(chunk[None, :, None], (n, self.horizon, self.dim)).copy()


def test_temporal_ensemble_averages_every_kept_chunks_prediction():
    # C = 1, H = 3: step t is predicted by the chunks planned at t-2, t-1 and t (fewer at the start), chunk s
    # predicting 10·s + (t - s) for it. m = 0 weighs them alike.
    actor = ChunkedActor(PositionSampler(), RecipeConfig(execute_steps=1, num_samples=1, clip_sigma=None,
                                                         temporal_ensemble=0.0))
    got = [actor.act({})[0] for _ in range(5)]
    assert got == pytest.approx([0.0, (1 + 10) / 2, (2 + 11 + 20) / 3, (12 + 21 + 30) / 3, (22 + 31 + 40) / 3])
    assert actor.chunks_planned == 5
    # m = ln 2: oldest weight 1, then 1/2, 1/4 (ACT's rule: older predictions count more).
    actor = ChunkedActor(PositionSampler(), RecipeConfig(execute_steps=1, num_samples=1, clip_sigma=None,
                                                         temporal_ensemble=float(np.log(2.0))))
    got = [actor.act({})[0] for _ in range(3)]
    assert got == pytest.approx([0.0, (1 + 10 / 2) / 1.5, (2 + 11 / 2 + 20 / 4) / 1.75])
    # C = 2: chunks at steps 0, 2, 4; steps in between use the kept ones only.
    sampler = PositionSampler(horizon=4)
    actor = ChunkedActor(sampler, RecipeConfig(execute_steps=2, num_samples=1, clip_sigma=None,
                                               temporal_ensemble=0.0))
    needs = []
    got = []
    for _ in range(5):
        needs.append(actor.needs_plan)
        got.append(actor.act({})[0])
    assert needs == [True, False, True, False, True] and sampler.calls == 3
    assert got == pytest.approx([0.0, 1.0, (2 + 10) / 2, (3 + 11) / 2, (12 + 20) / 2])  # chunk 0 expires at 4
    actor.reset()  # a new episode keeps nothing of the last
    assert actor.needs_plan and actor.act({})[0] == pytest.approx(30.0)


def test_temporal_ensemble_clips_the_ensembled_action_and_refuses_chunk_planning():
    mean, std = np.zeros(7), np.ones(7)
    config = RecipeConfig(execute_steps=1, num_samples=1, clip_sigma=2.0, clip_beyond_demonstrated=False,
                          temporal_ensemble=0.0)
    actor = ChunkedActor(PositionSampler(), config, mean, std)
    got = [actor.act({})[0] for _ in range(3)]
    assert got == pytest.approx([0.0, 2.0, 2.0])  # 5.5 and 11 clipped to mean + 2σ
    assert actor.counters.actions == 3 and actor.counters.clipped_actions == 2
    with pytest.raises(ValueError, match="step by step"):
        actor.plan({})
    with pytest.raises(ValueError, match="NaN"):
        ChunkedActor(lambda obs, n: np.full((n, 3, 7), np.nan), config, mean, std).act({})
    with pytest.raises(ValueError, match="horizon"):
        ChunkedActor(PositionSampler(horizon=3), config.with_(execute_steps=4), mean, std).act({})
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temporal_ensemble"):
            RecipeConfig(temporal_ensemble=bad)
    from coop_transport.deploy import ArmPolicy  # the node executes planned chunks: refused with a reason
    with pytest.raises(ValueError, match="evaluation-side"):
        ArmPolicy(object(), "robot0", config)


def test_recipe_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        reduce_chunk(np.full((1, 4, 7), np.nan), RecipeConfig(execute_steps=2), np.zeros(7), np.ones(7))
    with pytest.raises(ValueError, match="horizon"):
        reduce_chunk(np.zeros((1, 4, 7)), RecipeConfig(execute_steps=8), np.zeros(7), np.ones(7))
    with pytest.raises(ValueError, match="mean and std"):
        reduce_chunk(np.zeros((1, 4, 7)), RecipeConfig(execute_steps=2), None, None)
    for bad in (dict(execute_steps=0), dict(num_samples=0), dict(clip_sigma=-1.0), dict(gripper_latch=1.0)):
        with pytest.raises(ValueError):
            RecipeConfig(**bad)


def test_defaults_are_the_papers_final_recipe():
    assert RecipeConfig() == RecipeConfig.per_arm() == RecipeConfig(10, 4, 2.0)
    assert RecipeConfig.joint().execute_steps == 25
    ladder = list(ABLATION_LADDER.values())
    assert ladder[0] == RecipeConfig.baseline() and ladder[-1].execute_steps == 25


def test_wilson_interval_matches_the_papers_table():
    lo, hi = wilson_interval(30, 100)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (21.9, 39.6)  # B1 in the seed paper's Table 1
    lo, hi = wilson_interval(32, 100)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (23.7, 41.7)  # B2
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
