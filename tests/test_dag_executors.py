"""Executors: one worker process per GPU (pinned by CUDA_VISIBLE_DEVICES), and Ray."""

from __future__ import annotations

import json

import pytest

from exl2build.dag.executors import GpuPoolExecutor
from exl2build.dag.step import Step
from test_dag_support import run_steps, write_step


def _two_chains(counter):
    shared = Step("measure", "measure", 1, {"counter": str(counter), "tag": "measure"}, write_step)
    steps = [shared]
    for bpw in (3.0, 4.0):
        q = Step("quantize", f"quantize[{bpw}]", 1, {"bpw": bpw, "sleep": 1}, write_step, inputs={"m": shared}, gpu=True)
        c = Step("compile", f"compile[{bpw}]", 1, {"bpw": bpw}, write_step, inputs={"q": q}, export=f"{bpw}bpw")
        steps += [q, c]
    return steps


def test_gpu_pool_pins_one_worker_per_gpu(tmp_path):
    cache = tmp_path / "cache"
    executor = GpuPoolExecutor([0, 1])
    try:
        results = run_steps(_two_chains(tmp_path / "count.txt"), cache, out_dir=tmp_path / "out", executor=executor)
    finally:
        executor.close()
    assert [r.status for r in results] == ["ran"] * 5
    envs = [json.loads((cache / r.name / r.key / "env.json").read_text()) for r in results]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"0", "1"}
    assert len({e["pid"] for e in envs}) == 2  # two worker processes
    assert (tmp_path / "out" / "3.0bpw" / "value.txt").is_file() and (tmp_path / "out" / "4.0bpw" / "value.txt").is_file()


@pytest.mark.ray
def test_ray_executor_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    import test_dag_support
    from exl2build.dag.executors import RayExecutor

    cloudpickle.register_pickle_by_value(test_dag_support)  # the test steps travel by value
    try:
        executor = RayExecutor(None, num_cpus=2)
        results = run_steps(_two_chains(tmp_path / "count.txt"), tmp_path / "cache", out_dir=tmp_path / "out", executor=executor)
        assert [r.status for r in results] == ["ran"] * 5
        again = run_steps(_two_chains(tmp_path / "count.txt"), tmp_path / "cache", out_dir=tmp_path / "out", executor=executor)
        assert [r.status for r in again] == ["cached"] * 5
    finally:
        cloudpickle.unregister_pickle_by_value(test_dag_support)
        ray.shutdown()
    assert (tmp_path / "count.txt").read_text().split().count("measure") == 1
