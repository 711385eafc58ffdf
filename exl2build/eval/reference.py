"""The FP16 reference for KL-divergence: per scored token, the FP16 model's top-k.

Stored as one safetensors file beside the FP16 eval.json:
  topk_idx  int32 [T, k]  the k most likely tokens, most likely first
  topk_logp f32   [T, k]  their log-probabilities
  nll       f32   [T]     -log p(target) (for delta-p and the PPL ratio)
  argmax    int32 [T]     the FP16 model's most likely token, as kernels.logit_stats picks it
                          (fp16 logits tie often; the same tie-break as the build's argmax
                          keeps FP16-vs-itself agreement at exactly 1)
Rows are the scored tokens in window order. The metadata records the digest of the tokens
and windows it was computed on, so a reference is never compared against other text.
Full-vocabulary logits of the whole text are never held: T*k*8 bytes instead of T*V*4.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exl2build.errors import InputError
from exl2build.eval.metrics import Window

REFERENCE_FILE = "reference.safetensors"
FORMAT = "exl2build-fp16-reference/2"


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V] (one chunk) -> (int32 [T, k] indices, f32 [T, k] log-probs), most likely first."""
    k = min(k, logits.shape[-1])
    vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # fp32: fp16 lse loses ~3 digits
    return idx.to(torch.int32), (vals.float() - lse).contiguous()


def eval_digest(streams: list[torch.Tensor], windows: list[Window], bos: bool) -> str:
    """sha256 over the token ids, the windows and the BOS choice: what the figures depend on."""
    h = hashlib.sha256()
    for s in streams:
        h.update(s.to("cpu", torch.int64).contiguous().numpy().tobytes())
        h.update(b"|")
    h.update(json.dumps([[w.row, w.start, w.end, w.score_from] for w in windows]).encode())
    h.update(b"bos" if bos else b"nobos")
    return h.hexdigest()


class ReferenceWriter:
    """Collects the top-k of each scored chunk; `save` writes the file."""

    def __init__(self, k: int):
        self.k = k
        self._idx: list[torch.Tensor] = []
        self._logp: list[torch.Tensor] = []
        self._nll: list[torch.Tensor] = []
        self._argmax: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, nll: torch.Tensor, argmax: torch.Tensor) -> None:
        # Kept on the logits' device (T*k*8 bytes) and moved once in `save`: no sync per chunk.
        idx, logp = topk_logprobs(logits, self.k)
        self._idx.append(idx)
        self._logp.append(logp)
        self._nll.append(nll.detach().float())
        self._argmax.append(argmax.detach().to(torch.int32))

    def save(self, out_dir: str | Path, digest: str, info: dict | None = None) -> Path:
        path = Path(out_dir) / REFERENCE_FILE
        def host(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.cpu() for t in parts]).contiguous()

        tensors = {"topk_idx": host(self._idx), "topk_logp": host(self._logp), "nll": host(self._nll),
                   "argmax": host(self._argmax)}
        meta = {"format": FORMAT, "digest": digest, "top_k": str(self.k), "info": json.dumps(info or {})}
        save_file(tensors, str(path), metadata=meta)
        return path


class Reference:
    """Read access to a saved reference, a row range at a time (the file stays on disk)."""

    def __init__(self, path: Path, handle, rows: int, k: int):
        self.path, self._f, self.rows, self.k = path, handle, rows, k

    @classmethod
    def open(cls, ref_dir: str | Path, digest: str) -> "Reference":
        path = Path(ref_dir) / REFERENCE_FILE
        if not path.is_file():
            raise InputError(
                f"{path}: no FP16 reference found. Pass the output folder of the FP16 model's "
                "evaluation (it writes reference.safetensors), or evaluate without a reference."
            )
        try:
            f = safe_open(str(path), framework="pt")
            meta = f.metadata() or {}
            shape = f.get_slice("topk_idx").get_shape()
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise InputError(f"{path}: cannot be read as a reference ({e}). Delete it and re-run the FP16 evaluation.") from None
        if meta.get("format") != FORMAT:
            raise InputError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}. Re-run the FP16 evaluation.")
        if meta.get("digest") != digest:
            raise InputError(
                f"{path}: this FP16 reference was computed on other tokens or windows (digest "
                f"{str(meta.get('digest'))[:12]} vs {digest[:12]}). Evaluate the FP16 model with the same "
                "eval text, method, ctx, stride, windows and bos, and pass that folder."
            )
        return cls(path, f, int(shape[0]), int(shape[1]))

    def close(self) -> None:
        self._f = None  # safe_open has no close(); dropping the handle unmaps the file

    def slice(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(topk_idx, topk_logp, nll, argmax) of rows [a, b)."""
        if not 0 <= a <= b <= self.rows:
            raise InputError(f"{self.path}: rows {a}:{b} requested but the reference has {self.rows}. Re-run the FP16 evaluation.")
        return tuple(self._f.get_slice(name)[a:b] for name in ("topk_idx", "topk_logp", "nll", "argmax"))
