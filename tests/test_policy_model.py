"""π0 model: attention mask, flow-matching loss, KV-cached sampler, learning a bimodal distribution, LoRA, configs,
tokenizers, image transforms. Small and CPU-only; nothing may be downloaded (HF_HUB_OFFLINE)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: any download attempt fails
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from coop_transport.policy import (
    EMA,
    ByteTokenizer,
    PaliGemmaTokenizer,
    augment_images,
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
    get_config,
    make_attention_mask,
    make_tokenizer,
    merge_lora,
    to_model_images,
    trainable_parameter_filter,
)
from coop_transport.policy.config import StreamConfig, VisionConfig
from coop_transport.policy.lora import LORA_TARGET_MODULES
from coop_transport.policy.model import fold_mask_for_gqa, rope_cos_sin


def make_batch(config, batch_size=2, seed=0, with_actions=True):
    """A random batch for `config`: uint8 images, prompt with padding, one camera masked out in row 0."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    tokens, mask = ByteTokenizer(config.max_token_len).encode_batch(["go"] * batch_size)
    batch = {
        "images": {c: torch.randint(0, 256, (batch_size, size, size, 3), generator=g, dtype=torch.uint8)
                   for c in config.cameras},
        "image_masks": {config.cameras[0]: torch.tensor([False] + [True] * (batch_size - 1))},
        "prompt_tokens": torch.from_numpy(tokens),
        "prompt_mask": torch.from_numpy(mask),
        "state": torch.randn(batch_size, config.state_dim, generator=g),
    }
    if with_actions:
        batch["actions"] = torch.randn(batch_size, config.action_horizon, config.action_dim, generator=g)
    return batch


pytestmark = pytest.mark.usefixtures("torch_one_thread_seeded")


# ---- attention mask ------------------------------------------------------------------------------------------------


def test_attention_mask_pi0_blocks():
    # prefix: 2 real tokens + 1 padding (one bidirectional block); then the state block; then 2 action tokens.
    input_mask = torch.tensor([[True, True, False, True, True, True]])
    block_starts = torch.tensor([False, False, False, True, True, False])
    expected = torch.tensor([
        # keys: p0 p1 pad st a0 a1
        [1, 1, 0, 0, 0, 0],  # p0: the prefix sees only the (real) prefix, bidirectionally
        [1, 1, 0, 0, 0, 0],  # p1
        [0, 0, 0, 0, 0, 0],  # padding sees nothing
        [1, 1, 0, 1, 0, 0],  # state: prefix + itself, not the actions
        [1, 1, 0, 1, 1, 1],  # actions: everything real, bidirectional among themselves
        [1, 1, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(make_attention_mask(input_mask, block_starts)[0], expected)


def test_attention_mask_big_vision_examples():
    real = torch.ones(1, 4, dtype=torch.bool)
    causal = make_attention_mask(real, torch.tensor([True, True, True, True]))[0]
    assert torch.equal(causal, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    prefix_lm = make_attention_mask(real, torch.tensor([False, False, True, True]))[0]
    assert prefix_lm[:2, :2].all() and not prefix_lm[:2, 2:].any() and torch.equal(
        prefix_lm[2:], torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_model_uses_pi0_block_layout():
    model = build_model(get_config("tiny"))
    prefix_mask = torch.tensor([[True, True, False]])
    mask, positions = model._full_mask_and_positions(prefix_mask)
    horizon = model.config.action_horizon
    assert mask.shape == (1, 3 + 1 + horizon, 3 + 1 + horizon)
    state_row, action_rows = mask[0, 3], mask[0, 4:]
    assert state_row[:2].all() and not state_row[2] and state_row[3] and not state_row[4:].any()
    assert action_rows[:, [0, 1, 3]].all() and action_rows[:, 4:].all() and not action_rows[:, 2].any()
    assert not mask[0, :3, 3:].any()  # the prefix never sees the suffix
    assert positions[0].tolist() == [0, 1, 1, 2] + list(range(3, 3 + horizon))  # padding does not advance


# ---- flow matching ---------------------------------------------------------------------------------------------------


def test_loss_with_zero_velocity_is_mean_square_target_over_real_entries():
    config = get_config("tiny")
    model = build_model(config)
    torch.nn.init.zeros_(model.action_out_proj.weight)
    torch.nn.init.zeros_(model.action_out_proj.bias)
    batch = make_batch(config)
    batch["action_pad_mask"] = torch.ones(2, config.action_horizon, dtype=torch.bool)
    batch["action_pad_mask"][1, -1] = False  # a step past the episode end
    noise = torch.randn(2, config.action_horizon, config.action_pad_dim)
    loss, info = model.compute_loss(batch, noise=noise, time=torch.tensor([0.3, 0.8]))
    target = noise[..., : config.action_dim] - batch["actions"]  # u = noise - actions on the real dims only
    real = batch["action_pad_mask"][:, :, None].expand_as(target)
    assert torch.allclose(loss, (target**2)[real].mean(), atol=1e-6)
    assert torch.allclose(info["losses/flow_matching"], loss)


def test_object_state_head_adds_its_weighted_error_trains_the_encoder_and_leaves_sampling_alone():
    """The auxiliary head (config.object_state_dim): loss = flow matching + w * MSE of the head's prediction; its
    gradient reaches the image encoder; sampling is the same with or without it; misuse is refused."""
    config = get_config("tiny", object_state_dim=5)
    model = build_model(config)
    batch = make_batch(config)
    batch["object_state"] = torch.randn(2, 5)
    noise = torch.randn(2, config.action_horizon, config.action_pad_dim)
    time = torch.tensor([0.3, 0.8])
    flow, _ = model.compute_loss(batch, noise=noise, time=time)
    total, info = model.compute_loss(batch, noise=noise, time=time, object_state_weight=0.5)
    _, prefix_out, prefix_mask = model.predict_velocity(batch, noise, time, return_prefix=True)
    expected = ((model.predict_object_state(prefix_out, prefix_mask) - batch["object_state"]) ** 2).mean()
    assert torch.allclose(info["losses/object_state"], expected, atol=1e-6)
    assert torch.allclose(total, flow + 0.5 * expected, atol=1e-6)

    model.zero_grad()
    (total - flow).backward()  # the auxiliary term alone
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.action_out_proj.weight.grad is None or model.action_out_proj.weight.grad.abs().sum() == 0

    plain = build_model(get_config("tiny"))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("object_state_head.") for k in unexpected)
    sample_noise = torch.randn(2, config.action_horizon, config.action_pad_dim)
    with_head = model.sample_actions(make_batch(config, with_actions=False), noise=sample_noise)
    without = plain.sample_actions(make_batch(config, with_actions=False), noise=sample_noise)
    assert torch.equal(with_head, without)

    with pytest.raises(ValueError, match="object-state head"):
        plain.compute_loss(batch, object_state_weight=0.5)
    with pytest.raises(ValueError, match="object_state"):
        model.compute_loss({k: v for k, v in batch.items() if k != "object_state"}, object_state_weight=0.5)
    with pytest.raises(ValueError, match="object_state_dim"):
        get_config("tiny", object_state_dim=-1)


def test_time_sampling_follows_pi0():
    model = build_model(get_config("tiny"))
    time = model.sample_time(200_000, "cpu")
    assert time.min() >= 0.001 and time.max() <= 1.0
    assert abs(time.mean().item() - (0.6 * 0.999 + 0.001)) < 3e-3  # E[Beta(1.5, 1)] = 0.6
    assert abs((time < 0.5).float().mean().item() - 0.5**1.5) < 5e-3  # P(Beta(1.5, 1) < x) = x^1.5


def test_posemb_rope_helpers_are_finite():
    cos, sin = rope_cos_sin(torch.arange(5)[None], 16)
    assert torch.allclose(cos**2 + sin**2, torch.ones(1, 5, 16), atol=1e-6)
    mask = torch.tensor([[[True, False], [True, True]]])
    folded = fold_mask_for_gqa(mask, groups=3, dtype=torch.float32)
    assert folded.shape == (1, 1, 6, 2) and torch.isinf(folded[0, 0, ::2, 1]).all() and (folded[0, 0, 1::2] == 0).all()


# ---- inference ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["per_arm", "joint"])
def test_kv_cached_velocity_equals_full_pass(setting):
    config = get_config("tiny", setting=setting)
    model = build_model(config).eval()
    batch = make_batch(config, batch_size=3, with_actions=False)
    x_t = torch.randn(3, config.action_horizon, config.action_pad_dim)
    time = torch.tensor([1.0, 0.55, 0.1])
    with torch.no_grad():
        full = model.predict_velocity(batch, x_t, time)
        cache = model.prepare_prefix(batch)
        cached = model.denoise_velocity(cache, x_t, time)
        # N samples per observation share the expanded cache: rows b * N + n.
        cache3 = model.prepare_prefix(batch, num_samples=2)
        cached3 = model.denoise_velocity(cache3, x_t.repeat_interleave(2, 0), time.repeat_interleave(2, 0))
        # The written-out attention (what the compiled GPU sampler runs) computes the same velocity.
        matmul = model.denoise_velocity(model.prepare_prefix(batch, attention="matmul"), x_t, time, attention="matmul")
    assert torch.allclose(full, cached, atol=1e-5), (full - cached).abs().max()
    assert torch.allclose(cached3, cached.repeat_interleave(2, 0), atol=1e-5)
    assert torch.allclose(matmul, cached, atol=1e-5), (matmul - cached).abs().max()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        model.prepare_prefix(batch, attention="flash")


def test_prefix_hidden_states_ignore_the_suffix():
    config = get_config("tiny")
    model = build_model(config).eval()
    batch = make_batch(config, with_actions=False)
    with torch.no_grad():
        cache = model.prepare_prefix(batch)
        prefix, prefix_mask = model.embed_prefix(batch)
        mask, positions = model._full_mask_and_positions(prefix_mask)
        cos, sin = rope_cos_sin(positions, config.vlm.head_dim)
        for scale in (0.0, 10.0):  # the suffix content must not matter to the prefix
            suffix = model.embed_suffix(model.pad_state(batch["state"]),
                                        scale * torch.randn(2, config.action_horizon, config.action_pad_dim),
                                        torch.rand(2))
            prefix_out, _, _ = model.run_layers(prefix, suffix, fold_mask_for_gqa(mask, config.vlm.num_heads // config.vlm.num_kv_heads, torch.float32), cos, sin)
            real = prefix_mask[:, :, None]
            assert torch.allclose(prefix_out * real, cache.prefix_hidden * real, atol=1e-5)
    assert torch.equal(cache.prefix_embeddings, prefix)
    assert cache.prefix_embeddings.shape == (2, config.num_prefix_tokens, config.vlm.width)


def test_sample_actions_shapes_noise_and_sample_order():
    config = get_config("tiny")
    model = build_model(config).eval()
    batch = make_batch(config, with_actions=False)
    noise = torch.randn(2 * 3, config.action_horizon, config.action_pad_dim)
    actions, cache = model.sample_actions(batch, noise=noise, num_samples=3, return_prefix=True)
    assert actions.shape == (6, config.action_horizon, config.action_dim) and actions.dtype == torch.float32
    assert torch.equal(actions, model.sample_actions(batch, noise=noise, num_samples=3))  # deterministic given noise
    second = {k: ({c: t[1:] for c, t in v.items()} if isinstance(v, dict) else v[1:]) for k, v in batch.items()}
    alone = model.sample_actions(second, noise=noise[3:], num_samples=3)  # observation 1 on its own
    assert torch.allclose(actions[3:], alone, atol=1e-5)
    assert cache.prefix_hidden.shape == (2, config.num_prefix_tokens, config.vlm.width)
    with pytest.raises(ValueError, match="noise has shape"):
        model.sample_actions(batch, noise=noise[:, :, : config.action_dim], num_samples=3)


def test_policy_samples_in_groups_as_each_group_alone():
    """Pi0Policy.sample_batch(..., groups=G): the critics' K draws of N samples take K passes over one prefix.
    Group g of a row is computed exactly as N samples alone on its noise, and all together agree with one pass of
    G x N samples (which may round differently)."""
    from coop_transport.pi0_policy import Pi0Policy
    from coop_transport.utils.synthetic import random_arm_batch

    policy = Pi0Policy.load(device="cpu")  # the shipped per-arm default
    rows, n, groups = 2, 4, 3
    batch = random_arm_batch(policy, rows, np.random.default_rng(0))  # prompted as robot0, robot1
    pad = (policy.config.action_horizon, policy.config.action_pad_dim)
    noise = torch.randn(rows * groups * n, *pad, generator=torch.Generator().manual_seed(0))
    grouped, cache = policy.sample_batch(batch, n, noise=noise, return_prefix=True, groups=groups)
    assert grouped.shape == (rows, groups * n, policy.horizon, 7)
    for g in range(groups):
        alone = policy.sample_batch(batch, n, noise=noise.view(rows, groups, n, *pad)[:, g].reshape(rows * n, *pad))
        assert np.array_equal(grouped[:, g * n:(g + 1) * n], alone)
    np.testing.assert_allclose(grouped, policy.sample_batch(batch, groups * n, noise=noise), atol=1e-4)
    _, single = policy.sample_batch(batch, n, noise=noise[: rows * n], return_prefix=True)
    assert torch.equal(cache.prefix_hidden, single.prefix_hidden) and torch.equal(cache.prefix_mask,
                                                                                  single.prefix_mask)


def test_regionally_compiled_sampler_matches_eager_and_compiles_each_region_once():
    """inference.regional_compiled_sampler (the compiled path behind torch-compile-cudagraph; Inductor also runs on
    the CPU): the same actions as eager for the same noise, and the flow step is compiled once for all ten steps."""
    from coop_transport.inference import regional_compiled_sampler

    torch._dynamo.reset()
    config = get_config("tiny")
    model = build_model(config).eval()
    batch = make_batch(config, with_actions=False)
    noise = torch.randn(2 * 4, config.action_horizon, config.action_pad_dim)
    sample = regional_compiled_sampler(model)
    with torch.no_grad():
        compiled = sample(batch, noise=noise, num_samples=4)
        again = sample(batch, noise=noise, num_samples=4)
    eager = model.sample_actions(batch, noise=noise, num_samples=4)
    assert torch.allclose(compiled, eager, atol=1e-4), (compiled - eager).abs().max()
    assert torch.equal(compiled, again)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == 2, dict(frames)  # prefix + one flow step: no recompilation per step or per call
    with pytest.raises(ValueError, match="own CUDA graphs"):
        regional_compiled_sampler(model, mode="reduce-overhead")


def test_sampler_reproduces_a_state_conditioned_bimodal_distribution():
    """Flow matching must keep both modes (a regression model would collapse to their mean)."""
    config = get_config("tiny", cameras=("agentview",), action_dim=2, state_dim=2, action_pad_dim=4,
                        vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=1, mlp_dim=32))
    model = build_model(config)
    tokens, mask = ByteTokenizer(config.max_token_len).encode("go")
    g = torch.Generator().manual_seed(0)

    def batch_for(sign: torch.Tensor) -> dict:
        n = sign.shape[0]
        return {"images": {"agentview": torch.zeros(n, 16, 16, 3, dtype=torch.uint8)},
                "prompt_tokens": torch.from_numpy(tokens)[None].expand(n, -1),
                "prompt_mask": torch.from_numpy(mask)[None].expand(n, -1),
                "state": torch.stack([sign, torch.zeros(n)], -1)}

    # actions: the whole chunk sits at 0.5 * s + 0.5 * m for a fair coin m = +-1, plus small noise.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        sign = torch.randint(0, 2, (64,), generator=g).float() * 2 - 1
        mode = torch.randint(0, 2, (64,), generator=g).float() * 2 - 1
        batch = batch_for(sign)
        batch["actions"] = (0.5 * sign + 0.5 * mode)[:, None, None] + 0.05 * torch.randn(64, 4, 2, generator=g)
        loss, _ = model.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    for s in (-1.0, 1.0):
        actions = model.sample_actions(batch_for(torch.full((256,), s)))
        chunk_mean = actions.mean(dim=(1, 2))  # (256,)
        low, high = 0.5 * s - 0.5, 0.5 * s + 0.5
        near_a_mode = torch.minimum((chunk_mean - low).abs(), (chunk_mean - high).abs()) < 0.2
        upper = (chunk_mean > 0.5 * s).float().mean().item()
        assert abs(actions.mean().item() - 0.5 * s) < 0.2
        assert abs(actions.std().item() - 0.5) < 0.15
        assert near_a_mode.float().mean() > 0.7 and 0.25 < upper < 0.75


# ---- LoRA and trainable parameters -----------------------------------------------------------------------------------


def _lora_param_count(config) -> int:
    """r * (in + out) for every adapted projection of both streams (independent of peft)."""
    total = 0
    for stream, rank in ((config.vlm, config.lora_rank_vlm), (config.expert, config.lora_rank_expert)):
        q, kv = stream.num_heads * stream.head_dim, stream.num_kv_heads * stream.head_dim
        shapes = [(stream.width, q), (stream.width, kv), (stream.width, kv), (q, stream.width),
                  (stream.width, stream.mlp_dim), (stream.width, stream.mlp_dim), (stream.mlp_dim, stream.width)]
        total += stream.depth * sum(rank * (i + o) for i, o in shapes)
    return total


def _gemma_base_count(config) -> int:
    total = config.vocab_size * config.vlm.width
    for stream in (config.vlm, config.expert):
        q, kv = stream.num_heads * stream.head_dim, stream.num_kv_heads * stream.head_dim
        per_layer = stream.width * (2 * q + 2 * kv) + 3 * stream.width * stream.mlp_dim + 2 * stream.width
        total += stream.depth * per_layer + stream.width
    return total


@pytest.mark.parametrize("name,lora", [("tiny", False), ("small", False), ("small", True), ("pi0-3b", True)])
def test_trainable_and_frozen_parameter_counts(name, lora):
    config = get_config(name, lora=lora)
    with torch.device("meta"):  # pi0-3b's 3.3 B parameters without allocating them
        model = build_model(config)
    counts = count_parameters(model)
    if not lora:
        assert counts["frozen"] == 0
        return
    assert counts["frozen"] == _gemma_base_count(config)  # exactly the Gemma base weights
    assert counts["trainable"] == counts["total"] - _gemma_base_count(config)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == _lora_param_count(config)
    for n, p in model.named_parameters():
        assert p.requires_grad == trainable_parameter_filter(n, config)
    if name == "pi0-3b":
        assert 3.2e9 < counts["total"] < 3.3e9  # π0: PaliGemma 3B + 300M expert
        expert_base = sum(p.numel() for n, p in model.named_parameters() if n.startswith("expert.") and "lora_" not in n)
        assert 310e6 < expert_base < 312e6  # openpi: "gemma_300m: 311M params"


def test_lora_ranks_and_targets():
    model = build_model(get_config("tiny", lora=True))
    assert model.vlm.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 16
    assert model.expert.layers[1].mlp.down_proj.lora_A["default"].weight.shape[0] == 32
    assert model.expert.layers[1].mlp.down_proj.scaling["default"] == 1.0  # alpha / rank = 32 / 32
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * 2 * 7 and all(__import__("re").fullmatch(LORA_TARGET_MODULES, n) for n in adapted)
    assert not any("vision" in n for n in adapted)


def test_lora_step_changes_adapters_only():
    config = get_config("tiny", lora=True, lora_train_vision=False)
    model = build_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for seed in range(2):  # lora_B starts at 0, so lora_A gets a gradient from the second step on
        loss, _ = model.compute_loss(make_batch(config, seed=seed))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The VLM's last layer only feeds the actions through its keys and values: its q, o and MLP (and their
    # adapters) get no gradient from the action loss, in π0 as here.
    last = f"vlm.layers.{config.vlm.depth - 1}."
    unused = (last + "self_attn.q_proj", last + "self_attn.o_proj", last + "mlp.")
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        if ("lora_" in n and not n.startswith(unused)) or n.startswith(("action_", "state_proj")):
            assert changed, n
        elif n.startswith(("vlm.", "expert.", "vision.", "image_projector.")):
            assert not changed, n  # frozen base weights and (here) the frozen image encoder


def test_merge_lora_keeps_outputs():
    config = get_config("tiny", lora=True)
    model = build_model(config).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # make the adapters matter
    batch = make_batch(config, with_actions=False)
    noise = torch.randn(2, config.action_horizon, config.action_pad_dim)
    with_adapters = model.sample_actions(batch, noise=noise)
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.sample_actions(batch, noise=noise), with_adapters, atol=1e-5)


def test_ema_update_rule():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 0.1)
    ema.copy_to(model)
    assert torch.allclose(model.weight, start + 0.1)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


# ---- configs -----------------------------------------------------------------------------------------------------------


def test_config_registry_and_validation():
    assert get_config("pi0-3b").action_horizon == 50 and get_config("pi0-3b").lora and get_config("small").ema_decay
    joint = get_config("small", setting="joint")
    assert joint.action_dim == 14 and joint.state_dim == 36 and len(joint.cameras) == 3
    with pytest.raises(ValueError, match="Did you mean 'pi0-3b'"):
        get_config("pi0_3b")
    with pytest.raises(ValueError, match="action_horizon"):
        get_config("small", action_horizn=3)
    with pytest.raises(ValueError, match="depth"):
        get_config("small", expert=StreamConfig(width=128, depth=2, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=64))
    with pytest.raises(ValueError, match="40"):
        get_config("small", action_dim=40)
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=96, patch_size=10)
    with pytest.raises(ValueError, match="ema_decay"):
        get_config("small", ema_decay=1.5)


def test_config_dict_round_trip():
    for name in ("small", "pi0-3b"):
        config = get_config(name, setting="joint")
        assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({**config_to_dict(get_config("small")), "bogus": 1})


# ---- tokenizers --------------------------------------------------------------------------------------------------------


def test_byte_tokenizer():
    tokens, mask = ByteTokenizer(8).encode("a_b")
    assert tokens.tolist() == [1, 3 + ord("a"), 3 + ord(" "), 3 + ord("b"), 3 + ord("\n"), 0, 0, 0]
    assert mask.tolist() == [True] * 5 + [False] * 3
    with pytest.warns(UserWarning, match="truncated"):
        tokens, mask = ByteTokenizer(4).encode("long prompt")
    assert mask.all() and tokens[0] == 1
    assert ByteTokenizer(32).decode(ByteTokenizer(32).encode("pick up")[0]) == "pick up\n"
    assert isinstance(make_tokenizer(get_config("small")), ByteTokenizer)


def test_paligemma_tokenizer_is_local_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        make_tokenizer(get_config("pi0-3b"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        make_tokenizer(get_config("pi0-3b"), tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "go": 3, "left": 4, "<unk>": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    paligemma = make_tokenizer(get_config("pi0-3b"), tmp_path)
    assert isinstance(paligemma, PaliGemmaTokenizer)
    tokens, mask = paligemma.encode("go_left")
    assert tokens[:3].tolist() == [2, 3, 4] and mask.sum() == 3 and tokens.shape == (48,)


# ---- images ------------------------------------------------------------------------------------------------------------


def test_image_preprocessing():
    image = torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8).expand(1, 4, 4, 3)
    out = to_model_images(image, 4)
    assert out.shape == (1, 3, 4, 4) and out[0, 0].eq(-1).all() and out[0, 1].eq(1).all()
    wide = to_model_images(torch.zeros(2, 8, 16, 3), 8)  # aspect kept: 4 rows of image, 2 + 2 rows of padding
    assert wide.shape == (2, 3, 8, 8) and wide[:, :, :2].eq(-1).all() and wide[:, :, 2:6].eq(0).all()
    with pytest.raises(ValueError, match="RGB"):
        to_model_images(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), 4)


def test_augmentation_keeps_shape_range_and_spares_wrist_geometry():
    g = torch.Generator().manual_seed(0)
    images = {"wrist": torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8),
              "agentview": torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)}
    out = augment_images(images, generator=g)
    for camera, image in out.items():
        assert image.shape == (3, 32, 32, 3) and image.min() >= -1 and image.max() <= 1
    # Colour jitter alone keeps a uniform image uniform; crop + rotation would not (black corners).
    flat = {"wrist": torch.full((2, 32, 32, 3), 128, dtype=torch.uint8),
            "agentview": torch.full((2, 32, 32, 3), 128, dtype=torch.uint8)}
    out = augment_images(flat, generator=g)
    assert out["wrist"].std(dim=(1, 2, 3)).max() < 1e-5
    assert out["agentview"].std(dim=(1, 2, 3)).min() > 1e-3


def test_model_accepts_float_images_and_missing_camera_errors():
    config = get_config("tiny")
    model = build_model(config).eval()
    batch = make_batch(config, with_actions=False)
    as_float = dict(batch, images={c: v.float() / 127.5 - 1 for c, v in batch["images"].items()})
    noise = torch.randn(2, config.action_horizon, config.action_pad_dim)
    assert torch.allclose(model.sample_actions(batch, noise=noise), model.sample_actions(as_float, noise=noise), atol=1e-5)
    with pytest.raises(ValueError, match="lacks cameras"):
        model.sample_actions(dict(batch, images={}))
    with pytest.raises(ValueError, match="state has width"):
        model.sample_actions(dict(batch, state=torch.zeros(2, 3)))


def test_no_network_needed():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    build_model(get_config("tiny", setting="joint"))  # builds offline (random init, byte tokenizer)
    assert np.isfinite(count_parameters(build_model(get_config("tiny")))["total"])
