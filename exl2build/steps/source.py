"""Step `source`: the FP16 HF folder every later step reads (HF dir as is, GGUF
dequantized, .bin/.pt converted to safetensors without unpickling code)."""

from __future__ import annotations

from pathlib import Path

from exl2build.config import SourceConfig
from exl2build.dag.step import Step, StepContext

VERSION = 1
IMPORT_KIND = {"hf": "hf", "gguf": "gguf", "checkpoint": "bin"}


def make(cfg: SourceConfig) -> Step:
    if cfg.fetch:
        from exl2build.fetch import PINNED

        files = {"source": "sha256:" + PINNED[cfg.fetch]}  # known before the download
    else:
        files = {"source": cfg.path}
    return Step("source", "source", VERSION, {"kind": cfg.kind, "fetch": cfg.fetch}, run, files=files)


def run(ctx: StepContext) -> None:
    from exl2build.model.source import import_source

    if ctx.params["fetch"] == "smollm2":
        from exl2build.fetch import fetch_smollm2

        path = fetch_smollm2()
    else:
        path = Path(ctx.files["source"])
    ctx.log.info("importing %s (%s)", path, ctx.params["kind"])
    import_source(path, ctx.out, IMPORT_KIND[ctx.params["kind"]])
