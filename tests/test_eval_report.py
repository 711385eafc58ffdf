"""report.md / report.json / plots, and quality gates."""

from __future__ import annotations

import json
import re

import pytest
from matplotlib.image import imread

from exl2build.errors import ConfigError, StepError
from exl2build.eval.gates import check_builds, check_gates, validate_gates
from exl2build.eval.report import BUILD_KEYS, baseline_entry, build_entry, size_on_disk, write_report

BASE = {"ppl": 22.13, "ppl_err": 0.12, "size_bytes": 269_060_280, "decode_tps": 40.0, "tokens_scored": 301_000,
        "speed": {"prefill_tokens": 2048, "decode_tokens": 256, "decode_prompt": 16, "runs": 3, "warmup": 1},
        "method": {"method": "windows", "ctx": 2048, "stride": 2048, "bos": False, "windows": 147, "top_k": 32},
        "device": "CPU test"}


def _build(bpw, ppl, kld, top1):
    return {"bpw_target": bpw, "bpw_decoder": bpw - 0.0003, "head_bits": 6, "dir": f"builds/x/{bpw}bpw",
            "size_bytes": int(bpw * 3e7), "ppl": ppl, "ppl_err": 0.2, "kld_mean": kld, "kld_p99": 10 * kld,
            "top1_agreement": top1, "decode_tps": 60.0}


def _report():
    return {
        "recipe": "demo",
        "source": {"path": "/models/smollm2", "digest": "ab" * 32},
        "eval": {"text": "wikitext-2-raw test"},
        "baseline": BASE,
        # Deliberately out of order: the report sorts by bitrate.
        "builds": [_build(4.0, 27.81, 0.05, 0.93), _build(2.5, 111.1, 0.9, 0.6), _build(3.0, 54.3, 0.4, 0.75)],
        "steps": [{"name": "measure", "key": "f" * 64, "status": "ran", "seconds": 89.0},
                  {"name": "quantize[4.0]", "key": "e" * 64, "status": "cached", "seconds": 0.0}],
    }


def test_report_files_are_well_formed(tmp_path):
    written = write_report(tmp_path, _report())
    r = json.loads((tmp_path / "report.json").read_text())
    assert set(r) >= {"recipe", "builds", "baseline", "steps"}
    assert [b["bpw_target"] for b in r["builds"]] == [2.5, 3.0, 4.0]
    for b in r["builds"]:
        assert set(BUILD_KEYS) <= set(b)
    assert r["builds"][2]["delta_ppl"] == pytest.approx(27.81 - 22.13)
    assert r["steps"][0] == {"name": "measure", "key": "f" * 64, "status": "ran", "seconds": 89.0}
    assert r["recipe"] == {"name": "demo"} and r["eval"]["ctx"] == 2048 and r["device"] == "CPU test"

    names = sorted(p.name for p in written["plots"])
    assert names == ["kld_vs_bpw.png", "ppl_vs_bpw.png", "top1_vs_bpw.png"]
    for p in written["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300

    md = (tmp_path / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if re.match(r"^\| (FP16|[\d.]+ bpw) \|", ln)]
    assert rows[0].startswith("| FP16") and "22.1300 ± 0.1200" in rows[0]
    assert [ln.split("|")[1].strip() for ln in rows[1:]] == ["2.5 bpw", "3.0 bpw", "4.0 bpw"]
    assert "+5.6800" in rows[3] and "93.00 %" in rows[3]
    assert "abab" in md and "wikitext-2-raw test" in md and "exllamav2 method" in md and "CPU test" in md
    assert "batch-1 decode of 256 tokens after a 16-token prompt; prefill of 2048 tokens; median of 3 runs" in md
    assert "![ppl_vs_bpw](ppl_vs_bpw.png)" in md and "| measure | `ffffffffffff` | ran | 89.0 |" in md


def test_report_without_kld_or_baseline_skips_those_plots(tmp_path):
    rep = {"recipe": {"name": "r"}, "builds": [{"bpw_target": 4.0, "ppl": 10.0}], "steps": []}
    written = write_report(tmp_path, rep)
    assert [p.name for p in written["plots"]] == ["ppl_vs_bpw.png"]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["baseline"] is None and r["builds"][0]["kld_mean"] is None
    assert "| 4.0 bpw | 4.0 |" in (tmp_path / "report.md").read_text()


def test_report_requires_bpw_target(tmp_path):
    with pytest.raises(ValueError, match="bpw_target"):
        write_report(tmp_path, {"builds": [{"ppl": 3.0}]})


def test_build_and_baseline_entries(tmp_path):
    d = tmp_path / "4.0bpw"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2", "bits": 4.0, "head_bits": 6}}))
    (d / "output.safetensors").write_bytes(b"x" * 1000)
    (d / "notes.bin").write_bytes(b"x" * 50)  # not part of the model
    e = build_entry(4.0, d, {"ppl": 9.0, "kld_mean": 0.1, "digest": "zz"}, bpw_decoder=3.9997)
    assert e["head_bits"] == 6 and e["bpw_decoder"] == 3.9997 and e["ppl"] == 9.0 and "digest" not in e
    assert e["size_bytes"] == size_on_disk(d) == 1000 + len((d / "config.json").read_bytes())
    b = baseline_entry(d, {"ppl": 8.0})
    assert b["bpw_decoder"] == 16.0 and b["ppl"] == 8.0


# ---------------------------------------------------------------- gates


FIG = {"ppl": 27.8, "kld_mean": 0.05, "kld_p99": 0.6, "top1_agreement": 0.93, "ppl_ratio": 27.8 / 22.13}


def test_gates_pass():
    checks = check_gates({"max_kld_mean": 0.1, "max_ppl_ratio": {4.0: 1.3, "3.0": 2.0}}, 4.0, FIG)
    assert [c["gate"] for c in checks] == ["max_kld_mean", "max_ppl_ratio"] and all(c["ok"] for c in checks)


def test_gate_failure_names_bitrate_and_figure():
    with pytest.raises(StepError) as e:
        check_gates({"max_kld_mean": 0.01, "min_top1_agreement": 0.95}, 4.0, FIG)
    msg = str(e.value)
    assert "4.0 bpw" in msg and "kld_mean = 0.05" in msg and "eval.gates.max_kld_mean = 0.01" in msg
    assert "top1_agreement = 0.93 is below eval.gates.min_top1_agreement = 0.95" in msg


def test_per_bitrate_gates_check_only_listed_bitrates():
    g = {"max_ppl_ratio": {"3.0bpw": 1.01}}
    assert check_gates(g, 4.0, FIG) == []
    with pytest.raises(StepError, match="3.0 bpw.*ppl_ratio"):
        check_gates(g, 3.0, FIG)


def test_ppl_ratio_gate_uses_baseline_when_no_reference():
    fig = {"ppl": 30.0}
    with pytest.raises(StepError, match="ppl_ratio = 1.5"):
        check_gates({"max_ppl_ratio": 1.2}, 4.0, fig, baseline={"ppl": 20.0})
    assert check_gates({"max_ppl_ratio": 1.6}, 4.0, fig, baseline={"ppl": 20.0})[0]["value"] == 1.5


def test_gate_on_a_missing_figure_fails_clearly():
    with pytest.raises(StepError, match="needs the figure 'kld_mean'"):
        check_gates({"max_kld_mean": 0.1}, 4.0, {"ppl": 10.0})


@pytest.mark.parametrize("gates,match", [({"max_kld": 1}, "unknown gate"), ({"max_kld_mean": "x"}, "finite number"),
                                         ({"max_ppl_ratio": {"four": 1.1}}, "not a number")])
def test_bad_gate_config(gates, match):
    with pytest.raises(ConfigError, match=match):
        validate_gates(gates)


def test_report_takes_text_method_device_from_the_fp16_eval(tmp_path):
    d = tmp_path / "fp16"
    d.mkdir()
    (d / "config.json").write_text("{}")
    ev = {"ppl": 8.0, "ppl_err": 0.1, "device": "CPU x", "tokens_scored": 189,
          "text": {"description": "generated by the FP16 model (16 x 512 tokens)"},
          "method": {"method": "sliding", "ctx": 512, "stride": 256, "bos": True, "windows": 3, "top_k": 32}}
    write_report(tmp_path / "out", {"recipe": "r", "baseline": baseline_entry(d, ev), "builds": []})
    md = (tmp_path / "out" / "report.md").read_text()
    assert "generated by the FP16 model (16 x 512 tokens) (189 tokens scored)" in md
    assert "every 256 tokens, second half of each window scored (llama.cpp method); 3 windows, BOS" in md
    assert "**Device:** CPU x" in md


def test_check_builds_names_every_failing_bitrate_once():
    builds = [{"bpw_target": 3.0, "kld_mean": 0.4}, {"bpw_target": 4.0, "kld_mean": 0.05}, {"bpw_target": 5.0, "kld_mean": 0.3}]
    with pytest.raises(StepError) as e:
        check_builds({"max_kld_mean": 0.2}, builds)
    msg = str(e.value)
    assert "3.0 bpw: kld_mean = 0.4" in msg and "5.0 bpw: kld_mean = 0.3" in msg and "4.0 bpw" not in msg
    assert msg.count("Raise the bitrate") == 1
    assert [c["bpw"] for c in check_builds({"max_kld_mean": 0.5}, builds)] == [3.0, 4.0, 5.0]
