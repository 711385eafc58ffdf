"""Source import: turn what the user has (HF folder, .bin/.pt checkpoint, GGUF) into an FP16 HF folder.

Every path ends in the same place: a folder with config.json, fp16 *.safetensors and
tokenizer files that load_model and the quantizer read. Weights are handled one tensor
(or one checkpoint shard) at a time and written in bounded shards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.model.weights import to_dtype_checked

KINDS = ("auto", "hf", "bin", "gguf")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
SHARD_BYTES = 2 << 30  # 2 GiB per output shard keeps host memory bounded during import


def detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        if path.suffix.lower() in (".bin", ".pt", ".pth"):
            return "bin"
    elif path.is_dir():
        if any(path.glob("*.safetensors")):
            return "hf"
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            return "bin"
        ggufs = list(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
    raise InputError(
        f"{path}: cannot tell what kind of model this is. Give a Hugging Face folder (config.json + "
        "*.safetensors or pytorch_model*.bin), a .bin/.pt checkpoint beside a config.json, or a .gguf file."
    )


def import_source(path: str | Path, out_dir: str | Path, kind: str = "auto") -> Path:
    """Write an FP16 HF folder for `path` into `out_dir` (created) and return `out_dir`."""
    path, out = Path(path), Path(out_dir)
    if not path.exists():
        raise InputError(f"{path}: source model not found. Check the model path in the recipe.")
    if kind not in KINDS:
        raise InputError(f"source kind {kind!r} is not one of {', '.join(KINDS)}. Fix the recipe's source kind.")
    if kind == "auto":
        kind = detect_kind(path)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        _import_hf(path, out)
    elif kind == "bin":
        _import_bin(path, out)
    else:
        _import_gguf(path if path.is_file() else next(path.glob("*.gguf")), out)
    validate_hf_dir(out)
    return out


# ---------------------------------------------------------------- helpers


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space and keeps the artifact valid if the source moves.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_side_files(src_dir: Path, out: Path) -> None:
    """config, tokenizer and generation files: everything except weights and their indexes."""
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.suffix.lower() not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
            _link_or_copy(f, out / f.name)


def validate_hf_dir(path: Path) -> ModelConfig:
    """Check that a folder loads: config, every tensor present with the right shape, a tokenizer."""
    from exl2build.model.load import _linear_shapes, check_quant_method
    from exl2build.model.weights import WeightStore

    cfg = ModelConfig.from_dir(path)
    check_quant_method(cfg)
    if cfg.is_exl2:
        raise InputError(f"{path}: is already an EXL2 model; the source must be an FP16 model.")
    store = WeightStore(path)
    spec = cfg.spec
    expect = {f"{spec.embed_key}.weight": (cfg.vocab_size, cfg.hidden_size),
              f"{spec.norm_key}.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings or store.has(f"{spec.head_key}.weight"):
        expect[f"{spec.head_key}.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        p = spec.layer_key(i)
        for n in spec.norms:
            expect[f"{p}.{n}.weight"] = (cfg.hidden_size,)
        for n, (K, N) in _linear_shapes(cfg).items():
            expect[f"{p}.{n}.weight"] = (N, K)
            if spec.qkv_bias and n in spec.attn_linears[:3]:
                expect[f"{p}.{n}.bias"] = (N,)
    for name, shape in expect.items():
        got = store.shape(name)  # raises the "missing tensor" InputError
        if got != shape:
            raise InputError(
                f"{store.file_of(name)}: tensor {name!r} has shape {list(got)} but config.json implies "
                f"{list(shape)}. The weights do not match the config; use the matching config.json."
            )
    # A layer tensor the forward pass does not read (a bias, an extra norm) would be dropped
    # without a word and the converted model would be wrong. RoPE's inv_freq is recomputed.
    unused = sorted(n for n in store.names() if n.startswith(f"{spec.layer_prefix}.") and n not in expect
                    and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise InputError(
            f"{store.file_of(unused[0])}: tensor {unused[0]!r}{more} is not part of a {spec.name} layer as "
            "exl2build runs it, so converting would drop it and change the model. Use a model whose layers hold "
            "only the standard weights (biases only where the architecture has them, e.g. Qwen2's q/k/v)."
        )
    store.close()
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise InputError(
            f"{path}: has no tokenizer.json or tokenizer.model. Copy the tokenizer files of the model into the folder."
        )
    return cfg


class ShardWriter:
    """Collects tensors and writes `model-0000i.safetensors` shards of at most SHARD_BYTES."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.pending or any(name in ks for _, ks in self.files):
            raise InputError(f"{self.out}: tensor {name!r} appears twice in the source; the checkpoint is corrupt.")
        if self.pending and self.size + t.numel() * t.element_size() > self.shard_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()

    def flush(self) -> None:
        if self.pending:
            fname = f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.pending, str(self.out / fname), metadata={"format": "pt"})
            self.files.append((fname, list(self.pending)))
            self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.out / self.files[0][0], self.out / "model.safetensors")
            return
        wm = {k: f for f, ks in self.files for k in ks}
        (self.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))


# ---------------------------------------------------------------- the three kinds


def _import_hf(path: Path, out: Path) -> None:
    if not path.is_dir():
        raise InputError(f"{path}: kind 'hf' needs a folder with config.json and *.safetensors.")
    validate_hf_dir(path)
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() not in (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt"):
            _link_or_copy(f, out / f.name)


def _load_checkpoint(f: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError ...
        raise InputError(
            f"{f}: cannot be loaded as a plain tensor checkpoint with torch.load(weights_only=True) ({e}). "
            "exl2build never unpickles arbitrary objects; re-save the state dict as tensors only "
            "(torch.save(model.state_dict(), ...)) or as safetensors."
        ) from None
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{f}: does not hold a dict of tensors (a state dict). Save model.state_dict() instead.")
    return obj


def _import_bin(path: Path, out: Path) -> None:
    src_dir = path if path.is_dir() else path.parent
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".bin", ".pt", ".pth"))
    else:
        files = [path]
    if not (src_dir / "config.json").is_file():
        raise InputError(
            f"{src_dir}: a .bin/.pt checkpoint needs the model's config.json beside it. Copy the config.json "
            "(and tokenizer files) of the model into that folder."
        )
    writer = ShardWriter(out)
    for f in files:
        sd = _load_checkpoint(f)
        for name, t in sd.items():
            # clone: tied weights share storage, which safetensors refuses to write twice.
            t = to_dtype_checked(t, torch.float16, f"{f}: tensor {name!r}") if t.is_floating_point() else t
            writer.add(name, t.clone())
        del sd
    writer.close()
    _copy_side_files(src_dir, out)


def _import_gguf(path: Path, out: Path) -> None:
    from exl2build.model.gguf import GGUFFile

    g = GGUFFile(path)
    (out / "config.json").write_text(json.dumps(g.config(), indent=2))
    writer = ShardWriter(out)
    for name, t in g.tensors():
        writer.add(name, t)
    writer.close()
    g.write_tokenizer(out)
