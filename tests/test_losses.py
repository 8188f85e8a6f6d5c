"""The PPO-clip surrogate (brief section 2.5)."""

import pytest
import torch

from g2rpo.losses import clipped_surrogate


def test_on_policy_ratio_is_one_and_clipping_is_inactive():
    log_prob = torch.tensor([-1.3, 0.2, 2.0, -0.7], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, metrics = clipped_surrogate(log_prob, log_prob.detach().clone(), advantages, 1e-4)
    assert metrics["ratio"].item() == 1.0 and metrics["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-advantages.mean().item())  # the clipped equals the unclipped loss
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 4)  # d/dlogp of -A r at r = 1


@pytest.mark.parametrize(
    ("advantage", "log_ratio", "gradient_flows"),
    [
        (1.0, 0.01, False),  # good sample already made more likely than 1 + eps: clipped
        (1.0, -0.01, True),  # good sample made less likely: always corrected
        (-1.0, -0.01, False),  # bad sample already less likely than 1 - eps: clipped
        (-1.0, 0.01, True),  # bad sample made more likely: always corrected
    ],
)
def test_clipping_stops_the_gradient_only_in_the_advantage_direction(advantage, log_ratio, gradient_flows):
    log_prob = torch.tensor([log_ratio], requires_grad=True)
    loss, metrics = clipped_surrogate(log_prob, torch.zeros(1), torch.tensor([advantage]), 1e-3)
    loss.backward()
    assert (log_prob.grad.abs().item() > 0) == gradient_flows
    assert metrics["clipfrac"].item() == 1.0
