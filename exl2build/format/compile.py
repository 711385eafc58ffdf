"""compile_full: a loadable EXL2 model folder from the quantizer's per-layer tensor files.

Per ../shared/docs/exl2-format.md: weights go to `output.safetensors`, or to
`output-0000k-of-0000N.safetensors` shards when they exceed the shard size; every other file
of the source folder is copied; config.json gains `quantization_config`.
Tensor order is fixed (embeddings, layers by index, then the rest, names sorted inside), so
the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from exl2build.errors import InputError, StepError
from exl2build.model.config import rope_keys

MB = 1024 * 1024
# Source files that are weights (or index files pointing at weights) are not copied.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")
_LAYER = re.compile(r"^(.*?layers)\.(\d+)\.(.*)$")


def tensor_order(name: str):
    """Sort key: embeddings first, decoder layers by index, then final norm / head / others."""
    m = _LAYER.match(name)
    if m:
        return (1, int(m.group(2)), m.group(3))
    if "embed" in name:
        return (0, 0, name)
    return (2, 0, name)


def _collect(quantized_dir: Path) -> dict[str, Path]:
    files = sorted(quantized_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{quantized_dir}: no *.safetensors files from the quantize step. Re-run quantize.")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k in where:
                    raise StepError(f"tensor {k!r} appears in both {where[k].name} and {f.name} in {quantized_dir}; "
                                    "the quantized folder is inconsistent. Re-run the quantize step.")
                where[k] = f
    return where


def _shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy split in tensor order; a file's size counts its data plus a safe estimate of its
    JSON header (name + ~100 bytes of dtype/shape/offsets per tensor), so files stay within the
    limit. A single tensor larger than the limit gets a file of its own."""
    shards, cur, cur_size = [], [], 64
    for n in names:
        need = sizes[n] + len(n) + 100
        if cur and limit > 0 and cur_size + need > limit:
            shards.append(cur)
            cur, cur_size = [], 64
        cur.append(n)
        cur_size += need
    if cur:
        shards.append(cur)
    return shards


def _is_weight_file(p: Path) -> bool:
    return any(p.match(pat) for pat in WEIGHT_PATTERNS)


def compile_full(source_dir, quantized_dir, out_dir, shard_size_mb: float, quant_config: dict) -> dict:
    """Write the compiled model to out_dir; returns {"files": [...], "bytes": total, "tensors": count}."""
    source_dir, quantized_dir, out_dir = Path(source_dir), Path(quantized_dir), Path(out_dir)
    if shard_size_mb < 0:
        raise InputError(f"compile: shard_size_mb={shard_size_mb} must be >= 0 (0 = one output file).")
    if not (source_dir / "config.json").is_file():
        raise InputError(f"{source_dir}: no config.json. Point compile at the FP16 source model folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    where = _collect(quantized_dir)
    handles = {}

    def get(name):
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    sizes = {}
    for n in where:
        f = where[n]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        sl = handles[f].get_slice(n)
        numel = 1
        for d in sl.get_shape():
            numel *= d
        sizes[n] = numel * _DTYPE_BYTES[sl.get_dtype()]
    names = sorted(where, key=tensor_order)
    shards = _shards(names, sizes, int(shard_size_mb * MB))
    files = []
    for k, shard in enumerate(shards):
        fname = "output.safetensors" if len(shards) == 1 else f"output-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: get(n).contiguous() for n in shard}, str(out_dir / fname), metadata={"format": "pt"})
        # safetensors creates files owner-only (0600); a published model must be readable
        # like the config and tokenizer files beside it.
        os.chmod(out_dir / fname, 0o666 & ~_umask())
        files.append(fname)
    handles.clear()

    for p in sorted(source_dir.iterdir()):
        if p.is_file() and not _is_weight_file(p) and p.name != "config.json":
            shutil.copyfile(p, out_dir / p.name)
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quant_config
    if "rope_theta" not in config and "rope_parameters" in config:
        # exllamav2 reads RoPE from the top-level keys only; transformers 5 writes rope_parameters
        # instead. Spell it both ways, or exllamav2 would run the model at theta 10000.
        config["rope_theta"], scaling = rope_keys(config)
        if scaling is not None:
            config["rope_scaling"] = scaling
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"files": files, "bytes": sum(sizes.values()), "tensors": len(names)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
