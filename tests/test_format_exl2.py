"""QTensor container and EXL2 tensor naming (exl2build.format.exl2)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2build import kernels
from exl2build.format.exl2 import (
    QTensor,
    build_qtensor,
    is_quantized,
    pad_columns,
    qtensor_names,
    quantization_config,
    tensor_name,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(K=192, N=72, layout=((8, 32), (4, 64), (2, 96)), bias=True, seed=0) -> QTensor:
    groups = []
    for i, (bits, rows) in enumerate(layout):
        codes = torch.randint(0, 1 << bits, (rows, N), generator=gen(seed + i), dtype=torch.int64).to(torch.uint8)
        qs = torch.randint(1, 17, (N,), generator=gen(seed + 50 + i), dtype=torch.int64).to(torch.uint8)
        groups.append((bits, codes, qs, 0.01 * (i + 1)))
    invperm = torch.argsort(torch.randperm(K, generator=gen(seed + 99))).to(torch.int32)
    b = torch.randn(N, generator=gen(seed + 7)).half() if bias else None
    return build_qtensor(groups, invperm, N, b)


def test_names():
    p = "model.layers.0.mlp.down_proj"
    assert tensor_name(p, "q_weight") == p + ".q_weight"
    assert qtensor_names(p) == [p + s for s in (".q_weight", ".q_scale", ".q_scale_max", ".q_groups", ".q_invperm")]
    assert qtensor_names(p, bias=True)[-1] == p + ".bias"
    assert is_quantized(qtensor_names(p), p) and not is_quantized([p + ".weight"], p)
    assert [pad_columns(n) for n in (1, 32, 33, 576)] == [32, 32, 64, 576]


def test_build_layout_matches_format():
    qt = make()
    assert qt.K == 192 and qt.N == 72 and qt.n_pad == 96 and qt.num_groups == 3
    assert qt.q_weight.shape == (32 * 8 // 32 + 64 * 4 // 32 + 96 * 2 // 32, 96)
    assert qt.q_scale.shape == (3, 12) and qt.q_scale_max.dtype == torch.float16
    assert qt.q_groups.tolist() == [8, 0, 4, 8, 2, 16]
    assert qt.group_rows() == [(8, 0, 32), (4, 32, 64), (2, 96, 96)]
    # padded columns hold the zero code 2^(bits-1)
    pad = kernels.unpack_codes(qt.q_weight[16:], 2, 96)[:, 72:]
    assert torch.all(pad == 2)


def test_tensors_from_tensors_round_trip(tmp_path):
    qt = make()
    prefix = "model.layers.3.self_attn.q_proj"
    t = qt.tensors(prefix)
    assert sorted(t) == sorted(qtensor_names(prefix, bias=True))
    save_file(t, str(tmp_path / "x.safetensors"))
    back = QTensor.from_tensors(load_file(str(tmp_path / "x.safetensors")), prefix, qt.K, qt.N)
    for name in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "bias"):
        assert torch.equal(getattr(back, name), getattr(qt, name))
    assert torch.equal(kernels.dequant(back), kernels.dequant(qt))
    no_bias = make(bias=False)
    assert "p.bias" not in no_bias.tensors("p")
    assert QTensor.from_tensors(no_bias.tensors("p"), "p", 192, 72).bias is None


def test_from_tensors_errors_name_the_tensor():
    t = make().tensors("lin")
    with pytest.raises(ValueError, match="lin.q_groups"):
        QTensor.from_tensors({k: v for k, v in t.items() if k != "lin.q_groups"}, "lin", 192, 72)
    bad = dict(t)
    bad["lin.q_scale_max"] = bad["lin.q_scale_max"].float()
    with pytest.raises(ValueError, match="lin.q_scale_max"):
        QTensor.from_tensors(bad, "lin", 192, 72)
    with pytest.raises(ValueError, match="q_weight"):
        QTensor.from_tensors(t, "lin", 192, 100)  # wrong N -> wrong N_pad
    with pytest.raises(ValueError, match="q_invperm"):
        QTensor.from_tensors(t, "lin", 191, 72)


def test_perm_invperm():
    qt = make()
    perm = qt.perm
    assert perm.dtype == torch.int32
    assert torch.equal(perm[qt.q_invperm.long()], torch.arange(qt.K, dtype=torch.int32))
    assert torch.equal(qt.q_invperm[perm.long()], torch.arange(qt.K, dtype=torch.int32))
    assert qt.perm is perm  # cached


def test_to_and_dataclass_fields():
    qt = make()
    moved = qt.to("cpu")
    assert moved is not qt and torch.equal(moved.q_weight, qt.q_weight) and moved.K == qt.K
    assert torch.equal(moved.perm, qt.perm)


def test_quantization_config():
    cfg = quantization_config("0.1.0", 4.0, 6, 100, 2048, "valid.parquet")
    assert cfg == {
        "quant_method": "exl2",
        "version": "0.1.0",
        "bits": 4.0,
        "head_bits": 6,
        "calibration": {"rows": 100, "length": 2048, "dataset": "valid.parquet"},
    }


def test_validate_rejects_broken_groups_and_invperm():
    qt = make()
    qt.q_groups = torch.tensor([8, 0, 4, 8, 2, 40], dtype=torch.int16)  # last group past q_weight
    with pytest.raises(ValueError, match="q_groups"):
        qt.validate("lin")
    qt = make()
    qt.q_invperm = torch.zeros(qt.K, dtype=torch.int32)
    with pytest.raises(ValueError, match="lin.q_invperm"):
        qt.validate("lin")
    with pytest.raises(ValueError, match="bit widths"):
        bad = make()
        bad.q_groups = torch.tensor([7, 0, 4, 8, 2, 16], dtype=torch.int16)
        bad.validate("lin")
