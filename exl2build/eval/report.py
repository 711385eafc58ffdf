"""report.md, report.json and the plots: how much each build loses against FP16, its size and speed.

`write_report(out_dir, report)` takes one dict:

    recipe    recipe name (str) or the composed recipe (dict with at least "name")
    source    {"path": ..., "digest": ...}            the FP16 source model
    eval      {"text": ..., "method": ..., "ctx": ...} evaluation text and method (optional:
              taken from the baseline's eval.json figures when missing)
    device    where the evaluation ran (optional, same fallback)
    baseline  FP16 figures (eval.json keys) plus dir, size_bytes
    builds    one dict per bitrate: bpw_target, bpw_decoder, head_bits, dir, size_bytes and the
              eval.json figures (ppl, ppl_err, kld_mean, kld_p99, top1_agreement, decode_tps, ...)
    steps     [{name, key, status, seconds}]

`build_entry` / `baseline_entry` assemble those dicts from a model folder and its eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from exl2build.eval.plots import write_plots

BUILD_KEYS = ("bpw_target", "bpw_decoder", "head_bits", "dir", "size_bytes", "ppl", "ppl_err",
              "kld_mean", "kld_p99", "top1_agreement", "decode_tps")
# Figures copied from eval.json into a report row (when present).
EVAL_KEYS = ("ppl", "ppl_err", "nll_mean", "tokens_scored", "kld_mean", "kld_err", "kld_median", "kld_p90",
             "kld_p99", "kld_p999", "kld_max", "top1_agreement", "top1_err", "dp_mean", "dp_err", "dp_rms",
             "ln_ppl_ratio", "ln_ppl_ratio_err", "ppl_ratio", "prefill_tps", "decode_tps", "eval_tps",
             "device", "method", "text", "speed")
MODEL_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")


def size_on_disk(model_dir: str | Path) -> int:
    """Bytes of the files a user copies to run the model (weights, config, tokenizer)."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file() and f.suffix in MODEL_SUFFIXES)


def _figures(eval_figures: dict | None) -> dict:
    e = eval_figures or {}
    return {k: e[k] for k in EVAL_KEYS if k in e}


def build_entry(bpw_target: float, model_dir: str | Path, eval_figures: dict | None = None,
                bpw_decoder: float | None = None) -> dict:
    """A report row for one EXL2 build (head_bits from its config.json quantization_config)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    row = {"bpw_target": float(bpw_target), "bpw_decoder": bpw_decoder, "head_bits": q.get("head_bits"),
           "dir": str(model_dir), "size_bytes": size_on_disk(model_dir)}
    row.update(_figures(eval_figures))
    return row


def baseline_entry(model_dir: str | Path, eval_figures: dict | None = None) -> dict:
    row = {"bpw_target": 16.0, "bpw_decoder": 16.0, "head_bits": 16, "dir": str(model_dir),
           "size_bytes": size_on_disk(model_dir)}
    row.update(_figures(eval_figures))
    return row


def _normalize(report: dict) -> dict:
    """report.json content: every build has BUILD_KEYS, sorted by bitrate, ΔPPL vs FP16 added."""
    r = dict(report)
    base = r.get("baseline") or None
    builds = []
    for b in r.get("builds") or []:
        if b.get("bpw_target") is None:
            raise ValueError(f"write_report: a build entry has no bpw_target: {b}")
        row = {k: b.get(k) for k in BUILD_KEYS}
        row.update(b)
        if base and base.get("ppl") and row.get("ppl") is not None:
            row["delta_ppl"] = row["ppl"] - base["ppl"]
            row.setdefault("ppl_ratio", row["ppl"] / base["ppl"])
        builds.append(row)
    r["builds"] = sorted(builds, key=lambda b: b["bpw_target"])
    r["baseline"] = base
    r["steps"] = list(r.get("steps") or [])
    if isinstance(r.get("recipe"), str):
        r["recipe"] = {"name": r["recipe"]}
    r.setdefault("recipe", {})
    ev = dict(r.get("eval") or {})
    src = base or (r["builds"][0] if r["builds"] else {})
    if isinstance(src.get("method"), dict):
        ev.update(src["method"])  # what the evaluation actually used (e.g. the window count) wins
    if not ev.get("text") and src.get("text"):
        ev["text"] = src["text"]
    r["eval"] = ev
    r.setdefault("device", src.get("device"))
    return r


def _f(v, spec: str = ".4g", suffix: str = "") -> str:
    if v is None:
        return "–"
    return f"{v:{spec}}{suffix}"


def _ppl(b: dict) -> str:
    if b.get("ppl") is None:
        return "–"
    return f"{b['ppl']:.4f} ± {b['ppl_err']:.4f}" if b.get("ppl_err") is not None else f"{b['ppl']:.4f}"


def _size(n) -> str:
    return "–" if n is None else f"{n / 1e6:,.1f} MB"


def bpw_label(x: float) -> str:
    """4.0 -> "4.0", 2.25 -> "2.25": the way bitrates are named in build folders."""
    s = f"{x:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _table(r: dict) -> list[str]:
    head = ("| build | target bpw | decoder bpw | head bits | size | PPL ± err | ΔPPL | mean KLD | p99 KLD "
            "| top-1 agree | decode tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = r["baseline"]
    if base:
        lines.append(f"| FP16 | 16 | 16 | 16 | {_size(base.get('size_bytes'))} | {_ppl(base)} | – | – | – | – "
                     f"| {_f(base.get('decode_tps'), '.1f')} |")
    for b in r["builds"]:
        top1 = None if b.get("top1_agreement") is None else 100 * b["top1_agreement"]
        lines.append(
            f"| {bpw_label(b['bpw_target'])} bpw | {bpw_label(b['bpw_target'])} | {_f(b.get('bpw_decoder'), '.4f')} "
            f"| {_f(b.get('head_bits'), 'g')} | {_size(b.get('size_bytes'))} | {_ppl(b)} "
            f"| {_f(b.get('delta_ppl'), '+.4f')} | {_f(b.get('kld_mean'), '.5f')} | {_f(b.get('kld_p99'), '.4f')} "
            f"| {_f(top1, '.2f', ' %')} | {_f(b.get('decode_tps'), '.1f')} |"
        )
    return lines


def _method_line(ev: dict) -> str:
    m = ev.get("method")
    if m == "windows":
        desc = f"non-overlapping windows of {ev.get('ctx')} tokens, every token after the first scored (exllamav2 method)"
    elif m == "sliding":
        desc = (f"windows of {ev.get('ctx')} tokens every {ev.get('stride')} tokens, second half of each "
                "window scored (llama.cpp method)")
    else:
        desc = str(m)
    extra = [f"{ev['windows']} windows" if ev.get("windows") else None,
             "BOS replaces each window's first token" if ev.get("bos") else "no BOS"]
    return desc + "; " + ", ".join(x for x in extra if x)


def _markdown(r: dict, plots: list[Path]) -> str:
    recipe, src, ev = r["recipe"], r.get("source") or {}, r["eval"]
    base = r["baseline"] or (r["builds"][0] if r["builds"] else {})
    L = [f"# exl2build report: {recipe.get('name', 'recipe')}", ""]
    L.append(f"- **Recipe:** `{recipe.get('name', '–')}`" + (f" ({recipe['path']})" if recipe.get("path") else ""))
    digest = src.get("digest")
    L.append(f"- **Source model:** `{src.get('path', base.get('dir', '–'))}`" + (f", sha256 `{digest}`" if digest else ""))
    text = ev.get("text")
    if isinstance(text, dict):
        text = text.get("description") or text.get("path") or json.dumps(text)
    L.append(f"- **Evaluation text:** {text or '–'}" + (f" ({base['tokens_scored']:,} tokens scored)" if base.get("tokens_scored") else ""))
    L.append(f"- **Method:** {_method_line(ev)}")
    L.append(f"- **Device:** {r.get('device') or '–'}")
    sp = next((b["speed"] for b in [base, *r["builds"]] if isinstance(b.get("speed"), dict)), None)
    if sp:
        L.append(f"- **Speed:** batch-1 decode of {sp.get('decode_tokens')} tokens after a {sp.get('decode_prompt')}-token "
                 f"prompt; prefill of {sp.get('prefill_tokens')} tokens; median of {sp.get('runs')} runs after "
                 f"{sp.get('warmup')} warm-up")
    L += ["", "## Results", ""] + _table(r)
    L += ["", "PPL error: standard error of the mean token NLL, times PPL. KLD(FP16 ‖ build) per token from "
          f"the FP16 model's top-{ev.get('top_k', 'k')} log-probabilities plus one tail bucket (a lower bound "
          "of the exact KLD). Top-1 agree: share of tokens whose most likely next token matches FP16's."]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if r["steps"]:
        L += ["", "## Steps", "", "| step | key | status | seconds |", "|---|---|---|---|"]
        for s in r["steps"]:
            L.append(f"| {s.get('name')} | `{str(s.get('key', ''))[:12]}` | {s.get('status')} | {_f(s.get('seconds'), '.1f')} |")
    return "\n".join(L) + "\n"


def write_report(out_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write report.json, the plots and report.md into out_dir; returns {'json', 'md', 'plots': [...]}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = _normalize(report)
    plots = write_plots(out, r["builds"], r["baseline"])
    (out / "report.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(r, plots))
    return {"json": out / "report.json", "md": out / "report.md", "plots": plots}
