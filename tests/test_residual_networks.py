"""Residual networks and updates: the residual bound, FiLM's identity, V4's independence, the architectures.

CPU, small widths, no simulation."""

import copy
from types import SimpleNamespace

import pytest
import torch

from coop_transport.residual.architectures import ARCHS, get_arch
from coop_transport.residual.buffers import transition_fields
from coop_transport.residual.config import ResidualConfig
from coop_transport.residual.networks import FiLM, ResidualActor, sample_message
from coop_transport.residual.system import Boundary, ResidualSystem, make_agents
from coop_transport.residual.update import Learner

C = 3  # chunk


def small_config(arch: str, **kw) -> ResidualConfig:
    return ResidualConfig(arch=arch, chunk=C, latent_dim=16, encoder_width=8, encoder_heads=2, encoder_layers=1,
                          hidden_dim=16, batch_size=8, **kw)


def fake_system(arch: str, seed: int = 0):
    """What Learner and ResidualSystem.act need, without π0: agents sized for a 6-token, 12-wide prefix."""
    torch.manual_seed(seed)
    config = small_config(arch)
    spec = get_arch(arch)
    vla = SimpleNamespace(config=SimpleNamespace(vlm=SimpleNamespace(width=12), num_prefix_tokens=6))
    return SimpleNamespace(spec=spec, config=config, agents=make_agents(spec, config, vla), agent_names=spec.agents,
                           pose_mean=torch.zeros(6), pose_std=torch.ones(6), device=torch.device("cpu"))


def random_boundary(system, envs: int, ref_range: float = 1.0) -> Boundary:
    """A chunk boundary of ``envs`` environments: references uniform in ±ref_range, random latents, proprioception
    and (where the architecture has one) received messages."""
    spec, cfg = system.spec, system.config
    n = len(spec.agents)
    g = torch.Generator().manual_seed(0)
    b = Boundary(ref=(torch.rand(envs, n, C, spec.action_dim, generator=g) * 2 - 1) * ref_range,
                 proprio=torch.randn(envs, n, spec.proprio_dim, generator=g),
                 latent=torch.randn(envs, n, cfg.latent_dim, generator=g), sent=None, received=None)
    received_dim = spec.message_dim(cfg.message_dim, C)
    if received_dim:
        b.received = torch.randn(envs, n, received_dim, generator=g)
    return b


def random_batch(system, n: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    spec, cfg = system.spec, system.config
    fields = transition_fields(len(spec.agents), cfg.latent_dim, spec.proprio_dim, cfg.chunk, spec.action_dim)
    batch = {}
    for k, (shape, dtype) in fields.items():
        if dtype == torch.int64:
            batch[k] = torch.randint(5, (n, *shape), generator=g)
        else:
            batch[k] = torch.rand((n, *shape), generator=g) if k in ("gripper", "ready", "done", "discount") \
                else torch.randn((n, *shape), generator=g)
    batch["gripper"], batch["ready"], batch["done"] = (batch[k].round() for k in ("gripper", "ready", "done"))
    return batch


# ------------------------------------------------------------------------------------------------ architectures
def test_unknown_architecture_lists_the_six():
    with pytest.raises(ValueError) as err:
        get_arch("V7")
    for name in ("B1", "B2", "V3", "V4", "V5", "V6"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="V4"):
        ResidualConfig(arch="V7")


def test_architecture_table():
    assert [a for a, s in ARCHS.items() if s.trains] == ["V3", "V4", "V5", "V6"]
    assert get_arch("V3").agents == ("joint",) and get_arch("V3").action_dim == 14 and get_arch("V3").proprio_dim == 36
    assert get_arch("V4").agents == ("robot0", "robot1") and get_arch("V4").message_dim(16, 10) == 0
    assert get_arch("V5").message_dim(16, 10) == 16 and get_arch("V6").message_dim(16, 10) == 70
    assert get_arch("V5").partner("robot0") == "robot1" and get_arch("V4").partner("robot0") is None


def test_agents_share_architecture_not_weights():
    system = fake_system("V5")
    a, b = system.agents["robot0"], system.agents["robot1"]
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert not {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}


# ------------------------------------------------------------------------------------------------------- bound
@pytest.mark.parametrize("message_dim", [0, 16])
def test_residual_never_leaves_ref_plus_minus_radius(message_dim):
    torch.manual_seed(0)
    actor = ResidualActor(latent_dim=16, proprio_dim=18, chunk=C, action_dim=7, message_dim=message_dim, hidden=16)
    assert torch.allclose(actor.scale(), torch.full((7,), 0.05))  # starts at half of the 0.10 bound
    for trial in range(20):
        with torch.no_grad():  # random, often huge, weights and residual scales
            for p in actor.parameters():
                p.normal_(0.0, 10.0 ** (trial % 4))
            actor.rho.normal_(0.0, 50.0)
        big = 10.0 ** (trial % 7)
        z, p = torch.randn(32, 16) * big, torch.randn(32, 18) * big
        ref = torch.rand(32, C, 7) * 4 - 2  # references outside [-1, 1] too
        msg = torch.randn(32, message_dim) * big if message_dim else None
        noise = torch.randn(32, C, 7) * big
        s = actor.scale()
        assert (s <= 0.10).all() and (s >= 0).all()
        for out in (actor.residual_action(z, p, ref, msg), actor.residual_action(z, p, ref, msg, noise)):
            assert torch.isfinite(out).all()
            assert ((out - ref).abs() <= s + 1e-6).all()  # before the final clip
            assert ((out - ref).abs() <= 0.10 + 1e-6).all()
        executed = actor(z, p, ref, msg, noise)
        assert executed.abs().max() <= 1.0


@pytest.mark.parametrize("arch", ["V3", "V4"])
def test_gripper_radius_bounds_the_gripper_dimensions_alone(arch):
    """--gripper-radius 2: the gripper rows may move anywhere in [-1, 1] (a release can be held back), the arm rows
    stay within 0.10 of the reference, and every row starts at half its bound."""
    spec = get_arch(arch)
    vla = SimpleNamespace(config=SimpleNamespace(vlm=SimpleNamespace(width=12), num_prefix_tokens=6))
    agent = next(iter(make_agents(spec, small_config(arch, gripper_radius=2.0), vla).values()))
    actor = agent.actor
    grippers = [6] if spec.action_dim == 7 else [6, 13]
    arm_rows = [d for d in range(spec.action_dim) if d not in grippers]
    expected = torch.full((spec.action_dim,), 0.05)
    expected[grippers] = 1.0
    assert torch.allclose(actor.scale(), expected)
    z, p = torch.randn(64, 16), torch.randn(64, spec.proprio_dim)
    ref = torch.full((64, C, spec.action_dim), -1.0)  # every sample says "open"
    with torch.no_grad():
        actor.rho.fill_(30.0)  # scales at their bounds
        actor.out.bias.fill_(30.0)  # tanh(Δ) -> 1: the largest push up in every row
    out = actor.residual_action(z, p, ref)
    assert torch.allclose(out[..., arm_rows], torch.full_like(out[..., arm_rows], -0.9), atol=1e-4)
    assert (actor(z, p, ref)[..., grippers] > 0.99).all()  # the open command turned into a full close
    for trial in range(10):  # any weights: |a - ref| <= the row's bound before the final clip
        with torch.no_grad():
            for q in actor.parameters():
                q.normal_(0.0, 10.0 ** (trial % 3))
        noisy_ref = torch.rand(64, C, spec.action_dim) * 2 - 1
        gap = (actor.residual_action(z, p, noisy_ref, noise=torch.randn(64, C, spec.action_dim) * 5) - noisy_ref).abs()
        assert (gap[..., arm_rows] <= 0.10 + 1e-6).all() and (gap[..., grippers] <= 2.0 + 1e-6).all()
    # the paper's actor is unchanged by the option's existence; a bad value or a residual-free arch is refused
    assert torch.allclose(ResidualActor(16, 18, C, 7, hidden=16).bound, torch.full((7,), 0.10))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="gripper_radius"):
            small_config(arch, gripper_radius=bad)
    with pytest.raises(ValueError, match="gripper_radius"):
        ResidualConfig(arch="B1", gripper_radius=2.0)


@pytest.mark.parametrize("arch", ["V3", "V5"])
def test_gripper_exploration_has_its_own_noise(arch):
    """--gripper-explore-std 0: exploring chunks move the arm rows only (the gripper rows equal the deterministic
    chunk's); unset, every row draws explore_std exactly as before the option existed."""
    system = fake_system(arch)
    spec, cfg = system.spec, system.config
    e = 3
    grippers = [6] if spec.action_dim == 7 else [6, 13]
    arm_rows = [d for d in range(spec.action_dim) if d not in grippers]
    b = random_boundary(system, e, ref_range=0.8)
    received_dim = spec.message_dim(cfg.message_dim, C)
    plain = ResidualSystem.act(system, b, torch.Generator().manual_seed(1), explore=False)
    system.config = cfg.replace(gripper_explore_std=0.0)
    quiet = ResidualSystem.act(system, b, torch.Generator().manual_seed(1), explore=True)
    assert torch.equal(quiet[..., grippers], plain[..., grippers])
    assert not torch.allclose(quiet[..., arm_rows], plain[..., arm_rows])
    system.config = cfg  # unset: the draw of the paper's recipe, noise = explore_std * randn on every row
    explored = ResidualSystem.act(system, b, torch.Generator().manual_seed(1), explore=True)
    g = torch.Generator().manual_seed(1)
    expected = torch.stack([system.agents[a].actor(b.latent[:, i], b.proprio[:, i], b.ref[:, i],
                                                   b.received[:, i] if received_dim else None,
                                                   cfg.explore_std * torch.randn(b.ref[:, i].shape, generator=g))
                            for i, a in enumerate(spec.agents)], dim=1)
    assert torch.equal(explored, expected)
    with pytest.raises(ValueError, match="gripper_explore_std"):
        small_config(arch, gripper_explore_std=-0.1)


def test_film_is_identity_at_zero_message():
    torch.manual_seed(0)
    film = FiLM(message_dim=16, features=32)
    h = torch.randn(5, 32)
    assert torch.equal(film(h, torch.randn(5, 16)), h)  # fresh: identity for every message (zero output layer)
    with torch.no_grad():
        for p in film.parameters():
            p.normal_(0.0, 3.0)
    assert torch.equal(film(h, torch.zeros(5, 16)), h)  # any weights: identity at the zero message
    assert not torch.allclose(film(h, torch.randn(5, 16)), h)
    actor = ResidualActor(16, 18, C, 7, message_dim=16, hidden=16)
    with torch.no_grad():
        for p in actor.parameters():
            p.normal_()
    z, p, ref = torch.randn(4, 16), torch.randn(4, 18), torch.rand(4, C, 7)
    assert torch.equal(actor(z, p, ref, torch.zeros(4, 16)), actor(z, p, ref, None))  # missing == zero message


def test_message_sampled_in_training_mean_at_evaluation():
    mean, log_std = torch.randn(4, 16), torch.full((4, 16), -1.0)
    assert torch.equal(sample_message(mean, log_std, deterministic=True), mean)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_message(mean, log_std, g1), sample_message(mean, log_std, g2)
    assert torch.equal(a, b) and not torch.equal(a, mean)


# ------------------------------------------------------------------------------------------------- independence
def _perturb_agent0(system, batch):
    """Agent robot0's inputs and parameters changed; robot1's untouched."""
    batch = {k: v.clone() for k, v in batch.items()}
    for k in ("latent", "proprio", "ref", "action", "next_latent", "next_proprio", "next_ref"):
        batch[k][:, 0] = batch[k][:, 0] * 3.0 + 1.0
    for k in ("phase", "gripper", "ready", "pose"):
        batch[k][:, 0] = batch[k][:, 0] * 0 + 1
    with torch.no_grad():
        for p in system.agents["robot0"].parameters():
            p.add_(0.5)
    return batch


def _update_twice(arch):
    base = fake_system(arch)
    batch = random_batch(base)
    other = copy.deepcopy(base)
    batch_other = _perturb_agent0(other, batch)
    m1 = Learner(base, base.config).update(batch, torch.Generator().manual_seed(5))
    m2 = Learner(other, other.config).update(batch_other, torch.Generator().manual_seed(5))
    return base, other, m1, m2


def test_v4_agents_have_no_data_or_gradient_path():
    base, other, m1, m2 = _update_twice("V4")
    for k in base.agents["robot1"].state_dict():
        assert torch.equal(base.agents["robot1"].state_dict()[k], other.agents["robot1"].state_dict()[k]), k
    assert {k: v for k, v in m1.items() if k.startswith("robot1/")} == \
        {k: v for k, v in m2.items() if k.startswith("robot1/")}
    assert m1["robot0/losses/q"] != m2["robot0/losses/q"]  # the perturbation did reach robot0

    # gradients: robot1's losses do not depend on robot0's parameters
    system = fake_system("V4")
    learner = Learner(system, system.config)
    view = learner.agent_view(random_batch(system), 1)
    agent1, agent0 = system.agents["robot1"], system.agents["robot0"]
    q1, q2 = agent1.q(view["latent"], view["proprio"], view["action"])
    loss = q1.mean() + q2.mean() + agent1.v(view["latent"], view["proprio"]).mean() + \
        agent1.actor(view["latent"], view["proprio"], view["ref"]).sum()
    grads = torch.autograd.grad(loss, [p for p in agent0.parameters() if p.requires_grad], allow_unused=True)
    assert all(g is None for g in grads)

    # acting: robot1's chunk does not depend on anything of robot0
    e = 4
    b = Boundary(ref=torch.rand(e, 2, C, 7), proprio=torch.randn(e, 2, 18), latent=torch.randn(e, 2, 16), sent=None,
                 received=None)
    a1 = ResidualSystem.act(system, b, torch.Generator().manual_seed(0), explore=False)
    b.ref[:, 0] += 0.3
    b.proprio[:, 0] += 1.0
    b.latent[:, 0] *= -1
    a2 = ResidualSystem.act(system, b, torch.Generator().manual_seed(0), explore=False)
    assert torch.equal(a1[:, 1], a2[:, 1]) and not torch.equal(a1[:, 0], a2[:, 0])


def test_v5_message_does_reach_the_partner():
    """The same perturbation changes robot1's update in V5 (its received message): the V4 test can see paths."""
    base, other, _, _ = _update_twice("V5")
    changed = [k for k in base.agents["robot1"].state_dict()
               if not torch.equal(base.agents["robot1"].state_dict()[k], other.agents["robot1"].state_dict()[k])]
    assert any(k.startswith("actor.") for k in changed) and any(k.startswith("q.") for k in changed)


@pytest.mark.parametrize("actor_data", ["batch", "online"])
def test_actor_data_online_keeps_the_demonstrations_out_of_the_actor(actor_data):
    """actor_data="online": shifting the demonstration rows' actions changes the critics' update but not the
    actor's; with the paper's "batch" it changes both. (β = 0 holds the AWR weights at 1: otherwise the shift reaches
    the online rows' weights through V, which learns from the whole batch, as it should.)"""
    def updated(shift):
        system = fake_system("V4")
        system.config = system.config.replace(actor_data=actor_data, beta=0.0)
        batch = random_batch(system)
        batch["from_demo"] = torch.arange(len(batch["reward"])) < 4
        batch["action"][:4] += shift
        Learner(system, system.config).update(batch, torch.Generator().manual_seed(5))
        return system.agents["robot0"]

    a, b = updated(0.0), updated(0.5)
    same = lambda m1, m2: all(torch.equal(x, y) for x, y in zip(m1.parameters(), m2.parameters()))  # noqa: E731
    assert not same(a.q, b.q)
    assert same(a.actor, b.actor) == (actor_data == "online")


@pytest.mark.parametrize("arch", ["V3", "V4", "V5", "V6"])
def test_update_metrics_and_targets(arch):
    system = fake_system(arch)
    learner = Learner(system, system.config)
    before = copy.deepcopy(system.agents)
    metrics = learner.update(random_batch(system), torch.Generator().manual_seed(0))
    for name in system.agent_names:
        for key in ("losses/q", "losses/v", "losses/actor", "charts/q", "charts/residual_radius"):
            assert f"{name}/{key}" in metrics
        if arch == "V5":
            assert f"{name}/losses/message" in metrics
        agent, old = system.agents[name], before[name]
        for (_, t), (_, t0), (_, q) in zip(agent.q_target.named_parameters(), old.q_target.named_parameters(),
                                           agent.q.named_parameters()):  # Polyak 0.005 towards the updated critic
            assert torch.allclose(t, 0.995 * t0 + 0.005 * q, atol=1e-6)
        assert all(not p.requires_grad for p in agent.q_target.parameters())


# ---------------------------------------------------------------------------------------------------- critic gate
def test_critic_gate_keeps_the_residual_only_where_both_critics_prefer_it():
    """Hand-made critics: Q1 = 10 * sum(a), Q2 = 10 * sum(a) + 2 * a[0, 0]. A row keeps its residual chunk only when
    both critics' gain over the reference exceeds the margin; else it executes the clipped reference."""
    from coop_transport.residual.system import GateCounters, critic_gate

    agent = SimpleNamespace(q=lambda z, p, a, m: (10 * a.flatten(1).sum(1), 10 * a.flatten(1).sum(1) + 2 * a[:, 0, 0]))
    ref = torch.zeros(4, C, 7)
    ref[3] = 1.5  # outside [-1, 1]: the fallback is the clipped reference
    action = torch.zeros(4, C, 7)
    action[0, 1, 1] = 0.05  # gains 0.5 and 0.5
    action[1, 0, 0] = 0.05  # gains 0.5 and 0.6
    action[2, 0, 0], action[2, 1, 1] = -0.05, 0.06  # gains 0.1 and 0.0: the second critic is not convinced
    action[3] = 0.98  # gains 10 * 21 * (0.98 - 1) < 0
    counters = GateCounters()
    out = critic_gate(agent, None, None, ref, None, action, 0.0, counters)
    assert [torch.equal(out[i], action[i]) for i in range(4)] == [True, True, False, False]
    assert torch.equal(out[2], ref[2]) and torch.equal(out[3], torch.ones(C, 7))
    assert (counters.chunks, counters.residual_chunks, counters.residual_rate) == (4, 2, 0.5)
    stricter = critic_gate(agent, None, None, ref, None, action, 0.55)  # no row's smaller gain exceeds 0.55
    assert [torch.equal(stricter[i], action[i]) for i in range(4)] == [False, False, False, False]
    looser = critic_gate(agent, None, None, ref, None, action, -1.0)
    assert [torch.equal(looser[i], action[i]) for i in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("arch", ["V3", "V4", "V5", "V6"])
def test_gated_acting_with_real_critics_and_agent_independence(arch):
    """ResidualSystem.act with the gate: a margin no gain reaches executes π0's reference, a margin every gain
    exceeds the actor's chunk; in V4 robot1's gated chunk does not depend on robot0's critics."""
    from coop_transport.residual.system import GateCounters

    system = fake_system(arch)
    system.gate_counters = GateCounters()
    e, spec, cfg = 4, system.spec, system.config
    n = len(spec.agents)
    g = torch.Generator().manual_seed(1)
    b = random_boundary(system, e)
    for agent in system.agents.values():  # a residual far from zero
        torch.nn.init.normal_(agent.actor.out.weight, std=1.0)
    ungated = ResidualSystem.act(system, b, g, explore=False)
    assert not torch.allclose(ungated, b.ref)

    def gated(margin):
        system.config = cfg.replace(gate_margin=margin)
        return ResidualSystem.act(system, b, g, explore=False, gated=True)

    assert torch.equal(gated(1e9), b.ref) and torch.equal(gated(-1e9), ungated)
    assert torch.equal(ResidualSystem.act(system, b, g, explore=False), ungated)  # gated=False: no gate
    assert system.gate_counters.chunks == 2 * e * n and system.gate_counters.residual_chunks == e * n
    if arch == "V4":
        system.config = cfg.replace(gate_margin=0.0)
        before = ResidualSystem.act(system, b, g, explore=False, gated=True)
        with torch.no_grad():
            for p in system.agents["robot0"].q.parameters():
                p.normal_()
        after = ResidualSystem.act(system, b, g, explore=False, gated=True)
        assert torch.equal(before[:, 1], after[:, 1])


# ------------------------------------------------------------------------------------ the critics' choice of draws
def test_choose_candidate_takes_the_draw_the_doubting_critic_rates_highest():
    """Hand-made agent: the actor adds 0.1 to every action, Q1 = sum(a), Q2 = sum(a) - 10 * a[0, 0]. Each row
    executes the actor's chunk over the draw whose lower critic value is highest; ties go to the first draw."""
    from coop_transport.residual.system import CandidateCounters, choose_candidate

    agent = SimpleNamespace(actor=lambda z, p, ref, m: ref + 0.1,
                            q=lambda z, p, a, m: (a.flatten(1).sum(1), a.flatten(1).sum(1) - 10 * a[:, 0, 0]))
    candidates = torch.zeros(3, 3, C, 7)  # (rows, draws, C, D)
    candidates[0, 1] += 0.2  # row 0: draw 1 is better by both critics
    candidates[1, 1] += 0.2  # row 1: draw 1 has the larger Q1, but Q2 punishes its a[0, 0] ...
    candidates[1, 1, 0, 0] = 1.0
    candidates[1, 2] += 0.05  # ... so draw 2 has the highest lower value
    counters = CandidateCounters()  # row 2: all draws equal, the first one wins
    ref, action = choose_candidate(agent, torch.zeros(3, 4), torch.zeros(3, 2), candidates, None, counters)
    assert torch.equal(ref, candidates[[0, 1, 2], [1, 2, 0]]) and torch.equal(action, ref + 0.1)
    assert (counters.chunks, counters.switched_chunks) == (3, 2)
    # C = 3, D = 7: 21 entries. Lower values per draw: row 0 1.1, 3.3, 1.1; row 1 1.1, 7.1 - 11 = -3.9, 1.65; row 2
    # 1.1 three times. |Q1 - Q2| = 10 * a[0, 0]: row 0 1, 3, 1; row 1 1, 11, 1.5; row 2 1, 1, 1
    assert counters.value_spread == pytest.approx((3.3 - 1.1) + (1.65 + 3.9) + 0.0, abs=1e-5)
    assert counters.critic_gap == pytest.approx(5 / 3 + 13.5 / 3 + 1.0, abs=1e-5)
    # Q1 - Q2 changes over the draws by 3 - 1 (row 0), 11 - 1 (row 1), 0 (row 2). Q1 alone takes draw 1 in rows 0
    # and 1, Q2 alone draw 1 in row 0 and draw 2 in row 1; in row 2 both take the first: they agree in rows 0, 2
    assert counters.critic_gap_spread == pytest.approx(2.0 + 10.0, abs=1e-5)
    assert counters.critics_agree == 2


def test_choice_summary_means_count_only_the_episodes_that_recorded_them():
    """A resumed evaluation can mix episodes logged before a counter existed with newer ones: a mean divides by the
    agent chunks of the episodes that recorded it, and is None where none did (not a made-up 0)."""
    from coop_transport.evaluation import choice_summary

    def episode(chunks, switched, **means):
        return {"stats": {"candidate_chunks": chunks, "candidate_switched_chunks": switched,
                          "candidate_settings": {"candidates": 4},
                          **{f"candidate_{k}": v for k, v in means.items()}}}

    old, new = episode(10, 7, value_spread=0.5), episode(30, 21, value_spread=1.5, critics_agree=12)
    out = choice_summary([old, new], "candidate", "switched", "switch_rate", "candidates",
                         means=("value_spread", "critics_agree"))
    assert out["agent_chunks"] == 40 and out["switch_rate"] == pytest.approx(28 / 40) and out["candidates"] == 4
    assert out["mean_value_spread"] == pytest.approx(2.0 / 40)
    assert out["mean_critics_agree"] == pytest.approx(12 / 30)  # the old episode's 10 chunks are not counted
    only_old = choice_summary([old], "candidate", "switched", "switch_rate", "candidates", means=("critics_agree",))
    assert only_old["mean_critics_agree"] is None


@pytest.mark.parametrize("arch", ["V3", "V4", "V5", "V6"])
def test_acting_on_draws_with_real_networks_and_agent_independence(arch):
    """ResidualSystem.act with K draws per agent: each agent executes its actor's chunk over the draw its own
    critics rate highest, and the boundary's reference becomes that draw; one draw repeated K times acts as the
    plain boundary; in V4 robot1's choice does not depend on robot0's critics."""
    from coop_transport.residual.system import CandidateCounters

    system = fake_system(arch)
    system.candidate_counters = CandidateCounters()
    e, k, spec = 4, 3, system.spec
    g = torch.Generator().manual_seed(2)
    b = random_boundary(system, e)
    plain = ResidualSystem.act(system, random_boundary(system, e), g, explore=False)
    b.candidates = b.ref[:, :, None].repeat(1, 1, k, 1, 1)
    assert torch.equal(ResidualSystem.act(system, b, g, explore=False), plain)
    draws = (torch.rand(e, len(spec.agents), k, C, spec.action_dim, generator=g) * 2 - 1)
    b.candidates = draws
    action = ResidualSystem.act(system, b, g, explore=False)
    for i, name in enumerate(spec.agents):
        agent, received = system.agents[name], (b.received[:, i] if b.received is not None else None)
        score = torch.stack([torch.minimum(*agent.q(b.latent[:, i], b.proprio[:, i],
                                                    agent.actor(b.latent[:, i], b.proprio[:, i], draws[:, i, j],
                                                                received), received))
                             for j in range(k)], 1)  # (E, K)
        best = score.argmax(1)
        chosen = draws[torch.arange(e), i, best]
        assert torch.equal(b.ref[:, i], chosen)
        assert torch.allclose(action[:, i], agent.actor(b.latent[:, i], b.proprio[:, i], chosen, received), atol=1e-6)
    assert system.candidate_counters.chunks == 2 * e * len(spec.agents)
    assert system.candidate_counters.switched_chunks > 0  # the choice is not always the first draw
    if arch == "V4":
        before = b.ref.clone()
        with torch.no_grad():
            for p in system.agents["robot0"].q.parameters():
                p.normal_()
        b.candidates = draws
        ResidualSystem.act(system, b, g, explore=False)
        assert torch.equal(before[:, 1], b.ref[:, 1])
