"""π0 checkpoints (round trip, refusal of bad ones) and the openpi / LeRobot weight-name mapping. CPU, tiny config."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from coop_transport.policy import (
    CheckpointError,
    WeightLoadingError,
    build_model,
    get_config,
    load_checkpoint,
    load_pi0_weights,
    openpi_state_dict,
    save_checkpoint,
)
from coop_transport.policy.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from coop_transport.policy.config import StreamConfig
from test_policy_model import make_batch


pytestmark = pytest.mark.usefixtures("torch_one_thread_seeded")


NORM_STATS = {"state": {"mean": np.arange(3, dtype=np.float32), "std": np.ones(3)}, "actions": {"q01": [-1.0, -2.0]}}


def _actions(model, config, seed=0):
    batch = make_batch(config, with_actions=False)
    noise = torch.randn(2 * 2, config.action_horizon, config.action_pad_dim, generator=torch.Generator().manual_seed(seed))
    return model.sample_actions(batch, noise=noise, num_samples=2)


# ---- checkpoints -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_round_trip(tmp_path, lora):
    config = get_config("tiny", lora=lora)
    model = build_model(config).eval()
    if lora:  # non-trivial adapters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    path = save_checkpoint(tmp_path / "step_10", model, config, NORM_STATS, step=10, extra={"success": 0.3})
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["step_10"]  # no temporary directories left behind
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and len(meta["weights_sha256"]) == 64 and meta["config"]["name"] == "tiny"

    loaded = load_checkpoint(path)
    assert loaded.config == config and loaded.step == 10 and loaded.extra == {"success": 0.3}
    assert np.array_equal(loaded.norm_stats["state"]["mean"], NORM_STATS["state"]["mean"])
    assert np.array_equal(loaded.norm_stats["actions"]["q01"], [-1.0, -2.0])
    assert torch.equal(_actions(loaded.model, config), _actions(model, config))  # identical outputs, identical noise


def test_checkpoint_overwrite_is_atomic_replace(tmp_path):
    config = get_config("tiny")
    first, second = build_model(config), build_model(config)
    save_checkpoint(tmp_path / "latest", first, config, {}, step=1)
    save_checkpoint(tmp_path / "latest", second, config, {}, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    loaded = load_checkpoint(tmp_path / "latest")
    assert loaded.step == 2
    assert torch.equal(loaded.model.action_out_proj.weight, second.action_out_proj.weight)


def test_save_refuses_a_config_that_is_not_the_models(tmp_path):
    model = build_model(get_config("tiny"))
    with pytest.raises(ValueError, match="differs"):
        save_checkpoint(tmp_path / "x", model, get_config("tiny", action_horizon=8), {}, step=0)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def saved(tmp_path):
    config = get_config("tiny")
    return save_checkpoint(tmp_path / "ckpt", build_model(config), config, NORM_STATS, step=3)


def test_load_refuses_missing_files(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_checkpoint(saved)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_checkpoint(saved.parent / "nowhere")


def test_load_refuses_truncated_weights(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)


def test_load_refuses_corrupt_weights_even_with_matching_hash(saved):
    import hashlib

    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"
    (saved / WEIGHTS_FILE).write_bytes(garbage)
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(saved)


def test_load_refuses_config_weights_mismatch(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["config"]["expert"]["mlp_dim"] = 48  # the weights were saved with 32
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch.*expert.layers.0.mlp"):
        load_checkpoint(saved)


def test_load_refuses_bad_json_and_versions(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "config": {**meta["config"], "bogus": 1}}))
    with pytest.raises(CheckpointError, match="bogus"):
        load_checkpoint(saved)
    (saved / CONFIG_FILE).write_text("{truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)


def test_checkpoint_contains_no_pickle(saved):
    for path in saved.iterdir():
        assert b"\x80\x04\x95" not in path.read_bytes()[:64]  # pickle protocol-4 header


# ---- openpi / LeRobot weight names ---------------------------------------------------------------------------------


def openpi_names(config) -> set[str]:
    """The tensor names openpi's convert_jax_model_to_pytorch.py writes, spelled out from its source."""
    pg, ex = "paligemma_with_expert.paligemma.model.", "paligemma_with_expert.gemma_expert.model."
    vt = pg + "vision_tower.vision_model."
    names = {vt + "embeddings.patch_embedding.weight", vt + "embeddings.patch_embedding.bias",
             vt + "embeddings.position_embedding.weight", vt + "post_layernorm.weight", vt + "post_layernorm.bias",
             pg + "multi_modal_projector.linear.weight", pg + "multi_modal_projector.linear.bias",
             pg + "language_model.embed_tokens.weight", pg + "language_model.norm.weight", ex + "norm.weight"}
    for i in range(config.vision.depth):
        layer = f"{vt}encoder.layers.{i}."
        for part in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.out_proj"):
            names |= {layer + part + ".weight", layer + part + ".bias"}
    for prefix, depth in ((pg + "language_model.", config.vlm.depth), (ex, config.expert.depth)):
        for i in range(depth):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                         "post_attention_layernorm"):
                names.add(f"{prefix}layers.{i}.{part}.weight")
    for proj in ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"):
        names |= {proj + ".weight", proj + ".bias"}
    return names


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    sb = {k.replace(".base_layer.", "."): v for k, v in sb.items() if "lora_" not in k}
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_openpi_names_round_trip(tmp_path):
    config = get_config("tiny")
    source = build_model(config)
    exported = openpi_state_dict(source)
    assert set(exported) == openpi_names(config)
    save_file(exported, str(tmp_path / "model.safetensors"))

    target = build_model(config)  # another random init
    load_pi0_weights(target, tmp_path)
    _assert_same_weights(source, target)
    # The public entry point, LoRA included: weights land in the adapters' base layers.
    lora_target = build_model(get_config("tiny", lora=True), weights=str(tmp_path))
    _assert_same_weights(source, lora_target)


def test_openpi_file_layouts(tmp_path):
    config = get_config("tiny")
    source = build_model(config)
    exported = openpi_state_dict(source)
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"

    # openpi's save_model keeps one name of PaliGemma's tied embedding pair: lm_head. The expert's unused lm_head
    # is in the file too.
    openpi_file = {k: v for k, v in exported.items() if k != embed}
    openpi_file["paligemma_with_expert.paligemma.lm_head.weight"] = exported[embed]
    openpi_file["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(7, config.expert.width)
    openpi_file[
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_ids"
    ] = torch.arange(4)[None]
    # LeRobot: everything under "model.", older transformers layout (language_model.model.*, vision_tower.*).
    legacy = {}
    for k, v in exported.items():
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        k = k.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
        legacy["model." + k] = v
    for i, state in enumerate((openpi_file, legacy)):
        path = tmp_path / f"layout{i}.safetensors"
        save_file(state, str(path))
        target = build_model(config)
        load_pi0_weights(target, path)
        _assert_same_weights(source, target)


def test_weight_loading_errors_list_offenders(tmp_path):
    config = get_config("tiny")
    exported = openpi_state_dict(build_model(config))
    broken = dict(exported)
    del broken["action_out_proj.bias"]
    broken["paligemma_with_expert.something_new.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightLoadingError, match=r"(?s)missing \(1\): action_out_proj.bias.*something_new"):
        load_pi0_weights(build_model(config), tmp_path / "broken.safetensors")

    # The joint setting's wider state input: refused, unless explicitly allowed to stay freshly initialised.
    save_file(exported, str(tmp_path / "model.safetensors"))
    joint = build_model(get_config("tiny", setting="joint"))
    with pytest.raises(WeightLoadingError, match=r"state_proj.weight: file \(16, 32\) vs model \(16, 64\)"):
        load_pi0_weights(joint, tmp_path)
    state_proj = joint.state_proj.weight.detach().clone()
    load_pi0_weights(joint, tmp_path, skip_mismatched=("state_proj.",))
    assert torch.equal(joint.state_proj.weight, state_proj)
    assert torch.equal(joint.action_in_proj.weight, exported["action_in_proj.weight"])

    other = build_model(get_config("tiny", expert=StreamConfig(width=16, depth=2, num_heads=2, num_kv_heads=1,
                                                               head_dim=16, mlp_dim=24)))
    with pytest.raises(WeightLoadingError, match="shape mismatch"):
        load_pi0_weights(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no π0 weights"):
        load_pi0_weights(other, tmp_path / "empty_dir_that_does_not_exist")


def test_exported_file_loads_back_as_plain_tensors(tmp_path):
    config = get_config("tiny")
    save_file(openpi_state_dict(build_model(config)), str(tmp_path / "model.safetensors"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    with pytest.raises(ValueError, match="merge"):
        openpi_state_dict(build_model(get_config("tiny", lora=True)))
