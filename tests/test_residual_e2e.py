"""Residual RL end to end in the real simulation: every architecture for a few chunks, the command line, resuming
after a kill, deployment (evaluation registry, ROS ArmPolicy), probes, and local/process/Ray parity.

Tiny stand-ins made here: random tiny π0 checkpoints (per-arm and joint, 32 px cameras, horizon 4) and a two-episode
scripted demonstration file with 32 px images. Episodes last 6 steps and chunks 2, so a run is a handful of chunks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_transport.residual.config import ResidualConfig
from coop_transport.residual.rollout import InProcessPool
from coop_transport.residual.train import sim_config_for, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import residual as residual_cli  # noqa: E402

HORIZON, CHUNK, SIZE = 6, 2, 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from coop_transport.adapters import ARM_PROMPTS, JOINT_PROMPT
    from coop_transport.data.generate import GenerateConfig, generate
    from coop_transport.policy import build_model, get_config, save_checkpoint

    root = tmp_path_factory.mktemp("residual_assets")
    torch.manual_seed(0)
    for variant, setting, state, action, prompts in (("per-arm", "per_arm", 18, 7, dict(ARM_PROMPTS)),
                                                     ("joint", "joint", 36, 14, {"joint": JOINT_PROMPT})):
        config = get_config("tiny", setting=setting, action_horizon=4)
        norm = {"state": {"mean": [0.0] * state, "std": [1.0] * state},
                "actions": {"mean": [0.0] * action, "std": [0.5] * action}}
        save_checkpoint(root / variant, build_model(config), config, norm, 0, {"variant": variant, "prompts": prompts})
    generate(GenerateConfig(out=root / "demos.hdf5", episodes=2, workers=1, images=True, image_size=SIZE,
                            horizon=12, successful_only=False, progress=False))
    return root


def make_config(assets: Path, arch: str, out: Path, **kw) -> ResidualConfig:
    base = dict(arch=arch, chunks=4, out=out, vla=assets / "per-arm", vla_joint=assets / "joint",
                data=assets / "demos.hdf5", envs=0, device="cpu", chunk=CHUNK, baseline_chunk=CHUNK, num_samples=2,
                horizon=HORIZON, latent_dim=32, encoder_width=16, encoder_heads=2, encoder_layers=1, hidden_dim=32,
                message_dim=16, batch_size=8, learning_starts=1, encoder_steps=3, encoder_batch=4, encoder_pool=16,
                eval_every=0, eval_episodes=1, save_every=2, log_every=2, progress=False)
    base.update(kw)
    return ResidualConfig(**base)


@pytest.fixture(scope="module")
def pool(assets):
    config = make_config(assets, "V4", Path("unused"))
    with InProcessPool(1, sim_config_for(config, SIZE), config.gamma) as p:
        yield p


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("residual_runs")


# --------------------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", ["B1", "B2", "V3", "V4", "V5", "V6"])
def test_every_architecture_runs_end_to_end(assets, pool, runs, arch):
    from coop_transport.residual.checkpoint import load_policy
    from coop_transport.sim.labels import MILESTONES

    config = make_config(assets, arch, runs / arch)
    if arch == "B1":  # through the command line (its own in-process simulation)
        argv = ["--arch", "B1", "--out", str(runs / arch), "--vla", str(assets / "per-arm"), "--envs", "0",
                "--device", "cpu", "--baseline-chunk", str(CHUNK), "--num-samples", "2", "--horizon", str(HORIZON),
                "--eval-episodes", "1", "--no-progress"]
        import tyro

        result = residual_cli.main(tyro.cli(ResidualConfig, args=argv))[0]
    else:
        result = train(config, 0, pool)
    run = config.run_dir(0)
    saved = json.loads((run / "result.json").read_text())
    assert saved["arch"] == arch and 0.0 <= saved["success_rate"] <= 1.0 and saved["episodes"] == 1
    assert list(saved["milestone_rates"]) == list(MILESTONES)  # the stage funnel of the reported evaluation
    assert (run / "eval").is_dir()
    if arch in ("B1", "B2"):
        assert saved["trains"] is False and saved["best_checkpoint"] is None
        return
    assert result["chunks"] == 4 and result["updates"] > 0 and result["training_episodes"] >= 1
    assert result["demo"]["transitions"] > 0
    assert (run / "train_state" / "state.safetensors").is_file() and (run / "log.csv").is_file()
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))  # safetensors + JSON only
    system = load_policy(run, "cpu")  # the best checkpoint, rebuilt from disk
    assert system.spec.name == arch and system.chunk == CHUNK


@pytest.mark.parametrize("arch", ["V4", "V5", "V6", "V3"])
def test_ros_arm_policy_of_a_trained_run(assets, pool, runs, arch):
    from coop_transport.deploy import load_arm_policy
    from coop_transport.recipe import RecipeConfig

    run = runs / arch / "seed_0"
    if not (run / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    recipe = RecipeConfig(execute_steps=10, num_samples=2, clip_sigma=2.0)  # C comes from the checkpoint
    if arch == "V3":
        with pytest.raises(ValueError, match="centralized"):
            load_arm_policy(str(run), "robot0", recipe, device="cpu")
        return
    policy = load_arm_policy(str(run), "robot1", recipe, device="cpu")
    assert policy.architecture == arch and policy.accepts_message == (arch != "V4")
    assert policy.image_size == SIZE and policy.uses_agentview
    sim = pool.workers[0].sim
    sim.reset(5)
    obs = sim.arm_observation("robot1")
    actions = policy.plan(obs)
    assert actions.shape == (CHUNK, 7) and np.all(np.abs(actions) <= 1.0)
    message = policy.message(obs)
    if arch == "V4":
        assert message is None
    elif arch == "V5":
        assert message.shape == (16,)
    else:
        assert message.shape == (CHUNK, 7)
    if arch != "V4":  # a partner message of the right size is used; a missing one is the zero message
        with_msg = policy.plan({**obs, "partner_message": np.zeros_like(message)})
        assert with_msg.shape == (CHUNK, 7)
        with pytest.raises(ValueError, match="expects"):
            policy.plan({**obs, "partner_message": np.zeros(3)})
    assert "chunks" in policy.stats()


def test_evaluation_registry_runs_a_residual_checkpoint(runs):
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate

    run = runs / "V5" / "seed_0"
    if not (run / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    summary = evaluate(ControllerSpec("residual", {"checkpoint": str(run), "device": "cpu"}),
                       EvalConfig(episodes=1, workers=1, horizon=HORIZON), progress=False)
    assert summary["episodes"] == 1 and summary["per_seed"][0]["length"] <= HORIZON

    # the same through training/evaluate.py, which refuses the residual controller without a run to load
    import evaluate as evaluate_cli

    out = runs / "evaluate_cli"
    cli = evaluate_cli.main(evaluate_cli.Config(controller="residual", policy=run, episodes=1, workers=1,
                                                horizon=HORIZON, out=out, progress=False))
    same = lambda r: (r["seed"], r["success"], r["length"], r["milestones"])  # noqa: E731 - not the wall time
    assert [same(r) for r in cli["per_seed"]] == [same(r) for r in summary["per_seed"]]
    assert (out / "summary.json").is_file()
    with pytest.raises(ValueError, match="needs --policy"):
        evaluate_cli.main(evaluate_cli.Config(controller="residual", out=out, progress=False))


def test_a_prior_with_a_state_history_trains_and_evaluates(assets, pool, tmp_path):
    """The shipped default sees earlier arm states: the rollout workers send each arm's latest states, and the
    evaluation registry's residual controller passes them too (it refused such a prior before)."""
    import dataclasses

    from coop_transport.adapters import ARM_PROMPTS
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate
    from coop_transport.policy import build_model, get_config, save_checkpoint

    torch.manual_seed(0)
    config = get_config("tiny", setting="per_arm", action_horizon=4)
    config = dataclasses.replace(config, state_dim=3 * 18, state_pad_dim=max(config.state_pad_dim, 3 * 18))
    norm = {"state": {"mean": [0.0] * 54, "std": [1.0] * 54}, "actions": {"mean": [0.0] * 7, "std": [0.5] * 7}}
    save_checkpoint(tmp_path / "prior", build_model(config), config, norm, 0,
                    {"variant": "per-arm", "prompts": dict(ARM_PROMPTS),
                     "state_history": {"frames": 3, "stride": 2, "encoding": "delta"}})
    result = train(make_config(assets, "V4", tmp_path / "V4", vla=tmp_path / "prior"), 0, pool)
    assert result["chunks"] >= 4
    summary = evaluate(ControllerSpec("residual", {"checkpoint": str(tmp_path / "V4" / "seed_0"), "device": "cpu"}),
                       EvalConfig(episodes=1, workers=1, horizon=HORIZON), progress=False)
    assert summary["episodes"] == 1 and summary["per_seed"][0]["length"] <= HORIZON


@pytest.mark.parametrize("arch", ["V3", "V5"])
def test_a_run_with_a_gripper_radius_trains_logs_and_reloads_it(assets, pool, tmp_path, arch):
    """--gripper-radius: the bound travels with the run's config into its checkpoint (the ROS node and the export
    load it from there), and the log follows the gripper rows' radius and residual."""
    import csv

    from coop_transport.residual.checkpoint import load_policy

    result = train(make_config(assets, arch, tmp_path / arch, gripper_radius=2.0), 0, pool)
    assert result["chunks"] >= 4 and result["updates"] > 0
    run = tmp_path / arch / "seed_0"
    rows = list(csv.DictReader((run / "log.csv").open()))
    agent = "joint" if arch == "V3" else "robot0"
    assert 0.0 < float(rows[-1][f"{agent}/charts/gripper_radius"]) <= 2.0
    assert float(rows[-1][f"{agent}/charts/gripper_residual"]) >= 0.0
    system = load_policy(run, "cpu")
    assert system.config.gripper_radius == 2.0
    bound = next(iter(system.agents.values())).actor.bound
    grippers = [6] if arch == "V5" else [6, 13]
    assert bound[grippers].tolist() == [2.0] * len(grippers)
    assert all(b == pytest.approx(0.10) for d, b in enumerate(bound.tolist()) if d not in grippers)


def test_evaluation_episodes_draw_noise_of_their_own(runs):
    """One environment or two, each evaluation episode sees the same π0 references (its noise stream is seeded by
    its reset seed), and the evaluation registry's residual controller draws the same."""
    from coop_transport.residual.checkpoint import load_policy
    from coop_transport.residual.policy import ResidualController
    from coop_transport.residual.rollout import run_episodes
    from coop_transport.residual.train import EVAL_NOISE_SEED
    from coop_transport.sim import TransportSim

    run = runs / "V5" / "seed_0"
    if not (run / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    system = load_policy(run, "cpu")
    sim_config = sim_config_for(system.config, SIZE, training=False)

    def references(envs: int) -> dict:
        seen = {}

        def recorder(b, context):
            for i, (seed, k) in enumerate(zip(context["seeds"], context["boundary_index"])):
                seen[(seed, k)] = b.ref[i].clone()

        with InProcessPool(envs, sim_config, system.config.gamma) as p:
            run_episodes(system, p, [1, 2, 3], EVAL_NOISE_SEED, recorder=recorder)
        return seen

    one, two = references(1), references(2)
    assert one.keys() == two.keys() and len(one) == 3 * HORIZON // CHUNK
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=0)

    controller, recorded = ResidualController(system), []
    boundary = system.boundary
    system.boundary = lambda *args, **kw: recorded.append(boundary(*args, **kw)) or recorded[-1]
    with TransportSim(sim_config) as sim:
        sim.reset(2)
        controller.reset(sim, 2)
        for _ in range(2 * CHUNK):
            sim.step(controller.act(sim))
    for k, b in enumerate(recorded):
        torch.testing.assert_close(b.ref[0], one[(2, k)], atol=1e-5, rtol=0)
    assert len(recorded) == 2 and not torch.allclose(one[(1, 0)], one[(2, 0)])


def test_probes_on_a_trained_v5(assets, pool, runs):
    from coop_transport.residual.probes import PROBES, run_probes

    config = make_config(assets, "V5", runs / "V5", eval_episodes=2, mode="probes")
    if not (config.run_dir(0) / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    payload = run_probes(config, 0, pool)
    assert set(payload["interventions"]) == set(PROBES)
    none = payload["interventions"]["none"]
    for name, r in payload["interventions"].items():
        assert 0.0 <= r["success_rate"] <= 1.0 and r["episodes"] == 2
        if name != "none":  # paired with the unchanged message on the same reset seeds
            paired = r["against_none"]
            assert paired["episodes"] == 2 and paired["won"] - paired["lost"] == r["successes"] - none["successes"]
    probe = payload["linear_probe"]
    for key in ("phase", "gripper", "ready"):
        assert 0.0 <= probe[key]["accuracy"] <= 1.0 and 0.0 < probe[key]["chance"] <= 1.0
    assert (probe["phase"]["uniform_chance"], probe["gripper"]["uniform_chance"]) == (0.2, 0.5)
    assert "r2" in probe["pose"] and set(probe["per_agent"]) == {"robot0", "robot1"}
    assert json.loads((config.run_dir(0) / "probes.json").read_text())["arch"] == "V5"

    # resumable: probes whose result is gone run again (with out of time first), the others are read back, and the
    # random probes draw from their own streams, so the results equal the uninterrupted run's
    probes_dir = config.run_dir(0) / "probes"
    for name in ("gaussian", "shuffle_time"):
        shutil.rmtree(probes_dir / name)
    stopped = run_probes(config.replace(stop_after_s=1e-9), 0, pool)
    assert stopped["out_of_time"] and "gaussian" not in stopped["done"]
    assert not (probes_dir / "gaussian" / "summary.json").exists()
    again = run_probes(config, 0, pool)
    assert again["interventions"] == payload["interventions"]
    assert again["linear_probe"] == payload["linear_probe"]

    # a probe cut off after its first episode continues with the second: the same outcomes as in one go
    gaussian = probes_dir / "gaussian"
    first = (gaussian / "episodes.jsonl").read_text().splitlines()[0]
    (gaussian / "summary.json").unlink()
    (gaussian / "episodes.jsonl").write_text(first + "\n")
    continued = run_probes(config, 0, pool)
    assert json.loads((gaussian / "summary.json").read_text())["resumed_episodes"] == 1
    assert continued["interventions"] == payload["interventions"]


def test_gated_evaluation_of_a_trained_run(assets, pool, runs):
    """--mode eval --gate-margin: a margin no critic gain reaches executes π0's reference chunks (the B1 chunks of
    the same noise), one every gain exceeds the ungated residual; the gated result is a method of its own in the
    report, paired with the ungated one by seed."""
    from coop_transport.residual.checkpoint import load_policy
    from coop_transport.residual.report import write_report
    from coop_transport.residual.rollout import episode_generator
    from coop_transport.residual.train import gated_run_dir, reevaluate

    run = runs / "V4" / "seed_0"
    if not (run / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    system = load_policy(run, "cpu")
    for agent in system.agents.values():  # a residual far from zero, so that the gate's choice shows
        torch.nn.init.normal_(agent.actor.out.weight, std=1.0)
    sim = pool.workers[0].sim
    sim.reset(3)
    obs = sim.observation

    def chunk(s):
        return s.boundary([obs], episode_generator(7, 3), explore=False, deterministic=True)

    ungated, closed, open_ = chunk(system), chunk(system.with_gate(1e9)), chunk(system.with_gate(-1e9))
    assert torch.equal(closed.action, closed.ref.clamp(-1, 1)) and torch.equal(open_.action, ungated.action)
    assert not torch.allclose(ungated.action, ungated.ref)

    config = make_config(assets, "V4", runs / "V4", mode="eval", gate_margin=-1e9)
    summary = reevaluate(config, 0, pool)
    assert summary["gate"]["residual_rate"] == 1.0 and summary["gate"]["agent_chunks"] == 2 * HORIZON // CHUNK
    md = (run / "eval" / "best_gate_-1e+09" / "summary.md").read_text()
    assert f"| critic gate | margin -1e+09: 100.0% of {2 * HORIZON // CHUNK} agent chunks kept their residual |" in md
    plain = reevaluate(config.replace(gate_margin=None), 0, pool)
    same = lambda r: (r["seed"], r["success"], r["length"], r["milestones"])  # noqa: E731
    assert [same(r) for r in summary["per_seed"]] == [same(r) for r in plain["per_seed"]]
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate

    registry = evaluate(ControllerSpec("residual", {"checkpoint": str(run), "device": "cpu", "gate_margin": -1e9}),
                        EvalConfig(episodes=1, workers=1, horizon=HORIZON), progress=False)  # evaluate.py's path
    assert registry["gate"] == {"agent_chunks": 2 * HORIZON // CHUNK, "residual_rate": 1.0, "margin": -1e9}
    assert "gate" not in evaluate(ControllerSpec("residual", {"checkpoint": str(run), "device": "cpu"}),
                                  EvalConfig(episodes=1, workers=1, horizon=HORIZON), progress=False)
    again = reevaluate(config, 0, pool)  # a finished evaluation runs anew, with the same outcomes
    assert again["resumed_episodes"] == 0 and [same(r) for r in again["per_seed"]] == [same(r) for r in
                                                                                      summary["per_seed"]]
    gated = json.loads((gated_run_dir(run, -1e9) / "result.json").read_text())
    assert gated["gated"] and gated["config"]["gate_margin"] == -1e9 and gated["evaluated_checkpoint"]
    report = write_report([runs / "V4"], runs / "report_gate")
    assert set(report["table1"]) == {"V4", "V4 gate -1e+09"} and "V4 gate -1e+09-V4" not in report["paired"]
    md = (runs / "report_gate" / "report.md").read_text()
    assert "| V4 gate -1e+09 " in md and "V4 gate -1e+09 ≥ B1" not in md  # no B1 here: no target row
    with pytest.raises(ValueError, match="no residual"):
        reevaluate(make_config(assets, "B1", runs / "B1", mode="eval", gate_margin=0.0), 0, pool)


def test_best_of_k_evaluation_of_a_trained_run(assets, pool, runs):
    """--mode eval --candidates K: draw 0 of each agent is the one-draw reference of the same noise; each agent
    executes its actor's chunk over the draw its own critics rate highest; the result is the method "V4 best-of-K"
    in the report, and training/evaluate.py's registry path reports the same choice counts."""
    from coop_transport.adapters import arm_images, policy_state
    from coop_transport.evaluation import ControllerSpec, EvalConfig, evaluate
    from coop_transport.residual.checkpoint import load_policy
    from coop_transport.residual.report import write_report
    from coop_transport.residual.rollout import episode_generator
    from coop_transport.residual.train import gated_run_dir, reevaluate

    run = runs / "V4" / "seed_0"
    if not (run / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    system = load_policy(run, "cpu")
    sim = pool.workers[0].sim
    sim.reset(3)
    obs = sim.observation
    one = system.boundary([obs], episode_generator(7, 3), explore=False, deterministic=True)
    three = system.with_candidates(3).boundary([obs], episode_generator(7, 3), explore=False, deterministic=True)
    assert three.candidates.shape == (1, 2, 3, CHUNK, 7)
    # the same noise, and each draw's N samples in a pass of their own (Pi0Policy.sample_batch(groups=K)): draw 0
    # is computed exactly as the single draw
    assert torch.equal(three.candidates[:, :, 0], one.ref)
    assert not torch.allclose(three.candidates[:, :, 1], three.candidates[:, :, 0])  # draws of their own noise
    for i, arm in enumerate(system.agent_names):
        agent = system.agents[arm]
        with torch.no_grad():
            values = [torch.minimum(*agent.q(three.latent[:, i], three.proprio[:, i],
                                             agent.actor(three.latent[:, i], three.proprio[:, i],
                                                         three.candidates[:, i, j]))) for j in range(3)]
        best = int(torch.stack(values).argmax())
        assert torch.equal(three.ref[:, i], three.candidates[:, i, best])
    arm_obs = sim.arm_observation("robot0")  # the ROS node's path: one agent alone
    agent, proprio = system.agents["robot0"], system.normalize_proprio([arm_obs["proprio"]])
    for seed in range(20):  # the first noise for which the critics prefer another draw than the first
        plan, _ = system.with_candidates(3).agent_plan("robot0", arm_obs, torch.Generator().manual_seed(seed), None)
        refs, prefix, mask = system.vla_draws([arm_images(arm_obs)], [policy_state(arm_obs, system.vla.state_history)],
                                              [system.vla.prompts["robot0"]], torch.Generator().manual_seed(seed), 3)
        with torch.no_grad():
            z = agent.encoder(prefix, mask, proprio)
            proposals = [agent.actor(z, proprio, refs[:, j]) for j in range(3)]
            best = int(torch.stack([torch.minimum(*agent.q(z, proprio, a)) for a in proposals]).argmax())
        if best:
            break
    assert best, "in 20 noise seeds the critics always preferred the first draw"
    np.testing.assert_allclose(plan, proposals[best][0].numpy(), atol=1e-4)
    training_like = system.with_candidates(3).boundary([obs], torch.Generator().manual_seed(0), explore=True,
                                                       deterministic=False)
    assert training_like.candidates is None  # exploration acts on one draw

    config = make_config(assets, "V4", runs / "V4", mode="eval", candidates=2)
    summary = reevaluate(config, 0, pool)
    chunks = 2 * HORIZON // CHUNK
    assert summary["candidates"]["agent_chunks"] == chunks and summary["candidates"]["candidates"] == 2
    assert "gate" not in summary
    rate = summary["candidates"]["switch_rate"]
    md = (run / "eval" / "best_best_of_2" / "summary.md").read_text()
    assert (f"| critics' choice | 2 π0 draws: {100 * rate:.1f}% of {chunks} agent chunks took another than the "
            "first (any ranking of exchangeable draws: 50.0%) |") in md
    split = summary["time_split"]  # where the evaluation's wall time went
    assert split["boundaries"] >= chunks // 2 and split["policy_s"] > 0 and split["simulation_s"] > 0
    assert split["policy_s"] + split["simulation_s"] <= summary["wall_s"]
    assert (f"| time split | policy {split['policy_s']:.0f} s ({1000 * split['policy_s'] / split['boundaries']:.1f} "
            f"ms per batched chunk boundary, {split['boundaries']} boundaries), simulation "
            f"{split['simulation_s']:.0f} s |") in md
    spread, gap = summary["candidates"]["mean_value_spread"], summary["candidates"]["mean_critic_gap"]
    assert spread > 0 and gap > 0 and f"| critics' values over the draws | spread {spread:.4g} " in md
    agree, varying = summary["candidates"]["mean_critics_agree"], summary["candidates"]["mean_critic_gap_spread"]
    assert 0.0 <= agree <= 1.0 and 0.0 <= varying <= 2 * gap  # max - min of Q1 - Q2 is at most twice its mean |.|
    assert (f"| twin critics on the draws | their difference changes by {varying:.4g} from draw to draw (max − min "
            f"of Q1 − Q2); Q1 and Q2 alone pick the same draw in {100 * agree:.1f}% of agent chunks (at random: "
            "50.0%) |") in md
    registry = evaluate(ControllerSpec("residual", {"checkpoint": str(run), "device": "cpu", "candidates": 2}),
                        EvalConfig(episodes=1, workers=1, horizon=HORIZON), progress=False)  # evaluate.py's path
    assert registry["candidates"] == summary["candidates"]
    result = json.loads((gated_run_dir(run, None, 2) / "result.json").read_text())
    assert result["candidates"]["candidates"] == 2 and not result["gated"] and result["config"]["candidates"] == 2
    assert result["outcome_by_reset_seed"] == {str(r["seed"]): r["success"] for r in summary["per_seed"]}
    plain = json.loads((run / "result.json").read_text())
    assert set(plain["outcome_by_reset_seed"]) == set(result["outcome_by_reset_seed"])  # the same reset seeds
    report = write_report([runs / "V4"], runs / "report_best")
    assert "V4 best-of-2" in report["table1"] and "V4 best-of-2" in (runs / "report_best" / "report.md").read_text()
    pairs = report["selection_vs_plain"]["V4 best-of-2"]  # episode by episode against the plain evaluation
    differ = sum(plain["outcome_by_reset_seed"][k] != v for k, v in result["outcome_by_reset_seed"].items())
    assert pairs["per_seed"][0]["episodes"] == summary["episodes"] and pairs["won"] + pairs["lost"] == differ
    with pytest.raises(ValueError, match="no critics"):
        reevaluate(make_config(assets, "B1", runs / "B1", mode="eval", candidates=2), 0, pool)


def test_recipe_ablation_of_a_trained_v4(assets, pool, runs):
    from coop_transport.residual.report import run_ablation

    config = make_config(assets, "V4", runs / "V4", mode="ablation", eval_episodes=2)
    if not (config.run_dir(0) / "best.json").is_file():
        pytest.skip("needs test_every_architecture_runs_end_to_end")
    payload = run_ablation(config, 0, pool)
    rates = [r["success_rate"] for r in payload["rows"]]
    assert len(rates) == 4 and rates[3] is None  # chunk 25 does not apply to 2-step residual chunks
    assert all(0.0 <= r <= 1.0 for r in rates[:3])
    assert payload["rows"][0]["recipe"]["num_samples"] == 1 and payload["rows"][2]["recipe"]["clip_sigma"] == 2.0

    # resumable row by row: finished rows are read back, a cut-off row continues, the deadline stops the call
    rows = config.run_dir(0) / "ablation"
    kept = (rows / "row_0" / "summary.json").stat().st_mtime_ns
    (rows / "row_1" / "summary.json").unlink()  # row 1 cut off after its first episode
    log = rows / "row_1" / "episodes.jsonl"
    log.write_text(log.read_text().splitlines()[0] + "\n")
    (config.run_dir(0) / "ablation.json").unlink()
    stopped = run_ablation(config.replace(stop_after_s=1e-9), 0, pool)
    assert stopped["out_of_time"] and stopped["done"] == [payload["rows"][0]["name"]]
    assert not (config.run_dir(0) / "ablation.json").exists()
    (rows / "row_2" / "summary.json").unlink()
    (rows / "row_2" / "episodes.jsonl").unlink()  # row 2 from its first episode
    again = run_ablation(config, 0, pool)
    assert again == payload and (rows / "row_0" / "summary.json").stat().st_mtime_ns == kept
    assert json.loads((rows / "row_1" / "summary.json").read_text())["resumed_episodes"] == 1


# ------------------------------------------------------------------------------------------- demonstration buffer
def test_demo_buffer_takes_the_executed_actions_or_the_expert_labels(assets, pool):
    """``demo_actions`` picks the demonstration transitions' actions: executed (with the expert's exploration noise)
    or its noise-free labels; a file without labels is refused for ``expert``."""
    from coop_transport.data.dataset import DatasetError, load_demonstrations
    from coop_transport.residual.demos import build_demo_buffer, plan_demo_chunks
    from coop_transport.residual.system import ResidualSystem, make_agents
    from coop_transport.residual.train import load_vla

    vla = load_vla(make_config(assets, "V4", Path("unused")), "cpu")  # frozen: one for every buffer

    def demo_buffer(config):  # fresh agents each time: building the buffer pre-trains and freezes their encoders
        system = ResidualSystem(config.spec, config, vla, make_agents(config.spec, config, vla), torch.device("cpu"))
        return build_demo_buffer(system, config, pool, torch.Generator().manual_seed(0))

    actions = {}
    for labels in ("executed", "expert"):
        config = make_config(assets, "V4", Path("unused"), demo_actions=labels)
        buffer, info = demo_buffer(config)
        actions[labels] = buffer.data["action"][:len(buffer)]  # (N, 2 arms, C, 7)
        with load_demonstrations(config.data, action_labels=labels) as demos:
            train = set(demos.demo_names("train"))
            trajs = [t for t in demos.joint_trajectories(None, images=None) if t.demo in train]
        expected = []
        for traj in trajs:  # the buffer's rows, in its order: demonstrations, then chunk starts
            for t, k, _ in plan_demo_chunks(len(traj), CHUNK, CHUNK, bool(traj.success)):
                chunk = np.asarray(traj.actions[t:t + k])
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], CHUNK - k, 0)])
                expected.append(np.stack([chunk[:, :7], chunk[:, 7:]]))
        assert info["transitions"] == len(expected) > 0
        np.testing.assert_allclose(actions[labels].numpy(), np.stack(expected), atol=1e-6)
    assert (actions["executed"] - actions["expert"]).abs().max() > 1e-3  # the exploration noise tells them apart

    import h5py
    unlabelled = assets / "demos_without_labels.hdf5"
    if not unlabelled.exists():
        import shutil
        shutil.copy(assets / "demos.hdf5", unlabelled)
        with h5py.File(unlabelled, "a") as f:
            for name in f["data"]:
                if "expert_actions" in f["data"][name]:
                    del f["data"][name]["expert_actions"]
    with pytest.raises(DatasetError, match="expert"):
        demo_buffer(make_config(assets, "V4", Path("unused"), demo_actions="expert", data=unlabelled))


# ------------------------------------------------------------------------------------------------------- resume
def test_resume_after_a_kill_continues_identically(assets, pool, tmp_path):
    from safetensors.torch import load_file

    straight = make_config(assets, "V5", tmp_path / "straight", chunks=6)
    killed = make_config(assets, "V5", tmp_path / "killed", chunks=6)
    a = train(straight, 0, pool)
    assert train(killed, 0, pool, stop_after=2) == {"stopped_at": 2}  # dies right after the save at chunk 2
    state = json.loads((killed.run_dir(0) / "train_state" / "state.json").read_text())
    assert state["progress"]["chunks"] == 2
    b = train(killed, 0, pool)  # the same command again: resumes at chunk 2
    assert (a["chunks"], a["updates"], a["success_rate"]) == (b["chunks"], b["updates"], b["success_rate"])
    ta = load_file(str(straight.run_dir(0) / "train_state" / "state.safetensors"))
    tb = load_file(str(killed.run_dir(0) / "train_state" / "state.safetensors"))
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    import csv

    def log(config):  # every logged number except the wall-clock rates
        with open(config.run_dir(0) / "log.csv") as f:
            return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in csv.DictReader(f)]

    assert log(straight) == log(killed) and len(log(straight)) == 3

    # out of time (--stop-after-s): the run saves where it stands, off the save_every grid, and stops the call;
    # the same command without the limit resumes there and ends where the uninterrupted run ended
    from coop_transport.residual.train import run

    timed = make_config(assets, "V5", tmp_path / "timed", chunks=6, save_every=100, stop_after_s=1e-3)
    stopped = run(timed, pool)
    assert len(stopped) == 1 and stopped[0]["out_of_time"] and 1 <= stopped[0]["stopped_at"] < 6
    state = json.loads((timed.run_dir(0) / "train_state" / "state.json").read_text())
    assert state["progress"]["chunks"] == stopped[0]["stopped_at"]
    c = run(make_config(assets, "V5", tmp_path / "timed", chunks=6, save_every=100), pool)[0]
    assert (c["chunks"], c["updates"], c["success_rate"]) == (a["chunks"], a["updates"], a["success_rate"])
    tc = load_file(str(timed.run_dir(0) / "train_state" / "state.safetensors"))
    for key in ta:
        assert torch.equal(ta[key], tc[key]), key


def test_an_evaluation_cut_off_by_the_deadline_continues_where_it_stopped(assets, pool, tmp_path, monkeypatch):
    import coop_transport.residual.train as train_module

    a = train(make_config(assets, "V4", tmp_path / "straight", chunks=4, eval_every=2, eval_episodes=3), 0, pool)
    timed = make_config(assets, "V4", tmp_path / "timed", chunks=4, eval_every=2, eval_episodes=3, stop_after_s=1e5)
    real = train_module.run_episodes
    with monkeypatch.context() as m:  # the deadline comes after the first episode of the evaluation at chunk 2
        m.setattr(train_module, "run_episodes", lambda system, pool, seeds, *args, **kw:
                  real(system, pool, seeds[:1], *args, **kw))
        first = train(timed, 0, pool)
    assert first["out_of_time"] and first["eval_pending"] and first["stopped_at"] == 2
    log = timed.run_dir(0) / "eval" / "chunk_000002" / "episodes.jsonl"
    assert len(log.read_text().splitlines()) == 1 and not (timed.run_dir(0) / "result.json").exists()
    ran = []
    with monkeypatch.context() as m:  # the rerun runs the two episodes not yet finished, then trains on
        m.setattr(train_module, "run_episodes", lambda system, pool, seeds, *args, **kw:
                  ran.append(list(seeds)) or real(system, pool, seeds, *args, **kw))
        b = train(timed, 0, pool)
    assert ran == [[2, 3], [1, 2, 3]]  # the rest of chunk 2's evaluation, then chunk 4's
    assert "| resumed | 1 of the 3 episodes came from an earlier call; counted over the other 2 alone: clip " \
        "activation rate, wall time, time split |" in (timed.run_dir(0) / "eval" / "chunk_000002" /
                                                       "summary.md").read_text()
    assert [e["chunks"] for e in b["evals"]] == [e["chunks"] for e in a["evals"]] == [2, 4]
    assert (b["chunks"], b["updates"], b["success_rate"]) == (a["chunks"], a["updates"], a["success_rate"])

    def outcomes(run, name):
        summary = json.loads((run / "eval" / name / "summary.json").read_text())
        return [(r["seed"], r["success"], r["length"], r["milestones"]) for r in summary["per_seed"]]

    for name in ("chunk_000002", "chunk_000004"):
        assert outcomes(timed.run_dir(0), name) == outcomes(make_config(assets, "V4", tmp_path / "straight")
                                                            .run_dir(0), name)

    # a finished seed is read back from its result.json: nothing trains or evaluates again
    monkeypatch.setattr(train_module, "_evaluate_checkpoint", lambda *args, **kw: pytest.fail("evaluated again"))
    again = train(timed, 0, pool)
    assert (again["chunks"], again["updates"], again["evals"]) == (b["chunks"], b["updates"], json.loads(
        json.dumps(b["evals"])))


def test_a_cut_off_baseline_evaluation_continues_and_a_finished_one_runs_anew(assets, pool, tmp_path, monkeypatch):
    import coop_transport.residual.train as train_module

    config = make_config(assets, "B1", tmp_path / "B1", eval_episodes=3, stop_after_s=1e5)
    real = train_module.run_episodes
    with monkeypatch.context() as m:  # the deadline comes after the first episode
        m.setattr(train_module, "run_episodes", lambda system, pool, seeds, *args, **kw:
                  real(system, pool, seeds[:1], *args, **kw))
        first = train(config, 0, pool)
    assert first["out_of_time"] and not (config.run_dir(0) / "result.json").exists()
    ran = []
    monkeypatch.setattr(train_module, "run_episodes", lambda system, pool, seeds, *args, **kw:
                        ran.append(list(seeds)) or real(system, pool, seeds, *args, **kw))
    done = train(config, 0, pool)
    again = train(config, 0, pool)  # B1 has no training state: a rerun of a finished evaluation evaluates anew
    assert ran == [[2, 3], [1, 2, 3]] and done["episodes"] == again["episodes"] == 3
    assert done["successes"] == again["successes"]


def test_a_cut_off_evaluation_of_a_prior_replaced_in_place_is_refused(assets, pool, tmp_path, monkeypatch):
    """The episode log's key holds the weights' digests, not only the paths: a prior retrained into the same
    directory between a cut-off and its continuation would mix two policies' episodes; it is refused instead."""
    import shutil

    import coop_transport.residual.train as train_module
    from coop_transport.policy import load_checkpoint, save_checkpoint

    prior = tmp_path / "prior"
    shutil.copytree(assets / "per-arm", prior)
    config = make_config(assets, "B1", tmp_path / "B1", vla=prior, eval_episodes=2, stop_after_s=1e5)
    real = train_module.run_episodes
    with monkeypatch.context() as m:  # the deadline comes after the first episode
        m.setattr(train_module, "run_episodes", lambda system, pool, seeds, *args, **kw:
                  real(system, pool, seeds[:1], *args, **kw))
        assert train(config, 0, pool)["out_of_time"]
    ckpt = load_checkpoint(prior)
    with torch.no_grad():
        next(ckpt.model.parameters()).add_(0.01)  # retrained, in the same place
    save_checkpoint(prior, ckpt.model, ckpt.config, ckpt.norm_stats, 1, ckpt.extra)
    with pytest.raises(ValueError, match="holds episodes of another evaluation"):
        train(config, 0, pool)


def test_reproduce_script_runs_lanes_resumes_and_reports(assets, tmp_path):
    """training/reproduce_residual.sh with the tiny stand-ins on CPU: two lanes (V5 then its probes; V4 then its
    gated evaluation, each listed before its training job: a lane runs a seed's training first; V5's evaluation with
    its critics choosing among 2 draws), a first call whose deadline leaves no time for any job, then the same
    command to the end and the report. A gated evaluation of a seed that is not trained and not in JOBS is refused
    by name, and so are unknown job kinds."""
    import os
    import subprocess

    tiny = (f"--vla {assets / 'per-arm'} --vla-joint {assets / 'joint'} --chunks 4 --chunk {CHUNK} --baseline-chunk "
            f"{CHUNK} --num-samples 2 --horizon {HORIZON} --latent-dim 32 --encoder-width 16 --encoder-heads 2 "
            "--encoder-layers 1 --hidden-dim 32 --batch-size 8 --learning-starts 1 --encoder-steps 3 "
            "--encoder-batch 4 --encoder-pool 16 --eval-every 0 --eval-episodes 1 --save-every 2 --log-every 2")
    env = {**os.environ, "JOBS": "V5:0:probes V4:0:gate=0.0 V5:0 V4:0 V4:0:ablation V5:0:best=2", "LANES": "2", "ENVS": "0", "DEVICE": "cpu",
           "DATA": str(assets / "demos.hdf5"), "PROBE_EPISODES": "1", "EXTRA": tiny, "PYTHON": sys.executable}
    out = tmp_path / "runs"
    script = ["bash", str(ROOT / "training" / "reproduce_residual.sh"), str(out)]
    first = subprocess.run(script, cwd=ROOT, env={**env, "DEADLINE_S": "60"}, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "6 of 6 jobs not done: rerun the same command" in first.stdout
    assert "no seed finished yet: no report" in first.stdout and "Traceback" not in first.stdout
    assert not (out / "V5" / "seed_0" / "config.json").exists()  # under 90 s left: no job starts
    alone = subprocess.run(script, cwd=ROOT, env={**env, "JOBS": "V6:0:gate=0"}, capture_output=True, text=True,
                           timeout=120)
    assert "V6 seed 0 gate=0: seed 0 of V6 is not trained (add V6:0 to JOBS)" in alone.stdout, alone.stdout
    assert "1 of 1 jobs not done" in alone.stdout and not (out / "V6").exists()
    typo = subprocess.run(script, cwd=ROOT, env={**env, "JOBS": "V4:0:prob"}, capture_output=True, text=True,
                          timeout=120)
    assert "V4:0:prob: unknown job" in typo.stdout, typo.stdout
    for job in ("V4:0:best=1", "V4:0:best=2,gat=0"):  # best=1 is the plain run; a misspelt part
        typo = subprocess.run(script, cwd=ROOT, env={**env, "JOBS": job}, capture_output=True, text=True, timeout=120)
        assert f"{job}: unknown job" in typo.stdout, typo.stdout
    done = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "all jobs done" in done.stdout, done.stdout
    for arch in ("V4", "V5"):
        assert json.loads((out / arch / "seed_0" / "result.json").read_text())["chunks"] >= 4
    probes = json.loads((out / "V5" / "seed_0" / "probes.json").read_text())
    gated = json.loads((out / "V4" / "seed_0" / "gate_0" / "result.json").read_text())
    assert gated["gate"]["margin"] == 0.0 and 0.0 <= gated["gate"]["residual_rate"] <= 1.0
    chosen = json.loads((out / "V5" / "seed_0" / "best_of_2" / "result.json").read_text())
    assert chosen["candidates"]["candidates"] == 2 and 0.0 <= chosen["candidates"]["switch_rate"] <= 1.0
    assert set(probes["interventions"]) >= {"none", "zeros"}
    assert len(json.loads((out / "V4" / "seed_0" / "ablation.json").read_text())["rows"]) == 4
    assert "## Table 2: inference-recipe ablation on V4" in (out / "report" / "report.md").read_text()
    report = (out / "report" / "report.md").read_text()
    assert "| **V4 " in report and "| **V5 " in report and "Communication probes" in report
    assert "critic gate 0** |" in report and "| V4 gate 0 ≥ B1" not in report
    assert "critic best-of-2** |" in report
    assert "| V5 ≥ V4 | V5 − V4 = " in report and "| V5 ≥ 75% | V5 = " in report  # the targets B1-free runs allow


# ------------------------------------------------------------------------------------------------------ parity
def _chunk_outcome(pool) -> list:
    out = [pool.reset({0: 7})[0]]
    chunk = np.tile(np.linspace(-0.5, 0.5, 14), (CHUNK, 1))
    out += [pool.step({0: chunk})[0] for _ in range(2)]
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_worker_processes_match_in_process_simulation(pool):
    from coop_transport.residual.rollout import ProcessPool

    local = _chunk_outcome(pool)
    with ProcessPool(1, pool.workers[0].sim.config, 0.99) as processes:
        remote = _chunk_outcome(processes)
    assert all(_same(x, y) for x, y in zip(local, remote))


def test_ray_actors_match_local_workers(pool):
    pytest.importorskip("ray")
    from coop_transport.residual.rollout import RayPool

    local = _chunk_outcome(pool)
    with RayPool(1, pool.workers[0].sim.config, 0.99, address="local") as ray_pool:
        remote = _chunk_outcome(ray_pool)
    assert all(_same(x, y) for x, y in zip(local, remote))


# ------------------------------------------------------------------------------------------- evaluation's funnel
class _ExpertDrivenSystem:
    """Stands in for a ResidualSystem in run_episodes: each boundary's chunk is the scripted expert's next action
    (chunks of one step), so an episode reaches every task milestone."""

    def __init__(self, sim, horizon: int):
        from types import SimpleNamespace

        from coop_transport.sim.expert import ExpertConfig, ScriptedExpert

        self.sim, self.expert = sim, ScriptedExpert(ExpertConfig())
        self.config = SimpleNamespace(horizon=horizon, gate_margin=None, candidates=1)
        self.counters = SimpleNamespace(actions=0, clipped_actions=0)

    def boundary(self, observations, generator, context, **kwargs):
        from types import SimpleNamespace

        if context["boundary_index"][0] == 0:
            self.expert.reset(self.sim, context["seeds"][0])
        action = self.expert.act(self.sim)
        return SimpleNamespace(joint_action=lambda: action[None, None])  # (envs, C = 1, 14)

    def weights_digest(self) -> dict:
        return {"expert": True}

    def choice_stats(self) -> dict:
        return {}


def test_residual_evaluation_records_the_stage_funnel(tmp_path):
    """The residual evaluation reports which milestones each episode reached, as training/evaluate.py does (it
    reported an empty funnel beside its successes before)."""
    from coop_transport.residual.train import evaluate_system
    from coop_transport.sim import SimConfig
    from coop_transport.sim.labels import MILESTONES

    with InProcessPool(1, SimConfig(wrist_cameras=False, agentview=False, horizon=500), 0.99) as pool:
        system = _ExpertDrivenSystem(pool.workers[0].sim, 500)
        summary = evaluate_system(system, pool, 1, tmp_path / "eval", "expert", {})
    assert summary["successes"] == 1
    assert summary["per_seed"][0]["milestones"] == list(MILESTONES)  # in task order
    assert summary["milestone_rates"] == {m: 1.0 for m in MILESTONES}
    assert summary["per_seed"][0]["handover"]["outcome"] == "handed_over"  # and how the hand-over ended
    assert summary["handover_outcomes"]["handed_over"] == 1
    assert "| 1 | yes |" in (tmp_path / "eval" / "summary.md").read_text()
