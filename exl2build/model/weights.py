"""WeightStore: lazy, one-tensor-at-a-time access to a directory of safetensors files.

Works for a single `model.safetensors`, HF shards (with or without the index json) and
EXL2 outputs (`output*.safetensors`). Only the tensor asked for is read, so host memory
stays near the size of one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from exl2build.errors import InputError


def to_dtype_checked(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast, refusing values that overflow fp16 (bf16/fp32 weights can exceed 65504)."""
    out = t.to(dtype)
    overflow = dtype == torch.float16 and t.is_floating_point() and bool(torch.isinf(out).any())
    if overflow and not bool(torch.isinf(t).any()):
        big = float(t.float().abs().max())
        raise InputError(
            f"{what} has values up to {big:.4g}, beyond the fp16 range (65504), so it cannot be stored "
            "as fp16. EXL2 keeps such tensors in fp16; this model cannot be converted as is."
        )
    return out


class WeightStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = self._find_files()
        self._where: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types
                raise InputError(
                    f"{f}: not a readable safetensors file ({e}). Re-download or re-export the weights."
                ) from None
            for k in keys:
                # First file wins, so a stray duplicate cannot silently override a shard.
                self._where.setdefault(k, f)
        self._handles: dict[Path, object] = {}

    def _find_files(self) -> list[Path]:
        if not self.path.is_dir():
            raise InputError(f"{self.path}: is not a directory. Point the recipe at a model folder.")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise InputError(f"{index}: unreadable index ({e}). Delete it or fix its 'weight_map'.") from None
            files = sorted({self.path / v for v in wm.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(
                    f"{index}: names shard files that are not in {self.path}: {', '.join(missing)}. "
                    "Download the missing shards or remove the stale index."
                )
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputError(
                f"{self.path}: no *.safetensors files. Convert .bin/.pt/GGUF weights with the "
                "source import step first, or point the recipe at the right folder."
            )
        return files

    def _describe_files(self) -> str:
        names = [f.name for f in self.files]
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        if name not in self._where:
            raise InputError(
                f"{self.path}: tensor {name!r} is missing from {self._describe_files()}. "
                "The weights are incomplete or belong to a different architecture than config.json says."
            )
        return self._where[name]

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            h = safe_open(str(f), framework="pt")
            self._handles[f] = h
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def get(self, name: str, device="cpu", dtype: torch.dtype | None = None,
            shape: tuple | None = None) -> torch.Tensor:
        """Read one tensor; `shape`, when given, is checked and a mismatch raises InputError."""
        f = self.file_of(name)
        t = self._handle(f).get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise InputError(
                f"{f}: tensor {name!r} has shape {list(t.shape)} but config.json implies {list(shape)}. "
                "The weights do not match the config; use the config.json that came with them."
            )
        if dtype is not None and t.dtype != dtype:
            t = to_dtype_checked(t, dtype, f"{f}: tensor {name!r}")
        return t.to(device)

    def qtensor(self, prefix: str, K: int, N: int, device="cpu"):
        """Read the EXL2 tensors of one quantized linear (`<prefix>.q_weight` ...) as a QTensor."""
        from exl2build.format.exl2 import QTensor

        needed = ["q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm"]
        tensors = {f"{prefix}.{n}": self.get(f"{prefix}.{n}") for n in needed}
        if self.has(f"{prefix}.bias"):
            tensors[f"{prefix}.bias"] = self.get(f"{prefix}.bias")
        inv = tensors[f"{prefix}.q_invperm"]
        if inv.numel() != K:
            raise InputError(
                f"{self.file_of(prefix + '.q_invperm')}: {prefix}.q_invperm has {inv.numel()} entries but "
                f"the layer has K={K} inputs. The quantized weights do not match config.json."
            )
        qt = QTensor.from_tensors(tensors, prefix, K, N)
        return qt.to(device) if str(device) != "cpu" else qt

    def close(self) -> None:
        self._handles.clear()
