"""Running one step: lock its key, build into a temp folder, publish, clean the scratch.

`execute(job)` is what every executor calls, in this process, in a per-GPU worker process
or in a Ray task, so a Job carries only picklable facts.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from exl2build.dag.cache import Cache, tool_versions
from exl2build.dag.step import StepContext
from exl2build.errors import ConfigError, Exl2BuildError


@dataclass
class Job:
    name: str
    label: str
    version: int
    key: str
    params: dict
    run: Callable
    cache_root: str
    inputs: dict[str, str]  # input name -> artifact path
    input_digests: dict[str, str]
    files: dict[str, str]  # external input name -> path (or pinned digest)
    file_digests: dict[str, str]
    device: str = "auto"
    log_dir: Optional[str] = None
    gpu: bool = False


@dataclass
class JobResult:
    label: str
    key: str
    status: str  # ran | cached | failed
    seconds: float = 0.0
    error: str = ""
    path: str = ""
    digest: str = ""
    extra: dict = field(default_factory=dict)


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        # Checked where the step runs (a Ray worker may have the GPU its head lacks).
        why = "torch here is a CPU build" if torch.version.cuda is None else "torch finds no CUDA GPU here"
        raise ConfigError(f"device={spec}: {why} (torch {torch.__version__} on {os.uname().nodename}). "
                          "Use device=auto or device=cpu, or run the build where a GPU is.")
    return torch.device(spec)


def step_logger(label: str, log_dir: Optional[str]) -> logging.Logger:
    log = logging.getLogger(f"exl2build.step.{label}")
    if log_dir and not any(isinstance(h, logging.FileHandler) for h in log.handlers):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
        handler = logging.FileHandler(Path(log_dir) / f"{safe}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return log


def log_failure(log: logging.Logger, exc: BaseException) -> str:
    """Logs a step's failure; returns its one-line message for the summary.

    An Exl2BuildError is bad input whose message names the fix: the console gets that message alone
    and the traceback goes to the step's log file only (INFO, below the console's level). Anything
    else is a bug, and its traceback goes to the console too.
    """
    if isinstance(exc, Exl2BuildError):
        log.error("failed: %s", exc)
        log.info("traceback of that failure:\n%s", traceback.format_exc())
        return str(exc)
    log.error("failed: %s\n%s", exc, traceback.format_exc())
    return f"{type(exc).__name__}: {exc}"


def _log_progress(log: logging.Logger) -> Callable[[int, int, str], None]:
    """Progress for steps away from the display: a log line at most every 5 s."""
    last = [0.0]

    def progress(done: int, total: int, what: str = "") -> None:
        now = time.monotonic()
        if now - last[0] > 5 or done >= total:
            last[0] = now
            log.info("progress %d/%d %s", done, total, what)

    return progress


def execute(job: Job, progress: Optional[Callable[[int, int, str], None]] = None) -> JobResult:
    cache = Cache(Path(job.cache_root))
    log = step_logger(job.label, job.log_dir)
    to_log = _log_progress(log)  # the step log always shows progress; a display may too
    if progress is None:
        progress = to_log
    else:
        shown = progress

        def progress(done: int, total: int, what: str = "") -> None:
            shown(done, total, what)
            to_log(done, total, what)

    try:  # before anything is written: a machine without the device fails the step cleanly
        device = resolve_device(job.device)
    except ConfigError as exc:
        return JobResult(job.label, job.key, "failed", error=log_failure(log, exc))
    # A second process that needs the same key waits here, then finds it published.
    with cache.lock(job.name, job.key):
        if cache.is_published(job.name, job.key):
            m = cache.manifest(job.name, job.key)
            return JobResult(job.label, job.key, "cached", path=str(cache.entry(job.name, job.key)), digest=m["digest"])
        tmp = cache.new_tmp(job.name, job.key)
        work = cache.work_dir(job.name, job.key)
        ctx = StepContext(
            out=tmp,
            inputs={k: Path(v) for k, v in job.inputs.items()},
            params=job.params,
            work=work,
            progress=progress,
            log=log,
            device=device,
            files=dict(job.files),
        )
        log.info("run %s key=%s params=%s", job.label, job.key[:12], job.params)
        started = time.time()
        try:
            job.run(ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a result
            shutil.rmtree(tmp, ignore_errors=True)  # the work folder stays: a rerun resumes
            msg = log_failure(log, exc)
            if isinstance(exc, KeyboardInterrupt):
                raise
            return JobResult(job.label, job.key, "failed", time.time() - started, error=msg)
        seconds = time.time() - started
        manifest = {
            "step": job.name,
            "label": job.label,
            "version": job.version,
            "key": job.key,
            "params": job.params,
            "inputs": {k: {"path": job.inputs[k], "digest": job.input_digests[k]} for k in job.inputs},
            "files": {k: {"path": job.files[k], "digest": job.file_digests[k]} for k in job.files},
            "timings": {"started": started, "seconds": seconds},
            "tools": tool_versions(),
            "device": str(ctx.device),
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        m = cache.publish(tmp, job.name, job.key, manifest)
        shutil.rmtree(work, ignore_errors=True)
        log.info("published %s in %.1fs", job.label, seconds)
        return JobResult(job.label, job.key, "ran", seconds, path=str(cache.entry(job.name, job.key)), digest=m["digest"])
