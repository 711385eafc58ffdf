"""A Llama-2-7B-shaped model side by side with exllamav2 0.3.2: conversion cost per layer, memory, decode speed.

Measures (device_side_by_side.sh STAGE=big):
  * convert: a model with Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, vocab
    32000, the Llama-2 tokenizer) but only LAYERS decoder layers (default 4), random weights
    generated on the GPU (values do not change the work done). Both tools measure it and
    quantize it at 4.0 bpw (head 6 bits) from the same calibration text (wikitext-2 valid.txt;
    16 x 2048 measurement rows, 32 x 2048 quantization rows for both; exllamav2 gets one parquet
    row per non-empty line, ours tokenizes the text whole, as each tool's loader does). Reported:
    seconds per decoder layer for measurement and for quantization (exllamav2: from its
    time-stamped ' -- Layer:' log lines; ours: from the progress callbacks of measure_model /
    quantize_model, run in-process by `ours-convert`, the same functions the CLI steps call), the
    whole wall time of each phase, peak GPU memory in use (NVML / nvidia-smi sampling, the same
    for both; ours also torch.cuda.max_memory_allocated/reserved) and peak host RSS (wait4).
  * decode: batch-1 decode tok/s (256 new tokens, median of 3 after a warm-up) of a 32-layer
    7B-shaped 4.0 bpw model in both engines, from each tool's build: to avoid quantizing 32
    layers, the 32-layer folder repeats the quantized tensors of the LAYERS quantized layers
    (layer i = quantized layer i mod LAYERS; weight values do not change the speed). Compared with
    the bandwidth limit = copy bandwidth (benchmarks/kernels.py copy_bandwidth, same run) / bytes of
    weights read per token (all tensors in the folder except the embedding table, of which one row
    is read; the KV cache is not counted).
Results: <out>/big.json, <out>/big.md, subprocess logs in <out>/big_sub.log.

    python benchmarks/sbs_big.py --text valid.txt --tokenizer llama2-tokenizer.json --work /tmp/exl2sbs/big \
        --out $OUT [--layers 4] [--parts convert,decode]
    python benchmarks/sbs_big.py --smoke --work /tmp/sbs-big --out /tmp/sbs-big/out   # CPU, tiny shapes
Internal subcommands (run in subprocesses by the driver): ours-convert, ours-decode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sbs_common as sc  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SMOKE = dict(hidden=128, intermediate=256, heads=4, kv_heads=4, vocab=32000)


# ----------------------------------------------------------------------------- the FP16 model


def gen_model(root: Path, layers: int, dims: dict, tokenizer_json: Path | None, tokenizer_model: Path | None,
              device: str, seed: int = 0) -> dict:
    """A random Llama-architecture HF folder: one safetensors file per layer plus one for the rest."""
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, nh, nkv, vocab = (dims[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab"))
    hd = h // nh

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).half().cpu()

    t0 = time.time()
    save_file({"model.embed_tokens.weight": rnd(vocab, h, std=1.0), "model.norm.weight": torch.ones(h, dtype=torch.float16),
               "lm_head.weight": rnd(vocab, h, std=h**-0.5)}, str(root / "model-base.safetensors"), metadata={"format": "pt"})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g, device=device)).half().cpu(),
             p + "post_attention_layernorm.weight": (1 + 0.1 * torch.randn(h, generator=g, device=device)).half().cpu(),
             p + "self_attn.q_proj.weight": rnd(nh * hd, h, std=h**-0.5), p + "self_attn.k_proj.weight": rnd(nkv * hd, h, std=h**-0.5),
             p + "self_attn.v_proj.weight": rnd(nkv * hd, h, std=h**-0.5), p + "self_attn.o_proj.weight": rnd(h, nh * hd, std=h**-0.5),
             p + "mlp.gate_proj.weight": rnd(inter, h, std=h**-0.5), p + "mlp.up_proj.weight": rnd(inter, h, std=h**-0.5),
             p + "mlp.down_proj.weight": rnd(h, inter, std=inter**-0.5)}
        save_file(t, str(root / f"model-layer-{i:03d}.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "torch_dtype": "float16"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                            "add_bos_token": True, "add_eos_token": False}, indent=2))
    if tokenizer_json:
        shutil.copy(tokenizer_json, root / "tokenizer.json")
    if tokenizer_model:
        shutil.copy(tokenizer_model, root / "tokenizer.model")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the driver keeps only its context while it samples its subprocesses' GPU memory
    return {"dir": str(root), "layers": layers, "dims": dims, "seconds": time.time() - t0, "bytes": sc.dir_bytes(root)}


# ----------------------------------------------------------------------------- ours (subprocess)


def cmd_ours_convert(a) -> dict:
    """Measure + optimize + quantize + compile in this process, with per-layer times and memory peaks."""
    import exl2build
    import torch

    from exl2build.data.text import read_text, tokens_from_text
    from exl2build.data.tokenizer import Tokenizer
    from exl2build.format.compile import compile_full
    from exl2build.format.exl2 import quantization_config
    from exl2build.model.config import ModelConfig
    from exl2build.quant.measure import measure_model
    from exl2build.quant.optimize import choose
    from exl2build.quant.options import ATTN_OPTIONS, MLP_OPTIONS
    from exl2build.quant.quantize import quantize_model

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    work = Path(a.work)
    for d in ("measure", "quantized", "qwork"):
        shutil.rmtree(work / d, ignore_errors=True)  # fresh run: no resume from an earlier checkpoint
    shutil.rmtree(a.build, ignore_errors=True)
    L = ModelConfig.from_dir(a.model).num_layers
    out = {"layers": L, "device": str(dev)}

    t = time.time()
    tok = Tokenizer.from_dir(a.model)
    text = read_text(a.text, fmt="text")
    qtok = tokens_from_text(tok, text, a.qrows, a.length, seed=0, source=a.text)
    mtok = tokens_from_text(tok, text, a.mrows, a.length, seed=1, source=a.text)
    out["tokenize_seconds"] = time.time() - t

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def peaks(key):
        if cuda:
            out[f"{key}_max_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
            out[f"{key}_max_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
            torch.cuda.reset_peak_memory_stats(dev)

    per_layer = len(ATTN_OPTIONS) + len(MLP_OPTIONS)
    marks_m: dict[int, float] = {}

    def prog_m(done, total, what):
        if done % per_layer == 0:
            marks_m.setdefault(done // per_layer - 1, time.time())

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_m = time.time()
    measurement = measure_model(a.model, mtok, {}, work / "measure", prog_m, device=dev)
    sync()
    out["measure_seconds"] = time.time() - t_m
    out["measure_per_layer_s"] = _diffs(t_m, marks_m, L)
    peaks("measure")

    t = time.time()
    strategy = choose(measurement, a.bpw)
    out["optimize_seconds"] = time.time() - t
    out["achieved_bpw"] = strategy.get("achieved_bpw")

    marks_q: dict[int, float] = {}

    def prog_q(done, total, what):
        if done % 2 == 0 and done <= 2 * L:
            marks_q.setdefault(done // 2 - 1, time.time())

    t_q = time.time()
    summary = quantize_model(a.model, qtok, strategy, a.head_bits, work / "quantized", work / "qwork", prog_q, {}, device=dev)
    sync()
    out["quantize_seconds"] = time.time() - t_q
    out["quantize_per_layer_s"] = _diffs(t_q, marks_q, L)
    out["decoder_bpw"] = summary.get("decoder_bpw")
    peaks("quantize")

    t = time.time()
    qc = quantization_config(exl2build.__version__, a.bpw, a.head_bits, a.qrows, a.length, Path(a.text).name)
    compile_full(a.model, work / "quantized", a.build, 0, qc)
    out["compile_seconds"] = time.time() - t
    out["build"] = str(a.build)
    import resource

    out["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _diffs(t0: float, marks: dict[int, float], L: int) -> list[float]:
    out, prev = [], t0
    for i in range(L):
        if i not in marks:
            break
        out.append(marks[i] - prev)
        prev = marks[i]
    return out


def cmd_ours_decode(a) -> dict:
    import exl2build  # noqa: F401
    import torch

    from exl2build.eval.speed import measure_speed
    from exl2build.model.load import load_model

    out = {"engine": "exl2build", "model": a.model}
    if a.copy_bw and torch.cuda.is_available():
        out["copy_GBps"] = sc.bench_kernels().copy_bandwidth() / 1e9
        torch.cuda.empty_cache()
    t = time.time()
    model, _ = load_model(a.model, a.device)
    out["load_seconds"] = time.time() - t
    s = measure_speed(model, {"decode_tokens": a.new, "decode_prompt": 16, "runs": 3, "warmup": 1, "prefill_tokens": a.prefill})
    out.update(s)
    if torch.cuda.is_available():
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ----------------------------------------------------------------------------- driver parts


def exl2_convert(a, fp16: str, sub_log: Path) -> dict:
    parquet = a.work / "calib.parquet"
    pq = sc.write_calibration_parquet(a.text, parquet)
    meas = a.work / "exl2_measurement.json"
    out_dir = a.work / "exl2_build"
    res = {"parquet_rows": pq["rows"], "rows": {"measure": f"{a.mrows} x {a.length}", "quant": f"{a.qrows} x {a.length}"}}
    for phase in ("measure", "quant"):
        wd = a.work / f"exl2_work_{phase}"
        shutil.rmtree(wd, ignore_errors=True)
        cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", fp16, "-o", str(wd), "-c", str(parquet),
               "-mr", str(a.mrows), "-ml", str(a.length), "-r", str(a.qrows), "-l", str(a.length), "-hb", str(a.head_bits)]
        if phase == "measure":
            meas.unlink(missing_ok=True)
            cmd += ["-om", str(meas)]
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            cmd += ["-b", str(a.bpw), "-m", str(meas), "-cf", str(out_dir)]
        r = sc.check_ok(sc.run_logged(cmd, sub_log, f"exllamav2 {phase}", max(30, a.res.left()), cwd=str(a.work), gpu_memory=True),
                        f"exllamav2 {phase}")
        lt = sc.layer_times_from_log(r["lines"])
        res[phase] = {"wall_seconds": r["seconds"], "maxrss_mib": r["maxrss_mib"], "gpu": r["gpu"], **lt,
                      "mean_layer_s": sum(lt["per_layer_s"]) / len(lt["per_layer_s"]) if lt["per_layer_s"] else None}
        shutil.rmtree(wd, ignore_errors=True)
        a.res.data["parts"].setdefault("exl2_convert", {})["partial"] = res  # visible even if the next phase dies
        a.res.save()
    if not (out_dir / "config.json").is_file():
        raise RuntimeError(f"exllamav2 wrote no {out_dir}/config.json")
    res["build"] = str(out_dir)
    return res


def ours_convert(a, fp16: str, sub_log: Path) -> dict:
    build = a.work / "ours_build"
    cmd = [sys.executable, str(Path(__file__).resolve()), "ours-convert", "--model", fp16, "--text", a.text, "--work",
           str(a.work / "ours_work"), "--build", str(build), "--mrows", str(a.mrows), "--qrows", str(a.qrows),
           "--length", str(a.length), "--bpw", str(a.bpw), "--head-bits", str(a.head_bits), "--device", a.device]
    r = sc.check_ok(sc.run_logged(cmd, sub_log, "exl2build convert", max(30, a.res.left()), cwd=str(a.work), gpu_memory=True),
                    "exl2build convert")
    if r["result"] is None:
        raise RuntimeError("ours-convert printed no RESULT line")
    res = dict(r["result"])
    for k in ("measure", "quantize"):
        pl = res.get(f"{k}_per_layer_s") or []
        res[f"{k}_mean_layer_s"] = sum(pl) / len(pl) if pl else None
    res.update(wall_seconds=r["seconds"], maxrss_mib=r["maxrss_mib"], gpu=r["gpu"])
    shutil.rmtree(a.work / "ours_work", ignore_errors=True)
    return res


def replicate(src: str, dst: Path, src_layers: int, dst_layers: int) -> dict:
    """dst: a dst_layers-layer copy of a quantized folder; layer i holds the tensors of layer i % src_layers."""
    import torch  # noqa: F401
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(src)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t0 = time.time()
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and not p.name.endswith(".safetensors.index.json"):
            shutil.copy(p, dst / p.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = dst_layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    handles = {f: safe_open(str(f), framework="pt") for f in sorted(src.glob("*.safetensors"))}
    where = {k: f for f, h in handles.items() for k in h.keys()}
    base = {k: handles[f].get_tensor(k) for k, f in where.items() if not k.startswith("model.layers.")}
    save_file(base, str(dst / "model-base.safetensors"), metadata={"format": "pt"})
    for i in range(dst_layers):
        s = i % src_layers
        pre = f"model.layers.{s}."
        t = {f"model.layers.{i}." + k[len(pre):]: handles[f].get_tensor(k) for k, f in where.items() if k.startswith(pre)}
        if not t:
            raise RuntimeError(f"{src}: no tensors under {pre}")
        save_file(t, str(dst / f"model-layer-{i:03d}.safetensors"), metadata={"format": "pt"})
    sizes = sc.safetensors_tensor_bytes(dst)
    embed = [k for k in sizes if k.startswith("model.embed_tokens.")]
    embed_bytes = sum(sizes[k] for k in embed)
    row = cfg["hidden_size"] * 2
    return {"dir": str(dst), "layers": dst_layers, "from_layers": src_layers, "seconds": time.time() - t0,
            "tensor_bytes": sum(sizes.values()), "embed_bytes": embed_bytes,
            "bytes_per_token": sum(sizes.values()) - embed_bytes + row}


def ours_decode(a, model_dir: str, sub_log: Path, title: str, copy_bw: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "ours-decode", "--model", model_dir, "--new", str(a.new),
           "--prefill", str(a.prefill), "--device", a.device] + (["--copy-bw"] if copy_bw else [])
    r = sc.check_ok(sc.run_logged(cmd, sub_log, title, max(30, a.res.left()), cwd=str(a.work)), title)
    if r["result"] is None:
        raise RuntimeError(f"{title}: no RESULT line")
    return r["result"]


def exl2_decode(a, model_dir: str, sub_log: Path, title: str) -> dict:
    cmd = [sys.executable, str(HERE / "sbs_exl2.py"), "decode", "--model", model_dir, "--new", str(a.new), "--prompt", "16",
           "--runs", "3", "--warmup", "1"]
    r = sc.check_ok(sc.run_logged(cmd, sub_log, title, max(30, a.res.left()), cwd=str(a.work)), title)
    if r["result"] is None:
        raise RuntimeError(f"{title}: no RESULT line")
    return r["result"]


# ----------------------------------------------------------------------------- report


def markdown(res: sc.Results, a) -> str:
    R = res.result
    env = res.data["env"]
    L = [f"# Llama-2-7B shapes ({a.layers} random layers): exl2build vs exllamav2 0.3.2", "",
         f"GPU: {env.get('gpu')}; torch {env.get('torch')} (CUDA {env.get('cuda')}); {res.data['started']}. "
         f"Command: `{res.data.get('command')}`. Calibration: wikitext-2 valid.txt, {a.mrows} x {a.length} measurement rows and "
         f"{a.qrows} x {a.length} quantization rows for both tools; 4.0 bpw, head {a.head_bits} bits.", ""]
    o, e = R("ours_convert") or {}, R("exl2_convert") or (res.data["parts"].get("exl2_convert") or {}).get("partial") or {}
    em, eq = e.get("measure") or {}, e.get("quant") or {}

    def gpu(d):
        g = (d or {}).get("gpu") or {}
        return sc.fmt(g.get("peak_over_baseline_mib"), ".0f")

    rows = [["exl2build", sc.fmt(o.get("measure_mean_layer_s"), ".2f"), sc.fmt(o.get("measure_seconds"), ".1f"),
             sc.fmt(o.get("quantize_mean_layer_s"), ".2f"), sc.fmt(o.get("quantize_seconds"), ".1f"),
             f"{gpu(o)} (allocated {sc.fmt(o.get('measure_max_allocated_mib'), '.0f')} / {sc.fmt(o.get('quantize_max_allocated_mib'), '.0f')})",
             sc.fmt(o.get("maxrss_mib"), ".0f"), sc.fmt(o.get("wall_seconds"), ".1f")],
            ["exllamav2", sc.fmt(em.get("mean_layer_s"), ".2f"), sc.fmt(em.get("wall_seconds"), ".1f"),
             sc.fmt(eq.get("mean_layer_s"), ".2f"), sc.fmt(eq.get("wall_seconds"), ".1f"),
             f"{gpu(em)} / {gpu(eq)}", f"{sc.fmt(em.get('maxrss_mib'), '.0f')} / {sc.fmt(eq.get('maxrss_mib'), '.0f')}",
             sc.fmt((em.get("wall_seconds") or 0) + (eq.get("wall_seconds") or 0) if em or eq else None, ".1f")]]
    L += ["## Conversion", "",
          "s/layer = mean over the decoder layers (ours: progress callbacks; exllamav2: its ' -- Layer:' log lines). "
          "Phase seconds: ours = measure_model / quantize_model calls; exllamav2 = the whole converter run of that phase "
          "(tokenizing, embeddings, lm_head, compile included). GPU MiB = peak memory in use over the baseline, sampled "
          "(ours: whole run; in brackets torch max allocated in measure / quantize); RSS = peak host RSS.", "",
          sc.md_table(["tool", "measure s/layer", "measure s", "quantize s/layer", "quantize s", "peak GPU MiB",
                       "peak RSS MiB", "total wall s"], rows), ""]
    if o:
        L += [f"Ours per layer: measure {', '.join(sc.fmt(x, '.1f') for x in o.get('measure_per_layer_s') or [])}; "
              f"quantize {', '.join(sc.fmt(x, '.1f') for x in o.get('quantize_per_layer_s') or [])}. "
              f"exllamav2 per layer: measure {', '.join(sc.fmt(x, '.1f') for x in em.get('per_layer_s') or [])}; "
              f"quantize {', '.join(sc.fmt(x, '.1f') for x in eq.get('per_layer_s') or [])}.", ""]
    cb = (R("decode_exl2build_ours32") or {}).get("copy_GBps")
    rows = []
    for label, key in (("exl2build build", "ours32"), ("exllamav2 build", "exl2_32")):
        rep = R(f"replicate_{key}") or {}
        bpt = rep.get("bytes_per_token")
        limit = cb * 1e9 / bpt if cb and bpt else None
        oo, ee = R(f"decode_exl2build_{key}") or {}, R(f"decode_exllamav2_{key}") or {}
        rows.append([label, sc.fmt(bpt / 1e9 if bpt else None, ".3f"), sc.fmt(limit, ".0f"), sc.fmt(oo.get("decode_tps"), ".1f"),
                     sc.fmt(ee.get("loop_tps"), ".1f"), sc.fmt(ee.get("generator_tps"), ".1f"),
                     sc.fmt(100 * oo["decode_tps"] / limit, ".0f") if limit and oo.get("decode_tps") else "–",
                     sc.fmt(100 * ee["loop_tps"] / limit, ".0f") if limit and ee.get("loop_tps") else "–"])
    L += [f"## Batch-1 decode, {a.dst_layers}-layer 7B-shaped 4.0 bpw model ({a.new} new tokens, median of 3 after a warm-up)", "",
          f"The {a.dst_layers} layers repeat the {a.layers} quantized layers (weight values do not change the speed). Limit = copy "
          f"bandwidth {sc.fmt(cb, '.0f')} GB/s (read + write, same run) / weight bytes read per token (KV cache not counted).", "",
          sc.md_table(["folder", "GB per token", "limit tok/s", "exl2build tok/s", "exllamav2 loop tok/s",
                       "exllamav2 generator tok/s", "exl2build % of limit", "exllamav2 loop % of limit"], rows), ""]
    bad = sc.part_status_lines(res)
    if bad:
        L += ["## Failures / skipped parts", ""] + bad + [""]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def driver(a) -> int:
    a.work, a.out = Path(a.work).resolve(), Path(a.out).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    dims = dict(LLAMA2_7B)
    tok_json = Path(a.tokenizer).resolve() if a.tokenizer else None
    tok_model = None
    if a.smoke:
        sys.path.append(str(HERE.parent))  # appended: the installed exl2build must win
        from tests.conftest import LLAMA2_TOKENIZER, WIKI_VALID

        dims = dict(SMOKE)
        a.device, a.mrows, a.qrows, a.length, a.new, a.prefill, a.dst_layers = "cpu", 2, 2, 128, 8, 16, 3
        a.layers = min(a.layers, 2)
        a.text = a.text or str(WIKI_VALID)
        tok_model = LLAMA2_TOKENIZER if not tok_json else None
    a.text = str(Path(a.text).resolve())
    parts = set(a.parts.split(","))
    res = sc.Results(a.out, "big")
    a.res = res
    res.set("command", " ".join(sys.argv))
    res.set("settings", {"layers": a.layers, "dims": dims, "mrows": a.mrows, "qrows": a.qrows, "length": a.length, "bpw": a.bpw,
                         "head_bits": a.head_bits, "decode_layers": a.dst_layers, "new": a.new, "device": a.device})
    state = sc.State(a.work / "state.json", a.force or "convert" in parts)
    sub_log = a.out / "big_sub.log"
    fp16 = a.work / "fp16"
    if "convert" in parts:
        state.run(res, "gen_model", gen_model, fp16, a.layers, dims, tok_json, tok_model, a.device, need_s=20)
        if (fp16 / "config.json").is_file():
            state.run(res, "exl2_convert", exl2_convert, a, str(fp16), sub_log, need_s=150)
            state.run(res, "ours_convert", ours_convert, a, str(fp16), sub_log, need_s=90)
    else:
        for name in ("gen_model", "exl2_convert", "ours_convert"):  # the earlier call's figures, for the report
            state.reuse(res, name)
    if "decode" in parts:
        builds = {"ours32": (res.result("ours_convert") or {}).get("build"), "exl2_32": (res.result("exl2_convert") or {}).get("build")}
        for key, b in builds.items():
            if b:
                state.run(res, f"replicate_{key}", replicate, b, a.work / key, a.layers, a.dst_layers, need_s=30)
        first = True
        for key in ("ours32", "exl2_32"):
            d = (res.result(f"replicate_{key}") or {}).get("dir")
            if not d:
                continue
            res.part(f"decode_exl2build_{key}", ours_decode, a, d, sub_log, f"exl2build decode {key}", first, need_s=45)
            first = False
            res.part(f"decode_exllamav2_{key}", exl2_decode, a, d, sub_log, f"exllamav2 decode {key}", need_s=60)
    md = markdown(res, a)
    (a.out / "big.md").write_text(md)
    print(md, flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("ours-convert")
    c.add_argument("--model", required=True)
    c.add_argument("--text", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--build", required=True)
    c.add_argument("--mrows", type=int, default=16)
    c.add_argument("--qrows", type=int, default=32)
    c.add_argument("--length", type=int, default=2048)
    c.add_argument("--bpw", type=float, default=4.0)
    c.add_argument("--head-bits", type=int, default=6)
    c.add_argument("--device", default="cuda")
    d = sub.add_parser("ours-decode")
    d.add_argument("--model", required=True)
    d.add_argument("--new", type=int, default=256)
    d.add_argument("--prefill", type=int, default=512)
    d.add_argument("--device", default="cuda")
    d.add_argument("--copy-bw", action="store_true")
    for p in (ap,):
        p.add_argument("--text", default=None, help="calibration text (wikitext-2 valid.txt)")
        p.add_argument("--tokenizer", default=None, help="the Llama-2 tokenizer.json (sbs_llama2_tokenizer.py makes it)")
        p.add_argument("--work", default=None)
        p.add_argument("--out", default=None)
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--dst-layers", type=int, default=32)
        p.add_argument("--mrows", type=int, default=16)
        p.add_argument("--qrows", type=int, default=32)
        p.add_argument("--length", type=int, default=2048)
        p.add_argument("--bpw", type=float, default=4.0)
        p.add_argument("--head-bits", type=int, default=6)
        p.add_argument("--new", type=int, default=256)
        p.add_argument("--prefill", type=int, default=512)
        p.add_argument("--device", default="cuda")
        p.add_argument("--parts", default="convert,decode")
        p.add_argument("--force", action="store_true")
        p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (exllamav2 parts fail, logged)")
    a = ap.parse_args()
    if a.cmd == "ours-convert":
        sc.emit_result(cmd_ours_convert(a))
        return 0
    if a.cmd == "ours-decode":
        sc.emit_result(cmd_ours_decode(a))
        return 0
    if not a.work or not a.out or not (a.text or a.smoke):
        ap.error("the driver needs --work, --out and --text")
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
