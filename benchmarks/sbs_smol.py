"""SmolLM2-135M side by side with exllamav2 0.3.2 on one GPU: conversion time, cross-loading, PPL, speed.

Measures, in one run (device_side_by_side.sh STAGE=smol; see its header for the device calls):
  * conversion wall time: our real CLI (`exl2build build recipe=smollm2-135m eval=off`, the GGUF
    imported to fp16, measurement + the BPWS builds) and exllamav2's converter on that fp16 folder
    (measurement once with -om, then each bitrate with -m), same calibration text (wikitext-2
    valid.txt; for exllamav2 one parquet row per non-empty line, as anchors.md; 100 x 2048 quant
    rows and 16 x 2048 measurement rows for both, the tools' defaults);
  * perplexity on the SAME token ids (wiki.test.raw tokenized once by our tokenizer, 2048-token
    non-overlapping windows, no BOS, all 2047 targets of a window scored) of every build in both
    engines: (a) ours in ours, (b) exllamav2's build in our loader/evaluator (issue 5: we read what
    exllamav2 writes), (c) ours in exllamav2 (issue 4: exllamav2 loads what we write), (d)
    exllamav2's in exllamav2, (e) FP16 in both; then, if time is left, KLD / top-1 agreement of
    every build against FP16 with our evaluator (a separate run: the timed runs score NLL only);
  * evaluation throughput (window tokens/s over all windows after a warm-up window, CUDA-
    synchronized, NLL of every target on both sides);
  * batch-1 decode tok/s, 256 new tokens, median of 3 after a warm-up, for FP16 and both 4.0 builds
    in both engines (ours: eval/speed.py's real generate loop; exllamav2: plain forward loop and its
    dynamic generator, see sbs_exl2.py).
Results: <out>/smol.json, <out>/smol.md, subprocess logs in <out>/smol_sub.log. Finished parts are
kept in <work>/state.json, so a second call (after a time-out) continues where the first stopped.

    python benchmarks/sbs_smol.py --assets /tmp/exl2sbs/assets --calib valid.txt --eval wiki.test.raw \
        --work /tmp/exl2sbs/smol --out $OUT [--bpws 4.0] [--force]
    python benchmarks/sbs_smol.py --smoke --work /tmp/sbs-smoke --out /tmp/sbs-smoke/out   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sbs_common as sc  # noqa: E402


def bpw_label(b: float) -> str:
    return repr(float(b))


# ----------------------------------------------------------------------------- conversion


def ours_convert(a, sub_log: Path) -> dict:
    """Our CLI: import + calibration + measurement + the bitrates (evaluation off)."""
    out_dir, cache_dir = a.work / "ours", a.work / "cache"
    bpws = "[" + ",".join(bpw_label(b) for b in a.bpws) + "]"
    cmd = [sys.executable, "-m", "exl2build", "build", f"recipe={a.recipe}", f"device={a.device}",
           f"calib.path={a.calib}", "eval=off", f"quant.bpws={bpws}", f"out_dir={out_dir}", f"cache_dir={cache_dir}"]
    cmd += a.ours_extra
    env = dict(os.environ)
    if a.assets:
        env["EXL2BUILD_ASSETS"] = str(a.assets)
    # cwd outside the checkout: `python -m exl2build` must import the installed package.
    r = sc.check_ok(sc.run_logged(cmd, sub_log, "exl2build build", a.timeout(), cwd=str(a.work), env=env), "exl2build build")
    report = json.loads((out_dir / "report.json").read_text())
    steps = {s["name"]: s for s in report.get("steps", [])}
    fp16 = (report.get("baseline") or {}).get("dir")
    if not fp16 or not (Path(fp16) / "config.json").is_file():
        found = sorted((cache_dir / "source").glob("*/config.json"))
        fp16 = str(found[-1].parent) if found else None
    builds = {}
    for b in report.get("builds", []):
        lab = bpw_label(b["bpw_target"])
        builds[lab] = {"dir": b["dir"], "bpw_decoder": b.get("bpw_decoder"), "size_bytes": b.get("size_bytes"),
                       "seconds_optimize_quantize_compile": sum(
                           (steps.get(f"{s}[{lab}]") or {}).get("seconds") or 0 for s in ("optimize", "quantize", "compile")),
                       "status": [(steps.get(f"{s}[{lab}]") or {}).get("status") for s in ("optimize", "quantize", "compile")]}
    return {"wall_seconds": r["seconds"], "maxrss_mib": r["maxrss_mib"], "fp16_dir": fp16, "builds": builds,
            "steps": report.get("steps"), "measure_seconds": (steps.get("measure") or {}).get("seconds"),
            "measure_status": (steps.get("measure") or {}).get("status"),
            "source_seconds": (steps.get("source") or {}).get("seconds"), "calib_seconds": (steps.get("calib") or {}).get("seconds")}


def make_tokens(a, fp16_dir: str) -> dict:
    """wiki.test.raw read whole and tokenized once by our tokenizer (no BOS), saved for both engines."""
    import torch

    from exl2build.data.tokenizer import Tokenizer

    text = Path(a.eval).read_text(encoding="utf-8")
    ids = Tokenizer.from_dir(fp16_dir).encode(text)
    t = torch.tensor(ids, dtype=torch.long)
    path = a.work / "eval_tokens.pt"
    torch.save(t, path)
    n = t.numel() // a.ctx
    if a.eval_windows:
        n = min(n, a.eval_windows)
    return {"path": str(path), "tokens": t.numel(), "windows": n, "ctx": a.ctx, "scored": n * (a.ctx - 1)}


def exl2_measure(a, fp16_dir: str, sub_log: Path) -> dict:
    parquet = a.work / "calib.parquet"
    pq = sc.write_calibration_parquet(a.calib, parquet)
    work = a.work / "exl2_work_measure"
    shutil.rmtree(work, ignore_errors=True)
    meas = a.work / "exl2_measurement.json"
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", fp16_dir, "-o", str(work), "-c", str(parquet),
           "-om", str(meas)] + a.exl2_extra
    r = sc.check_ok(sc.run_logged(cmd, sub_log, "exllamav2 measurement", a.timeout(), cwd=str(a.work)), "exllamav2 measurement")
    if not meas.is_file():
        raise RuntimeError(f"exllamav2's converter exited 0 but wrote no {meas}")
    return {"wall_seconds": r["seconds"], "maxrss_mib": r["maxrss_mib"], "measurement": str(meas), "parquet_rows": pq["rows"],
            **sc.layer_times_from_log(r["lines"])}


def exl2_quant(a, fp16_dir: str, bpw: float, sub_log: Path) -> dict:
    lab = bpw_label(bpw)
    work, out = a.work / f"exl2_work_{lab}", a.work / "exl2" / f"{lab}bpw"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", fp16_dir, "-o", str(work), "-c",
           str(a.work / "calib.parquet"), "-b", str(bpw), "-m", str(a.work / "exl2_measurement.json"), "-cf", str(out)] + a.exl2_extra
    r = sc.check_ok(sc.run_logged(cmd, sub_log, f"exllamav2 convert {lab}", a.timeout(), cwd=str(a.work)), f"exllamav2 {lab}")
    if not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
        raise RuntimeError(f"exllamav2's converter exited 0 but {out} has no config.json / *.safetensors")
    shutil.rmtree(work, ignore_errors=True)  # its work dir holds a copy of every tensor
    return {"wall_seconds": r["seconds"], "maxrss_mib": r["maxrss_mib"], "dir": str(out), "size_bytes": sc.dir_bytes(out),
            **sc.layer_times_from_log(r["lines"])}


# ----------------------------------------------------------------------------- evaluation


def ours_eval(a, model_dir: str, tokens: dict, ref_dir: str | None = None, out_dir: Path | None = None,
              warm: bool = True) -> dict:
    """Our evaluator (eval.evaluate.evaluate_model) on the shared token ids. Timed runs go without a
    reference (NLL only, like the exllamav2 side); the KLD runs use the FP16 reference."""
    import torch

    from exl2build.eval.evaluate import evaluate_model

    t = torch.load(tokens["path"])
    params = {"ctx": a.ctx, "windows": tokens["windows"]}
    if warm:
        evaluate_model(model_dir, t, {"ctx": a.ctx, "windows": 1}, device=a.device, write_reference=False)  # not counted
    r = evaluate_model(model_dir, t, params, ref_dir=ref_dir, out_dir=out_dir, device=a.device,
                       write_reference=out_dir is not None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    keep = ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "eval_seconds", "eval_tps", "device",
            "method", "quantized", "bits", "reference")
    return {k: r.get(k) for k in keep} | {"engine": "exl2build", "model": model_dir}


def exl2_eval(a, model_dir: str, tokens: dict, sub_log: Path, title: str) -> dict:
    cmd = [sys.executable, str(HERE / "sbs_exl2.py"), "eval", "--model", model_dir, "--tokens", tokens["path"],
           "--ctx", str(a.ctx), "--windows", str(tokens["windows"])]
    r = sc.check_ok(sc.run_logged(cmd, sub_log, title, a.timeout(), cwd=str(a.work)), title)
    if r["result"] is None:
        raise RuntimeError(f"{title}: no RESULT line; last lines:\n{r['tail']}")
    return r["result"]


def ours_decode(a, model_dir: str) -> dict:
    import torch

    from exl2build.eval.speed import measure_speed
    from exl2build.model.load import load_model

    model, _ = load_model(model_dir, a.device)
    try:
        s = measure_speed(model, {"decode_tokens": a.decode_new, "decode_prompt": 16, "runs": 3, "warmup": 1,
                                  "prefill_tokens": a.prefill})
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return s | {"engine": "exl2build", "model": model_dir}


def exl2_decode(a, model_dir: str, sub_log: Path, title: str) -> dict:
    cmd = [sys.executable, str(HERE / "sbs_exl2.py"), "decode", "--model", model_dir, "--new", str(a.decode_new),
           "--prompt", "16", "--runs", "3", "--warmup", "1"]
    r = sc.check_ok(sc.run_logged(cmd, sub_log, title, a.timeout(), cwd=str(a.work)), title)
    if r["result"] is None:
        raise RuntimeError(f"{title}: no RESULT line; last lines:\n{r['tail']}")
    return r["result"]


# ----------------------------------------------------------------------------- report


def markdown(res: sc.Results, a) -> str:
    P = res.data["parts"]

    def R(name):
        p = P.get(name) or {}
        return p.get("result") if p.get("status") == "ok" else None

    env = res.data["env"]
    L = [f"# SmolLM2-135M: exl2build vs exllamav2 0.3.2, side by side", "",
         f"GPU: {env.get('gpu')}; torch {env.get('torch')} (CUDA {env.get('cuda')}); {res.data['started']}; "
         f"EXLLAMA_NO_SDPA={env.get('EXLLAMA_NO_SDPA')}. Command: `{res.data.get('command')}`.", ""]
    oc = R("ours_convert") or {}
    em = R("exl2_measure") or {}
    L += ["## Conversion (wall seconds; same calibration text: 100 x 2048 quant rows, 16 x 2048 measurement rows)", ""]
    rows = [["exl2build (CLI)", sc.fmt(oc.get("measure_seconds"), ".1f"),
             ", ".join(f"{k}: {sc.fmt(v.get('seconds_optimize_quantize_compile'), '.1f')}" for k, v in (oc.get("builds") or {}).items()),
             sc.fmt(oc.get("wall_seconds"), ".1f") + " (whole CLI run: GGUF import, calibration, measurement, bitrates)"]]
    ex = [f"{bpw_label(b)}: {sc.fmt((R('exl2_quant_' + bpw_label(b)) or {}).get('wall_seconds'), '.1f')}" for b in a.bpws]
    rows.append(["exllamav2 convert_exl2", sc.fmt(em.get("wall_seconds"), ".1f"), ", ".join(ex),
                 "measurement and each bitrate are separate converter runs (each tokenizes and embeds again)"])
    L += [sc.md_table(["tool", "measurement s", "per bitrate s (optimize + quantize + compile)", "note"], rows), ""]
    if oc.get("measure_status") == "cached":
        L += ["(our measurement was cached from an earlier call of this stage: its seconds are that run's)", ""]

    tok = R("tokens") or {}
    L += [f"## Perplexity on the same token ids ({tok.get('windows')} windows x {tok.get('ctx')} tokens of wiki.test.raw, "
          f"tokenized once by our tokenizer, no BOS, {tok.get('scored')} scored tokens)", ""]
    rows = []
    for label, key in [("FP16", "fp16")] + [(f"exl2build {bpw_label(b)}", f"ours_{bpw_label(b)}") for b in a.bpws] + \
            [(f"exllamav2 {bpw_label(b)}", f"exl2_{bpw_label(b)}") for b in a.bpws]:
        o, e, k = R(f"eval_exl2build_{key}") or {}, R(f"eval_exllamav2_{key}") or {}, R(f"kld_exl2build_{key}") or {}
        rows.append([label, sc.fmt(o.get("ppl"), ".3f"), sc.fmt(e.get("ppl"), ".3f"), sc.fmt(k.get("kld_mean"), ".4f"),
                     sc.fmt(k.get("top1_agreement"), ".4f"), sc.fmt(o.get("eval_tps"), ".0f"), sc.fmt(e.get("eval_tps"), ".0f")])
    L += [sc.md_table(["build", "PPL in exl2build", "PPL in exllamav2", "KLD vs FP16 (exl2build)", "top-1 agree",
                       "eval tok/s exl2build", "eval tok/s exllamav2"], rows), ""]
    L += ["Cross-loading: an exllamav2 4.0 build evaluated by exl2build (issue 5) and an exl2build build evaluated by "
          "exllamav2 (issue 4) are the off-diagonal cells; a failed cell is listed under Failures.", ""]

    L += [f"## Batch-1 decode, {a.decode_new} new tokens after a 16-token prompt (tok/s, median of 3 after 1 warm-up)", ""]
    rows = []
    for label, key in [("FP16", "fp16"), ("exl2build 4.0", "ours_4.0"), ("exllamav2 4.0", "exl2_4.0")]:
        o, e = R(f"decode_exl2build_{key}") or {}, R(f"decode_exllamav2_{key}") or {}
        rows.append([label, sc.fmt(o.get("decode_tps"), ".1f"), sc.fmt(e.get("loop_tps"), ".1f"), sc.fmt(e.get("generator_tps"), ".1f"),
                     sc.fmt(o.get("prefill_tps"), ".0f")])
    L += [sc.md_table(["build", "exl2build generate (CUDA graph)", "exllamav2 forward loop", "exllamav2 dynamic generator",
                       f"exl2build prefill tok/s ({a.prefill} tokens)"], rows), ""]
    bad = sc.part_status_lines(res)
    if bad:
        L += ["## Failures / skipped parts (tracebacks in smol.json and smol.log)", ""] + bad + [""]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def smoke_setup(a) -> None:
    """CPU check of our side: a tiny random Llama (tests/conftest.py), small calibration and windows."""
    sys.path.append(str(HERE.parent))  # appended: the installed exl2build must win
    from tests.conftest import WIKI_TEST, WIKI_VALID, make_tiny_llama

    src = make_tiny_llama(a.work / "tiny-src", layers=2)
    a.device = "cpu"
    a.calib, a.eval = str(WIKI_VALID), str(WIKI_TEST)
    a.ctx, a.eval_windows, a.decode_new, a.prefill = 256, 3, 8, 32
    a.ours_extra = ["source=hf", f"source.path={src}", "calib.rows=4", "calib.length=256", "calib.measure_rows=2",
                    "calib.measure_length=256", "quant.scale_steps=9"] + a.ours_extra
    a.exl2_extra = ["-r", "4", "-l", "256", "-mr", "2", "-ml", "256"] + a.exl2_extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=None, help="EXL2BUILD_ASSETS (holds smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--calib", help="calibration text (wikitext-2 valid.txt)")
    ap.add_argument("--eval", help="evaluation text (wiki.test.raw)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--bpws", default="4.0", help="comma-separated, e.g. 4.0 or 2.5,3.0,4.0")
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--decode-new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--parts", default="convert,eval,decode")
    ap.add_argument("--ours-extra", nargs="*", default=[], help="extra overrides for `exl2build build`")
    ap.add_argument("--exl2-extra", nargs="*", default=[], help="extra arguments for exllamav2's convert_exl2")
    ap.add_argument("--force", action="store_true", help="ignore <work>/state.json (finished parts of earlier calls)")
    ap.add_argument("--smoke", action="store_true", help="CPU check with a tiny model (exllamav2 parts will fail, logged)")
    a = ap.parse_args()
    a.work, a.out = a.work.resolve(), a.out.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    a.bpws = [float(x) for x in a.bpws.split(",") if x.strip()]
    if a.smoke:
        smoke_setup(a)
    a.calib, a.eval = str(Path(a.calib).resolve()), str(Path(a.eval).resolve())
    parts = set(a.parts.split(","))
    res = sc.Results(a.out, "smol")
    res.set("command", " ".join(sys.argv))
    res.set("settings", {"bpws": a.bpws, "ctx": a.ctx, "device": a.device, "decode_new": a.decode_new, "calib": a.calib,
                         "eval": a.eval, "ours_extra": a.ours_extra, "exl2_extra": a.exl2_extra})
    a.timeout = lambda: max(30.0, res.left())
    state = sc.State(a.work / "state.json", a.force)
    sub_log = a.out / "smol_sub.log"

    # 1. conversions (reused from <work> when an earlier call finished them)
    # Our CLI run is always needed (it gives the FP16 folder); a finished one for the same bitrates is reused.
    oc = state.run(res, "ours_convert", ours_convert, a, sub_log, need_s=60,
                   state_key="ours_convert@" + ",".join(bpw_label(b) for b in a.bpws))
    fp16 = (oc or {}).get("fp16_dir")
    if fp16 is None:
        res.note("no FP16 folder (our CLI run failed): nothing else can run")
        (a.out / "smol.md").write_text(markdown(res, a))
        return 1
    tokens = state.run(res, "tokens", make_tokens, a, fp16)
    if "convert" in parts:
        state.run(res, "exl2_measure", exl2_measure, a, fp16, sub_log, need_s=100)
        for b in a.bpws:
            if state.data.get("exl2_measure") or res.result("exl2_measure"):
                state.run(res, f"exl2_quant_{bpw_label(b)}", exl2_quant, a, fp16, b, sub_log, need_s=140)

    ours_dirs = {bpw_label(b): ((oc.get("builds") or {}).get(bpw_label(b)) or {}).get("dir") for b in a.bpws}
    exl2_dirs = {bpw_label(b): ((res.result(f"exl2_quant_{bpw_label(b)}") or {}).get("dir")) for b in a.bpws}
    models = [("fp16", fp16)] + [(f"ours_{k}", v) for k, v in ours_dirs.items()] + [(f"exl2_{k}", v) for k, v in exl2_dirs.items()]
    models = [(k, v) for k, v in models if v]

    # 2. perplexity and eval throughput, every model in both engines (NLL only on both sides)
    if "eval" in parts and tokens:
        for key, d in models:
            state.run(res, f"eval_exl2build_{key}", ours_eval, a, d, tokens, need_s=15)
        for key, d in models:
            state.run(res, f"eval_exllamav2_{key}", exl2_eval, a, d, tokens, sub_log, f"exllamav2 eval {key}", need_s=25)
        (a.out / "smol.md").write_text(markdown(res, a))

    # 3. batch-1 decode of FP16 and the 4.0 builds, both engines
    if "decode" in parts:
        for key, d in models:
            if key in ("fp16", "ours_4.0", "exl2_4.0"):
                state.run(res, f"decode_exl2build_{key}", ours_decode, a, d, need_s=20)
                state.run(res, f"decode_exllamav2_{key}", exl2_decode, a, d, sub_log, f"exllamav2 decode {key}", need_s=35)
        (a.out / "smol.md").write_text(markdown(res, a))

    # 4. KLD against FP16 (our evaluator; the FP16 run writes the reference), if time is left
    if "eval" in parts and tokens:
        ref = a.work / "eval_fp16"
        if state.run(res, "kld_exl2build_fp16", ours_eval, a, fp16, tokens, None, ref, False, need_s=15) is not None:
            for key, d in models:
                if key != "fp16":
                    state.run(res, f"kld_exl2build_{key}", ours_eval, a, d, tokens, str(ref), None, False, need_s=15)

    md = markdown(res, a)
    (a.out / "smol.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
