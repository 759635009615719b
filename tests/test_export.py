"""Export of the π0 policy: ONNX graphs of the small config, ONNX Runtime parity with PyTorch on fresh inputs and the
same noise, refusal of a manifest from another checkpoint and of corrupt / truncated / missing files and wrong
inputs, backends through deploy.load_arm_policy and the pi0 controller, the residual-RL networks of a V5 run.
CPU only; random weights."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from coop_transport.adapters import ARM_PROMPTS
from coop_transport.export import ExportError, ExportFileMissing, canonical_backend, make_backend, read_manifest
from coop_transport.export.exporter import ExportConfig, main
from coop_transport.export.manifest import MANIFEST_FILE, sha256_file, write_manifest
from coop_transport.export.runtime import EpisodeNoise, load_backend_policy
from coop_transport.export.spec import fake_inputs
from coop_transport.policy import build_model, get_config, load_checkpoint, save_checkpoint

TOL = 5e-4  # float32 backends, z-scored action units (why: export/parity.py TOLERANCE_FP32)


def make_checkpoint(path, name="small", seed=0):
    config = get_config(name)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    rng = np.random.default_rng(seed)
    norm = {"state": {"mean": rng.normal(size=config.state_dim), "std": rng.uniform(0.5, 2.0, config.state_dim)},
            "actions": {"mean": 0.1 * rng.normal(size=config.action_dim), "std": rng.uniform(0.1, 1.0, config.action_dim)}}
    prompts = dict(ARM_PROMPTS) if name != "tiny" else {"robot0": "left", "robot1": "right"}  # tiny: 8 tokens
    return save_checkpoint(path, model, config, norm, step=7, extra={"variant": "per-arm", "prompts": prompts})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the project's 2-core machines are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped default (small config), exported for N=1 and N=4: exactly what `python export/export.py` does."""
    from coop_transport.pi0_policy import default_policy_dir

    root = tmp_path_factory.mktemp("export")
    checkpoint = default_policy_dir()
    lines = []
    manifest = main(ExportConfig(out=root / "onnx", checkpoint=checkpoint, samples=(1, 4), parity_trials=2,
                                 parity_backends=("onnxruntime-cpu",)), log=lines.append)
    return {"root": root, "checkpoint": checkpoint, "out": root / "onnx", "manifest": manifest, "log": "\n".join(lines)}


@pytest.fixture(scope="module")
def torch_backend(exported):
    return make_backend("torch", model=load_checkpoint(exported["checkpoint"]).model)


def arm_observation(size, seed=0):
    """A random arm observation with the latest 16 states (the shipped default sees states 5, 10, 15 steps back)."""
    rng = np.random.default_rng(seed)
    proprio = rng.normal(size=18).astype(np.float32)
    walk = np.cumsum(0.01 * rng.normal(size=(15, 18)), 0).astype(np.float32)
    return {"proprio": proprio, "proprio_history": np.concatenate([proprio[None], proprio + walk]),
            "wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "agentview_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)}


# ---- the export itself ---------------------------------------------------------------------------------------------


def test_manifest_describes_the_export(exported):
    out, manifest = exported["out"], read_manifest(exported["out"])
    checkpoint_meta = json.loads((exported["checkpoint"] / "config.json").read_text())
    assert manifest["source_checkpoint"]["weights_sha256"] == checkpoint_meta["weights_sha256"]
    assert manifest["source_checkpoint"]["config_sha256"] == sha256_file(exported["checkpoint"] / "config.json")
    assert set(manifest["graphs"]) == {"pi0_chunk_b1_n1", "pi0_chunk_b1_n4"}
    from coop_transport.policy.config import config_from_dict

    config = config_from_dict(checkpoint_meta["config"])  # the default's: small, action horizon 32
    assert config.name == "small"
    graph = manifest["graphs"]["pi0_chunk_b1_n4"]
    assert [(i["name"], tuple(i["shape"]), i["dtype"]) for i in graph["inputs"]] == [
        ("image_wrist", (1, 96, 96, 3), "uint8"), ("image_agentview", (1, 96, 96, 3), "uint8"),
        ("prompt_tokens", (1, config.max_token_len), "int64"), ("prompt_mask", (1, config.max_token_len), "bool"),
        ("state", (1, 72), "float32"), ("noise", (4, config.action_horizon, config.action_pad_dim), "float32")]
    # The default's state: the current 18 values and the displacements since 5, 10 and 15 control steps back.
    assert manifest["policy"]["state_history"] == {"frames": 4, "stride": 5, "encoding": "delta"}
    assert config.state_dim == 72 and len(manifest["norm_stats"]["state"]["std"]) == 72
    assert [(o["name"], tuple(o["shape"])) for o in graph["outputs"]] == [("actions", (4, config.action_horizon, 7))]
    assert graph["settings"]["num_flow_steps"] == 10 and graph["opset"] == 17
    assert graph["settings"]["fused"] is True  # export.fused.FusedChunkSampler; parity is against the original
    for name, record in manifest["files"].items():  # every file hashed
        assert sha256_file(out / name) == record["sha256"] and (out / name).stat().st_size == record["bytes"]
    assert manifest["prompts"]["robot0"]["text"] == ARM_PROMPTS["robot0"]
    assert manifest["recipe_defaults"]["num_samples"] == 4
    assert len(manifest["norm_stats"]["actions"]["std"]) == 7
    parity = manifest["parity"]["backends"]["onnxruntime-cpu"]
    assert parity["pass"] and parity["max_abs"] < TOL
    assert len(parity["shapes"]["B1_N4"]["max_abs_per_dim"]) == 7
    # The command prints its parity figures.
    assert "parity onnxruntime-cpu: max abs error" in exported["log"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert manifest["tensorrt"]["status"] == "skipped" and "TensorRT is not installed" in manifest["tensorrt"]["reason"]


@pytest.mark.parametrize("num_samples", [1, 4])
def test_onnxruntime_matches_pytorch_on_fresh_inputs(exported, torch_backend, num_samples):
    ort = make_backend("onnxruntime-cpu", export_dir=exported["out"], threads=1)
    for seed in (101, 202):  # inputs never seen at export time; the same noise for both
        inputs = fake_inputs(ort.input_specs(1, num_samples), seed=seed, vocab_size=get_config("small").vocab_size)
        expected = torch_backend.sample(inputs, num_samples)
        actual = ort.sample(inputs, num_samples)
        per_dim = np.abs(actual - expected).reshape(-1, 7).max(axis=0)
        assert actual.shape == (num_samples, 32, 7)  # the default predicts 32-step chunks and np.all(np.isfinite(actual))
        assert per_dim.max() < TOL, per_dim
        assert np.abs(expected).mean() > 0.1  # not trivially zero


def test_verify_mode_checks_stored_reference(exported):
    report = main(ExportConfig(out=exported["out"], mode="verify", parity_backends=("onnxruntime-cpu",)),
                  log=lambda *_: None)
    assert report["onnxruntime-cpu"]["pass"] and set(report["onnxruntime-cpu"]["shapes"]) == {"B1_N1", "B1_N4"}


# ---- the fused sampler (export.fused) -------------------------------------------------------------------------------

FUSED_TOL = 1e-4  # z-scored actions, PyTorch float32 on both sides; observed ~6e-6 (rounding order only)


def sampler_pair(model, num_samples, batch_size=1, seed=0):
    """The original chunk sampler and the fused one over `model`, and named random inputs as torch tensors."""
    from coop_transport.export.fused import FusedChunkSampler
    from coop_transport.export.graphs import Pi0ChunkSampler
    from coop_transport.export.spec import chunk_sampler_inputs

    inputs = fake_inputs(chunk_sampler_inputs(model.config, batch_size, num_samples), seed=seed,
                         vocab_size=model.config.vocab_size)
    args = [torch.from_numpy(v) for v in inputs.values()]
    return Pi0ChunkSampler(model, num_samples).eval(), FusedChunkSampler(model, num_samples).eval(), args


@pytest.fixture(scope="module")
def shipped_model():
    from coop_transport.pi0_policy import default_policy_dir

    return load_checkpoint(default_policy_dir()).model.float().eval()


@pytest.mark.parametrize("num_samples", [1, 4])
def test_fused_sampler_matches_sample_actions(shipped_model, num_samples):
    """The fused rewrite computes Pi0Model.sample_actions: the shipped default (trained weights, horizon 32) on
    random observations of random prompt lengths, the same noise."""
    for seed in (0, 1, 2):
        original, fused, args = sampler_pair(shipped_model, num_samples, seed=seed)
        with torch.no_grad():
            expected, actual = original(*args), fused(*args)
        assert actual.shape == expected.shape == (num_samples, 32, 7)
        assert (actual - expected).abs().max().item() < FUSED_TOL
        assert expected.abs().mean().item() > 0.1  # not trivially zero


def test_fused_sampler_matches_with_two_observations_and_norm_weights():
    """Two observations x 4 samples (the per-observation context shared by its own samples only), and RMSNorm /
    LayerNorm weights and biases moved off their initial values so that the folded norm scales matter."""
    torch.manual_seed(0)
    model = build_model(get_config("small")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    original, fused, args = sampler_pair(model, num_samples=4, batch_size=2, seed=5)
    with torch.no_grad():
        error = (fused(*args) - original(*args)).abs().max().item()
    assert error < FUSED_TOL


def test_fused_sampler_matches_with_two_kv_heads():
    """The general grouped-query layout (π0 has one KV head, where the fused layout needs no transposes): tiny config
    with 4 query heads over 2 KV heads, 2 observations x 3 samples."""
    import dataclasses

    config = get_config("tiny")
    config = dataclasses.replace(config, vlm=dataclasses.replace(config.vlm, num_heads=4, num_kv_heads=2),
                                 expert=dataclasses.replace(config.expert, num_heads=4, num_kv_heads=2))
    torch.manual_seed(0)
    original, fused, args = sampler_pair(build_model(config).eval(), num_samples=3, batch_size=2, seed=1)
    with torch.no_grad():
        assert (fused(*args) - original(*args)).abs().max().item() < FUSED_TOL


@pytest.mark.parametrize("mistake", ["rotary sign", "flow-time bias order", "padding mask", "state token"])
def test_parity_check_catches_a_wrong_fusion(shipped_model, monkeypatch, mistake):
    """Each fusion, deliberately broken, moves the actions far beyond FUSED_TOL: the comparison above (and the
    export's parity check, which uses the same reference) would catch it."""
    from coop_transport.export import fused as fused_module

    if mistake == "rotary sign":  # rotate_half(x) = [-x2, x1]: lose the minus sign folded into the sin table
        tables = fused_module.rotary_tables

        def unsigned_tables(cos, sin, heads):
            cos_table, signed_sin = tables(cos, sin, heads)  # (rows, heads, 2, hd/2)
            return cos_table, torch.cat([-signed_sin[:, :, :1], signed_sin[:, :, 1:]], dim=2)
        monkeypatch.setattr(fused_module, "rotary_tables", unsigned_tables)
    elif mistake == "padding mask":  # let every query attend to the padded prompt tokens too
        monkeypatch.setattr(fused_module, "additive_mask", lambda mask, groups, kv_heads: torch.zeros(
            mask.shape[0], kv_heads, mask.shape[1] * groups, mask.shape[2]))
    original, fused, args = sampler_pair(shipped_model, num_samples=4, seed=3)
    if mistake == "flow-time bias order":  # the time embedding of the last step at the first, and so on
        fused.action_in_step_bias = fused.action_in_step_bias.flip(0)
    elif mistake == "state token":  # the cached state-token keys replaced by the last prefix token's
        context = fused.context

        def wrong_state_keys(*inputs):
            kv, mask, cos, sin = context(*inputs)
            state = torch.tensor([kv[0][0].shape[2] - 1])
            return [(k.index_copy(2, state, k[:, :, -2:-1]), v) for k, v in kv], mask, cos, sin
        fused.context = wrong_state_keys
    with torch.no_grad():
        error = (fused(*args) - original(*args)).abs().max().item()
    assert error > 100 * FUSED_TOL, f"{mistake}: the broken fusion still matches ({error:.1e})"


def test_plain_and_fused_exports_agree(tmp_path):
    """export_model with fused=False traces Pi0Model.sample_actions as it is; both graphs match PyTorch through ONNX
    Runtime (tiny config, 2 observations x 2 samples), and the fused one has fewer nodes."""
    from coop_transport.export.exporter import export_model
    from coop_transport.export.spec import chunk_sampler_inputs

    torch.manual_seed(0)
    config = get_config("tiny")
    model = build_model(config).eval()
    torch_backend = make_backend("torch", model=model)
    inputs = fake_inputs(chunk_sampler_inputs(config, 2, 2), seed=9, vocab_size=config.vocab_size)
    nodes = {}
    for fused in (False, True):
        manifest = export_model(model, config, tmp_path / str(fused), samples=(2,), batch_sizes=(2,),
                                log=lambda *_: None, fused=fused)
        graph = manifest["graphs"]["pi0_chunk_b2_n2"]
        assert graph["settings"]["fused"] is fused
        nodes[fused] = graph["onnx_nodes"]
        ort = make_backend("onnxruntime-cpu", export_dir=tmp_path / str(fused), manifest=manifest, threads=1)
        assert np.abs(ort.sample(inputs, 2) - torch_backend.sample(inputs, 2)).max() < TOL
    assert nodes[True] < nodes[False]


# ---- refusals -------------------------------------------------------------------------------------------------------


def test_refuses_export_of_another_checkpoint(exported, tmp_path):
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ExportError, match="another checkpoint"):
        load_backend_policy(other, "onnxruntime", export_dir=exported["out"])
    from coop_transport.deploy import load_arm_policy

    with pytest.raises(ExportError, match="another checkpoint"):
        load_arm_policy(str(other), "robot0", backend="onnxruntime", export=str(exported["out"]))
    with pytest.raises(ExportFileMissing, match="export/export.py"):  # no export beside this checkpoint
        load_backend_policy(other, "onnxruntime")


@pytest.fixture
def copy_of_export(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported["out"], target)
    return target


def test_refuses_corrupt_onnx(copy_of_export):
    onnx_file = copy_of_export / "pi0_chunk_b1_n4.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, different content
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256 .* does not match"):
        make_backend("onnxruntime", export_dir=copy_of_export)


def test_refuses_truncated_onnx(copy_of_export):
    onnx_file = copy_of_export / "pi0_chunk_b1_n1.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ExportError, match="truncated"):
        make_backend("onnxruntime", export_dir=copy_of_export)


def test_refuses_unloadable_onnx_even_with_matching_hash(copy_of_export):
    onnx_file = copy_of_export / "pi0_chunk_b1_n1.onnx"
    onnx_file.write_bytes(b"not an onnx graph")
    manifest = read_manifest(copy_of_export)
    manifest["files"]["pi0_chunk_b1_n1.onnx"] = {"sha256": sha256_file(onnx_file), "bytes": onnx_file.stat().st_size}
    write_manifest(copy_of_export, manifest)
    with pytest.raises(ExportError, match="not a loadable ONNX graph"):
        make_backend("onnxruntime", export_dir=copy_of_export)


def test_refuses_missing_files(copy_of_export):
    (copy_of_export / "pi0_chunk_b1_n4.onnx").unlink()
    with pytest.raises(ExportFileMissing, match="missing"):
        make_backend("onnxruntime", export_dir=copy_of_export)
    (copy_of_export / MANIFEST_FILE).unlink()
    with pytest.raises(ExportFileMissing, match="no manifest.json"):
        make_backend("onnxruntime", export_dir=copy_of_export)


def test_refuses_wrong_inputs(exported):
    ort = make_backend("onnxruntime", export_dir=exported["out"], threads=1)
    good = fake_inputs(ort.input_specs(1, 4), seed=5)
    with pytest.raises(ExportError, match="'state' .* dtype float64"):
        ort.sample({**good, "state": good["state"].astype(np.float64)}, 4)
    with pytest.raises(ExportError, match="'image_wrist' .* shape"):
        ort.sample({**good, "image_wrist": good["image_wrist"][:, :64, :64]}, 4)
    with pytest.raises(ExportError, match="missing \\['noise'\\]"):
        ort.sample({k: v for k, v in good.items() if k != "noise"}, 4)
    with pytest.raises(ExportError, match="no graph for B=1, N=2"):
        ort.sample(good, 2)
    policy = load_backend_policy(exported["out"], "onnxruntime")
    with pytest.raises(ValueError, match="expects 96x96"):
        policy.sample_arm(arm_observation(64), "robot0", 4)


def test_exported_policy_runs_without_pytorch(exported):
    """A robot needs onnxruntime and numpy only: loading and running an export directory never imports torch."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from coop_transport.export.runtime import load_backend_policy\n"
            f"policy = load_backend_policy({str(exported['out'])!r}, 'onnxruntime', threads=1)\n"
            "obs = {'proprio': np.zeros(18, np.float32), 'proprio_history': np.zeros((1, 18), np.float32),\n"
            "       'wrist_image': np.zeros((96, 96, 3), np.uint8), 'agentview_image': np.zeros((96, 96, 3), np.uint8)}\n"
            "assert policy.sample_arms({'robot0': obs, 'robot1': obs}, 4)['robot1'].shape == (4, 32, 7)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_names():
    assert canonical_backend("onnx") == "onnxruntime" and canonical_backend("eager") == "torch"
    with pytest.raises(ValueError, match="unknown inference backend 'onnxruntme'.*Did you mean"):
        canonical_backend("onnxruntme")


def test_tensorrt_build_skipped_with_a_clear_message(exported):
    pytest.importorskip("onnxruntime")
    from coop_transport.export.tensorrt_build import build_engines, tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is installed here")
    section = build_engines(exported["out"], read_manifest(exported["out"]), log=lambda *_: None)
    assert section["status"] == "skipped" and "import tensorrt" in section["reason"] and not section["engines"]
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        make_backend("tensorrt", export_dir=exported["out"])


# ---- the deployment hooks ----------------------------------------------------------------------------------------


def test_arm_policy_onnxruntime_plans_the_torch_chunk(exported):
    from coop_transport.deploy import load_arm_policy

    obs = arm_observation(96, seed=3)
    plans = {}
    for name, path, backend, export in [("torch", exported["checkpoint"], "torch", None),
                                        ("ort", exported["checkpoint"], "onnxruntime", exported["out"]),
                                        ("ort-dir", exported["out"], "onnx", None)]:
        policy = load_arm_policy(str(path), "robot1", backend=backend, export=export and str(export), threads=1)
        policy.policy.noise_source = EpisodeNoise(11)  # the same flow noise for every backend
        plans[name] = policy.plan(obs)
        assert policy.stats()["backend"] == {"torch": "torch", "ort": "onnxruntime-cpu", "ort-dir": "onnxruntime-cpu"}[name]
    assert plans["torch"].shape == (10, 7)
    assert np.abs(plans["ort"] - plans["torch"]).max() < TOL
    assert np.array_equal(plans["ort"], plans["ort-dir"])


def test_pi0_controller_runs_a_backend_with_paired_noise(exported):
    from coop_transport.evaluation import ControllerSpec, build_controller

    obs = {arm: arm_observation(96, seed=i) for i, arm in enumerate(("robot0", "robot1"))}
    chunks = {}
    for backend in ("torch", "onnxruntime"):
        args = {"policy": str(exported["checkpoint"]), "backend": backend, "noise_seed": 0, "threads": 1}
        if backend != "torch":
            args["export"] = str(exported["out"])
        controller, overrides = build_controller(ControllerSpec("pi0", args))
        assert overrides["image_size"] == 96
        controller.reset(None, seed=5)  # restarts the noise stream for episode seed 5
        chunks[backend] = {arm: actor.plan(obs[arm]) for arm, actor in controller.actors.items()}
    for arm in ("robot0", "robot1"):
        assert np.abs(chunks["onnxruntime"][arm] - chunks["torch"][arm]).max() < TOL


def test_evaluate_command_runs_an_export_directory(exported, tmp_path):
    """training/evaluate.py --policy EXPORT_DIR --backend onnxruntime (the closed-loop parity run): the export is
    accepted as the policy, its row names the source checkpoint's step, and a folder that is neither is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import evaluate

    result = evaluate.main(evaluate.Config(policy=exported["out"], backend="onnxruntime", episodes=1, first_seed=3,
                                           workers=1, horizon=2, noise_seed=0, out=tmp_path, progress=False))
    (row,) = result["rows"]
    assert row["episodes"] == 1 and row["step"] == exported["manifest"]["source_checkpoint"]["step"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["per_seed"][0]["seed"] == 3
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        evaluate.main(evaluate.Config(policy=tmp_path, backend="onnxruntime", out=tmp_path / "x", progress=False))


@pytest.mark.ros
def test_policy_node_loads_an_exported_policy(exported):
    """The ROS policy node's `backend` and `policy_path` parameters reach deploy.load_arm_policy (default factory)."""
    pytest.importorskip("rclpy")
    from ros_helpers import use_isolated_ros_env

    use_isolated_ros_env()
    import rclpy
    from rclpy.parameter import Parameter

    from coop_transport.ros.policy_node import PolicyNode

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter("arm", value="robot1"), Parameter("policy_path", value=str(exported["out"])),
            Parameter("backend", value="onnx"), Parameter("inference_threads", value=1)])
        try:
            assert node.policy.stats()["backend"] == "onnxruntime-cpu" and node.image_size == 96
            plan = node.policy.plan(arm_observation(96))
            assert plan.shape == (node.recipe.execute_steps, 7) and np.all(np.isfinite(plan))
        finally:
            node.close()
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


@pytest.fixture(scope="module")
def tiny_with_residual(tmp_path_factory):
    """The tiny config with a V5 residual run (RL token encoders, communication heads, residual actors, and the
    critics its gate and its choice among 2 π0 draws consult), its weights forced into .onnx.data files (the path
    π0-3B's >2 GB graphs take)."""
    from coop_transport.pi0_policy import Pi0Policy
    from coop_transport.residual.checkpoint import save_policy
    from coop_transport.residual.config import ResidualConfig
    from coop_transport.residual.system import ResidualSystem, make_agents

    root = tmp_path_factory.mktemp("residual")
    checkpoint = make_checkpoint(root / "ckpt", name="tiny")
    vla = Pi0Policy.load(checkpoint, device="cpu")
    config = ResidualConfig(arch="V5", vla=checkpoint, chunk=4, latent_dim=32, encoder_width=16, encoder_heads=2,
                            encoder_layers=1, hidden_dim=32, gate_margin=0.0, candidates=2)
    torch.manual_seed(0)
    agents = make_agents(config.spec, config, vla)
    for p in agents.parameters():  # move zero-initialized layers (FiLM, actor output) off zero
        p.data += 0.05 * torch.randn_like(p)
    run = save_policy(root / "v5", ResidualSystem(config.spec, config, vla, agents, "cpu"), config, 0)
    manifest = main(ExportConfig(out=root / "onnx", checkpoint=checkpoint, samples=(4,), residual=run,
                                 external_data=True, parity_trials=1, parity_backends=("onnxruntime-cpu",)),
                    log=lambda *_: None)
    return {"root": root, "checkpoint": checkpoint, "run": run, "out": root / "onnx", "manifest": manifest}


def test_residual_networks_exported_with_parity(tiny_with_residual):
    manifest = tiny_with_residual["manifest"]
    kinds = {name: g["kind"] for name, g in manifest["graphs"].items()}
    assert kinds == {"pi0_chunk_b1_n4": "pi0_chunk_sampler", "pi0_chunk_prefix_b1_n8": "pi0_chunk_sampler_prefix",
                     **{f"{k}_{a}": k for k in ("rl_token_encoder", "communication_head", "residual_actor")
                        for a in ("robot0", "robot1")},
                     "critic_robot0": "twin_critic", "critic_robot1": "twin_critic"}
    actor = manifest["graphs"]["residual_actor_robot0"]
    assert [i["name"] for i in actor["inputs"]] == ["latent", "proprio", "reference", "message"]
    assert actor["outputs"][0]["shape"] == [1, 4, 7]
    critic = manifest["graphs"]["critic_robot0"]  # 2 draws of N = 4 in one sampler call, rated by the critics
    assert [i["name"] for i in critic["inputs"]] == ["latent", "proprio", "actions", "message"]
    assert [o["name"] for o in critic["outputs"]] == ["q1", "q2"]
    assert manifest["graphs"]["pi0_chunk_prefix_b1_n8"]["settings"]["draws"] == 2
    assert manifest["residual"]["architecture"] == "V5"
    assert manifest["residual"]["vla"]["weights_sha256"] == manifest["source_checkpoint"]["weights_sha256"]
    graphs = manifest["parity"]["graphs"]
    assert set(graphs) == set(kinds) - {"pi0_chunk_b1_n4"}
    assert all(r["pass"] and r["max_abs"] < TOL for r in graphs.values()), graphs
    report = main(ExportConfig(out=tiny_with_residual["out"], mode="verify", parity_backends=("onnxruntime-cpu",)),
                  log=lambda *_: None)  # against the stored PyTorch outputs
    assert all(r["pass"] for r in report["graphs"].values()) and report["onnxruntime-cpu"]["pass"]


def test_residual_run_of_another_checkpoint_is_refused(tiny_with_residual, tmp_path):
    other = make_checkpoint(tmp_path / "other", name="tiny", seed=3)
    with pytest.raises(ExportError, match="not the one .* was trained on"):
        main(ExportConfig(out=tmp_path / "onnx", checkpoint=other, residual=tiny_with_residual["run"], samples=(4,)),
             log=lambda *_: None)
    assert not (tmp_path / "onnx").exists()


def test_external_data_graph(tiny_with_residual):
    """π0-3B's graphs exceed protobuf's 2 GB: their weights go to one .onnx.data file per graph (forced here)."""
    out, manifest = tiny_with_residual["out"], tiny_with_residual["manifest"]
    graph = manifest["graphs"]["pi0_chunk_b1_n4"]
    assert graph["external_data"] == "pi0_chunk_b1_n4.onnx.data" and graph["external_data"] in manifest["files"]
    assert manifest["parity"]["backends"]["onnxruntime-cpu"]["max_abs"] < TOL
    (out / graph["external_data"]).write_bytes(b"\0" * 16)
    with pytest.raises(ExportError, match="truncated"):
        make_backend("onnxruntime", export_dir=out)


def test_auto_backend_prefers_a_matching_export_on_cpu(exported, tmp_path):
    import shutil

    from coop_transport.deploy import auto_backend, load_arm_policy
    from coop_transport.export.runtime import BackendPolicy

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(exported["checkpoint"] / name, checkpoint / name)
    assert auto_backend(str(checkpoint), device="cpu") == "torch"  # no export yet: eager PyTorch
    shutil.copytree(exported["out"], checkpoint / "export")
    assert auto_backend(str(checkpoint), device="cpu") == "onnxruntime"
    policy = load_arm_policy(str(checkpoint), "robot0", backend="auto", device="cpu", threads=1)
    assert isinstance(policy.policy, BackendPolicy)
    assert auto_backend(str(exported["out"]), device="cpu") == "onnxruntime"  # an export directory itself

    other = make_checkpoint(tmp_path / "other", seed=3)  # the same export beside another checkpoint: refused
    shutil.copytree(exported["out"], other / "export")
    with pytest.raises(Exception, match="(?i)checkpoint"):
        load_arm_policy(str(other), "robot0", backend="auto", device="cpu", threads=1)
