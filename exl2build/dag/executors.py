"""Where steps run: in this process, in one worker process per GPU, or as Ray tasks.

All three share one interface: `submit(job)` queues a step whose inputs are ready and
`wait()` blocks until at least one finishes and returns the finished (job, result) pairs.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections import deque
from typing import Callable, Optional

from exl2build.dag.execute import Job, JobResult, execute
from exl2build.errors import ConfigError


class LocalExecutor:
    """In-process, one step at a time; the only executor with per-layer progress bars."""

    parallel = False

    def __init__(self, progress_for: Optional[Callable[[Job], Callable]] = None):
        self.queue: deque[Job] = deque()
        self.progress_for = progress_for

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def pending(self) -> int:
        return len(self.queue)

    def wait(self) -> list[tuple[Job, JobResult]]:
        job = self.queue.popleft()
        progress = self.progress_for(job) if self.progress_for else None
        return [(job, execute(job, progress))]

    def close(self) -> None:
        pass


def _pin_gpu(gpu: int) -> None:
    # Runs first in a fresh (spawned) worker, before anything initialises CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


class GpuPoolExecutor:
    """One worker process per GPU, pinned with CUDA_VISIBLE_DEVICES; independent steps
    (the per-bitrate chains) run side by side."""

    parallel = True

    def __init__(self, gpus: list[int]):
        ctx = multiprocessing.get_context("spawn")
        self.pools = {g: cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin_gpu, initargs=(g,)) for g in gpus}
        self.free = list(gpus)
        self.queue: deque[Job] = deque()
        self.running: dict[cf.Future, tuple[Job, int]] = {}

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue and self.free:
            job, gpu = self.queue.popleft(), self.free.pop(0)
            if job.device.startswith("cuda"):
                job.device = "cuda:0"  # the one GPU the worker sees; "auto" resolves to it too
            self.running[self.pools[gpu].submit(execute, job)] = (job, gpu)

    def pending(self) -> int:
        return len(self.queue) + len(self.running)

    def wait(self) -> list[tuple[Job, JobResult]]:
        done, _ = cf.wait(list(self.running), return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            job, gpu = self.running.pop(fut)
            self.free.append(gpu)
            try:
                out.append((job, fut.result()))
            except Exception as exc:  # the worker died (killed, out of memory)
                out.append((job, JobResult(job.label, job.key, "failed", error=f"worker on GPU {gpu} died: {exc}")))
        self._dispatch()
        return out

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Steps as Ray tasks with their GPU needs declared; joins `address` or starts a local
    Ray. The cache folder must be on storage every node sees."""

    parallel = True

    def __init__(self, address: Optional[str], num_cpus: Optional[int] = None):
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "Config error at `runner`: runner=ray needs the optional Ray extra, which is not installed. "
                "Fix: `pip install exl2build[ray]` (or `pip install ray`), or use runner=local."
            ) from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs = dict(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address is None and num_cpus:
                kwargs["num_cpus"] = num_cpus
            ray.init(**kwargs)
        self.has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.remote = ray.remote(execute)
        self.running: dict = {}

    def submit(self, job: Job) -> None:
        use_gpu = job.gpu and self.has_gpu and job.device != "cpu"
        if use_gpu:
            job.device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES for the task
        elif job.device == "auto":
            job.device = "cpu"
        ref = self.remote.options(num_gpus=1 if use_gpu else 0, num_cpus=1).remote(job)
        self.running[ref] = job

    def pending(self) -> int:
        return len(self.running)

    def wait(self) -> list[tuple[Job, JobResult]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        out = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                out.append((job, self.ray.get(ref)))
            except Exception as exc:
                out.append((job, JobResult(job.label, job.key, "failed", error=f"Ray task failed: {exc}")))
        return out

    def close(self) -> None:
        pass  # leave Ray running: a joined cluster is not ours; a local one ends with us


def make_executor(kind: str, gpus: list[int], address: Optional[str], progress_for=None):
    if kind == "ray":
        return RayExecutor(address)
    if len(gpus) > 1:
        return GpuPoolExecutor(gpus)
    return LocalExecutor(progress_for)
