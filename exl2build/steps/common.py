"""Small helpers the step modules share: token tensors on disk, JSON files."""

from __future__ import annotations

import json
from pathlib import Path


def save_tokens(path: Path, tokens) -> None:
    from safetensors.torch import save_file

    save_file({"tokens": tokens.contiguous()}, str(path))


def load_tokens(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["tokens"]


def write_json(path: Path, value) -> None:
    Path(path).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def bpw_label(bpw: float) -> str:
    """4.0 -> "4.0", 2.25 -> "2.25": the name of a build folder (<bpw>bpw)."""
    return repr(float(bpw))


def call(fn, *args, **kwargs):
    """Call a library function, passing optional keywords only if it takes them (device=...)."""
    import inspect

    sig = inspect.signature(fn)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(*args, **kwargs)


def quant_params(cfg) -> dict:
    """The quantizer parameters a recipe sets (null = the library default: left out, so a
    default change in the library does not masquerade as a recipe change)."""
    p: dict = {}
    if cfg.damping is not None:
        p["damp"] = cfg.damping
    search = {name: getattr(cfg, key) for key, name in
              (("scale_min", "p_min"), ("scale_max", "p_max"), ("scale_steps", "p_steps"), ("scale_norm", "norm"))
              if getattr(cfg, key) is not None}
    if search:
        p["scale_search"] = search
    for key in ("rope_scale", "rope_alpha"):
        if getattr(cfg, key) is not None:
            p[key] = getattr(cfg, key)
    return p
