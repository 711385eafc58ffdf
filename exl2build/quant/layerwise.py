"""Shared machinery of the layer-by-layer passes (measure and quantize).

- calibration states: embeddings of the calibration ids, kept as one tensor [rows, len, hidden]
- batched block runs (bounded memory) and swapping a block's linears in and out
- per-layer checkpoints in the step's work folder, so a killed run resumes after the last
  finished layer and produces byte-identical results
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exl2build.errors import StepError
from exl2build.model.forward import compute_dtype_for

DEFAULT_BATCH_ROWS = 4  # calibration rows per forward batch; bounds activation memory


def embed_states(embedding, ids: torch.Tensor, device, batch_rows: int) -> torch.Tensor:
    """Embeddings of ids [rows, len] in the compute dtype of `device`, [rows, len, hidden]."""
    dtype = compute_dtype_for(device)
    parts = [embedding(ids[i : i + batch_rows].to(device), dtype) for i in range(0, ids.shape[0], batch_rows)]
    return torch.cat(parts)


def run_batched(fn, x: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """fn over row batches of x [rows, len, hidden], concatenated."""
    return torch.cat([fn(x[i : i + batch_rows]) for i in range(0, x.shape[0], batch_rows)])


def rel_error(fn, x: torch.Tensor, ref: torch.Tensor, batch_rows: int) -> float:
    """Relative error of fn(x) against ref, as the RMS over tokens of ||y_t - r_t|| / ||r_t||.

    Per token, not one global Frobenius ratio: many models carry a few tokens with massive
    residual activations (e.g. the first one), which would dominate a global norm and make
    every later block look almost error-free. Each block's output is RMS-normed per token by
    the next block, so the per-token ratio is what the rest of the model actually sees.
    Sums in float64.
    """
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_rows):
        r, den = ref_terms(ref[i : i + batch_rows])
        s, n = error_terms(fn(x[i : i + batch_rows]), r, den)
        total += s
        count += n
    return (total / count) ** 0.5 if count else 0.0


def ref_terms(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref in float64, per-token ||ref_t||^2) of one batch, for error_terms."""
    r = ref.to(torch.float64)
    return r, r.pow(2).sum(-1)


def error_terms(y: torch.Tensor, r: torch.Tensor, den: torch.Tensor) -> tuple[float, int]:
    """(sum over the batch's tokens of ||y_t - r_t||^2 / ||r_t||^2, tokens): rel_error's terms."""
    num = (y.to(torch.float64) - r).pow(2).sum(-1)
    ratio = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
    return float(ratio.sum()), int(ratio.numel())


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise StepError(
            f"{where}: hidden states contain inf/NaN (fp16 overflow in the reference pass). The model's "
            "activations exceed the fp16 range on this calibration data; use calibration text closer to the "
            "model's training data."
        )


@contextlib.contextmanager
def swapped(module, replacements: dict):
    """Temporarily set module.<name> = Linear for each entry, restoring the originals after."""
    old = {n: getattr(module, n) for n in replacements}
    try:
        for n, lin in replacements.items():
            setattr(module, n, lin)
        yield
    finally:
        for n, lin in old.items():
            setattr(module, n, lin)


@contextlib.contextmanager
def observing(linear, sink):
    """Route a Linear's inputs to `sink` (e.g. a HessianAccumulator) for the duration."""
    linear.observe = sink
    try:
        yield
    finally:
        linear.observe = None


class _Reached(Exception):
    """Raised by accumulate_inputs' hook: the observed linear got its input, stop the block."""


def accumulate_inputs(fn, linear, x: torch.Tensor, batch_rows: int, sink) -> None:
    """Run fn over row batches of x only up to `linear`: its input goes to `sink` (e.g. a
    HessianAccumulator) and the rest of the block, which that input does not depend on, is
    skipped. Same inputs, in the same order, as observing(linear, sink) around the whole run."""

    def hook(x2):
        sink(x2)
        raise _Reached

    with observing(linear, hook):
        for i in range(0, x.shape[0], batch_rows):
            try:
                fn(x[i : i + batch_rows])
            except _Reached:
                continue
            raise StepError(f"accumulate_inputs: the block never called the linear {linear!r} it was asked to observe.")


def fingerprint(model_dir: Path, calib_tokens: torch.Tensor, extra: dict) -> str:
    """Identity of a run's inputs: a checkpoint made for other inputs is never resumed."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    t = calib_tokens.to("cpu", torch.int64).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoint:
    """`<work>/<name>.json` (progress) + `<work>/<name>-states-<n>.safetensors` (states after n layers).

    The states file is written first and the JSON last (both by atomic rename), so a
    crash at any point leaves either the previous checkpoint or the new one, never a mix.
    """

    def __init__(self, work_dir: Path, name: str, fp: str):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.fp = fp
        self.json = self.dir / f"{name}.json"

    def _states_path(self, done: int) -> Path:
        return self.dir / f"{self.name}-states-{done:04d}.safetensors"

    def load(self, device):
        """(done layers, states tensors dict, results) or None when there is nothing valid to resume."""
        if not self.json.is_file():
            return None
        try:
            meta = json.loads(self.json.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("fingerprint") != self.fp:
            return None
        path = self._states_path(int(meta["done"]))
        if not path.is_file():
            return None
        tensors = {k: v.to(device) for k, v in load_file(str(path)).items()}
        return int(meta["done"]), tensors, meta["results"]

    def save(self, done: int, tensors: dict, results) -> None:
        path = self._states_path(done)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        _atomic_write_text(self.json, json.dumps({"fingerprint": self.fp, "done": done, "results": results}))
        for old in self.dir.glob(f"{self.name}-states-*.safetensors"):
            if old != path:
                old.unlink()
