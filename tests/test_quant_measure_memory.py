"""Measurement keeps only the quantized copies it still needs (bounded memory per block)."""

from __future__ import annotations

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

