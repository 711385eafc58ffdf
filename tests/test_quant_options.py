"""Option tables: group layout per the format rules, and exact bpw accounting."""

import pytest

from exl2build.errors import ConfigError
from exl2build.quant.options import (
    ATTN_OPTIONS,
    LEVELS,
    MLP_OPTIONS,
    BlockOption,
    LinearOption,
    block_option,
    head_option,
)

KS = (32, 96, 128, 256, 576, 1536, 4096, 11008, 14336)


def test_bits_hand_computed_single_width():
    # 4-bit, group 128, K=256, N=64: 2 groups.
    opt = LinearOption(128, (4,), (1.0,))
    assert opt.groups(256) == [(4, 128), (4, 128)]
    expect = 256 * 64 * 4 + 2 * 16 + 2 * 32 + 2 * 64 * 4 + 256 * 32
    assert opt.bits(256, 64) == expect
    assert opt.bpw(256, 64) == expect / (256 * 64)


def test_bits_hand_computed_mixed():
    # 25% 6-bit + 75% 5-bit over K=512 at group 128: 128 rows of 6 bits, 384 rows of 5 bits.
    opt = LinearOption(128, (6, 5), (0.25, 0.75))
    assert opt.groups(512) == [(6, 128), (5, 128), (5, 128), (5, 128)]
    N = 100  # N is counted unpadded, as exllamav2 does
    expect = 128 * N * 6 + 384 * N * 5 + 4 * 16 + 4 * 32 + 4 * N * 4 + 512 * 32
    assert opt.bits(512, N) == expect


def test_segment_smaller_than_group_and_rounding():
    # 10% of 576 = 57.6 rows -> 64 (nearest multiple of 32); then 512 rows in groups of 64.
    opt = LinearOption(64, (4, 3), (0.1, 0.9))
    g = opt.groups(576)
    assert g[0] == (4, 64) and all(b == 3 for b, _ in g[1:]) and sum(r for _, r in g) == 576


@pytest.mark.parametrize("table", [ATTN_OPTIONS, MLP_OPTIONS], ids=["attn", "mlp"])
def test_groups_follow_format_rules(table):
    for block in table:
        for lopt in block.linears.values():
            for K in KS:
                groups = lopt.groups(K)
                assert sum(r for _, r in groups) == K
                bits = [b for b, _ in groups]
                assert bits == sorted(bits, reverse=True), (lopt, K)
                assert all(b in (2, 3, 4, 5, 6, 8) for b in bits)
                assert all(0 < r <= lopt.group_size for _, r in groups)
                # every group but the last fills whole 32-bit words (rows multiple of 32)
                assert all(r % 32 == 0 for _, r in groups[:-1]), (lopt, K, groups)
                assert lopt.group_size in (32, 64, 128)


def test_tables_span_and_density():
    assert len(ATTN_OPTIONS) >= 19 and len(MLP_OPTIONS) >= 17
    names = [o.name for o in ATTN_OPTIONS]
    assert len(set(names)) == len(names)
    bpws = sorted(lv.bpw(4096, 4096) for lv in LEVELS)
    assert bpws[0] < 2.15 and bpws[-1] > 8.0
    assert bpws == [lv.bpw(4096, 4096) for lv in LEVELS]  # the ladder ascends
    below4 = [b for b in bpws if b < 4.0]
    assert len(below4) >= 9  # denser where each step matters most
    # some options lift the sensitive projections above the rest
    lifted = [o for o in ATTN_OPTIONS if o.linears["o_proj"] != o.linears["q_proj"]]
    assert lifted and all(o.linears["v_proj"] == o.linears["o_proj"] for o in lifted)
    assert any(o.linears["down_proj"] != o.linears["up_proj"] for o in MLP_OPTIONS)


def test_block_bits_sums_linears():
    opt = block_option("mlp", "s05")
    shapes = {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    assert opt.bits(shapes) == sum(opt.linears[n].bits(K, N) for n, (K, N) in shapes.items())
    assert isinstance(opt, BlockOption)


def test_head_option():
    h = head_option(6)
    assert h.widths == (8, 6) and h.group_size == 128 and h.fractions == (0.25, 0.75)
    assert h.groups(576)[0] == (8, 128) and h.groups(576)[1] == (8, 32)  # 4.5 quanta round up to 5
    assert 6.4 < h.bpw(576, 49152) < 6.7
    with pytest.raises(ConfigError, match="head_bits"):
        head_option(7)


def test_invalid_options_raise():
    with pytest.raises(ConfigError):
        LinearOption(48, (4,), (1.0,))
    with pytest.raises(ConfigError):
        LinearOption(64, (3, 4), (0.5, 0.5))
    with pytest.raises(ConfigError):
        LinearOption(64, (4, 3), (0.5, 0.6))
    with pytest.raises(ConfigError, match="Re-run the measurement"):
        block_option("attn", "nope")
