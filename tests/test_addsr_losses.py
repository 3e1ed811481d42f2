"""AddSR TA-ADD weights (paper 002, Eq. 3 exponential, Eq. 4 linear) and P(s) against hand values."""
import math

import numpy as np
import pytest
import torch

from sr_lab.losses.distillation import ExponentialWeight, LinearWeight, distillation_loss, student_step_index

STUDENT = [999, 749, 499, 249]


def abar_sd(T=1000):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas))


def test_p_maps_student_timesteps_to_inference_steps():
    assert student_step_index(torch.tensor([999, 749, 499, 249, 999]), STUDENT).tolist() == [1, 2, 3, 4, 1]
    assert float(student_step_index(499, STUDENT)) == 3
    with pytest.raises(ValueError, match="not in the student list"):
        student_step_index(500, STUDENT)


@pytest.mark.parametrize("s", STUDENT)
@pytest.mark.parametrize("t", [0, 1, 250, 500, 749, 998, 999])
def test_exponential_and_linear_weights_by_hand(s, t):
    ab = abar_sd()
    # the paper's product prod_{i<=t} (1 - beta_i) is abar_t: recompute it from the betas by hand
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    prod = float(np.prod(1 - betas[: t + 1]))
    assert prod == pytest.approx(float(ab[t]), rel=1e-12)
    p = STUDENT.index(s) + 1
    got = ExponentialWeight(0.5, 2.1)(ab[torch.tensor([t])], torch.tensor([float(p)]))
    assert float(got) == pytest.approx(math.sqrt(prod) * 0.5 * 2.1 ** (p - 1), rel=1e-12)
    lin = LinearWeight(0.3, 0.7)(ab[torch.tensor([t])], torch.tensor([float(p)]))
    assert float(lin) == pytest.approx(math.sqrt(prod) * (0.3 * p + 0.7), rel=1e-12)


def test_distillation_loss_is_weighted_mse_with_stop_gradient():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    loss = distillation_loss(x, target, w)
    assert float(loss) == pytest.approx((2.0 * (1 + 4) / 2 + 0.5 * (1 + 9) / 2) / 2)
    loss.backward()
    assert target.grad is None and x.grad is not None
