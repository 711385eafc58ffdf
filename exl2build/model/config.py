"""ModelConfig: the hyperparameters of a model directory, read from its config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exl2build.errors import InputError
from exl2build.model.arch import ArchSpec, get_arch


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e}). Fix or replace the file.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}.")
    return data


def _first_id(v: Any) -> int | None:
    # A special-token id may be given as a list; the first entry is the canonical one.
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def rope_keys(c: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of a config.json in either spelling: the top-level keys, or the
    `rope_parameters` dict that transformers 5 writes instead (theta inside, rope_type "default"
    for no scaling). Read only the old keys and a transformers-5 config would silently get 10000."""
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and ("rope_theta" in rp or "rope_type" in rp):
        theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        return float(theta), (scaling if scaling.get("rope_type", "default") != "default" else None)
    return float(c.get("rope_theta", 10000.0)), c.get("rope_scaling")


def _sliding_windows(rule: str, c: dict, layers: int, source: str) -> list:
    """ModelConfig.sliding_windows as transformers reads the config (ArchSpec.sliding_window)."""
    if rule == "mistral":
        window = c.get("sliding_window", 4096)
        on = [True] * layers
    elif rule == "qwen2" and c.get("use_sliding_window"):
        window = c.get("sliding_window", 4096)
        types = c.get("layer_types")
        if types is not None and len(types) != layers:
            raise InputError(f"{source}: layer_types has {len(types)} entries for {layers} layers. Give one per layer.")
        first = int(c.get("max_window_layers", 28))
        on = [t == "sliding_attention" for t in types] if types is not None else [i >= first for i in range(layers)]
    else:
        return []
    if window is None or not any(on):
        return []
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"{source}: sliding_window={window!r} is not a positive number of tokens. Fix it, or set it to null.")
    return [window if o else None for o in on]


@dataclass
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    quantization_config: dict | None = None
    # Per layer: the sliding attention window (a query sees itself and the window - 1 tokens
    # before it) or None for full causal attention; empty where no layer has a window.
    sliding_windows: list = field(default_factory=list)
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> ArchSpec:
        return get_arch(self.arch)

    def window_of(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @property
    def is_exl2(self) -> bool:
        q = self.quantization_config
        return bool(q) and q.get("quant_method") == "exl2"

    @classmethod
    def from_dict(cls, c: dict, source: str = "config.json", path: Path | None = None) -> "ModelConfig":
        archs = c.get("architectures") or []
        if not archs:
            raise InputError(
                f"{source}: key 'architectures' is missing or empty. Add e.g. "
                '"architectures": ["LlamaForCausalLM"] naming the model class.'
            )
        spec = get_arch(archs[0], source)

        def need(key: str):
            if key not in c:
                raise InputError(f"{source}: required key {key!r} is missing for {spec.name}. Add it to the config.")
            return c[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = c.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = rope_keys(c)
        cfg = cls(
            arch=spec.name,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(need("vocab_size")),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            bos_token_id=_first_id(c.get("bos_token_id")),
            quantization_config=c.get("quantization_config"),
            sliding_windows=_sliding_windows(spec.sliding_window, c, int(need("num_hidden_layers")), source),
            path=path,
            raw=c,
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise InputError(
                f"{source}: num_attention_heads={cfg.num_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_kv_heads}; the config is inconsistent."
            )
        for key in ("attention_bias", "mlp_bias"):  # transformers' Llama/Mistral options for biased linears
            if c.get(key):
                raise InputError(f"{source}: {key}=true (biases on every {'attention' if key[0] == 'a' else 'MLP'} "
                                 f"linear) is not supported for {spec.name}. Use a model without them.")
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise InputError(f"{source}: hidden_act={act!r} is not supported (only 'silu').")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        f = path / "config.json"
        if not f.is_file():
            raise InputError(
                f"{path}: no config.json found. A model directory needs the Hugging Face "
                "config.json beside its *.safetensors files; point the recipe at the model folder."
            )
        return cls.from_dict(read_json(f), source=str(f), path=path)
