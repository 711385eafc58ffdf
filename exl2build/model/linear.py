"""Linear layers: an FP16 one and an EXL2 quantized one behind one small interface.

`observe` is the quantizer's hook: when set, it receives the 2-D input [tokens, K] of every
forward call before the product (to accumulate the Hessian X^T X).
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b over the last dim; K inputs, N outputs."""

    def __init__(self, K: int, N: int):
        super().__init__()
        self.K = K
        self.N = N
        self.observe = None

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        if self.observe is not None:
            self.observe(x2)
        return self._product(x2).reshape(*lead, self.N)


class FP16Linear(Linear):
    """Weight stored [N, K] in fp16; computes in the input's dtype (fp32 on CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        N, K = weight.shape
        super().__init__(K, N)
        self.weight = nn.Parameter(weight.to(torch.float16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.float16), requires_grad=False)
        self._cast: tuple[torch.dtype, torch.Tensor, torch.Tensor | None] | None = None

    def _weights_as(self, dtype: torch.dtype):
        # On CPU we compute in fp32; converting 2 bytes/weight on every call would dominate,
        # so keep one converted copy (dropped by `release_cache`).
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        c = self._cast
        if c is None or c[0] != dtype or c[1].device != self.weight.device:
            b = None if self.bias is None else self.bias.to(dtype)
            c = (dtype, self.weight.to(dtype), b)
            self._cast = c
        return c[1], c[2]

    def release_cache(self) -> None:
        self._cast = None

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        w, b = self._weights_as(x2.dtype)
        return torch.nn.functional.linear(x2, w, b)

    def _apply(self, fn, recurse=True):
        self._cast = None
        return super()._apply(fn, recurse)


class EXL2Linear(Linear):
    """A quantized linear; the product goes through kernels.exl2_matmul.

    On CPU, prefill-sized inputs (M > 32) use a cached dequantized weight instead: evaluation
    is prefill-heavy and dequantizing per call would cost more than the matmul. On CUDA the
    same happens, wherever exl2_matmul would dequantize (kernels.uses_dequant), while
    `keep_dequantized` is set (see `dequant_cache`); the product is the same either way (the
    same fp16 dequantization, the same torch.matmul).
    """

    keep_dequantized = False

    def __init__(self, qtensor):
        super().__init__(qtensor.K, qtensor.N)
        self.qtensor = qtensor
        self.bias = None if qtensor.bias is None else qtensor.bias
        self._deq: torch.Tensor | None = None

    def release_cache(self) -> None:
        self._deq = None

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._deq is None or self._deq.dtype != dtype:
            from exl2build import kernels

            self._deq = kernels.dequant(self.qtensor).to(dtype)  # [K, N], original row order
        return self._deq

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        from exl2build import kernels

        dequantizes = kernels.uses_dequant(x2.shape[0], self.K, self.N, x2.is_cuda and x2.dtype == torch.float16)
        if dequantizes and (x2.device.type == "cpu" or self.keep_dequantized):
            y = x2 @ self._dequantized(x2.dtype)
        else:
            y = kernels.exl2_matmul(x2.contiguous(), self.qtensor)
        return self._add_bias(y)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        # QTensor is not an nn.Module; move it by probing where `fn` sends a tensor.
        probe = fn(torch.empty(0, device=self.qtensor.q_weight.device))
        if probe.device != self.qtensor.q_weight.device:
            self.qtensor = self.qtensor.to(probe.device)
            self.bias = self.qtensor.bias
            self._deq = None
        return super()._apply(fn, recurse)


def project(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """[lin(x) for lin in linears] for linears that read the same x (q, k, v; gate, up).

    Decode-sized inputs (a few tokens on CUDA) of EXL2 linears go through one grouped kernel
    launch (kernels.exl2_matmul_group); everything else is the linears' own forward.
    """
    from exl2build import kernels

    linears = list(linears)
    K = linears[0].K
    if (x.is_cuda and x.numel() <= kernels.GEMV_MAX_ROWS * K
            and all(type(m) is EXL2Linear and m.observe is None and m.K == K for m in linears)):
        lead = x.shape[:-1]
        ys = kernels.exl2_matmul_group(x.reshape(-1, K).contiguous(), [m.qtensor for m in linears])
        return [m._add_bias(y).reshape(*lead, m.N) for m, y in zip(linears, ys)]
    return [m(x) for m in linears]


def project_swiglu(linear: Linear, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """linear(silu(gate) * up) in one kernel launch, for decode-sized f16 CUDA inputs of an EXL2
    linear (kernels.exl2_matmul_swiglu: silu_mul's roundings, the same product); None elsewhere,
    where the caller runs silu_mul and the linear's own forward."""
    from exl2build import kernels

    K = linear.K
    if not (type(linear) is EXL2Linear and linear.observe is None and gate.is_cuda and gate.dtype == torch.float16
            and gate.numel() <= 8 * K and gate.shape == up.shape and gate.shape[-1] == K):
        return None
    lead = gate.shape[:-1]
    y = kernels.exl2_matmul_swiglu(gate.reshape(-1, K), up.reshape(-1, K), linear.qtensor)
    return linear._add_bias(y).reshape(*lead, linear.N)


def dequant_cache(model: nn.Module, enabled: bool) -> int:
    """Keep (or drop) one fp16 copy of every EXL2 weight for prefill-sized products.

    Evaluation runs thousands of 2048-token windows; dequantizing every weight in every
    window costs more than the matmuls of a small model. Returns the bytes the copies take
    (0 when disabling, or when the model has no EXL2 linears).
    """
    total = 0
    for m in model.modules():
        if isinstance(m, EXL2Linear):
            m.keep_dequantized = enabled
            if enabled:
                total += m.K * m.N * 2
            else:
                m.release_cache()
    return total


def dequant_cache_bytes(model: nn.Module) -> int:
    """fp16 bytes `dequant_cache(model, True)` would keep."""
    return sum(m.K * m.N * 2 for m in model.modules() if isinstance(m, EXL2Linear))
