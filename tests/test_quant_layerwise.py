"""Per-layer helpers: the block error metric and checkpoints."""

import torch

from exl2build.quant import layerwise as lw


def test_rel_error_is_per_token_rms():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 8, 16, generator=g)
    ref[:, 0] *= 1000.0  # a massive-activation token per row
    noise = 0.1 * torch.randn(2, 8, 16, generator=g) * ref[..., :1].abs().clamp(max=1.0)
    y = ref + noise
    err = lw.rel_error(lambda x: x, y, ref, batch_rows=1)
    per_token = ((y - ref).double().norm(dim=-1) / ref.double().norm(dim=-1)).pow(2).mean().sqrt()
    assert abs(err - float(per_token)) < 1e-6
    glob = float((y - ref).norm() / ref.norm())
    assert glob < err / 10  # a global ratio would hide the error on the ordinary tokens
    assert lw.rel_error(lambda x: x, ref, ref, batch_rows=2) == 0.0


def test_checkpoint_roundtrip_and_fingerprint(tmp_path):
    ck = lw.Checkpoint(tmp_path, "q", "fp1")
    assert ck.load("cpu") is None
    x = torch.arange(6.0).reshape(2, 3)
    ck.save(1, {"states": x}, {"a": 1})
    ck.save(2, {"states": x + 1}, {"a": 2})
    done, t, res = ck.load("cpu")
    assert done == 2 and torch.equal(t["states"], x + 1) and res == {"a": 2}
    assert len(list(tmp_path.glob("q-states-*.safetensors"))) == 1  # older states removed
    assert lw.Checkpoint(tmp_path, "q", "other").load("cpu") is None


def test_accumulate_inputs_stops_at_the_linear_with_the_same_hessian():
    import pytest

    from exl2build.errors import StepError
    from exl2build.model.linear import FP16Linear
    from exl2build.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    first, second = FP16Linear(torch.randn(8, 6, generator=g)), FP16Linear(torch.randn(5, 8, generator=g))
    calls = []

    def block(x):
        calls.append("first")
        h = first(x)
        calls.append("second")
        return second(torch.relu(h))

    x = torch.randn(5, 3, 6, generator=g)
    whole, part = HessianAccumulator(8), HessianAccumulator(8)
    with lw.observing(second, whole):
        lw.run_batched(block, x, 2)
    calls.clear()
    lw.accumulate_inputs(block, second, x, 2, part)
    assert torch.equal(whole.result(), part.result()) and part.tokens == 15
    assert calls == ["first", "second"] * 3  # 3 batches, each stopped inside `second`
    calls.clear()
    lw.accumulate_inputs(block, first, x, 2, HessianAccumulator(6))
    assert calls == ["first"] * 3
    with pytest.raises(StepError, match="never called"):
        lw.accumulate_inputs(lambda x: x, first, x, 2, HessianAccumulator(6))
    assert first.observe is None
