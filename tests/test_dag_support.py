"""Small real steps for testing the DAG machinery (no tests here; imported by test_dag_*).

They write real files, count their executions in a file outside the cache, and can kill
their own process at a chosen point (EXL2_TEST_KILL_AT) to simulate `kill -9`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from exl2build.dag.cache import Cache
from exl2build.dag.executors import LocalExecutor
from exl2build.dag.runner import Runner
from exl2build.dag.step import Step

TESTS = Path(__file__).resolve().parent


def _count(ctx) -> None:
    counter = ctx.params.get("counter")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{ctx.params.get('tag', '')} {os.getpid()}\n")


def write_step(ctx) -> None:
    """value.txt = this step's params + the values of its inputs (content flows downstream)."""
    _count(ctx)
    parts = [json.dumps(ctx.params, sort_keys=True)]
    for name in sorted(ctx.inputs):
        parts.append(f"{name}:" + (ctx.inputs[name] / "value.txt").read_text())
    for name in sorted(ctx.files):
        parts.append(f"{name}:" + Path(ctx.files[name]).read_text())
    time.sleep(ctx.params.get("sleep", 0))
    (ctx.out / "value.txt").write_text("\n".join(parts))
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    (ctx.out / "env.json").write_text(json.dumps({"CUDA_VISIBLE_DEVICES": env, "device": str(ctx.device), "pid": os.getpid()}))


def crash_step(ctx) -> None:
    """Writes half of its output, then the process is killed (SIGKILL) mid-write."""
    with open(ctx.out / "big.bin", "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        if os.environ.get("EXL2_TEST_KILL_AT") == "write":
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(b"y" * 100_000)


def checkpoint_step(ctx) -> None:
    """N 'layers', each a hash chain over the previous state, checkpointed in ctx.work."""
    state = hashlib.sha256(json.dumps(ctx.params, sort_keys=True).encode()).digest()
    log = Path(ctx.params["computed_log"])
    for i in range(ctx.params["layers"]):
        ck = ctx.work / f"layer{i:03d}.bin"
        if ck.exists():
            state = ck.read_bytes()
            continue
        for _ in range(2000):  # some real work per layer
            state = hashlib.sha256(state).digest()
        tmp = ck.with_suffix(".part")
        tmp.write_bytes(state)
        os.replace(tmp, ck)  # a checkpoint is complete or absent
        with open(log, "a") as f:
            f.write(f"{i}\n")
        ctx.progress(i + 1, ctx.params["layers"], f"layer {i}")
        if os.environ.get("EXL2_TEST_KILL_AT") == f"layer{i}":
            os.kill(os.getpid(), signal.SIGKILL)
    (ctx.out / "result.bin").write_bytes(b"".join((ctx.work / f"layer{i:03d}.bin").read_bytes() for i in range(ctx.params["layers"])))


def chain(params_a=None, params_b=None, version_b=1, files=None, run_a=write_step, name_a="a") -> list[Step]:
    a = Step(name_a, name_a, 1, dict(params_a or {"x": 1}), run_a, files=dict(files or {}))
    b = Step("b", "b", version_b, dict(params_b or {"y": 2}), write_step, inputs={"a": a})
    return [a, b]


def run_steps(steps, cache_dir, out_dir=None, executor=None):
    runner = Runner(Cache(Path(cache_dir)), str(out_dir or Path(cache_dir).parent / "out"), device="cpu")
    return runner.run(steps, executor or LocalExecutor())


def plan_steps(steps, cache_dir, out_dir=None):
    runner = Runner(Cache(Path(cache_dir)), str(out_dir or Path(cache_dir).parent / "out"), device="cpu")
    return runner.plan(steps)


def subprocess_main() -> None:
    """python test_dag_support.py SCENARIO CACHE_DIR JSON_PARAMS: run one scenario, print statuses."""
    scenario, cache_dir, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if scenario == "crash":
        steps = [Step("crash", "crash", 1, params, crash_step)]
    elif scenario == "checkpoint":
        steps = [Step("ckpt", "ckpt", 1, params, checkpoint_step)]
    elif scenario == "shared":
        # a multirun job: a shared measurement-like step, then this job's own bitrate step
        measure = Step("measure", "measure", 1, {"counter": params["counter"], "tag": "measure", "sleep": params.get("sleep", 0)}, write_step)
        own = Step("quantize", f"quantize[{params['bpw']}]", 1, {"bpw": params["bpw"], "counter": params["counter"], "tag": "quantize"}, write_step, inputs={"m": measure})
        steps = [measure, own]
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    results = run_steps(steps, cache_dir, out_dir=Path(cache_dir).parent / f"out-{os.getpid()}")
    print(json.dumps([[r.label, r.status, r.key] for r in results]))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    subprocess_main()
