"""Text for calibration and evaluation: read files, cut token windows, or sample text from a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from exl2build.errors import InputError

TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")


def _spec_fields(spec) -> tuple[Path, str | None, str | None]:
    """spec: a path, or a mapping/object with `path` and optional `format` (parquet|text) and `column`."""
    if isinstance(spec, (str, Path)):
        return Path(spec), None, None
    get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
    path = get("path")
    if not path:
        raise InputError(f"text source {spec!r}: key 'path' is missing. Give the file to read as path: <file>.")
    fmt = get("format") or get("kind") or get("type")
    return Path(str(path)), (str(fmt) if fmt else None), get("column")


def read_text(spec, column: str | None = None, fmt: str | None = None, key: str | None = None) -> str:
    """The whole text of a parquet or plain text file (parquet rows joined with "\\n").

    key: the recipe setting that names this file ("calib", "eval.text"), so that a fix can name
    the setting to change (`calib.column`); None where the file came from elsewhere.
    """
    path, sfmt, scol = _spec_fields(spec)
    fmt = (fmt or sfmt or ("parquet" if path.suffix.lower() == ".parquet" else "text")).lower()
    column = column or scol
    if not path.is_file():
        raise InputError(f"{path}: text file not found. Check the path in the recipe (it is read as given).")
    if fmt == "parquet":
        text = _read_parquet(path, column, key)
    elif fmt in ("text", "txt"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: is not UTF-8 text ({e}). Convert it to UTF-8 or use a parquet file.") from None
    else:
        raise InputError(f"{path}: format {fmt!r} is not supported; use 'parquet' or 'text'.")
    if not text.strip():
        raise InputError(f"{path}: contains no text. Use a file with text in it.")
    return text


def _read_parquet(path: Path, column: str | None, key: str | None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        plain = f"; for a plain text file use `{key.split('.')[0]}=text`" if key else ""
        raise InputError(f"{path}: cannot be read as parquet ({e}). Check the file{plain}.") from None
    setting = f"`{key}.column`" if key else "column="
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if column is not None:
        if column not in table.column_names:
            raise InputError(
                f"{path}: has no column {column!r}; columns are {table.column_names}. Set {setting} to one of them."
            )
        if column not in strings:
            kind = table.schema.field(column).type
            raise InputError(f"{path}: column {column!r} is {kind}, not text. Set {setting} to a string column.")
        cols = [column]
    else:
        if not strings:
            raise InputError(
                f"{path}: has no string column (columns: {table.schema.names}). Store the text as a string column."
            )
        cols = strings
    values = [table.column(c).to_pylist() for c in cols]
    rows = []
    for row in zip(*values):
        parts = [v for v in row if v is not None]
        if parts:
            rows.append("\n".join(parts))
    return "\n".join(rows)


def tokens_from_text(tok, text: str, rows: int | None, length: int, bos: bool = False, seed: int | None = 0,
                     source: str = "text", keys: tuple[str, str] = ("rows", "length")) -> torch.Tensor:
    """Cut the tokenized text into `rows` non-overlapping windows of `length` tokens -> LongTensor [rows, length].

    With bos, each window is BOS + (length-1) text tokens. rows=None takes every full window.
    When fewer rows than windows are asked for, a seeded random subset is taken (kept in text
    order), so the rows spread over the whole text; the result depends only on the inputs.
    keys: the settings that gave rows and length, named in the fix when the text is too short.
    """
    if length < 1 + int(bos):
        raise InputError(f"{source}: {keys[1]}={length} is too short; use at least {1 + int(bos)} tokens per row.")
    ids = tok.encode(text)
    step = length - int(bos)
    windows = len(ids) // step
    if rows is None:
        rows = windows
    if rows < 1 or rows > windows:
        raise InputError(
            f"{source}: {rows} rows x {length} tokens need {max(rows, 1) * step} text tokens, but the text has "
            f"only {len(ids)} tokens ({windows} full rows of {length}). Lower `{keys[0]}` or `{keys[1]}`, or use more text."
        )
    if rows == windows or seed is None:
        starts = [i * step for i in range(rows)]
    else:
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(windows, generator=g)[:rows].sort().values
        starts = [int(i) * step for i in pick]
    t = torch.tensor(ids, dtype=torch.long)
    out = torch.stack([t[s : s + step] for s in starts])
    if bos:
        out = torch.cat([torch.full((rows, 1), tok.bos_id, dtype=torch.long), out], dim=1)
    return out


@torch.no_grad()
def generate_text(model, tok, rows: int, length: int, seed: int = 0, temperature: float = 1.0,
                  top_p: float = 0.95, batch: int = 16) -> torch.Tensor:
    """Token rows sampled from the model itself -> LongTensor [rows, length].

    Each row starts with BOS (or EOS for tokenizers without BOS, as GPT-2 style models do)
    and continues with sampled tokens; EOS is suppressed so rows stay continuous text.
    Batches of `batch` rows share a KV cache; batch b uses generator seed (seed, b).
    """
    from exl2build.model.generate import GraphDecoder, sample_next

    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise InputError(
            f"{getattr(tok, 'path', 'tokenizer')}: generated text needs a BOS or EOS token to start from, and the "
            "tokenizer defines neither. Use a parquet or text dataset instead."
        )
    out = []
    for b0 in range(0, rows, batch):
        n = min(batch, rows - b0)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b0)
        cache = model.new_cache(n, length)
        cur = torch.full((n, 1), start, dtype=torch.long, device=model.device)
        toks = [cur]
        step = lambda col: model(col, cache)[:, -1]  # noqa: E731
        for i in range(length - 1):
            if i == 1 and model.device.type == "cuda":
                try:  # replaying one captured decode step is ~10x faster for small models
                    dec = GraphDecoder(model, cache)
                    step = lambda col: dec.step(col)  # noqa: E731
                except RuntimeError:
                    pass
            logits = step(cur).float()
            if tok.eos_id is not None and tok.eos_id < logits.shape[-1]:
                logits[:, tok.eos_id] = float("-inf")
            cur = sample_next(logits, temperature, top_p, g)[:, None]
            toks.append(cur)
        out.append(torch.cat(toks, 1).cpu())
    return torch.cat(out, 0)
