"""Plan and run a list of steps (in dependency order) against the cache.

A step's key needs the content digests of its inputs, so keys are computed as the DAG
unfolds: in `plan`, a step below one that must run shows no key ("input will be rebuilt").
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from exl2build.dag.cache import Cache, step_key
from exl2build.dag.execute import Job, log_failure, resolve_device, step_logger
from exl2build.dag.step import Step, StepContext


@dataclass
class PlanLine:
    label: str
    name: str
    key: Optional[str]
    action: str  # cached | run
    reason: str = ""

    def __str__(self) -> str:
        key = (self.key or "-" * 12)[:12]
        tail = f"  ({self.reason})" if self.reason else ""
        return f"{self.label:<20} {key}  {self.action}{tail}"


@dataclass
class StepResult:
    label: str
    name: str
    key: str
    status: str  # ran | cached | failed | skipped
    seconds: float = 0.0
    error: str = ""
    path: str = ""


def _flatten(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _params_diff(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")


def export_tree(src: Path, dst: Path) -> None:
    """Make dst a copy of src (hard links where possible), swapped in whole."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns("manifest.json"))
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def export_files(src: Path, dst: Path) -> None:
    """Move each file of src into dst (replacing same-named files); for out_dir itself."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*")):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)


class Runner:
    def __init__(self, cache: Cache, out_dir: str, device: str = "auto", log_dir: Optional[str] = None):
        self.cache = cache
        self.out_dir = Path(out_dir)
        self.scope = str(self.out_dir)
        self.device = device
        self.log_dir = log_dir

    # ------------------------------------------------------------------ keys
    def file_digests(self, step: Step) -> dict[str, str]:
        out = {}
        for name, value in step.files.items():
            out[name] = value[7:] if value.startswith("sha256:") else self.cache.digests.tree(Path(value))
        return out

    def _key(self, step: Step, digests: dict) -> tuple[str, dict, dict]:
        inputs = {n: digests[s] for n, s in step.inputs.items()}
        files = self.file_digests(step)
        return step_key(step.name, step.version, step.params, inputs, files), inputs, files

    def _reason(self, step: Step, inputs: dict, files: dict) -> str:
        last = self.cache.last(self.scope, step.label)
        if not last:
            return "no artifact"
        if last.get("version") != step.version:
            return f"code version changed ({last.get('version')} -> {step.version})"
        if last.get("params") != step.params:
            return f"params changed ({_params_diff(last.get('params', {}), step.params)})"
        changed = [n for n in inputs if last.get("inputs", {}).get(n) != inputs[n]]
        changed += [n for n in files if last.get("files", {}).get(n) != files[n]]
        if changed:
            return f"input changed ({', '.join(changed)})"
        return "no artifact"

    def _remember(self, step: Step, key: str, inputs: dict, files: dict) -> None:
        self.cache.record(self.scope, step.label, {"key": key, "name": step.name, "version": step.version, "params": step.params, "inputs": inputs, "files": files})

    # ------------------------------------------------------------------ plan
    def plan(self, steps: list[Step]) -> list[PlanLine]:
        digests: dict[Step, str] = {}
        lines = []
        for step in steps:
            if not step.cache:
                lines.append(PlanLine(step.label, step.name, None, "run", "always: written from the results"))
                continue
            waiting = [n for n, s in step.inputs.items() if s not in digests]
            if waiting:
                lines.append(PlanLine(step.label, step.name, None, "run", f"input will be rebuilt ({', '.join(waiting)})"))
                continue
            key, inputs, files = self._key(step, digests)
            if self.cache.is_published(step.name, key):
                digests[step] = self.cache.content_digest(step.name, key)
                lines.append(PlanLine(step.label, step.name, key, "cached"))
            else:
                lines.append(PlanLine(step.label, step.name, key, "run", self._reason(step, inputs, files)))
        return lines

    # ------------------------------------------------------------------ run
    def run(self, steps: list[Step], executor, display=None, only_cached: bool = False) -> list[StepResult]:
        """Run what is missing; with only_cached, fail steps that are not built yet."""
        self.out_dir.mkdir(parents=True, exist_ok=True)  # outputs, and what gc's references hang on
        results: dict[Step, StepResult] = {}
        digests: dict[Step, str] = {}
        paths: dict[Step, str] = {}
        keyinfo: dict[Step, tuple] = {}
        cached_steps = [s for s in steps if s.cache]
        submitted: set[Step] = set()
        by_job: dict[int, Step] = {}

        def finish(step: Step, res: StepResult) -> None:
            results[step] = res
            if res.status == "cached":
                self.cache.add_refs(self.scope, [(step.name, res.key)])
            if res.status in ("ran", "cached"):
                paths[step] = res.path
                if step.export is not None:
                    self._export(step, Path(res.path))
            if display:
                display.finished(step.label, res.status, res.seconds, res.key, res.error)

        while True:
            for step in cached_steps:
                if step in results or step in submitted:
                    continue
                bad = [n for n, s in step.inputs.items() if s in results and results[s].status in ("failed", "skipped")]
                if bad:
                    finish(step, StepResult(step.label, step.name, "", "skipped", error=f"input failed: {', '.join(bad)}"))
                    continue
                if not all(s in digests for s in step.inputs.values()):
                    continue
                key, inputs, files = self._key(step, digests)
                keyinfo[step] = (key, inputs, files)
                if self.cache.is_published(step.name, key):
                    digests[step] = self.cache.content_digest(step.name, key)
                    self._remember(step, key, inputs, files)
                    finish(step, StepResult(step.label, step.name, key, "cached", path=str(self.cache.entry(step.name, key))))
                    continue
                if only_cached:
                    finish(step, StepResult(step.label, step.name, key, "failed", error="not built yet: run `exl2build build` with the same recipe first"))
                    continue
                self.cache.add_refs(self.scope, [(step.name, key)])  # gc keeps its work if we die
                job = self._job(step, key, inputs, files, paths)
                by_job[id(job)] = step
                submitted.add(step)
                if display:
                    display.started(step.label)
                executor.submit(job)
            if not executor.pending():
                break
            for job, jr in executor.wait():
                step = by_job.pop(id(job))
                submitted.discard(step)
                if jr.status in ("ran", "cached"):
                    digests[step] = jr.digest
                    self._remember(step, *keyinfo[step])
                finish(step, StepResult(step.label, step.name, jr.key, jr.status, jr.seconds, jr.error, jr.path))

        for step in steps:
            if not step.cache:
                finish(step, self._run_uncached(step, paths, results))
        ordered = [results[s] for s in steps]
        self._set_refs(steps, ordered)
        return ordered

    def _job(self, step: Step, key: str, inputs: dict, files: dict, paths: dict) -> Job:
        return Job(
            name=step.name, label=step.label, version=step.version, key=key, params=step.params, run=step.run,
            cache_root=str(self.cache.root), inputs={n: paths[s] for n, s in step.inputs.items()},
            input_digests=inputs, files=dict(step.files), file_digests=files, device=self.device,
            log_dir=self.log_dir, gpu=step.gpu,
        )

    def _export(self, step: Step, artifact: Path) -> None:
        if step.export:
            export_tree(artifact, self.out_dir / step.export)

    def _run_uncached(self, step: Step, paths: dict, results: dict) -> StepResult:
        """Steps that summarise a run (the report): always run here, written into out_dir."""
        bad = [n for n, s in step.inputs.items() if results[s].status not in ("ran", "cached")]
        if bad:
            return StepResult(step.label, step.name, "", "skipped", error=f"input failed: {', '.join(bad)}")
        tmp = self.out_dir / f".{step.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log = step_logger(step.label, self.log_dir)
        done = [results[s] for s in results if s.cache]
        ctx = StepContext(
            out=tmp, inputs={n: Path(paths[s]) for n, s in step.inputs.items()}, params=step.params, work=tmp,
            progress=lambda *a: None, log=log, device=resolve_device("cpu"), files=dict(step.files),
            extra={"steps": [{"name": r.label, "key": r.key, "status": r.status, "seconds": round(r.seconds, 3)} for r in done]},
        )
        started = time.time()
        try:
            step.run(ctx)
        except Exception as exc:  # noqa: BLE001
            msg = log_failure(log, exc)
            export_files(tmp, self.out_dir)  # what was written (the report) still helps
            shutil.rmtree(tmp, ignore_errors=True)
            return StepResult(step.label, step.name, "", "failed", time.time() - started, msg)
        export_files(tmp, self.out_dir / (step.export or ""))
        shutil.rmtree(tmp, ignore_errors=True)
        return StepResult(step.label, step.name, "", "ran", time.time() - started, path=str(self.out_dir))

    def _set_refs(self, steps: list[Step], results: list[StepResult]) -> None:
        used = [(s.name, r.key) for s, r in zip(steps, results) if s.cache and r.status in ("ran", "cached")]
        if all(r.status in ("ran", "cached") for r in results):
            self.cache.set_refs(self.scope, used)  # exactly this build: older entries become garbage
        else:  # keep what earlier builds and this one's unfinished steps referenced
            self.cache.add_refs(self.scope, used)


def summary(results: list[StepResult]) -> str:
    lines = [f"{r.status:>7}  {r.label:<20} {r.key[:12] or '-' * 12}  {r.seconds:8.1f}s" + (f"  {r.error}" if r.error else "") for r in results]
    counts = {s: sum(r.status == s for r in results) for s in ("ran", "cached", "failed", "skipped")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do")
    return "\n".join(lines)


def succeeded(results: list[StepResult]) -> bool:
    return all(r.status in ("ran", "cached") for r in results)
