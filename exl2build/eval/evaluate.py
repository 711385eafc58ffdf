"""Evaluate one model directory on a token stream: perplexity, KLD against FP16, speed.

Logits are computed a chunk of positions at a time (model.hidden for the window, then the
head on `chunk` rows) and reduced at once by kernels.logit_stats, so at most chunk x vocab
logits exist. Evaluating an FP16 model also writes the FP16 reference (top-k log-probs) that
quantized builds are compared against; quantized builds read it through `ref_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from exl2build import kernels
from exl2build.errors import ConfigError, InputError
from exl2build.eval.metrics import METHODS, Window, plan_windows, summarize
from exl2build.eval.reference import Reference, ReferenceWriter, eval_digest
from exl2build.eval.speed import SpeedParams, device_name, measure_speed
from exl2build.model.linear import dequant_cache, dequant_cache_bytes
from exl2build.model.load import load_model

EVAL_FILE = "eval.json"


@dataclass
class EvalParams:
    """The `eval` settings that change the figures (all part of the step's cache key)."""

    method: str = "windows"  # windows (exllamav2) | sliding (llama.cpp)
    ctx: int = 2048  # tokens per window
    stride: int | None = None  # sliding only; default ctx - ctx//2
    windows: int | None = None  # evaluate only the first N windows (None: all)
    bos: bool = False  # replace each window's first token by BOS (llama.cpp does)
    chunk: int = 512  # logits rows per head call (memory, not results)
    top_k: int = 32  # FP16 reference: tokens kept per position
    speed: dict | None = field(default=None)  # SpeedParams keys, or None to skip

    @classmethod
    def from_dict(cls, d: dict | None) -> "EvalParams":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"eval: unknown key(s) {sorted(unknown)}. Known: {sorted(cls.__dataclass_fields__)}.")
        p = cls(**d)
        if p.method not in METHODS:
            raise ConfigError(f"eval.method = {p.method!r} is not known. Use one of: {', '.join(METHODS)}.")
        for key in ("ctx", "chunk", "top_k"):
            v = getattr(p, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"eval.{key} = {v!r}: must be a positive integer.")
        if p.windows is not None and (not isinstance(p.windows, int) or p.windows < 1):
            raise ConfigError(f"eval.windows = {p.windows!r}: must be a positive integer or null (all windows).")
        if isinstance(p.speed, bool):
            p.speed = {} if p.speed else None
        if p.speed is not None and dict(p.speed).get("enabled", True) is False:
            p.speed = None
        if p.speed is not None:
            SpeedParams.from_dict(p.speed)  # validate now, not after the evaluation
        return p


def _streams(tokens) -> list[torch.Tensor]:
    """A 1-D stream, or the rows of a 2-D tensor, each its own stream (windows never straddle rows)."""
    t = torch.as_tensor(tokens)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() not in (1, 2):
        raise ValueError(f"evaluate_model: tokens must be an integer tensor [N] or [rows, N], got {t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    return [t] if t.dim() == 1 else list(t)


def _stride(p: EvalParams) -> int:
    if p.method == "windows":
        return p.ctx
    return p.stride if p.stride is not None else p.ctx - p.ctx // 2


# Share of the free GPU memory the fp16 weight copies may take during an evaluation.
DEQUANT_CACHE_SHARE = 0.4


def _start_dequant_cache(model, device: torch.device) -> int:
    """On CUDA, keep fp16 copies of the EXL2 weights for the evaluation when they fit in
    DEQUANT_CACHE_SHARE of the free memory (figures unchanged, windows several times faster
    on small models). The CPU path always keeps them. Returns the bytes kept."""
    need = dequant_cache_bytes(model)
    if device.type != "cuda" or need == 0:
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return dequant_cache(model, True) if need <= DEQUANT_CACHE_SHARE * free else 0


def _model_info(cfg) -> dict:
    q = cfg.quantization_config or {}
    return {"quantized": cfg.is_exl2, "bits": q.get("bits"), "head_bits": q.get("head_bits")}


@torch.inference_mode()
def _score_window(model, ids: torch.Tensor, w: Window, p: EvalParams, bos_id, ref, ref_row: int,
                  writer: ReferenceWriter | None) -> dict[str, list[torch.Tensor]]:
    """Per-token nll/argmax(/kld, ref nll, ref argmax) of one window's scored targets."""
    x = ids.clone()
    if p.bos:
        x[0] = bos_id  # position 0 is never a target, so only the context changes
    h = model.hidden(x.to(model.device))  # [T, hidden]
    j0 = w.score_from - w.start  # first scored target, local
    targets = ids[j0:].to(model.device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("nll", "argmax", "kld", "ref_nll", "ref_argmax")}
    for a in range(0, targets.numel(), p.chunk):
        b = min(a + p.chunk, targets.numel())
        logits = model.head(h[j0 - 1 + a : j0 - 1 + b])  # position i predicts target i+1
        ref_idx = ref_logp = None
        if ref is not None:
            ref_idx, ref_logp, ref_nll, ref_argmax = ref.slice(ref_row + a, ref_row + b)
            out["ref_nll"].append(ref_nll)
            out["ref_argmax"].append(ref_argmax.long())
            ref_idx, ref_logp = ref_idx.to(model.device), ref_logp.to(model.device)
        st = kernels.logit_stats(logits.contiguous(), targets[a:b].contiguous(), ref_idx, ref_logp)
        # Results stay on the device until the end: a copy to the host per chunk would sync each time.
        out["nll"].append(st["nll"])
        out["argmax"].append(st["argmax"])
        if ref is not None:
            out["kld"].append(st["kld"])
        if writer is not None:
            writer.add(logits, st["nll"], st["argmax"])
    return out


def evaluate_model(model_dir, tokens, params: dict | EvalParams | None = None, ref_dir=None, out_dir=None,
                   progress: Callable[[int, int, str], None] | None = None, *, device=None,
                   write_reference: bool | None = None, text_info: dict | None = None) -> dict:
    """Evaluate `model_dir` on `tokens` and write `<out_dir>/eval.json` (and the reference for FP16).

    ref_dir: folder holding reference.safetensors from the FP16 evaluation on the same tokens;
    given, the KLD, top-1 agreement, delta-p and PPL-ratio figures are added.
    write_reference: default True for an FP16 (unquantized) model.
    Returns the dict written to eval.json.
    """
    p = params if isinstance(params, EvalParams) else EvalParams.from_dict(params)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streams = _streams(tokens)
    windows = plan_windows([s.numel() for s in streams], p.ctx, p.method, p.stride, p.windows)
    if not windows:
        raise InputError(
            f"evaluation text: {sum(s.numel() for s in streams)} tokens (longest row "
            f"{max((s.numel() for s in streams), default=0)}) give no window of eval.ctx = {p.ctx} tokens. "
            "Use a longer evaluation text or lower eval.ctx."
        )
    model, cfg = load_model(model_dir, device)
    if p.bos and cfg.bos_token_id is None:
        raise ConfigError(f"eval.bos = true but {model_dir}/config.json has no bos_token_id. Set eval.bos=false.")
    digest = eval_digest(streams, windows, p.bos)
    info = _model_info(cfg)
    if write_reference is None:
        write_reference = not info["quantized"]
    writer = ReferenceWriter(p.top_k) if write_reference and out_dir is not None else None
    ref = Reference.open(ref_dir, digest) if ref_dir is not None else None
    if ref is not None and ref.rows != sum(w.scored for w in windows):
        raise InputError(f"{ref.path}: {ref.rows} rows but the windows score {sum(w.scored for w in windows)} tokens. Re-run the FP16 evaluation.")

    acc: dict[str, list[torch.Tensor]] = {k: [] for k in ("nll", "argmax", "kld", "ref_nll", "ref_argmax")}
    row = 0
    cache_bytes = _start_dequant_cache(model, device)
    try:
        t0 = time.perf_counter()
        for i, w in enumerate(windows):
            part = _score_window(model, streams[w.row][w.start : w.end], w, p, cfg.bos_token_id, ref, row, writer)
            for k, v in part.items():
                acc[k].extend(v)
            row += w.scored
            if progress is not None:
                progress(i + 1, len(windows), f"window {i + 1}/{len(windows)}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        dequant_cache(model, False)  # the speed figures below measure the model as users run it

    if ref is not None:
        ref.close()
    cat = {k: torch.cat([t.cpu() for t in v]) if v else None for k, v in acc.items()}
    figures = summarize(cat["nll"], cat["argmax"], cat["kld"], cat["ref_nll"], cat["ref_argmax"])
    result = {
        "model_dir": str(model_dir),
        **info,
        "device": device_name(device),
        "text": text_info or {},
        "method": {"method": p.method, "ctx": p.ctx, "stride": _stride(p), "bos": p.bos,
                   "windows": len(windows), "top_k": ref.k if ref is not None else p.top_k},
        "digest": digest,
        **figures,
        "reference": None,  # the file name when this evaluation wrote the FP16 reference
        "compared_to": None if ref_dir is None else str(ref_dir),
        "eval_seconds": seconds,
        "eval_tps": len(windows) * p.ctx / seconds if seconds > 0 else None,
        # fp16 copies of the EXL2 weights kept during the windows (CUDA, when they fit; 0: none)
        "dequant_cache_bytes": cache_bytes,
    }
    if p.speed is not None:
        if progress is not None:
            progress(len(windows), len(windows), "speed")
        speed = measure_speed(model, SpeedParams.from_dict(p.speed))
        result.update(prefill_tps=speed["prefill_tps"], decode_tps=speed["decode_tps"], speed=speed)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if writer is not None:
            result["reference"] = writer.save(out, digest, {"model_dir": str(model_dir), "params": asdict(p)}).name
        (out / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
