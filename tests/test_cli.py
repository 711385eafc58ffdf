"""The CLI contract: --cfg job, plan output, report/gc commands, multirun, and (when the
quantizer is installed) an end-to-end build of a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exl2build.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def write_recipe(tmp_path: Path, model: Path, extra: str = "", eval_group: str = '"off"') -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "defaults:\n  - source: hf\n  - calib: generated\n  - quant: default\n"
        f"  - eval: {eval_group}\n  - runner: local\n  - _self_\n"
        f"name: tiny\nout_dir: {tmp_path}/out\ncache_dir: {tmp_path}/cache\ndevice: cpu\n"
        f"source:\n  path: {model}\n"
        "calib:\n  rows: 4\n  length: 64\n  measure_rows: 2\n  measure_length: 64\n"
        "quant:\n  bpws: [4.0]\n" + extra
    )
    return path


@pytest.fixture
def fake_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "exl2build COMMAND" in out


def test_cfg_job_prints_composed_recipe(tmp_path, fake_model, capsys):
    recipe = write_recipe(tmp_path, fake_model)
    code, out, _ = run_cli(["build", f"recipe={recipe}", "quant.bpws=[2.5,3.0]", "quant.head_bits=8", "--cfg", "job"], capsys)
    assert code == 0
    assert "head_bits: 8" in out and "- 2.5" in out and "- 3.0" in out and f"path: {fake_model}" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing ran


def test_default_recipe_is_demo(capsys):
    code, out, _ = run_cli(["build", "--cfg", "job"], capsys)
    assert code == 0 and "name: demo" in out and "fetch: smollm2" in out


def test_plan_lists_steps_with_reasons(tmp_path, fake_model, capsys):
    recipe = write_recipe(tmp_path, fake_model)
    code, out, _ = run_cli(["plan", f"recipe={recipe}", "quant.bpws=[3.0,4.0]"], capsys)
    assert code == 0
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("  ")}
    assert set(lines) == {"source", "calib", "measure", "optimize[3.0]", "quantize[3.0]", "compile[3.0]",
                          "optimize[4.0]", "quantize[4.0]", "compile[4.0]", "report"}
    assert "run  (no artifact)" in lines["source"]
    assert "input will be rebuilt" in lines["measure"]
    # a plan builds nothing; it only remembers the source digest
    assert {p.name for p in (tmp_path / "cache").iterdir()} <= {"digests.json", "digests.json.lock"}


def test_multirun_runs_one_job_per_value(tmp_path, fake_model, capsys):
    recipe = write_recipe(tmp_path, fake_model)
    code, out, _ = run_cli(["plan", f"recipe={recipe}", "-m", "quant.bpws=[3.0],[4.0]"], capsys)
    assert code == 0
    assert out.count("plan for recipe tiny") == 2 and "quantize[3.0]" in out and "quantize[4.0]" in out


def test_report_needs_a_build_first(tmp_path, fake_model, capsys):
    recipe = write_recipe(tmp_path, fake_model)
    code, out, _ = run_cli(["report", f"recipe={recipe}"], capsys)
    assert code == 1 and "not built yet" in out


def test_bad_input_in_a_step_prints_its_fix_and_logs_the_traceback(tmp_path, fake_model, capsys):
    (fake_model / "config.json").write_text('{"hidden_size": 12')  # cut short
    recipe = write_recipe(tmp_path, fake_model)
    code, out, err = run_cli(["build", f"recipe={recipe}"], capsys)
    assert code == 1
    assert "config.json: cannot be read as JSON" in out and "Fix or replace the file" in out
    assert "cannot be read as JSON" in err and "Traceback" not in err + out
    step_logs = list((tmp_path / "out" / "logs").glob("*/source.log"))
    assert len(step_logs) == 1 and "Traceback" in step_logs[0].read_text()


def test_device_cuda_without_a_gpu_fails_cleanly(tmp_path, fake_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = write_recipe(tmp_path, fake_model)
    code, out, err = run_cli(["build", f"recipe={recipe}", "device=cuda"], capsys)
    assert code == 1 and "device=cuda: torch" in out and "Use device=auto or device=cpu" in out
    assert "Traceback" not in out + err
    # nothing was started in the cache: no step folder, no temporary output
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "refs"]


def test_gc_dry_run_and_bad_flag(tmp_path, capsys):
    cache = tmp_path / "cache"
    (cache / "measure" / ".tmp-abc-1-x").mkdir(parents=True)
    code, out, _ = run_cli(["gc", f"cache_dir={cache}", "--dry-run"], capsys)
    assert code == 0 and "would remove measure/.tmp-abc-1-x" in out
    assert (cache / "measure" / ".tmp-abc-1-x").exists()
    code, out, _ = run_cli(["gc", f"cache_dir={cache}"], capsys)
    assert code == 0 and not (cache / "measure" / ".tmp-abc-1-x").exists()
    code, _, err = run_cli(["gc", "--force"], capsys)
    assert code == 2 and "--dry-run" in err


def test_console_script_runs_as_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "exl2build", "plan", "recipe=nope"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "no recipe named 'nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_end_to_end_tiny_model(tmp_path, tiny_llama, capsys):
    for mod in ("exl2build.quant.quantize", "exl2build.format.compile", "exl2build.eval.evaluate"):
        pytest.importorskip(mod)
    recipe = write_recipe(
        tmp_path, tiny_llama, eval_group="generated",
        extra="eval:\n  text:\n    rows: 2\n    length: 64\n  ctx: 64\n  speed: false\n",
    )
    code, out, err = run_cli(["build", f"recipe={recipe}"], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [b["bpw_target"] for b in report["builds"]] == [4.0]
    build = report["builds"][0]
    assert build["dir"] == str(tmp_path / "out" / "4.0bpw") and build["size_bytes"] > 0 and build["ppl"] > 0
    assert 3.9 <= build["bpw_decoder"] <= 4.0 and report["baseline"]["ppl"] > 0
    assert {s["status"] for s in report["steps"]} == {"ran"}
    ran = [s["name"] for s in report["steps"]]  # in the order they finished
    assert ran.index("evaluate[fp16]") < ran.index("measure")  # a bad evaluation setting fails first
    assert (tmp_path / "out" / "4.0bpw" / "config.json").is_file() and (tmp_path / "out" / "report.md").is_file()

    # Only evaluation settings change -> only evaluation (and the report) run again.
    code, out, _ = run_cli(["plan", f"recipe={recipe}", "eval.text.seed=7"], capsys)
    runs = {l.split()[0] for l in out.splitlines() if l.startswith("  ") and " run " in l}
    assert runs == {"evaltext", "evaluate[fp16]", "evaluate[4.0]", "report"}
    # A new bitrate -> only its own chain.
    code, out, _ = run_cli(["plan", f"recipe={recipe}", "quant.bpws=[4.0,5.0]"], capsys)
    runs = {l.split()[0] for l in out.splitlines() if l.startswith("  ") and " run " in l}
    assert runs == {"optimize[5.0]", "quantize[5.0]", "compile[5.0]", "evaluate[5.0]", "report"}
    # Rebuild is all cached; report rewrites from the cache.
    code, out, _ = run_cli(["report", f"recipe={recipe}"], capsys)
    assert code == 0 and "report:" in out
    # A quality gate the build breaks: the report is still written, the run fails naming it.
    code, out, _ = run_cli(["report", f"recipe={recipe}", "eval.gates.max_kld_mean=1e-12"], capsys)
    assert code == 1 and "4.0 bpw" in out and "kld_mean" in out
    assert (tmp_path / "out" / "report.json").is_file()


def test_installed_layout_finds_conf_and_recipes(tmp_path):
    """An installed wheel carries conf/ and recipes/ under exl2build/_resources (CMake rules)."""
    import shutil

    import exl2build

    repo = Path(exl2build.__file__).resolve().parents[1]
    site = tmp_path / "site"
    shutil.copytree(repo / "exl2build", site / "exl2build", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(repo / "conf", site / "exl2build" / "_resources" / "conf")
    shutil.copytree(repo / "recipes", site / "exl2build" / "_resources" / "recipes")
    # -S: no .pth files, so an editable install's import hook cannot redirect to the checkout.
    import sysconfig

    env = {"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = "import exl2build.resources as r; print(r.conf_dir()); print(r.recipes_dir())"
    proc = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.stdout.split() == [str(site / "exl2build" / "_resources" / d) for d in ("conf", "recipes")], proc.stderr
    proc = subprocess.run([sys.executable, "-S", "-m", "exl2build", "build", "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "name: demo" in proc.stdout
