"""Quantization options: how one linear (LinearOption) or one block (BlockOption) is quantized.

A LinearOption splits the K rows of W^T (in act-order, most important channels first) into
segments of decreasing bit width, each cut into groups of `group_size` rows. Its cost in bits
is counted exactly as exllamav2 counts it (../shared/docs/exl2-format.md), so the optimizer's
budget and the written files agree.

The block tables are built from one ladder of LinearOptions (`LEVELS`, ~2.2 to 8 bpw, denser
below 4 bpw where each step matters most). For every level there is a uniform option (all
linears at that level) and, except at the top, a "sensitive" option that lifts v/o (attention)
or down (MLP) two levels: those projections write straight into the residual stream and
measure as the most sensitive, so spending bits there is often the cheapest error reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

from exl2build.errors import ConfigError

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
ROW_QUANTUM = 32  # segments are whole multiples of 32 rows so every group fills 32-bit words

# Bumped whenever a table below changes: measurements record it and the optimizer checks it.
OPTIONS_VERSION = 1


@dataclass(frozen=True)
class LinearOption:
    group_size: int
    # Bit widths, strictly descending. Named `widths` (not `bits`) because `bits(K, N)` is
    # the cost method of the design contract; construct positionally: LinearOption(64, (4, 3), (0.1, 0.9)).
    widths: tuple[int, ...]
    fractions: tuple[float, ...]  # share of K rows per bit width, sums to 1

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"LinearOption group_size={self.group_size} is not one of {GROUP_SIZES}.")
        if not self.widths or len(self.widths) != len(self.fractions):
            raise ConfigError(
                f"LinearOption bits={self.widths} and fractions={self.fractions} must be non-empty and of equal length."
            )
        if any(b not in BIT_WIDTHS for b in self.widths) or list(self.widths) != sorted(set(self.widths), reverse=True):
            raise ConfigError(
                f"LinearOption bits={self.widths}: each must be one of {BIT_WIDTHS}, strictly descending."
            )
        if any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"LinearOption fractions={self.fractions} must be positive and sum to 1.")

    @property
    def name(self) -> str:
        mix = "+".join(f"{f:g}x{b}b" for b, f in zip(self.widths, self.fractions))
        return f"{mix}/g{self.group_size}"

    def segments(self, K: int) -> list[tuple[int, int]]:
        """(bits, rows) per bit width along K; rows are multiples of 32 except the last."""
        out, left = [], K
        for i, (b, f) in enumerate(zip(self.widths, self.fractions)):
            if i == len(self.widths) - 1:
                rows = left
            else:
                # Nearest multiple of 32, at least one quantum so small K still gets the mix.
                rows = max(ROW_QUANTUM, int(f * K / ROW_QUANTUM + 0.5) * ROW_QUANTUM)  # half rounds up
                rows = min(rows, left // ROW_QUANTUM * ROW_QUANTUM)
            if rows > 0:
                out.append((b, rows))
            left -= rows
        return out

    def groups(self, K: int) -> list[tuple[int, int]]:
        """(bits, rows) of every group along permuted K, bits non-increasing."""
        if K <= 0:
            raise ValueError(f"K must be positive, got {K}")
        out = []
        for b, rows in self.segments(K):
            for start in range(0, rows, self.group_size):
                out.append((b, min(self.group_size, rows - start)))
        return out

    def bits(self, K: int, N: int) -> int:
        """Storage bits of a [K, N] linear, exllamav2's accounting: codes, q_scale_max (16/group),
        q_groups (32/group), q_scale (4*N/group), q_invperm (32*K). N is not padded here."""
        groups = self.groups(K)
        g = len(groups)
        codes = sum(rows * N * b for b, rows in groups)
        return codes + g * 16 + g * 32 + g * N * 4 + K * 32

    def bpw(self, K: int, N: int) -> float:
        return self.bits(K, N) / (K * N)

    def nominal_bpw(self) -> float:
        """Code bits plus 4-bit scales per weight, ignoring per-group/per-row metadata."""
        return sum(b * f for b, f in zip(self.widths, self.fractions)) + 4 / self.group_size

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": list(self.widths), "fractions": list(self.fractions)}


@dataclass(frozen=True)
class BlockOption:
    name: str
    linears: dict  # linear short name ("q_proj", ...) -> LinearOption

    def bits(self, shapes: dict) -> int:
        """Total bits for the block given {linear: (K, N)}."""
        return sum(self.linears[n].bits(K, N) for n, (K, N) in sorted(shapes.items()))

    def __hash__(self):
        return hash(self.name)


LO = LinearOption

# The ladder, ascending in cost. Group 32 below 3 bpw (2/3-bit codes need fine scales),
# group 64 up to ~4.7 bpw, group 128 above (5+ bits need little help from small groups).
LEVELS: tuple[LinearOption, ...] = (
    LO(64, (3, 2), (0.05, 0.95)),  # ~2.11, the floor (below exllamav2's ~2.15)
    LO(32, (3, 2), (0.05, 0.95)),  # ~2.18
    LO(32, (3, 2), (0.2, 0.8)),  # ~2.33
    LO(32, (3, 2), (0.4, 0.6)),  # ~2.53
    LO(32, (3, 2), (0.6, 0.4)),  # ~2.73
    LO(32, (3, 2), (0.8, 0.2)),  # ~2.93
    LO(64, (4, 3), (0.1, 0.9)),  # ~3.16
    LO(64, (4, 3), (0.3, 0.7)),  # ~3.36
    LO(64, (4, 3), (0.5, 0.5)),  # ~3.56
    LO(64, (4, 3), (0.75, 0.25)),  # ~3.81
    LO(64, (4,), (1.0,)),  # ~4.06
    LO(64, (5, 4), (0.15, 0.85)),  # ~4.21
    LO(64, (5, 4), (0.35, 0.65)),  # ~4.41
    LO(64, (5, 4), (0.6, 0.4)),  # ~4.66
    LO(128, (5,), (1.0,)),  # ~5.03
    LO(128, (6, 5), (0.25, 0.75)),  # ~5.28
    LO(128, (6, 5), (0.6, 0.4)),  # ~5.63
    LO(128, (6,), (1.0,)),  # ~6.03
    LO(128, (8, 6), (0.25, 0.75)),  # ~6.53
    LO(128, (8, 6), (0.6, 0.4)),  # ~7.23
    LO(128, (8,), (1.0,)),  # ~8.03
)

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
ATTN_SENSITIVE = ("v_proj", "o_proj")
MLP_SENSITIVE = ("down_proj",)
SENSITIVE_LIFT = 2


def _block_table(linears: tuple[str, ...], sensitive: tuple[str, ...]) -> tuple[BlockOption, ...]:
    table = []
    for i, level in enumerate(LEVELS):
        table.append(BlockOption(f"u{i:02d}", {n: level for n in linears}))
        j = i + SENSITIVE_LIFT
        if j < len(LEVELS):
            table.append(BlockOption(f"s{i:02d}", {n: (LEVELS[j] if n in sensitive else level) for n in linears}))
    return tuple(table)


ATTN_OPTIONS: tuple[BlockOption, ...] = _block_table(ATTN_LINEARS, ATTN_SENSITIVE)
MLP_OPTIONS: tuple[BlockOption, ...] = _block_table(MLP_LINEARS, MLP_SENSITIVE)

BLOCK_TABLES = {"attn": ATTN_OPTIONS, "mlp": MLP_OPTIONS}
BLOCK_LINEARS = {"attn": ATTN_LINEARS, "mlp": MLP_LINEARS}

HEAD_OPTIONS: dict[int, LinearOption] = {
    2: LO(32, (4, 2), (0.3, 0.7)),
    3: LO(32, (4, 3), (0.15, 0.85)),
    4: LO(32, (6, 4), (0.15, 0.85)),
    5: LO(128, (6, 5), (0.15, 0.85)),
    6: LO(128, (8, 6), (0.25, 0.75)),  # more 8-bit rows than exllamav2's 15%: the head is cheap, its error is not
    8: LO(128, (8,), (1.0,)),
}


def bpw_range(K: int = 4096, N: int = 4096) -> tuple[float, float]:
    """(lowest, highest) decoder bpw the option ladder reaches for [K, N] linears. Small models
    reach a little less (per-row overhead weighs more); the optimizer reports their exact range."""
    costs = [lv.bpw(K, N) for lv in LEVELS]
    return min(costs), max(costs)


def head_option(head_bits: int) -> LinearOption:
    """The LinearOption for lm_head at `head_bits` (6 -> 25% 8-bit + 75% 6-bit, group 128); 16 = keep fp16
    is handled by the caller."""
    opt = HEAD_OPTIONS.get(int(head_bits)) if float(head_bits) == int(head_bits) else None
    if opt is None:
        raise ConfigError(
            f"head_bits={head_bits!r} is not supported: choose one of {sorted(HEAD_OPTIONS)} "
            "(the lm_head is quantized at a fixed mix per head_bits; 6 is the usual choice)."
        )
    return opt


def block_option(kind: str, name: str) -> BlockOption:
    """Look up a block option by table kind ('attn'/'mlp') and name; unknown names raise ConfigError."""
    table = BLOCK_TABLES.get(kind)
    if table is None:
        raise ConfigError(f"block kind {kind!r} is unknown; expected one of {sorted(BLOCK_TABLES)}.")
    for opt in table:
        if opt.name == name:
            return opt
    raise ConfigError(
        f"{kind} option {name!r} is not in the option table (version {OPTIONS_VERSION}): the strategy or "
        f"measurement was made with other tables. Re-run the measurement. Known names: "
        f"{', '.join(o.name for o in table)}."
    )


def distinct_linear_options(table) -> list[LinearOption]:
    """Every LinearOption used by a block table, in first-use order (for memoised quantization)."""
    seen, out = set(), []
    for opt in table:
        for lo in opt.linears.values():
            if lo not in seen:
                seen.add(lo)
                out.append(lo)
    return out

