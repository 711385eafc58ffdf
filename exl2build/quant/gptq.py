"""GPTQ of one linear into an EXL2 QTensor (act-order, mixed bit widths along K).

Work happens on W^T [K, N] in permuted order. Per group: search the scales on the group's
current rows (already corrected for earlier groups' error), run GPTQ inside the group
(kernels.gptq_group), then push the group's error onto all later rows with one matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from exl2build import kernels
from exl2build.errors import StepError
from exl2build.format.exl2 import build_qtensor
from exl2build.quant.hessian import DEFAULT_DAMP, prepare
from exl2build.quant.options import LinearOption


class ScaleSearch(NamedTuple):
    """Grid over the factor p applied to each group's max scale; score = sum |err|^norm."""

    p_min: float = 0.60
    p_max: float = 1.20
    p_steps: int = 121  # step 0.005: finer than, and a superset range of, exllamav2's 97 on [0.7, 1.2]
    norm: float = 3.5


DEFAULT_SCALE_SEARCH = ScaleSearch()


def as_scale_search(spec) -> ScaleSearch:
    if spec is None:
        return DEFAULT_SCALE_SEARCH
    if isinstance(spec, ScaleSearch):
        return spec
    if isinstance(spec, dict):
        return ScaleSearch(**spec)
    return ScaleSearch(*spec)


def quantize_linear(
    weight: torch.Tensor,
    H: torch.Tensor,
    option: LinearOption,
    scale_search=DEFAULT_SCALE_SEARCH,
    *,
    damp: float = DEFAULT_DAMP,
    bias: torch.Tensor | None = None,
    name: str = "linear",
    prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """(QTensor, dequantized weight [N, K] fp16) of `weight` [N, K] under Hessian H [K, K].

    `prepared` = hessian.prepare(H, damp, name) may be passed when several linears share H.
    The returned weight is what the loader will compute from the packed tensors (verified).
    """
    ss = as_scale_search(scale_search)
    N, K = weight.shape
    if H.shape != (K, K):
        raise StepError(f"{name}: Hessian shape {tuple(H.shape)} does not match the weight's K={K}.")
    perm, hinv = prepared if prepared is not None else prepare(H, damp, name)
    device = weight.device
    perm, hinv = perm.to(device), hinv.to(device)

    W = weight.to(torch.float32).T[perm].contiguous()  # [K, N] permuted
    groups, row = [], 0
    glist = option.groups(K)
    for gi, (bits, rows) in enumerate(glist):
        start, end = row, row + rows
        qscale, scale_max, scale = kernels.group_scale_search(
            W[start:end].contiguous(), bits, ss.p_min, ss.p_max, ss.p_steps, ss.norm
        )
        block = W[start:end]  # contiguous view: gptq_group writes the dequantized rows into W
        codes, err = kernels.gptq_group(block, hinv[start:end, start:end].contiguous(), scale, bits)
        if end < K:
            W[end:] -= torch.matmul(hinv[start:end, end:].T, err)
        if gi == len(glist) - 1 and (rows * bits) % 32:
            # The last group may end mid-word (K not a multiple of 32): pad with the zero code.
            pad = (-rows) % 32
            codes = torch.cat([codes, torch.full((pad, N), 1 << (bits - 1), dtype=torch.uint8, device=codes.device)])
        groups.append((bits, codes, qscale, scale_max))
        row = end

    invperm = torch.argsort(perm).to(torch.int32)
    qt = build_qtensor(groups, invperm, N, bias)
    loaded = kernels.dequant(qt)  # [K, N] original order, as the loader computes it
    ours = W[invperm.long()]
    _verify(loaded, ours, name)
    return qt, loaded.T.contiguous()


def _verify(loaded: torch.Tensor, ours: torch.Tensor, name: str) -> None:
    """The packed tensors must reproduce GPTQ's dequantized weights (up to fp16 rounding)."""
    a, b = loaded.to(torch.float32), ours.to(torch.float32)
    tol = 2e-3 * b.abs() + 1e-6
    bad = (a - b).abs() > tol
    if bool(bad.any()) or not bool(torch.isfinite(a).all()):
        k, n = (int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else (0, 0)
        raise StepError(
            f"{name}: the packed EXL2 tensors do not reproduce the GPTQ result (e.g. row {k}, column {n}: "
            f"packed {float(a[k, n]):.6g} vs GPTQ {float(b[k, n]):.6g}). This is a bug in packing or the "
            "kernels; re-run with the reference kernels to isolate it and report it."
        )
