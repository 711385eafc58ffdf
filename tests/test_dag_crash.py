"""A process killed (SIGKILL) while a step writes leaves nothing a later run trusts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from exl2build.dag.cache import Cache
from exl2build.dag.step import Step
from test_dag_support import TESTS, crash_step, run_steps


def test_kill_mid_write_leaves_no_artifact(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, EXL2_TEST_KILL_AT="write")
    proc = subprocess.run([sys.executable, str(TESTS / "test_dag_support.py"), "crash", str(cache), json.dumps({"n": 1})],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    step_dir = cache / "crash"
    leftovers = [p.name for p in step_dir.iterdir() if not p.name.endswith(".lock")]
    assert leftovers and all(n.startswith(".tmp-") or n.endswith(".work") for n in leftovers)

    # A later run does not trust the half-written folder: it runs the step and publishes it whole.
    [res] = run_steps([Step("crash", "crash", 1, {"n": 1}, crash_step)], cache)
    assert res.status == "ran"
    assert (cache / "crash" / res.key / "big.bin").stat().st_size == 200_000
    # The dead process's temp folder is garbage for gc (its lock is free).
    names = [p.name for p in Cache(cache).garbage()]
    assert any(n.startswith(".tmp-") for n in names)
