"""Measurement keeps only the quantized copies it still needs (bounded memory per block)."""

from __future__ import annotations

import json
import weakref

import torch
from conftest import make_tiny_llama

from exl2build.quant import measure
from exl2build.quant.options import ATTN_OPTIONS, MLP_OPTIONS, distinct_linear_options


def test_live_quantized_copies_stay_bounded(tmp_path, monkeypatch):
    model = make_tiny_llama(tmp_path / "src", layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=256)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    live, peak, made = set(), [0], [0]

    class Counted(measure.FP16Linear):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made[0] += 1
            live.add(id(self))
            weakref.finalize(self, live.discard, id(self))
            peak[0] = max(peak[0], len(live))

    monkeypatch.setattr(measure, "FP16Linear", Counted)
    peaks = []

    def progress(done, total, what):
        if done in (len(ATTN_OPTIONS), len(ATTN_OPTIONS) + len(MLP_OPTIONS)):  # a block finished
            peaks.append(peak[0])
            peak[0] = 0
            assert not live, "quantized copies outlive their block"

    measure.measure_model(model, ids, {"scale_search": {"p_steps": 5}, "batch_rows": 2}, tmp_path / "w", progress)
    # every (linear, level) is quantized exactly once ...
    distinct = 4 * len(distinct_linear_options(ATTN_OPTIONS)) + 3 * len(distinct_linear_options(MLP_OPTIONS))
    assert made[0] == distinct
    # ... but at most two levels per linear are alive at a time (all 21 were kept before)
    assert peaks[0] <= 2 * 4 and peaks[1] <= 2 * 3, peaks


def test_split_block_is_the_block_bit_for_bit(tmp_path):
    """score_options runs a block as prefix + rest (the q/k or gate/up part shared by uNN and
    sNN): that must be exactly the model's attn_block / mlp_block, or measurements would drift."""
    from exl2build.model.config import ModelConfig
    from exl2build.model.load import load_layer
    from exl2build.model.weights import WeightStore
    from exl2build.quant import layerwise as lw

    cases = (("gqa", dict(heads=4, kv_heads=2)), ("bias", dict(heads=2, kv_heads=2, qkv_bias=True, arch="Qwen2ForCausalLM")),
             ("window", dict(heads=4, kv_heads=2, arch="MistralForCausalLM")))
    for name, kw in cases:
        model = make_tiny_llama(tmp_path / name, layers=1, hidden=64, intermediate=96, vocab=256, **kw)
        if name == "window":  # a sliding window shorter than the 17-token rows
            c = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**c, "sliding_window": 5}))
        cfg = ModelConfig.from_dir(model)
        assert cfg.sliding_windows == ([5] if name == "window" else [])
        store = WeightStore(model)
        layer = load_layer(store, cfg, 0)
        store.close()
        g = torch.Generator().manual_seed(1)
        for rows, T in ((3, 17), (2, 1)):
            x = torch.randn(rows, T, 64, generator=g)
            with torch.no_grad():
                for kind in ("attn", "mlp"):
                    sub = getattr(layer, measure.BLOCKS[kind][0])
                    lins = {n: getattr(sub, n) for n in measure.BLOCKS[kind][1]}
                    want = measure.block_fn(layer, kind)(x)
                    got = measure._block_rest(layer, kind, x, measure._block_prefix(layer, kind, x, lins), lins)
                    assert torch.equal(got, want), (name, kind, rows, T)
                    y_ref = want + 0.01 * torch.randn(want.shape, generator=g)
                    errs = measure.score_options(layer, kind, x, y_ref, 2, [lins, lins])
                    assert errs == [lw.rel_error(measure.block_fn(layer, kind), x, y_ref, 2)] * 2


def test_option_groups_pair_u_and_s_options():
    for kind, table in (("attn", ATTN_OPTIONS), ("mlp", MLP_OPTIONS)):
        groups = measure.option_groups(kind, table)
        assert [k for g in groups for k in g] == list(range(len(table)))
        assert [[table[k].name for k in g] for g in groups][:2] == [["u00", "s00"], ["u01", "s01"]]
        assert [table[k].name for k in groups[-1]] == ["u20"]
