"""Residual-RL losses against values computed by hand (seed paper eq. 2-4, V5's message terms). CPU, instant."""

import math

import pytest
import torch

from coop_transport.residual.losses import (awr_loss, awr_weights, expectile_loss, gaussian_kl,
                                            message_supervision_loss, td_loss, td_target)


def test_expectile_weights_positive_errors_by_tau():
    # u = [2, -1], τ = 0.6: (0.6 * 4 + 0.4 * 1) / 2 = 1.4
    assert expectile_loss(torch.tensor([2.0, -1.0]), 0.6).item() == pytest.approx(1.4)
    # τ = 0.5 is half the squared error
    assert expectile_loss(torch.tensor([2.0, -1.0]), 0.5).item() == pytest.approx(0.5 * 2.5)
    assert expectile_loss(torch.zeros(3), 0.6).item() == 0.0


def test_td_target_uses_gamma_k_and_done():
    r = torch.tensor([1.0, 0.5, 0.2])
    discount = torch.tensor([0.99 ** 10, 0.99 ** 3, 0.99 ** 10])  # a full chunk, a 3-step chunk, a full chunk
    done = torch.tensor([0.0, 0.0, 1.0])
    next_v = torch.tensor([2.0, 3.0, 5.0])
    expected = [1.0 + 0.99 ** 10 * 2.0, 0.5 + 0.99 ** 3 * 3.0, 0.2]
    assert td_target(r, discount, done, next_v).tolist() == pytest.approx(expected)


def test_td_loss_is_smooth_l1_of_both_critics():
    y = torch.tensor([2.8, 0.5])
    q1 = torch.tensor([0.0, 3.0])  # errors -2.8, 2.5: linear branch |d| - 0.5 -> 2.3, 2.0
    q2 = torch.tensor([2.6, 0.5])  # errors -0.2, 0: quadratic branch 0.5 d^2 -> 0.02, 0
    assert td_loss(q1, q2, y).item() == pytest.approx((2.3 + 2.0) / 2 + 0.02 / 2)
    q1.requires_grad_(True)
    target = y.clone().requires_grad_(True)
    td_loss(q1, q2, target).backward()
    assert target.grad is None  # the target is detached


def test_awr_weights_exponential_and_capped():
    w = awr_weights(torch.tensor([0.0, 1.0, -1.0, 10.0]), beta=3.0, max_weight=100.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(3.0), math.exp(-3.0), 100.0])


def test_awr_weights_normalized_by_the_batch_std():
    # advantages of the critic's small scale: raw weights stay near 1, normalized ones act on standard deviations
    advantage = torch.tensor([-0.002, 0.0, 0.002, 0.004])
    std = advantage.std().item()  # unbiased, 0.0025820 for these four
    raw = awr_weights(advantage, beta=3.0)
    assert raw.tolist() == pytest.approx([math.exp(3 * a) for a in advantage.tolist()])
    assert max(abs(w - 1.0) for w in raw.tolist()) < 0.013
    normalized = awr_weights(advantage, beta=3.0, normalize=True)
    expected = [min(math.exp(3 * a / (std + 1e-6)), 100.0) for a in advantage.tolist()]  # 1e-6: the guard
    assert normalized.tolist() == pytest.approx(expected, rel=1e-4)
    assert normalized[3].item() == 100.0  # exp(3 · 1.549) = 104.3, capped
    assert normalized[0].item() == pytest.approx(0.098, abs=1e-3)  # exp(-3 · 0.775)
    scaled = awr_weights(advantage * 10, beta=3.0, normalize=True)  # the critic's scale drops out (up to the guard)
    assert scaled.tolist() == pytest.approx(normalized.tolist(), rel=1e-3)


def test_awr_loss_weighted_squared_chunk_error():
    predicted = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])  # (B=2, C=2, A=2)
    action = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    weights = torch.tensor([2.0, 7.0])
    # sample 0: squared error 1 + 0 + 0 + 1 = 2, weight 2 -> 4; sample 1: 0 -> mean 2
    assert awr_loss(predicted, action, weights).item() == pytest.approx(2.0)


def test_message_supervision_loss_hand_values():
    b = 3
    decoded = {"phase": torch.zeros(b, 5), "gripper": torch.zeros(b), "ready": torch.zeros(b),
               "pose": torch.zeros(b, 6)}
    labels = {"phase": torch.tensor([0, 3, 4]), "gripper": torch.tensor([1.0, 0.0, 1.0]),
              "ready": torch.tensor([0.0, 0.0, 1.0]), "pose": torch.ones(b, 6)}
    loss, parts = message_supervision_loss(decoded, labels, weight=0.1)
    assert parts["phase"].item() == pytest.approx(math.log(5))
    assert parts["gripper"].item() == pytest.approx(math.log(2))
    assert parts["ready"].item() == pytest.approx(math.log(2))
    assert parts["pose"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.1 * (math.log(5) + 2 * math.log(2) + 1.0))


def test_gaussian_kl_hand_values():
    assert gaussian_kl(torch.zeros(4, 16), torch.zeros(4, 16)).item() == pytest.approx(0.0)
    mean = torch.tensor([[1.0, 0.0]])
    log_std = torch.tensor([[0.0, math.log(2.0)]])
    # ½[(1 + 1 - 1 - 0) + (4 + 0 - 1 - 2 ln 2)]
    assert gaussian_kl(mean, log_std).item() == pytest.approx(0.5 * (1.0 + 3.0 - 2 * math.log(2.0)))
