"""The recipe schema (structured configs) and its validation.

Hydra composes a recipe from recipes/NAME.yaml and the groups in conf/; `load_recipe`
turns the composed mapping into these dataclasses and checks every value *before*
anything runs. Each problem becomes a ConfigError naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from exl2build.errors import ConfigError

SOURCE_KINDS = ("hf", "gguf", "checkpoint")
FETCHABLE = ("smollm2",)
TEXT_KINDS = ("parquet", "text", "generated")
HEAD_BITS = (2, 3, 4, 5, 6, 8)
EVAL_METHODS = ("windows", "sliding")
RUNNER_KINDS = ("local", "ray")


@dataclass
class SourceConfig:
    """The FP16 model: an HF directory, a GGUF file or a .bin/.pt checkpoint."""

    kind: str = "hf"
    path: Optional[str] = None
    fetch: Optional[str] = None  # "smollm2": download the pinned SmolLM2-135M GGUF


@dataclass
class CalibConfig:
    """Calibration text and how many rows x tokens the quantizer and measurement see."""

    kind: str = "parquet"
    path: Optional[str] = None
    column: Optional[str] = None
    rows: int = 100
    length: int = 2048
    measure_rows: int = 16
    measure_length: int = 2048
    seed: int = 0
    bos: bool = False


@dataclass
class QuantConfig:
    bpws: List[float] = field(default_factory=lambda: [4.0])
    head_bits: int = 6
    shard_size_mb: int = 8192  # 0 = one file
    # null = the quantizer's own default (exl2build.quant): damping relative to mean(diag H),
    # and the per-group scale factor search (range, steps, error norm).
    damping: Optional[float] = None
    scale_min: Optional[float] = None
    scale_max: Optional[float] = None
    scale_steps: Optional[int] = None
    scale_norm: Optional[float] = None
    rope_scale: Optional[float] = None
    rope_alpha: Optional[float] = None


@dataclass
class EvalTextConfig:
    """Held-out evaluation text; `generated` samples it from the FP16 model."""

    kind: str = "generated"
    path: Optional[str] = None
    column: Optional[str] = None
    rows: int = 8  # generated: rows x length tokens
    length: int = 2048
    seed: int = 1234
    max_tokens: Optional[int] = None  # file kinds: use at most this many tokens


@dataclass
class GatesConfig:
    """Quality limits for CI; a build that breaks one fails the run. Each is null (off), one
    number for every bitrate, or a mapping bitrate -> number, e.g. `{"4.0": 1.1, "3.0": 1.35}`."""

    max_kld_mean: Any = None
    max_kld_p99: Any = None
    max_ppl_ratio: Any = None
    max_ppl: Any = None
    min_top1_agreement: Any = None


@dataclass
class EvalConfig:
    enabled: bool = True
    text: EvalTextConfig = field(default_factory=EvalTextConfig)
    ctx: int = 2048
    method: str = "windows"  # windows (exllamav2) | sliding (llama.cpp, second half scored)
    stride: Optional[int] = None  # sliding: default ctx/2
    windows: Optional[int] = None  # at most this many windows
    bos: bool = False  # each window starts with BOS
    kld_topk: int = 32  # FP16 reference keeps this many log-probs per position
    speed: bool = True
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass
class RunnerConfig:
    kind: str = "local"
    gpus: List[int] = field(default_factory=list)
    address: Optional[str] = None


@dataclass
class RecipeConfig:
    name: str = "recipe"
    source: SourceConfig = field(default_factory=SourceConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    out_dir: Optional[str] = None  # null: builds/<name>
    cache_dir: str = ".exl2cache"
    device: str = "auto"


# ---------------------------------------------------------------- building from a mapping


def _fail(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"Config error at `{key}`: {problem}. Fix: {fix}")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(key, f"expected a mapping of settings, got {value!r}", f"give `{key}` as a mapping (key: value lines)")
        return _build(tp, value, key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _fail(key, f"expected a list, got {value!r}", f"write a list, e.g. `{key}=[...]`")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _fail(key, f"expected a mapping, got {value!r}", f"give `{key}` as a mapping")
        return dict(value)
    if value is None:
        raise _fail(key, "is empty (null)", f"set `{key}` to {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise _fail(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", f"set `{key}` to {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else "remove it"
            raise _fail(full, f"unknown key (known keys here: {', '.join(names)})", hint)
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, hints[name], data[name])
    return cls(**kwargs)


# ---------------------------------------------------------------- value checks


def bpw_range() -> tuple[float, float]:
    """The decoder bitrates EXL2 options can reach (from the quantizer's option table)."""
    try:
        from exl2build.quant import options
    except ImportError:
        return (2.1, 8.0)
    for name in ("bpw_range", "reachable_bpw_range", "reachable_range"):
        fn = getattr(options, name, None)
        if callable(fn):
            try:
                lo, hi = fn()
                return (float(lo), float(hi))
            except TypeError:
                pass
    lo, hi = getattr(options, "BPW_MIN", None), getattr(options, "BPW_MAX", None)
    if lo is not None and hi is not None:
        return (float(lo), float(hi))
    return (2.1, 8.0)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise _fail(key, f"{value!r} is not one of {choices}", f"set `{key}` to one of {choices}")


def _positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        need = "zero or more" if allow_zero else "greater than zero"
        raise _fail(key, f"{value!r} is out of range", f"set `{key}` to a value {need}")


def _existing(key: str, path: Optional[str], what: str) -> None:
    if path is None:
        raise _fail(key, f"no {what} is given", f"set `{key}=/path/to/{what.replace(' ', '_')}`")
    if not Path(path).exists():
        raise _fail(key, f"{path!r} does not exist", f"point `{key}` at an existing {what}")


def _check_text(prefix: str, kind: str, path: Optional[str]) -> None:
    _one_of(f"{prefix}.kind", kind, TEXT_KINDS)
    if kind != "generated":
        _existing(f"{prefix}.path", path, f"{kind} file")


def _check_gate(key: str, value: Any, bpws: List[float]) -> None:
    def number(k: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _fail(k, f"{v!r} is not a limit", f"set `{k}` to a number >= 0 (or null for no gate)")

    if value is None:
        return
    if not isinstance(value, dict):
        return number(key, value)
    for b, v in value.items():
        try:
            bpw = float(str(b).removesuffix("bpw"))
        except ValueError:
            raise _fail(f"{key}.{b}", f"{b!r} is not a bitrate", 'key the limits by bitrate, e.g. {"4.0": 1.1}') from None
        if bpw not in bpws:
            raise _fail(f"{key}.{b}", f"{bpw} is not one of quant.bpws {bpws}", "gate only bitrates that the recipe builds")
        number(f"{key}.{b}", v)


def check(cfg: RecipeConfig) -> RecipeConfig:
    s = cfg.source
    _one_of("source.kind", s.kind, SOURCE_KINDS)
    if s.fetch is not None:
        _one_of("source.fetch", s.fetch, FETCHABLE)
        if s.kind != "gguf":
            raise _fail("source.kind", f"source.fetch={s.fetch} gives a GGUF file but kind is {s.kind!r}", "set `source.kind=gguf`")
    else:
        _existing("source.path", s.path, "model" if s.kind == "hf" else f"{s.kind} file")
        if s.kind == "hf" and not (Path(s.path) / "config.json").is_file():
            raise _fail("source.path", f"{s.path!r} is not an HF model directory (no config.json)", "point `source.path` at a folder with config.json and *.safetensors, or set `source.kind` to gguf/checkpoint")

    c = cfg.calib
    _check_text("calib", c.kind, c.path)
    for k in ("rows", "length", "measure_rows", "measure_length"):
        _positive(f"calib.{k}", getattr(c, k))

    q = cfg.quant
    lo, hi = bpw_range()
    if not q.bpws:
        raise _fail("quant.bpws", "the list of target bitrates is empty", "set e.g. `quant.bpws=[4.0]`")
    for i, b in enumerate(q.bpws):
        if not (lo <= b <= hi):
            raise _fail(f"quant.bpws[{i}]", f"{b} bpw is outside what EXL2 options can reach ({lo:g} to {hi:g} bpw)", f"choose targets between {lo:g} and {hi:g}")
    if len(set(q.bpws)) != len(q.bpws):
        raise _fail("quant.bpws", f"{q.bpws} lists a bitrate twice", "list each target once")
    _one_of("quant.head_bits", q.head_bits, HEAD_BITS)
    _positive("quant.shard_size_mb", q.shard_size_mb, allow_zero=True)
    _positive("quant.damping", q.damping)
    _positive("quant.scale_min", q.scale_min)
    _positive("quant.scale_steps", q.scale_steps)
    _positive("quant.scale_norm", q.scale_norm)
    if q.scale_max is not None and q.scale_min is not None and q.scale_max < q.scale_min:
        raise _fail("quant.scale_max", f"{q.scale_max} is below quant.scale_min={q.scale_min}", "make scale_max >= scale_min")
    _positive("quant.rope_scale", q.rope_scale)
    _positive("quant.rope_alpha", q.rope_alpha)

    e = cfg.eval
    _check_text("eval.text", e.text.kind, e.text.path)
    _positive("eval.text.rows", e.text.rows)
    _positive("eval.text.length", e.text.length)
    _positive("eval.text.max_tokens", e.text.max_tokens)
    _positive("eval.ctx", e.ctx)
    _one_of("eval.method", e.method, EVAL_METHODS)
    _positive("eval.windows", e.windows)
    _positive("eval.stride", e.stride)
    if e.text.kind == "generated" and e.ctx > e.text.length:
        raise _fail("eval.ctx", f"{e.ctx} tokens per window exceed the generated rows of eval.text.length={e.text.length}", "set eval.ctx <= eval.text.length (or generate longer rows)")
    _positive("eval.kld_topk", e.kld_topk)
    for f in dataclasses.fields(GatesConfig):
        _check_gate(f"eval.gates.{f.name}", getattr(e.gates, f.name), q.bpws)

    r = cfg.runner
    _one_of("runner.kind", r.kind, RUNNER_KINDS)
    for i, g in enumerate(r.gpus):
        _positive(f"runner.gpus[{i}]", g, allow_zero=True)
    if len(set(r.gpus)) != len(r.gpus):
        raise _fail("runner.gpus", f"{r.gpus} names a GPU twice", "list each GPU index once")

    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise _fail("device", f"{cfg.device!r} is not a device", "set `device` to auto, cpu, cuda or cuda:N")
    for key in ("out_dir", "cache_dir"):
        if not getattr(cfg, key):
            raise _fail(key, "is empty", f"set `{key}` to a folder path")
    return cfg


def _absolute(cfg: RecipeConfig) -> RecipeConfig:
    """Relative paths are taken from the directory the command was started in."""
    def fix(p: Optional[str]) -> Optional[str]:
        return None if p is None else os.path.abspath(os.path.expanduser(p))

    cfg.source.path = fix(cfg.source.path)
    cfg.calib.path = fix(cfg.calib.path)
    cfg.eval.text.path = fix(cfg.eval.text.path)
    cfg.out_dir = fix(cfg.out_dir or f"builds/{cfg.name}")
    cfg.cache_dir = fix(cfg.cache_dir)
    return cfg


def load_recipe(data: dict) -> RecipeConfig:
    """Mapping (composed by Hydra, interpolations resolved) -> checked RecipeConfig."""
    data = {k: v for k, v in data.items() if k != "hydra"}
    return check(_absolute(_build(RecipeConfig, data, "")))


def schema_has(key: str) -> bool:
    """Whether a dotted override key (`quant.bpws`, `eval.text.kind`) names a setting."""
    tp: Any = RecipeConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return True


def known_keys(prefix: str) -> List[str]:
    """The keys one level under `prefix` ("" for the top), for error messages."""
    tp: Any = RecipeConfig
    for part in [p for p in prefix.split(".") if p]:
        tp = typing.get_type_hints(tp).get(part)
        if tp is None or not dataclasses.is_dataclass(tp):
            return []
    return [f.name for f in dataclasses.fields(tp)]


def to_dict(cfg: RecipeConfig) -> dict:
    return dataclasses.asdict(cfg)
