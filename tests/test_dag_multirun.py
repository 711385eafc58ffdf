"""Multirun jobs (one per bitrate) running at once share one measurement through the cache."""

from __future__ import annotations

import json
import subprocess
import sys

from test_dag_support import TESTS


def test_concurrent_jobs_share_measurement(tmp_path):
    cache, counter = tmp_path / "cache", tmp_path / "count.txt"
    procs = [
        subprocess.Popen([sys.executable, str(TESTS / "test_dag_support.py"), "shared", str(cache),
                          json.dumps({"bpw": bpw, "counter": str(counter), "sleep": 2})],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for bpw in (3.0, 4.0)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    runs = counter.read_text().split()
    assert runs.count("measure") == 1  # computed once
    assert runs.count("quantize") == 2  # one per job
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    measure_keys = {r[0][2] for r in results}
    assert len(measure_keys) == 1
    assert sorted(r[0][1] for r in results) == ["cached", "ran"]
