"""kill -9 in the middle of a checkpointing step, rerun: it resumes from the last finished
layer and the result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from exl2build.dag.cache import Cache
from exl2build.dag.step import Step
from test_dag_support import TESTS, checkpoint_step, run_steps


def test_resume_is_byte_identical(tmp_path):
    killed_log = tmp_path / "killed.log"
    params = {"layers": 6, "computed_log": str(killed_log)}
    cache = tmp_path / "cache"
    env = dict(os.environ, EXL2_TEST_KILL_AT="layer2")
    proc = subprocess.run([sys.executable, str(TESTS / "test_dag_support.py"), "checkpoint", str(cache), json.dumps(params)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert killed_log.read_text().split() == ["0", "1", "2"]
    # gc spares the killed build's checkpoints (its out_dir refers to the key) but not its temp folder.
    garbage = [p.name for p in Cache(cache).garbage()]
    assert not any(n.endswith(".work") for n in garbage) and any(n.startswith(".tmp-") for n in garbage)

    [res] = run_steps([Step("ckpt", "ckpt", 1, params, checkpoint_step)], cache)
    assert res.status == "ran"
    assert killed_log.read_text().split() == ["0", "1", "2", "3", "4", "5"]  # resumed at layer 3
    assert not (cache / "ckpt" / f"{res.key}.work").exists()  # scratch removed after publish

    # An uninterrupted run elsewhere (same params: the log path is part of them).
    clean = tmp_path / "clean-cache"
    [ref] = run_steps([Step("ckpt", "ckpt", 1, params, checkpoint_step)], clean)
    assert ref.key == res.key
    assert (cache / "ckpt" / res.key / "result.bin").read_bytes() == (clean / "ckpt" / ref.key / "result.bin").read_bytes()
