"""Helpers shared by the side-by-side benchmark against exllamav2 0.3.2 (measures nothing itself).

Used by sbs_smol.py, sbs_kernels.py and sbs_big.py (driven by device_side_by_side.sh):
  * Results: one JSON file per stage, rewritten after every part, so a run that is killed still
    leaves what it measured; each part is guarded (a failure is logged with its traceback and
    the next part runs) and parts that would not fit the stage's time budget are skipped;
  * run_logged: a subprocess whose output lines are time-stamped into a log, with its peak host
    RSS (os.wait4) and, optionally, the peak GPU memory in use (NVML / nvidia-smi sampling);
  * bench_kernels(): benchmarks/kernels.py imported as a module (its timers and ceilings);
  * markdown tables, calibration parquet (one row per non-empty line, as anchors.md runs
    exllamav2's converter), safetensors header sizes.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as exl2build/__init__.py, before anything imports torch
RESULT_TAG = "RESULT "  # a subprocess prints its result as one line: RESULT {json}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- results


def _plain(v):
    """JSON-safe copy (tensors and numpy scalars become numbers, paths strings)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return _plain(v.item())
    return str(v)


class Results:
    """The stage's results file <out>/<stage>.json: {"stage", "started", "env", "parts": {name: ...}}."""

    def __init__(self, out_dir, stage: str, budget_s: float | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / f"{stage}.json"
        self.t0 = time.time()
        budget = float(os.environ.get("STAGE_BUDGET_S", "570")) if budget_s is None else budget_s
        self.deadline = self.t0 + budget
        self.data = {"stage": stage, "started": utc_now(), "budget_s": budget, "env": env_info(), "parts": {},
                     "notes": []}
        self.save()

    def left(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_plain(self.data), indent=1) + "\n")
        tmp.replace(self.path)

    def part(self, name: str, fn, *args, need_s: float = 0.0, **kwargs):
        """Run fn(*args, **kwargs) as part `name`; returns its value, or None when it failed or was skipped."""
        if self.left() < need_s:
            msg = f"skipped: {self.left():.0f} s left of the stage budget, the part needs about {need_s:.0f} s"
            log(f"== {name}: {msg}")
            self.data["parts"][name] = {"status": "skipped", "error": msg}
            self.save()
            return None
        log(f"== {name} (stage time left {self.left():.0f} s)")
        t = time.time()
        rec = {"status": "running"}
        self.data["parts"][name] = rec
        self.save()
        try:
            value = fn(*args, **kwargs)
            rec.update(status="ok", result=value)
        except BaseException as e:  # noqa: BLE001 - a part must never stop the others (KeyboardInterrupt too)
            tb = traceback.format_exc()
            print(tb, flush=True)
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=tb)
            value = None
            if isinstance(e, KeyboardInterrupt):
                rec["seconds"] = round(time.time() - t, 2)
                self.save()
                raise
        rec["seconds"] = round(time.time() - t, 2)
        self.save()
        log(f"== {name}: {rec['status']} in {rec['seconds']:.1f} s")
        return value

    def result(self, name: str):
        p = self.data["parts"].get(name) or {}
        return p.get("result") if p.get("status") == "ok" else None


class State:
    """Finished parts of earlier calls (<work>/state.json): reused unless --force."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.data = {} if force or not path.is_file() else json.loads(path.read_text())

    def run(self, res: Results, name: str, fn, *args, need_s: float = 0.0, state_key: str | None = None, **kwargs):
        key = state_key or name
        if key in self.data:
            log_reuse = dict(self.data[key])
            res.data["parts"][name] = {"status": "ok", "result": log_reuse.get("result"), "seconds": log_reuse.get("seconds"),
                                       "reused_from_earlier_call": True}
            res.save()
            log(f"== {name}: reused from an earlier call")
            return log_reuse.get("result")
        value = res.part(name, fn, *args, need_s=need_s, **kwargs)
        p = res.data["parts"].get(name, {})
        if p.get("status") == "ok":
            self.data[key] = {"result": p.get("result"), "seconds": p.get("seconds")}
            self.path.write_text(json.dumps(_plain(self.data), indent=1))
        return value

    def reuse(self, res: Results, name: str, state_key: str | None = None):
        """Show a part finished by an earlier call in this call's results (never runs anything)."""
        key = state_key or name
        if key in self.data:
            res.data["parts"][name] = {"status": "ok", "result": self.data[key].get("result"),
                                       "seconds": self.data[key].get("seconds"), "reused_from_earlier_call": True}
            res.save()
            return self.data[key].get("result")
        return None


def env_info() -> dict:
    info = {"python": sys.version.split()[0], "host": os.uname().nodename, "cwd": os.getcwd()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        # No torch.cuda call here: the driver must not hold a CUDA context while it samples the
        # GPU memory of its subprocesses.
    except Exception as e:  # noqa: BLE001
        info["torch"] = f"unavailable: {e}"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpu"] = q.stdout.strip() or q.stderr.strip()
    except Exception as e:  # noqa: BLE001
        info["gpu"] = f"nvidia-smi unavailable: {e}"
    for k in ("EXLLAMA_NO_SDPA", "TORCH_CUDA_ARCH_LIST", "TORCH_EXTENSIONS_DIR", "STAGE_BUDGET_S"):
        info[k] = os.environ.get(k)
    return info


# ----------------------------------------------------------------------------- subprocesses


class GpuMemorySampler(threading.Thread):
    """Peak GPU memory in use on device `index` (MiB), sampled every `period` s (NVML, else nvidia-smi)."""

    def __init__(self, index: int = 0, period: float = 0.2):
        super().__init__(daemon=True)
        self.index, self.period = index, period
        self.stop_event = threading.Event()
        self.samples: list[float] = []
        self.method = None
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            self.method = "nvml"
        except Exception:  # noqa: BLE001
            self.method = "nvidia-smi"
        self.baseline = self.read()

    def read(self) -> float | None:
        try:
            if self._nvml is not None:
                mod, h = self._nvml
                return mod.nvmlDeviceGetMemoryInfo(h).used / 2**20
            q = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return float(q.stdout.strip().splitlines()[0])
        except Exception:  # noqa: BLE001
            return None

    def run(self) -> None:
        while not self.stop_event.is_set():
            v = self.read()
            if v is not None:
                self.samples.append(v)
            self.stop_event.wait(self.period)

    def finish(self) -> dict:
        self.stop_event.set()
        self.join(timeout=15)
        peak = max(self.samples) if self.samples else None
        return {"method": self.method, "samples": len(self.samples), "baseline_mib": self.baseline, "peak_mib": peak,
                "peak_over_baseline_mib": None if peak is None or self.baseline is None else peak - self.baseline}


def run_logged(cmd: list[str], log_path, title: str, timeout: float, cwd=None, env=None, gpu_memory: bool = False) -> dict:
    """Run `cmd`, appending its output to `log_path` with seconds since start; never raises for a
    non-zero exit (the caller decides). Returns rc, seconds, timed_out, lines [(t, text)],
    maxrss_mib (this child's peak RSS, from wait4), gpu (peak memory in use, if asked) and result
    (the JSON of the last `RESULT {...}` line, if any)."""
    timeout = max(1.0, float(timeout))
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log(f"$ {' '.join(map(str, cmd))}   (timeout {timeout:.0f} s, log {log_path})")
    lines: list[tuple[float, str]] = []
    sampler = GpuMemorySampler() if gpu_memory else None
    if sampler is not None:
        sampler.start()
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8", errors="replace") as f:
        f.write(f"\n===== {title} | {utc_now()} | cwd={cwd or os.getcwd()}\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1, cwd=cwd, env=env)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                p.kill()  # only the process this function started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in p.stdout:
                t = time.time() - t0
                line = line.rstrip("\n")
                lines.append((t, line))
                f.write(f"{t:9.2f}  {line}\n")
                if len(lines) % 50 == 0:
                    f.flush()
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
        seconds = time.time() - t0
        f.write(f"===== {title}: rc={p.returncode} in {seconds:.1f} s{' (TIMED OUT)' if timed_out.is_set() else ''}\n")
    gpu = sampler.finish() if sampler is not None else None
    result = None
    for _, line in reversed(lines):
        if line.startswith(RESULT_TAG):
            try:
                result = json.loads(line[len(RESULT_TAG):])
            except json.JSONDecodeError:
                pass
            break
    tail = "\n".join(l for _, l in lines[-15:])
    status_line = f"rc={p.returncode} in {seconds:.1f} s" + (" (timed out)" if timed_out.is_set() else "")
    log(f"{title}: {status_line}")
    if p.returncode != 0:
        print(tail, flush=True)
    return {"rc": p.returncode, "seconds": seconds, "timed_out": timed_out.is_set(), "lines": lines,
            "maxrss_mib": ru.ru_maxrss / 1024.0, "gpu": gpu, "result": result, "tail": tail}


def check_ok(r: dict, what: str) -> dict:
    """Raise with the output tail when a run_logged result failed."""
    if r["rc"] != 0 or r["timed_out"]:
        raise RuntimeError(f"{what} failed ({'timed out' if r['timed_out'] else 'rc=' + str(r['rc'])}); last lines:\n{r['tail']}")
    return r


def emit_result(value) -> None:
    """What a subprocess prints as its result (read back by run_logged)."""
    print(RESULT_TAG + json.dumps(_plain(value)), flush=True)


# ----------------------------------------------------------------------------- timing helpers


def bench_kernels():
    """benchmarks/kernels.py as a module (needs exl2build built with CUDA: it binds _native.cuda)."""
    name = "exl2build_bench_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def timed(torch, dev, setup, fn, reps):
    """(median seconds, all seconds) of fn() over reps runs, each after setup(), synchronized on CUDA."""
    ts = []
    for _ in range(reps):
        setup()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def median_rate(fn, runs: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    rates = [fn() for _ in range(runs)]
    return statistics.median(rates), rates


# ----------------------------------------------------------------------------- files


def write_calibration_parquet(text_path, out_path) -> dict:
    """One row per non-empty line of a text file, column "text" (how anchors.md ran exllamav2's converter)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [ln for ln in Path(text_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    pq.write_table(pa.table({"text": lines}), str(out_path))
    return {"rows": len(lines), "path": str(out_path)}


_DT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_tensor_bytes(model_dir) -> dict[str, int]:
    """name -> bytes of every tensor in the *.safetensors of a folder (read from the headers only)."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            out[k] = b - a
    return out


def dir_bytes(model_dir, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob(pattern))


def layer_times_from_log(lines: list[tuple[float, str]], end_markers=(" -- Writing", " -- Saving checkpoint", " -- Optimizing",
                                                                         " -- Compiling", " -- Finished")) -> dict:
    """Seconds per decoder layer from an exllamav2 converter log: from the first ' -- Layer: model.layers.N'
    line to the first layer line of another module (next layer, model.norm, lm_head) or an end marker."""
    pat = re.compile(r"^ -- Layer: (\S+) \(")
    starts: dict[int, float] = {}
    order: list[tuple[float, str]] = []
    for t, line in lines:
        m = pat.match(line)
        if m:
            order.append((t, m.group(1)))
            mm = re.match(r"model\.layers\.(\d+)$", m.group(1))
            if mm and int(mm.group(1)) not in starts:
                starts[int(mm.group(1))] = t
    per = {}
    for i, t_start in sorted(starts.items()):
        key = f"model.layers.{i}"
        t_end = None
        for t, k in order:
            if t > t_start and k != key:
                t_end = t
                break
        if t_end is None:  # last layer: the next end marker after its start, else the last line
            t_end = next((t for t, line in lines if t > t_start and line.startswith(end_markers)), lines[-1][0] if lines else t_start)
        per[i] = t_end - t_start
    return {"per_layer_s": [per[i] for i in sorted(per)], "first_layer_start_s": min(starts.values()) if starts else None}


# ----------------------------------------------------------------------------- markdown


def fmt(v, spec: str = ".2f", none: str = "–") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def part_status_lines(res: Results) -> list[str]:
    lines = []
    for name, p in res.data["parts"].items():
        if p.get("status") != "ok":
            err = [ln.strip() for ln in (p.get("error") or "").splitlines() if ln.strip()]
            text = err[0][:200] + (f" ... {err[-1][:200]}" if len(err) > 1 else "") if err else ""
            lines.append(f"- `{name}`: **{p.get('status')}** {text}")
    return lines
