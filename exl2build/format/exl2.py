"""EXL2 tensor names and the QTensor container of one quantized linear.

The on-disk contract is ../shared/docs/exl2-format.md. A QTensor holds exactly the
tensors a loader reads (q_perm is derived, never stored), plus K and N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
QTENSOR_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


def pad_columns(n: int) -> int:
    """N rounded up to a multiple of 32 (the packed width N_pad)."""
    return (n + 31) // 32 * 32


def tensor_name(prefix: str, suffix: str) -> str:
    """`<prefix>.<suffix>`, e.g. tensor_name('model.layers.0.mlp.up_proj', 'q_weight')."""
    return f"{prefix}.{suffix}"


def qtensor_names(prefix: str, bias: bool = False) -> list[str]:
    """The tensor names of one quantized linear, in a fixed order."""
    names = [tensor_name(prefix, s) for s in QTENSOR_SUFFIXES]
    if bias:
        names.append(tensor_name(prefix, "bias"))
    return names


def is_quantized(names, prefix: str) -> bool:
    """Whether a set of tensor names holds a quantized linear under `prefix`."""
    names = set(names)
    return all(tensor_name(prefix, s) in names for s in QTENSOR_SUFFIXES)


def quantization_config(version: str, bits: float, head_bits: int, rows: int, length: int, dataset: str) -> dict:
    """The `quantization_config` entry added to config.json of a compiled model."""
    return {
        "quant_method": "exl2",
        "version": str(version),
        "bits": float(bits),
        "head_bits": int(head_bits),
        "calibration": {"rows": int(rows), "length": int(length), "dataset": str(dataset)},
    }


@dataclass
class QTensor:
    """The packed tensors of one EXL2 linear (W^T orientation: K rows in, N columns out)."""

    q_weight: torch.Tensor  # int32 [sum rows_g*bits_g/32, N_pad]
    q_scale: torch.Tensor  # int32 [G, N_pad/8]
    q_scale_max: torch.Tensor  # float16 [G]
    q_groups: torch.Tensor  # int16 [2G]: (bits, first row inside q_weight) pairs
    q_invperm: torch.Tensor  # int32 [K]
    bias: torch.Tensor | None
    K: int
    N: int
    _perm: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_pad(self) -> int:
        return int(self.q_weight.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.q_scale_max.shape[0])

    @property
    def device(self) -> torch.device:
        return self.q_weight.device

    @property
    def perm(self) -> torch.Tensor:
        """Row r of the packed matrix is original input channel perm[r] (argsort of invperm)."""
        # Cached per q_invperm object, so replacing q_invperm (or moving it) refreshes it.
        if self._perm is None or self._perm[0] is not self.q_invperm:
            self._perm = (self.q_invperm, torch.argsort(self.q_invperm.long()).to(torch.int32))
        return self._perm[1]

    def group_rows(self) -> list[tuple[int, int, int]]:
        """(bits, first K row, rows) of each group, rebuilt from q_groups as the loader does."""
        # Word rows are read as unsigned 16-bit values (int16 on disk).
        qg = [v & 0xFFFF for v in self.q_groups.to("cpu", torch.int64).tolist()]
        total_words = int(self.q_weight.shape[0])
        out, k_row = [], 0
        for g in range(self.num_groups):
            bits, word = qg[2 * g], qg[2 * g + 1]
            if g + 1 < self.num_groups:
                rows = (qg[2 * g + 3] - word) * 32 // bits
            else:
                rows = self.K - k_row
            out.append((bits, k_row, rows))
            k_row += rows
        if any(rows <= 0 for _, _, rows in out) or k_row != self.K or (out and out[-1][2] * out[-1][0] > 32 * (total_words - qg[-1])):
            raise ValueError(f"q_groups {qg} do not describe K={self.K} rows in {total_words} packed words")
        return out

    def to(self, device) -> "QTensor":
        device = torch.device(device)
        return QTensor(
            self.q_weight.to(device),
            self.q_scale.to(device),
            self.q_scale_max.to(device),
            self.q_groups.to(device),
            self.q_invperm.to(device),
            None if self.bias is None else self.bias.to(device),
            self.K,
            self.N,
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors to write under `prefix` (bias only when present)."""
        out = {tensor_name(prefix, s): getattr(self, s).contiguous() for s in QTENSOR_SUFFIXES}
        if self.bias is not None:
            out[tensor_name(prefix, "bias")] = self.bias.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str, K: int, N: int) -> "QTensor":
        """Rebuild from a name -> tensor mapping (e.g. a safetensors file); checks shapes and dtypes."""
        missing = [n for n in qtensor_names(prefix) if n not in tensors]
        if missing:
            raise ValueError(f"quantized linear {prefix!r} lacks tensors {missing}")
        t = {s: tensors[tensor_name(prefix, s)] for s in QTENSOR_SUFFIXES}
        bias = tensors.get(tensor_name(prefix, "bias"))
        qt = cls(t["q_weight"], t["q_scale"], t["q_scale_max"], t["q_groups"], t["q_invperm"], bias, int(K), int(N))
        qt.validate(prefix)
        return qt

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the tensor when a dtype, shape or value breaks the format."""
        prefix = f"{prefix}." if prefix else ""
        G = self.num_groups
        n_pad = pad_columns(self.N)
        expect = {
            "q_weight": (torch.int32, None),
            "q_scale": (torch.int32, (G, n_pad // 8)),
            "q_scale_max": (torch.float16, (G,)),
            "q_groups": (torch.int16, (2 * G,)),
            "q_invperm": (torch.int32, (self.K,)),
        }
        if self.q_weight.dim() != 2 or self.q_weight.shape[1] != n_pad:
            raise ValueError(f"{prefix}q_weight: expected [*, {n_pad}] for N={self.N}, got {tuple(self.q_weight.shape)}")
        for name, (dtype, shape) in expect.items():
            t = getattr(self, name)
            if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
                raise ValueError(
                    f"{prefix}{name}: expected {dtype} {shape or '[*, N_pad]'}, got {t.dtype} {tuple(t.shape)}"
                )
        if self.bias is not None and (self.bias.dtype != torch.float16 or tuple(self.bias.shape) != (self.N,)):
            raise ValueError(f"{prefix}bias: expected float16 ({self.N},), got {self.bias.dtype} {tuple(self.bias.shape)}")
        bits = self.q_groups[0::2].tolist()
        if any(b not in BIT_WIDTHS for b in bits):
            raise ValueError(f"{prefix}q_groups: bit widths {bits} outside {BIT_WIDTHS}")
        self.group_rows()
        if not torch.equal(torch.sort(self.q_invperm.long()).values, torch.arange(self.K, device=self.q_invperm.device)):
            raise ValueError(f"{prefix}q_invperm: not a permutation of 0..{self.K - 1}")


def build_qtensor(groups, invperm: torch.Tensor, N: int, bias: torch.Tensor | None = None) -> QTensor:
    """Assemble a QTensor from per-group results along K (permuted order).

    groups: sequence of (bits, codes uint8 [rows, N], qscale uint8 [N] in 1..16, scale_max: a
    float or 0-d tensor; tensors stay on their device, so no GPU sync happens here).
    Padded columns hold the zero code 2^(bits-1) and scale code 1.
    """
    from exl2build import kernels  # lazy: kernels.py must not import format at load time

    n_pad = pad_columns(N)
    words, qscales, qmax, qgroups = [], [], [], []
    word_row = 0
    for bits, codes, qscale, scale_max in groups:
        rows = int(codes.shape[0])
        padded = torch.full((rows, n_pad), 1 << (bits - 1), dtype=torch.uint8, device=codes.device)
        padded[:, :N] = codes
        packed = kernels.pack_codes(padded.contiguous(), bits)
        qs = torch.ones(1, n_pad, dtype=torch.uint8, device=codes.device)
        qs[0, :N] = qscale
        words.append(packed)
        qscales.append(kernels.pack_scales(qs))
        qmax.append(torch.as_tensor(scale_max, dtype=torch.float32, device=codes.device).reshape(()))
        qgroups += [bits, word_row]
        word_row += int(packed.shape[0])
    device = invperm.device
    K = int(invperm.shape[0])
    qt = QTensor(
        torch.cat(words).to(device),
        torch.cat(qscales).to(device),
        torch.stack(qmax).to(device, torch.float16),
        torch.tensor(qgroups, dtype=torch.int16, device=device),
        invperm.to(torch.int32).contiguous(),
        None if bias is None else bias.to(device, torch.float16).contiguous(),
        K,
        int(N),
    )
    qt.validate("build_qtensor")
    return qt
