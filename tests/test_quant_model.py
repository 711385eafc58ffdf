"""End to end on a tiny random Llama: measure -> optimize -> quantize -> compile -> reload; resume."""

import json

import pytest
import torch
from conftest import make_tiny_llama

from exl2build import kernels
from exl2build.errors import InputError, StepError
from exl2build.format.compile import compile_full
from exl2build.model.load import load_model
from exl2build.model.weights import WeightStore
from exl2build.quant.measure import measure_model, read_measurement, write_measurement
from exl2build.quant.optimize import choose
from exl2build.quant.options import ATTN_OPTIONS, MLP_OPTIONS, LinearOption
from exl2build.quant.quantize import quantize_model

PARAMS = {"scale_search": {"p_steps": 11}, "batch_rows": 2}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = make_tiny_llama(root / "src", layers=2, hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=256)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    meas = measure_model(model, ids, PARAMS, root / "work_m", None)
    return root, model, ids, meas


def test_measurement_layout(setup):
    root, model, ids, meas = setup
    assert [b["key"] for b in meas["blocks"]] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    for b in meas["blocks"]:
        table = ATTN_OPTIONS if b["kind"] == "attn" else MLP_OPTIONS
        assert [o["name"] for o in b["options"]] == [o.name for o in table]
        errs = {o["name"]: o["err"] for o in b["options"]}
        assert 0 < errs["u20"] < errs["u09"] < errs["u00"] < 1  # more bits, less error
    write_measurement(meas, root / "measurement.json")
    assert read_measurement(root / "measurement.json") == json.loads(json.dumps(meas))


def test_quantize_compile_reload(setup, tmp_path):
    root, model, ids, meas = setup
    strategy = choose(meas, 5.0)
    res = quantize_model(model, ids, strategy, 6, tmp_path / "q", tmp_path / "work", None, PARAMS)
    assert res["decoder_bpw"] == pytest.approx(strategy["achieved_bpw"])
    assert set(res["linears"]) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS} | {"lm_head"}

    qc = {"quant_method": "exl2", "version": "test", "bits": 5.0, "head_bits": 6,
          "calibration": {"rows": 4, "length": 64, "dataset": "random"}}
    info = compile_full(model, tmp_path / "q", tmp_path / "out", 0, qc)
    assert info["files"] == ["output.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == qc

    src, out = WeightStore(model), WeightStore(tmp_path / "out")
    for i in range(2):
        for n in LINEARS:
            key = f"model.layers.{i}.{n}"
            w = src.get(f"{key}.weight").float()
            qt = out.qtensor(key, w.shape[1], w.shape[0])
            deq = kernels.dequant(qt).float().T
            rel = float((deq - w).norm() / w.norm())
            # rounding at b bits leaves ~2^(1-b) relative error; GPTQ trades some weight error for output error
            code_bits = sum(b * r for b, _, r in qt.group_rows()) / qt.K
            assert rel < 2.0 ** (2 - code_bits), (key, rel, code_bits)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(out.get(name), src.get(name))

    # the compiled folder runs, and its logits stay close to FP16
    fp16, _ = load_model(model)
    q, _ = load_model(tmp_path / "out")
    a, b = fp16(ids[:1]).float(), q(ids[:1]).float()
    assert float((a - b).norm() / a.norm()) < 0.1


def test_resume_is_byte_identical(setup, tmp_path):
    root, model, ids, meas = setup

    per_layer = len(ATTN_OPTIONS) + len(MLP_OPTIONS)  # measure's progress counts options

    def interrupt_in_layer1(done, total, what):
        assert isinstance(done, int) and isinstance(total, int)
        if done > per_layer or (total == 5 and done > 2):  # (quantize counts blocks + head)
            raise Interrupt

    calls = []

    def record(done, total, what):
        calls.append(done)

    with pytest.raises(Interrupt):
        measure_model(model, ids, PARAMS, tmp_path / "wm", interrupt_in_layer1)
    resumed = measure_model(model, ids, PARAMS, tmp_path / "wm", record)
    assert min(calls) > per_layer  # layer 0 came from the checkpoint
    assert json.dumps(resumed, sort_keys=True) == json.dumps(meas, sort_keys=True)

    strategy = choose(meas, 3.5)
    quantize_model(model, ids, strategy, 6, tmp_path / "q1", tmp_path / "wq1", None, PARAMS)
    with pytest.raises(Interrupt):
        quantize_model(model, ids, strategy, 6, tmp_path / "q2", tmp_path / "wq2", interrupt_in_layer1, PARAMS)
    calls.clear()
    quantize_model(model, ids, strategy, 6, tmp_path / "q2", tmp_path / "wq2", record, PARAMS)
    assert min(calls) > 2
    files1 = sorted(p.name for p in (tmp_path / "q1").iterdir())
    assert files1 == sorted(p.name for p in (tmp_path / "q2").iterdir())
    for f in files1:
        assert (tmp_path / "q1" / f).read_bytes() == (tmp_path / "q2" / f).read_bytes(), f


def test_checkpoint_of_other_inputs_is_not_resumed(setup, tmp_path):
    root, model, ids, meas = setup
    calls = []
    strategy = choose(meas, 4.0)
    quantize_model(model, ids[:2], strategy, 6, tmp_path / "q1", tmp_path / "w", None, PARAMS)
    quantize_model(model, ids, strategy, 6, tmp_path / "q2", tmp_path / "w", lambda d, t, w: calls.append(d), PARAMS)
    assert min(calls) == 1  # started over: the checkpoint was for other calibration rows


def test_overflowing_activations_name_the_layer(tmp_path):
    model = make_tiny_llama(tmp_path / "src", layers=1, vocab=64)
    from safetensors.torch import load_file, save_file

    t = load_file(str(model / "model.safetensors"))
    # CPU computes in fp32, so plant the overflow an fp16 GPU pass would produce
    t["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(t, str(model / "model.safetensors"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(StepError, match=r"model\.layers\.0\.self_attn.*fp16 overflow"):
        measure_model(model, ids, PARAMS, tmp_path / "w", None, device="cpu")


def test_exllamav2_measurement_import(setup, tmp_path):
    root, model, ids, meas = setup
    qp = lambda g, bits, prop: {"group_size": {str(b): g for b in bits}, "bits": bits, "bits_prop": prop, "scale_bits": 4}
    ours = {"q_proj": qp(64, [4], [1.0]), "k_proj": qp(64, [4], [1.0]), "v_proj": qp(64, [4], [1.0]),
            "o_proj": qp(64, [4], [1.0])}
    theirs = {n: qp(128, [4], [1.0]) for n in ours}  # exllamav2's 4-bit option uses group 128: no match
    mlp = {n: qp(64, [4], [1.0]) for n in ("gate_proj", "up_proj", "down_proj")}
    data = {"measurement": {}, "last_module_idx": 9}
    for i in range(2):
        data["measurement"][f"model.layers.{i}.self_attn"] = [
            {"accuracy": 0.9, "total_bits": 1, **ours}, {"accuracy": 0.95, "total_bits": 2, **theirs}]
        data["measurement"][f"model.layers.{i}.mlp"] = [{"accuracy": 0.8, "total_bits": 1, **mlp}]
    (tmp_path / "m.json").write_text(json.dumps(data))
    m = read_measurement(tmp_path / "m.json", model)
    four = next(o.name for o in ATTN_OPTIONS if set(o.linears.values()) == {LinearOption(64, (4,), (1.0,))})
    assert [o["name"] for b in m["blocks"] for o in b["options"]] == [four] * 4
    assert m["blocks"][1]["options"][0]["err"] == pytest.approx(0.2)
    for i in range(2):
        data["measurement"][f"model.layers.{i}.mlp"] = [{"accuracy": 0.8, "total_bits": 1, **{n: qp(128, [4], [1.0]) for n in mlp}}]
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp.*none of its 1 exllamav2 options coincides"):
        read_measurement(tmp_path / "m.json", model)
    with pytest.raises(InputError, match="does not exist"):
        read_measurement(tmp_path / "missing.json")


def test_qkv_bias_and_tied_head_without_measurement(tmp_path):
    """Qwen2-style q/k/v biases travel with the QTensors; a tied head is quantized from the embedding."""
    model = make_tiny_llama(tmp_path / "src", layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=256,
                            arch="Qwen2ForCausalLM", qkv_bias=True, tie=True)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    strategy = {"blocks": {"model.layers.0.self_attn": "u17", "model.layers.0.mlp": "s17"}}  # 6-bit / 6+8-bit
    res = quantize_model(model, ids, strategy, 8, tmp_path / "q", tmp_path / "w", None, PARAMS)
    assert res["linears"]["lm_head"]["option"] == "1x8b/g128"
    compile_full(model, tmp_path / "q", tmp_path / "out", 0, {"quant_method": "exl2"})
    out, src = WeightStore(tmp_path / "out"), WeightStore(model)
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(out.get(f"model.layers.0.self_attn.{n}.bias"), src.get(f"model.layers.0.self_attn.{n}.bias"))
    assert not out.has("lm_head.weight") and out.has("lm_head.q_weight")
    fp16, _ = load_model(model)
    q, _ = load_model(tmp_path / "out")
    a, b = fp16(ids[:1]).float(), q(ids[:1]).float()
    assert float((a - b).norm() / a.norm()) < 0.05
