"""Two processes needing the same step: one builds it, the other waits and reuses it."""

from __future__ import annotations

import json
import subprocess
import sys

from test_dag_support import TESTS


def test_two_processes_one_build(tmp_path):
    cache, counter = tmp_path / "cache", tmp_path / "count.txt"
    procs = [
        subprocess.Popen([sys.executable, str(TESTS / "test_dag_support.py"), "shared", str(cache),
                          json.dumps({"bpw": 4.0, "counter": str(counter), "sleep": 3})],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    runs = counter.read_text().split()
    assert runs.count("measure") == 1 and runs.count("quantize") == 1
    statuses = sorted(json.loads(o[0].strip().splitlines()[-1])[0][1] for o in outs)
    assert statuses == ["cached", "ran"]
