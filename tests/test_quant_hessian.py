"""Hessian accumulation and preparation, including the failure paths."""

import pytest
import torch

from exl2build.errors import StepError
from exl2build.quant.hessian import HessianAccumulator, prepare


def _x(n, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) * torch.linspace(0.2, 2.0, K)


def test_accumulator_matches_xtx():
    x = _x(300, 16)
    acc = HessianAccumulator(16, "l0")
    acc.add(x[:100])
    acc(x[100:].reshape(2, 100, 16))  # 3-D input as the Linear hook may pass, and the callable form
    assert acc.tokens == 300
    ref = (x.double().T @ x.double() / 300).float()
    assert torch.allclose(acc.result(), ref, rtol=1e-5, atol=1e-6)


def test_non_finite_activations_name_the_layer():
    acc = HessianAccumulator(4, "model.layers.3.mlp.down_proj")
    x = torch.ones(2, 4)
    x[1, 2] = float("inf")
    acc.add(x)
    with pytest.raises(StepError, match=r"model\.layers\.3\.mlp\.down_proj.*fp16 overflow"):
        acc.result()


def test_empty_accumulator_raises():
    with pytest.raises(StepError, match="no calibration tokens"):
        HessianAccumulator(4, "x").result()


def test_prepare_perm_and_factor():
    x = _x(500, 24)
    H = (x.T @ x / 500).float()
    perm, U = prepare(H, 0.05, "l")
    d = torch.diagonal(H)
    assert torch.equal(perm, torch.argsort(-d, stable=True))
    assert torch.all(d[perm][:-1] >= d[perm][1:])
    assert torch.equal(U, torch.triu(U))
    Hp = H.double()[perm][:, perm] + 0.05 * float(d.mean()) * torch.eye(24, dtype=torch.float64)
    assert torch.allclose((U.double().T @ U.double()), torch.linalg.inv(Hp), rtol=1e-4, atol=1e-6)


def test_stable_perm_on_ties_and_dead_channels():
    x = _x(200, 8)
    x[:, 2] = 0.0  # a dead channel
    x[:, 5] = 0.0
    H = (x.T @ x / 200).float()
    perm, U = prepare(H, 0.05, "l")
    assert perm[-2:].tolist() == [2, 5]  # dead channels last, in channel order
    assert torch.isfinite(U).all()


def test_all_dead_gives_identity_like_factor():
    perm, U = prepare(torch.zeros(8, 8), 0.05, "l")
    assert perm.tolist() == list(range(8)) and torch.isfinite(U).all()


def test_retry_with_more_damping_then_fail():
    # Indefinite H (eigenvalue -1 against mean diag 0.5): damping 0.05 fails, doubling reaches 3.2 and works.
    H = torch.diag(torch.tensor([2.0, -1.0]))
    perm, U = prepare(H, 0.05, "l")
    assert torch.isfinite(U).all()
    # Strongly indefinite (eigenvalue -99, mean diag 1): no damping within the retries can fix it.
    H = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    with pytest.raises(StepError, match=r"model\.layers\.7\.self_attn\.q_proj: the Hessian is not invertible"):
        prepare(H, 0.05, "model.layers.7.self_attn.q_proj")


def test_non_finite_hessian_raises():
    H = torch.eye(3)
    H[0, 1] = float("nan")
    with pytest.raises(StepError, match="fp16 overflow"):
        prepare(H, 0.05, "lm_head")
