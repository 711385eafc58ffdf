"""Hessians of linear layers (H = X^T X / tokens) and their preparation for GPTQ.

GPTQ needs, per linear, the act-order permutation (channels by diag H, largest first) and
the upper Cholesky factor of the inverse of the damped, permuted Hessian.
"""

from __future__ import annotations

import torch

from exl2build.errors import StepError

DEFAULT_DAMP = 0.01  # relative to mean(diag H); chosen by a SmolLM2 sweep, see docs/quantization.md
DAMP_RETRIES = 8  # each retry doubles the damping


class HessianAccumulator:
    """Accumulates X^T X over calibration inputs [tokens, K] in float32 (GEMM-blocked sums are
    accurate enough for a damped Hessian, and fp32 is twice as fast as fp64 on CPU).

    Non-finite inputs mean the FP16 reference pass overflowed: `result()` reports it naming
    the layer (checked once on H, which any inf/NaN input poisons, instead of on every batch).
    """

    def __init__(self, K: int, name: str = "", device="cpu"):
        self.K = int(K)
        self.name = name
        self.device = torch.device(device)
        self.H = torch.zeros(self.K, self.K, dtype=torch.float32, device=self.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.K).to(self.H.device, torch.float32)
        self.H.addmm_(x.T, x)
        self.tokens += int(x.shape[0])

    __call__ = add  # so an accumulator can be set directly as Linear.observe

    def result(self) -> torch.Tensor:
        """H / tokens as float32 [K, K]."""
        who = self.name or "a linear layer"
        if self.tokens == 0:
            raise StepError(f"{who}: no calibration tokens reached this layer's Hessian.")
        if not bool(torch.isfinite(self.H).all()):
            raise StepError(
                f"{who}: the input activations contain inf/NaN (fp16 overflow in the reference pass). The "
                "model's activations exceed the fp16 range on this calibration data; use calibration text "
                "closer to the model's training data, or a model exported in a range-safe fp16 (some bf16 "
                "checkpoints overflow when cast to fp16)."
            )
        return self.H / self.tokens


def prepare(H: torch.Tensor, damp: float = DEFAULT_DAMP, layer_name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, hinv_chol) for GPTQ.

    perm: int64 [K], channels by diag H descending (stable, so ties keep channel order).
    hinv_chol: float32 [K, K], upper Cholesky factor of (P (H + d I) P^T)^-1 where
    d = damp * mean(diag H). Dead channels (diag 0, never active in calibration) sort last
    and are kept invertible by the damping. If the Cholesky fails the damping is doubled and
    retried; after DAMP_RETRIES failures a StepError names the layer.
    """
    if damp <= 0:
        raise StepError(f"{layer_name}: damping must be positive, got {damp}. Set quant.damp to e.g. {DEFAULT_DAMP}.")
    if not bool(torch.isfinite(H).all()):
        raise StepError(
            f"{layer_name}: the Hessian contains inf/NaN (fp16 overflow in the reference pass). Use calibration "
            "data closer to the model's training data or check the source weights for overflow."
        )
    K = H.shape[0]
    # Float64 K x K matrices are large (0.97 GB each for K = 11008): build them one at a time
    # and drop each as soon as the next exists (peak 3 of them, was 7). Permuting in float32
    # and converting after is exact, so the values are those of the float64 permutation.
    diag = torch.diagonal(H).to(torch.float64)
    perm = torch.argsort(-diag, stable=True)
    mean_diag = float(diag.mean())
    dead = mean_diag == 0
    if dead:
        # No activation at all reached this linear: any invertible H gives plain rounding.
        mean_diag = 1.0
    d = damp
    for _ in range(DAMP_RETRIES + 1):
        if dead:
            A = torch.eye(K, dtype=torch.float64, device=H.device)
        else:
            A = H[perm].index_select(1, perm).to(torch.float64)
        A.diagonal().add_(d * mean_diag)  # = Hp + (d * mean) * I, entry for entry
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            # H^-1 = L^-T L^-1; a triangular solve is several times faster than cholesky_inverse on CPU
            Linv = torch.linalg.solve_triangular(L, torch.eye(K, dtype=torch.float64, device=H.device), upper=False)
            del L
            Hinv = Linv.T @ Linv
            del Linv
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return perm, U.to(torch.float32).contiguous()
            del U
        d *= 2
    raise StepError(
        f"{layer_name}: the Hessian is not invertible even with damping {d / 2:g} x mean(diag H) "
        f"(started at {damp:g}, doubled {DAMP_RETRIES} times). The calibration data likely does not "
        "excite this layer's inputs: use more or more varied calibration rows."
    )
