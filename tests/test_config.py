"""Every bad recipe or override: exit code 2 and one message naming the key and the fix."""

from __future__ import annotations

import pytest

from exl2build.cli import main
from exl2build.config import RecipeConfig, load_recipe
from exl2build.errors import ConfigError


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def recipe(tmp_path):
    """A tiny-model recipe (plain HF folder, text calibration) writing under tmp_path."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cal = tmp_path / "cal.txt"
    cal.write_text("some text " * 100)
    path = tmp_path / "r.yaml"
    path.write_text(
        "defaults:\n  - source: hf\n  - calib: text\n  - quant: default\n  - eval: \"off\"\n  - runner: local\n  - _self_\n"
        f"name: t\nout_dir: {tmp_path}/out\ncache_dir: {tmp_path}/cache\n"
        f"source:\n  path: {model}\ncalib:\n  path: {cal}\n  rows: 2\n  length: 16\n  measure_rows: 1\n  measure_length: 16\n"
    )
    return path


BAD_OVERRIDES = [
    (["quant.bitz=[4.0]"], "quant.bitz", "known keys under quant"),
    (["quant.head_bits=7"], "quant.head_bits", "2, 3, 4, 5, 6, 8"),
    (["quant.head_bits=six"], "quant.head_bits", "an integer"),
    (["quant.bpws=[1.0]"], "quant.bpws[0]", "between"),
    (["quant.bpws=[9.5]"], "quant.bpws[0]", "between"),
    (["quant.bpws=[]"], "quant.bpws", "quant.bpws=[4.0]"),
    (["quant.bpws=4.0"], "quant.bpws", "a list"),
    (["quant.shard_size_mb=-1"], "quant.shard_size_mb", "zero or more"),
    (["source.path=/no/such/model"], "source.path", "does not exist"),
    (["calib.path=/no/such/file.txt"], "calib.path", "does not exist"),
    (["calib.rows=0"], "calib.rows", "greater than zero"),
    (["source=nope"], "source", "gguf, hf, smollm2"),
    (["runner.kind=slurm"], "runner.kind", "local, ray"),
    (["device=tpu"], "device", "auto, cpu, cuda"),
    (["eval.method=rolling", "eval=text", "eval.text.path=/etc/hostname"], "eval.method", "windows, sliding"),
    (["+quant.extra=1"], "quant.extra", "known keys under quant"),
]


@pytest.mark.parametrize("overrides,key,fix", BAD_OVERRIDES)
def test_bad_override_exits_2_naming_key(recipe, capsys, overrides, key, fix):
    code, out, err = run_cli(["plan", f"recipe={recipe}", *overrides], capsys)
    assert code == 2, (out, err)
    assert f"`{key}`" in err and fix in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_key_in_recipe_file_suggests_the_right_one(recipe, capsys):
    recipe.write_text(recipe.read_text() + "quant:\n  head_bit: 6\n")
    code, _, err = run_cli(["plan", f"recipe={recipe}"], capsys)
    assert code == 2 and "`quant.head_bit`" in err and "did you mean `quant.head_bits`" in err


def test_unknown_override_key_suggests_the_right_one(recipe, capsys):
    code, _, err = run_cli(["plan", f"recipe={recipe}", "quant.bpw=[4.0]"], capsys)
    assert code == 2 and "`quant.bpw`" in err and "did you mean `quant.bpws`" in err


def test_unknown_recipe_lists_available(capsys):
    code, _, err = run_cli(["plan", "recipe=nope"], capsys)
    assert code == 2 and "`recipe`" in err and "demo" in err


def test_good_recipe_plans(recipe, capsys):
    code, out, _ = run_cli(["plan", f"recipe={recipe}", "quant.bpws=[3.0,4.0]"], capsys)
    assert code == 0 and "quantize[3.0]" in out and "quantize[4.0]" in out


def test_structured_defaults_validate():
    cfg = load_recipe({"name": "x", "source": {"kind": "gguf", "fetch": "smollm2"}, "calib": {"kind": "generated"}})
    assert isinstance(cfg, RecipeConfig) and cfg.out_dir.endswith("builds/x") and cfg.quant.bpws == [4.0]
    with pytest.raises(ConfigError, match="source.fetch"):
        load_recipe({"source": {"kind": "gguf", "fetch": "llama"}, "calib": {"kind": "generated"}})
    with pytest.raises(ConfigError, match="eval.gates.max_kld_mean.5.0"):
        load_recipe({"source": {"kind": "gguf", "fetch": "smollm2"}, "calib": {"kind": "generated"},
                     "eval": {"gates": {"max_kld_mean": {"5.0": 0.1}}}})


def test_recipe_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    code, _, err = run_cli(["plan", f"recipe={bad}"], capsys)
    assert code == 2 and "not valid YAML at line 2" in err and "Traceback" not in err


def test_recipe_naming_a_missing_group_option(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - source: nonexistent\n  - _self_\nname: bad\n")
    code, _, err = run_cli(["plan", f"recipe={bad}"], capsys)
    assert code == 2 and "source/nonexistent" in err and "Traceback" not in err
