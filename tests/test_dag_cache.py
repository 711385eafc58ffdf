"""Cache keys: what invalidates a step, what the plan says, digests remembered by stat."""

from __future__ import annotations

import json
import os

from exl2build.dag.cache import Cache, step_key
from exl2build.dag.digest import DigestMemo
from test_dag_support import chain, plan_steps, run_steps


def test_key_depends_on_name_version_params_inputs_files():
    base = step_key("measure", 1, {"a": 1, "b": [1, 2]}, {"model": "d1"}, {"text": "f1"})
    assert base == step_key("measure", 1, {"b": [1, 2], "a": 1}, {"model": "d1"}, {"text": "f1"})  # canonical JSON
    assert base != step_key("optimize", 1, {"a": 1, "b": [1, 2]}, {"model": "d1"}, {"text": "f1"})
    assert base != step_key("measure", 2, {"a": 1, "b": [1, 2]}, {"model": "d1"}, {"text": "f1"})
    assert base != step_key("measure", 1, {"a": 2, "b": [1, 2]}, {"model": "d1"}, {"text": "f1"})
    assert base != step_key("measure", 1, {"a": 1, "b": [1, 2]}, {"model": "d2"}, {"text": "f1"})
    assert base != step_key("measure", 1, {"a": 1, "b": [1, 2]}, {"model": "d1"}, {"text": "f2"})


def test_second_run_is_cached_and_artifact_has_manifest(tmp_path):
    cache = tmp_path / "cache"
    first = run_steps(chain(), cache)
    assert [r.status for r in first] == ["ran", "ran"]
    second = run_steps(chain(), cache)
    assert [r.status for r in second] == ["cached", "cached"]
    assert [r.key for r in first] == [r.key for r in second]
    m = json.loads((cache / "b" / first[1].key / "manifest.json").read_text())
    assert m["params"] == {"y": 2} and "value.txt" in m["outputs"] and m["inputs"]["a"]["digest"]
    assert m["tools"]["python"] and m["timings"]["seconds"] >= 0


def test_plan_reasons(tmp_path):
    cache = tmp_path / "cache"
    text = tmp_path / "cal.txt"
    text.write_text("hello")
    files = {"text": str(text)}
    lines = plan_steps(chain(files=files), cache)
    assert (lines[0].action, lines[0].reason) == ("run", "no artifact")
    assert lines[1].key is None and "input will be rebuilt (a)" in lines[1].reason
    run_steps(chain(files=files), cache)
    assert [l.action for l in plan_steps(chain(files=files), cache)] == ["cached", "cached"]

    lines = plan_steps(chain(files=files, params_b={"y": 3}), cache)
    assert lines[0].action == "cached"
    assert lines[1].action == "run" and lines[1].reason == "params changed (y: 2 -> 3)"

    lines = plan_steps(chain(files=files, version_b=2), cache)
    assert lines[1].reason == "code version changed (1 -> 2)"

    text.write_text("hello, changed")
    lines = plan_steps(chain(files=files), cache)
    assert lines[0].action == "run" and lines[0].reason == "input changed (text)"


def test_input_content_change_reruns_downstream_only_when_content_differs(tmp_path):
    cache = tmp_path / "cache"
    text = tmp_path / "cal.txt"
    text.write_text("v1")
    r1 = run_steps(chain(files={"text": str(text)}), cache)
    text.write_text("v2")
    r2 = run_steps(chain(files={"text": str(text)}), cache)
    assert [r.status for r in r2] == ["ran", "ran"] and r1[1].key != r2[1].key
    # Same content again: both keys are back to the first run's, nothing runs.
    text.write_text("v1")
    r3 = run_steps(chain(files={"text": str(text)}), cache)
    assert [r.status for r in r3] == ["cached", "cached"] and [r.key for r in r3] == [r.key for r in r1]


def test_source_digest_remembered_by_size_and_mtime(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights" * 1000)
    memo = DigestMemo(tmp_path / "cache")
    real = memo.file(f)
    data = json.loads((tmp_path / "cache" / "digests.json").read_text())
    data[str(f.resolve())]["sha256"] = "remembered"
    (tmp_path / "cache" / "digests.json").write_text(json.dumps(data))
    assert DigestMemo(tmp_path / "cache").file(f) == "remembered"  # not re-hashed
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert DigestMemo(tmp_path / "cache").file(f) == real  # touched: hashed again


def test_gc_keeps_referenced_entries(tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    old = run_steps(chain(params_b={"y": 1}), cache_dir, out_dir=out)
    new = run_steps(chain(params_b={"y": 2}), cache_dir, out_dir=out)
    garbage = Cache(cache_dir).garbage()
    assert [p.name for p in garbage] == [old[1].key]
    Cache(cache_dir).remove(garbage)
    assert [r.status for r in run_steps(chain(params_b={"y": 2}), cache_dir, out_dir=out)] == ["cached", "cached"]
    assert new[0].key == old[0].key
