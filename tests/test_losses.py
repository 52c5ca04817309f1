import math

import pytest
import torch
from torch import nn

from losses import GAN_LOSSES, ganzo_targets, get_gan_loss, gradient_penalty, soft_real_targets


def test_nonsaturating_and_hinge_at_d_zero():
    zeros = torch.zeros(5)
    ns = get_gan_loss("gan")
    torch.testing.assert_close(ns.d_loss(zeros, zeros), torch.full((5,), 2 * math.log(2)))
    torch.testing.assert_close(ns.g_loss(zeros), torch.full((5,), math.log(2)))
    hinge = get_gan_loss("hinge")
    torch.testing.assert_close(hinge.d_loss(zeros, zeros), torch.full((5,), 2.0))
    assert hinge.d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -2.0])).abs().max() == 0


def test_nonsaturating_matches_bce_with_soft_targets():
    logits, targets = torch.randn(64), torch.rand(64)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    ns = get_gan_loss("gan")
    torch.testing.assert_close(ns.g_loss(logits, targets), expected)
    both = ns.d_loss(logits, logits, targets, 1 - targets)
    torch.testing.assert_close(
        both, expected + nn.functional.binary_cross_entropy_with_logits(logits, 1 - targets, reduction="none")
    )


def test_nonsaturating_is_stable_for_large_logits():
    big = torch.tensor([-200.0, 200.0])
    ns = get_gan_loss("gan")
    assert torch.isfinite(ns.d_loss(big, big)).all() and torch.isfinite(ns.g_loss(big)).all()


def test_wasserstein_values():
    w = get_gan_loss("wgan")
    torch.testing.assert_close(w.d_loss(torch.tensor([2.0]), torch.tensor([0.5])), torch.tensor([-1.5]))
    torch.testing.assert_close(w.g_loss(torch.tensor([0.5])), torch.tensor([-0.5]))


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="valid"):
        get_gan_loss("lsgan-typo")
    assert set(GAN_LOSSES) == {"gan", "wgan", "wgan-gp", "hinge"}


def test_ganzo_targets():
    torch.manual_seed(0)
    real_t, fake_t = ganzo_targets(1000, soft=False, noisy_p=0.0)
    assert (real_t == 1).all() and (fake_t == 0).all()  # Ganzo's bug (fake targets = 1) is not reproduced
    real_t, fake_t = ganzo_targets(1000, soft=True, noisy_p=0.0)
    assert real_t.min() >= 0.9 and real_t.max() <= 1.0 and fake_t.min() >= 0.0 and fake_t.max() <= 0.1
    g_t = soft_real_targets(1000, soft=True)
    assert g_t.min() >= 0.9 and soft_real_targets(5, soft=False) == 1.0
    # Noisy labels: each term's targets are swapped for the whole batch with probability p.
    swaps = [ganzo_targets(4, soft=False, noisy_p=0.2)[0][0].item() == 0 for _ in range(4000)]
    assert abs(sum(swaps) / len(swaps) - 0.2) < 0.025


class LinearCritic(nn.Module):
    """D(x) = <a, x> + b: its input gradient is `a` everywhere."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.a.flatten() + self.b


@pytest.mark.parametrize("norm_a", [0.5, 1.0, 2.5])
def test_gradient_penalty_on_linear_critic(norm_a):
    torch.manual_seed(0)
    a = torch.randn(1, 4, 4)
    a = a / a.norm() * norm_a
    critic = LinearCritic(a)
    reals, fakes = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    gp = gradient_penalty(critic, reals, fakes)
    torch.testing.assert_close(gp, torch.full((6,), (norm_a - 1) ** 2))
    one_sided = gradient_penalty(critic, reals, fakes, one_sided=True)
    torch.testing.assert_close(one_sided, torch.full((6,), max(norm_a - 1, 0.0) ** 2))
    # d GP / d a = 2 (||a|| - 1) a / ||a|| (the penalty's own gradient reaches the critic: create_graph=True).
    gp.mean().backward()
    torch.testing.assert_close(critic.a.grad, 2 * (norm_a - 1) * critic.a.detach() / norm_a)


def test_gradient_penalty_fp16_with_grad_scaler_matches_fp32():
    """PyTorch's AMP recipe on CPU: the penalty from scaled-then-unscaled fp16 gradients equals the fp32 one, and
    equals the penalty computed with no scaler (scale 1) within fp16 accuracy."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 64, 1))
    fn = lambda x, labels=None: critic(x).flatten()
    reals, fakes = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    torch.manual_seed(1)
    reference = gradient_penalty(fn, reals, fakes)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # a typical scale once the scaler has settled
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        scaled = gradient_penalty(fn, reals, fakes, scale=scaler.get_scale())
        torch.manual_seed(1)
        unscaled = gradient_penalty(fn, reals, fakes, scale=1.0)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, reference, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(scaled, unscaled, rtol=1e-2, atol=1e-3)
    # The penalty's gradient flows back through the scaled graph and stays finite.
    (scaler.scale(scaled.mean())).backward()
    grads = [p.grad for p in critic.parameters() if p.grad is not None]  # the last bias has no input gradient
    assert len(grads) == 3 and all(torch.isfinite(g).all() for g in grads)


def test_gradient_penalty_passes_labels_to_conditional_critic():
    seen = {}

    def critic(x, labels=None):
        seen["labels"] = labels
        return x.flatten(1).sum(1)

    labels = torch.tensor([1, 2])
    gp = gradient_penalty(critic, torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), labels)
    assert seen["labels"] is labels
    torch.testing.assert_close(gp, torch.full((2,), 1.0))  # gradient of a sum over 4 inputs has norm 2
