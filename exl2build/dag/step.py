"""A step of the build DAG and the context it runs in (see docs/design.md, dag/)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass(eq=False)
class Step:
    """One unit of cached work.

    `name` picks the cache folder (cache_dir/<name>/<key>/), `label` tells instances apart
    in plans and reports (`quantize[4.0]`). `version` is bumped whenever the step's code
    changes what it produces. `files` are external inputs (name -> path, or a pinned
    "sha256:<hex>" when the content is known before it exists on disk); their content
    digests join the key like the digests of upstream artifacts do.
    """

    name: str
    label: str
    version: int
    params: dict
    run: Callable[["StepContext"], None]
    inputs: dict[str, "Step"] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    cache: bool = True  # False: runs every time, in the main process (the report)
    export: Optional[str] = None  # copy the artifact to <out_dir>/<export> ("" = out_dir itself)


@dataclass
class StepContext:
    out: Path  # fresh temporary folder; published by atomic rename
    inputs: dict[str, Path]  # input name -> upstream artifact folder
    params: dict
    work: Path  # per-key scratch that survives a kill (per-layer checkpoints)
    progress: Callable[[int, int, str], None]
    log: logging.Logger
    device: Any  # torch.device
    files: dict[str, str] = field(default_factory=dict)  # external input name -> path
    extra: dict = field(default_factory=dict)  # runtime facts for uncached steps (the report)
