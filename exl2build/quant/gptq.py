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
    H: torch.Tensor | None,
    option: LinearOption,
    scale_search=DEFAULT_SCALE_SEARCH,
    *,
    damp: float = DEFAULT_DAMP,
    bias: torch.Tensor | None = None,
    name: str = "linear",
    prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """(QTensor, dequantized weight [N, K] fp16) of `weight` [N, K] under Hessian H [K, K].

    `prepared` = hessian.prepare(H, damp, name) may be passed when several linears share H
    (H may then be None: only the prepared factor is used).
    The returned weight is what the loader will compute from the packed tensors (verified).
    """
    ss = as_scale_search(scale_search)
    N, K = weight.shape
    if H is None and prepared is None:
        raise StepError(f"{name}: quantize_linear needs the Hessian H or its prepared factor.")
    if H is not None and H.shape != (K, K):
        raise StepError(f"{name}: Hessian shape {tuple(H.shape)} does not match the weight's K={K}.")
    perm, hinv = prepared if prepared is not None else prepare(H, damp, name)
    if perm.shape != (K,) or hinv.shape != (K, K):
        raise StepError(f"{name}: prepared Hessian of size {perm.shape[0]} does not match the weight's K={K}.")
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
    _verify(loaded, W, invperm.long(), name)
    del W
    return qt, loaded.T.contiguous()


VERIFY_CHUNK = 1 << 22  # elements compared at a time: the temporaries stay small next to W


def _verify(loaded: torch.Tensor, W: torch.Tensor, invperm: torch.Tensor, name: str) -> None:
    """The packed tensors must reproduce GPTQ's dequantized weights (up to fp16 rounding).

    `loaded` [K, N] is in original row order, `W` [K, N] in act-order (row invperm[k] of W is
    row k of the weight). Compared in row chunks, so no full-size copies are made; one host
    sync at the end (a failure is located by a second pass)."""
    K, N = loaded.shape
    rows = max(1, VERIFY_CHUNK // max(N, 1))

    def chunks():
        for r0 in range(0, K, rows):
            a = loaded[r0 : r0 + rows].to(torch.float32)
            b = W[invperm[r0 : r0 + rows]]
            yield r0, a, b, ((a - b).abs() > 2e-3 * b.abs() + 1e-6) | ~torch.isfinite(a)

    failed = torch.zeros((), dtype=torch.bool, device=loaded.device)
    for _, _, _, bad in chunks():
        failed |= bad.any()
    if not bool(failed):
        return
    for r0, a, b, bad in chunks():
        if bool(bad.any()):
            k, n = (int(i) for i in bad.nonzero()[0])
            raise StepError(
                f"{name}: the packed EXL2 tensors do not reproduce the GPTQ result (e.g. row {r0 + k}, column {n}: "
                f"packed {float(a[k, n]):.6g} vs GPTQ {float(b[k, n]):.6g}). This is a bug in packing or the "
                "kernels; re-run with the reference kernels to isolate it and report it."
            )
