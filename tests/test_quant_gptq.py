"""GPTQ of one linear: agreement with a plain-torch reference, better than rounding, valid packing."""

import pytest
import torch

from exl2build import kernels, kernels_ref
from exl2build.errors import StepError
from exl2build.quant.gptq import ScaleSearch, quantize_linear
from exl2build.quant.hessian import HessianAccumulator
from exl2build.quant.options import LinearOption

SS = ScaleSearch(0.7, 1.2, 21, 3.5)


def _problem(N=96, K=128, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.05).half()
    # correlated, unevenly scaled inputs: where GPTQ's error feedback pays off
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    X = (torch.randn(tokens, K, generator=g) @ mix) * torch.linspace(0.2, 3.0, K)
    acc = HessianAccumulator(K)
    acc.add(X)
    return W, X, acc.result()


def _ref_gptq(W, H, option, ss, damp):
    """Textbook GPTQ, one row at a time over all of K (no blocking), act-order, per-group scales."""
    N, K = W.shape
    d = torch.diagonal(H).double()
    perm = torch.argsort(-d, stable=True)
    Hp = H.double()[perm][:, perm] + damp * float(d.mean()) * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True).float()
    Wt = W.float().T[perm].clone()
    row = 0
    for bits, rows in option.groups(K):
        _, _, scale = kernels_ref.group_scale_search(Wt[row : row + rows].clone(), bits, *ss)
        z, top = 2 ** (bits - 1), 2**bits - 1
        for i in range(row, row + rows):
            q = torch.clamp(torch.round(Wt[i] / scale) + z, 0, top)
            deq = (q - z) * scale
            err = (Wt[i] - deq) / U[i, i]
            Wt[i + 1 :] -= U[i, i + 1 :, None] * err[None, :]
            Wt[i] = deq
        row += rows
    return Wt[torch.argsort(perm)].T


def _rtn(W, H, option, ss):
    """Round-to-nearest with the same act-order groups and scale search, no error feedback."""
    N, K = W.shape
    perm = torch.argsort(-torch.diagonal(H), stable=True)
    Wt = W.float().T[perm].clone()
    row = 0
    for bits, rows in option.groups(K):
        _, _, scale = kernels_ref.group_scale_search(Wt[row : row + rows].clone(), bits, *ss)
        _, Wt[row : row + rows] = kernels_ref.quantize_rows(Wt[row : row + rows].clone(), scale, bits)
        row += rows
    return Wt[torch.argsort(perm)].T


def _out_err(X, W, Wq):
    return float((X @ (Wq.float() - W.float()).T).norm() / (X @ W.float().T).norm())


@pytest.mark.parametrize(
    "option",
    [LinearOption(32, (3, 2), (0.25, 0.75)), LinearOption(64, (4,), (1.0,)), LinearOption(128, (8, 6, 5), (0.1, 0.3, 0.6))],
    ids=["2-3bit", "4bit", "5-8bit"],
)
def test_matches_reference_and_beats_rtn(option):
    W, X, H = _problem()
    qt, deq = quantize_linear(W, H, option, SS, damp=0.05, name="t.q_proj")
    ref = _ref_gptq(W, H, option, SS, 0.05)
    e_ours, e_ref, e_rtn = _out_err(X, W, deq), _out_err(X, W, ref), _out_err(X, W, _rtn(W, H, option, SS))
    same = ((deq.float() - ref).abs() <= 2e-3 * ref.abs() + 1e-6).float().mean()
    assert same > 0.99, same  # a rare rounding-boundary flip may cascade a little
    assert abs(e_ours - e_ref) <= 0.01 * e_ref
    assert e_ours < 0.9 * e_rtn, (e_ours, e_rtn)


def test_packing_is_consistent():
    W, X, H = _problem(N=70, K=96)  # N not a multiple of 32: padded columns
    bias = torch.linspace(-1, 1, 70).half()
    option = LinearOption(32, (5, 4), (0.4, 0.6))
    qt, deq = quantize_linear(W, H, option, SS, bias=bias, name="t")
    qt.validate("t")
    assert qt.n_pad == 96 and qt.q_weight.shape[0] == sum(r * b // 32 for b, r in option.groups(96))
    assert [(b, r) for b, _, r in qt.group_rows()] == option.groups(96)
    perm = torch.argsort(-torch.diagonal(H), stable=True)
    assert torch.equal(qt.q_invperm.long(), torch.argsort(perm))
    assert torch.equal(kernels.dequant(qt), deq.T)
    assert torch.equal(qt.bias, bias)
    # padded columns hold the zero code
    codes = kernels.unpack_codes(qt.q_weight[: 32 * 5 // 32 * 1].contiguous(), 5, 32)
    assert (codes[:, 70:] == 16).all()


def test_k_not_multiple_of_32_pads_last_group():
    W, X, H = _problem(N=32, K=80)
    option = LinearOption(32, (4,), (1.0,))
    qt, deq = quantize_linear(W, H, option, SS, name="t")
    assert [(b, r) for b, _, r in qt.group_rows()] == [(4, 32), (4, 32), (4, 16)]
    assert _out_err(X, W, deq) < 0.15


def test_deterministic():
    W, X, H = _problem()
    option = LinearOption(64, (4, 3), (0.3, 0.7))
    a = quantize_linear(W, H, option, SS)[0].tensors("x")
    b = quantize_linear(W, H, option, SS)[0].tensors("x")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verification_failure_names_the_tensor(monkeypatch):
    W, X, H = _problem(N=32, K=64)
    real = kernels.dequant
    monkeypatch.setattr(kernels, "dequant", lambda qt: real(qt) * 1.01)  # a simulated packing bug
    with pytest.raises(StepError, match="model.layers.0.mlp.up_proj: the packed EXL2 tensors"):
        quantize_linear(W, H, LinearOption(64, (4,), (1.0,)), SS, name="model.layers.0.mlp.up_proj")


def test_hessian_shape_mismatch():
    W, X, H = _problem(N=32, K=64)
    with pytest.raises(StepError, match="does not match"):
        quantize_linear(W, H[:32, :32], LinearOption(64, (4,), (1.0,)), SS, name="t")


def test_verify_in_chunks_names_the_bad_element(monkeypatch):
    from exl2build.quant import gptq

    W, X, H = _problem(N=32, K=128)
    real = kernels.dequant

    def corrupt(qt):
        out = real(qt).clone()
        out[100, 7] = float("nan")  # one element, in the last of several verify chunks
        return out

    monkeypatch.setattr(gptq, "VERIFY_CHUNK", 32 * 16)
    monkeypatch.setattr(kernels, "dequant", corrupt)
    with pytest.raises(StepError, match=r"t: the packed EXL2 tensors .* row 100, column 7: packed nan"):
        quantize_linear(W, H, LinearOption(64, (4,), (1.0,)), SS, name="t")


def test_prepared_factor_without_hessian():
    from exl2build.quant.hessian import prepare

    W, X, H = _problem(N=32, K=64)
    opt = LinearOption(32, (4, 3), (0.5, 0.5))
    qa, da = quantize_linear(W, H, opt, SS)
    qb, db = quantize_linear(W, None, opt, SS, prepared=prepare(H))
    assert torch.equal(da, db)
    assert all(torch.equal(x, y) for x, y in zip(qa.tensors("t").values(), qb.tensors("t").values()))
    with pytest.raises(StepError, match="does not match"):
        quantize_linear(W[:, :32], None, opt, SS, prepared=prepare(H), name="t")
