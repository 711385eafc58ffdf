"""exllamav2 0.3.2 as the side-by-side benchmark runs it: perplexity and decode speed of one model folder.

    EXLLAMA_NO_SDPA=1 python benchmarks/sbs_exl2.py eval   --model DIR --tokens TOKENS.pt [--ctx 2048] [--windows N]
    EXLLAMA_NO_SDPA=1 python benchmarks/sbs_exl2.py decode --model DIR [--new 256] [--prompt 16] [--runs 3] [--warmup 1]

eval: the token ids (a 1-D int64 tensor saved with torch.save, made by our tokenizer) cut into
non-overlapping `ctx`-token windows, no BOS; per window model.forward(ids, cache) as exllamav2's
test_inference.py does (cache reset to 0, full logits), NLL of every target (ctx - 1 per window),
log-softmax in float32. Throughput = window tokens / time over all windows after one untimed
warm-up window, CUDA-synchronized.
decode: batch 1, `new` new tokens after a `prompt`-token random prompt, greedy; (1) the plain
forward loop with ExLlamaV2Cache (the embedding lives on the CPU in exllamav2, so each token
goes back to the host, as in its own generators), (2) ExLlamaV2DynamicGenerator in unpaged mode
(paged mode needs flash-attn) with decode speed = (new_tokens - 1) / time_generate from its
result. Median of `runs` after `warmup` untimed runs.
Prints one line `RESULT {json}`. Called by sbs_smol.py and sbs_big.py in a subprocess each, so a
crash inside exllamav2's extension cannot take the driver down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sbs_common import emit_result  # noqa: E402


def _setup():
    if os.environ.get("EXLLAMA_NO_SDPA") is None:
        # anchors.md: without flash-attn/xformers, 0.3.2's SDPA path applies no causal mask on
        # multi-token forwards; the harness always sets this, refuse to measure without it.
        raise SystemExit("EXLLAMA_NO_SDPA must be set (anchors.md): export EXLLAMA_NO_SDPA=1")
    import torch

    t = time.time()
    from exllamav2.ext import exllamav2_ext  # noqa: F401  (loads, or JIT-builds, the extension)

    return torch, time.time() - t


def _load(model_dir: str, max_seq_len: int):
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(model_dir)  # reads config.json and indexes the *.safetensors
    config.max_seq_len = max_seq_len
    config.arch_compat_overrides()
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=max_seq_len, lazy=True)
    model.load_autosplit(cache)
    return config, model, cache


def cmd_eval(a) -> dict:
    torch, ext_s = _setup()
    t = time.time()
    config, model, cache = _load(a.model, a.ctx)
    load_s = time.time() - t
    tokens = torch.load(a.tokens).to(torch.long).flatten()
    n = tokens.numel() // a.ctx if a.windows is None else a.windows
    if n < 1 or n * a.ctx > tokens.numel():
        raise SystemExit(f"{tokens.numel()} tokens cannot give {n} windows of {a.ctx}")
    windows = tokens[: n * a.ctx].view(n, a.ctx)
    dev = torch.device("cuda", 0)
    chunk = 512

    @torch.inference_mode()
    def score(ids):  # ids [1, ctx] int64 on the CPU (exllamav2's embedding is on the CPU)
        cache.current_seq_len = 0
        logits = model.forward(ids, cache)[:, :-1, :]
        targets = ids[:, 1:].to(logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for s in range(0, logits.shape[1], chunk):
            lp = torch.log_softmax(logits[:, s : s + chunk, :].float(), dim=-1)
            total -= lp.gather(-1, targets[:, s : s + chunk].unsqueeze(-1)).sum(dtype=torch.float64)
        return total

    score(windows[0:1])  # warm-up (kernel autotune, cuBLAS handles), not counted
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    sums = [score(windows[i : i + 1]) for i in range(n)]
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    nll = float(torch.stack(sums).sum().item())
    count = n * (a.ctx - 1)
    import math

    return {"engine": "exllamav2", "model": a.model, "windows": n, "ctx": a.ctx, "scored": count, "nll_sum": nll,
            "ppl": math.exp(nll / count), "eval_seconds": seconds, "eval_tps": n * a.ctx / seconds,
            "load_seconds": load_s, "ext_load_seconds": ext_s, "device": torch.cuda.get_device_name(dev),
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2**20}


def cmd_decode(a) -> dict:
    torch, ext_s = _setup()
    seq = ((a.prompt + a.new + 8 + 255) // 256) * 256  # the generator wants a multiple of 256
    t = time.time()
    config, model, cache = _load(a.model, seq)
    load_s = time.time() - t
    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, config.vocab_size, (1, a.prompt), generator=g, dtype=torch.long)
    out = {"engine": "exllamav2", "model": a.model, "new_tokens": a.new, "prompt_tokens": a.prompt, "runs": a.runs,
           "warmup": a.warmup, "load_seconds": load_s, "ext_load_seconds": ext_s,
           "device": torch.cuda.get_device_name(dev)}

    @torch.inference_mode()
    def loop() -> float:
        cache.current_seq_len = 0
        model.forward(prompt[:, :-1], cache, preprocess_only=True)
        tok = prompt[:, -1:]
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(a.new):
            logits = model.forward(tok, cache)
            tok = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True).cpu()
        torch.cuda.synchronize(dev)
        return a.new / (time.perf_counter() - t0)

    rates = []
    for i in range(a.warmup + a.runs):
        r = loop()
        if i >= a.warmup:
            rates.append(r)
    out["loop_tps"] = statistics.median(rates)
    out["loop_runs_tps"] = rates
    print(f"forward loop: {out['loop_tps']:.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in rates)})", flush=True)

    if not a.no_generator:
        try:
            out.update(_generator(torch, a, model, cache, config, prompt))
        except Exception as e:  # noqa: BLE001 - the forward loop result still stands
            import traceback

            traceback.print_exc()
            out["generator_error"] = f"{type(e).__name__}: {e}"
    return out


def _generator(torch, a, model, cache, config, prompt) -> dict:
    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    tokenizer = ExLlamaV2Tokenizer(config)  # needs tokenizer.json in the model folder
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=False, max_batch_size=1)
    settings = ExLlamaV2Sampler.Settings.greedy()

    def once() -> tuple[float, float]:
        job = ExLlamaV2DynamicJob(input_ids=prompt.clone(), max_new_tokens=a.new + 1, gen_settings=settings,
                                  stop_conditions=None)
        t0 = time.perf_counter()
        gen.enqueue(job)
        final = None
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming" and r.get("eos"):
                    final = r
        wall = time.perf_counter() - t0
        if final is None or not final.get("time_generate"):
            raise RuntimeError(f"generator gave no final result: {final!r}")
        steps = final["new_tokens"] - 1  # the first new token comes from prefill
        return steps / final["time_generate"], (final["new_tokens"]) / wall

    gen.warmup()
    rates, walls = [], []
    for i in range(a.warmup + a.runs):
        r, w = once()
        if i >= a.warmup:
            rates.append(r)
            walls.append(w)
    print(f"dynamic generator: {statistics.median(rates):.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
    return {"generator_tps": statistics.median(rates), "generator_runs_tps": rates,
            "generator_wall_tps": statistics.median(walls)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--tokens", required=True)
    e.add_argument("--ctx", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None)
    d = sub.add_parser("decode")
    d.add_argument("--model", required=True)
    d.add_argument("--new", type=int, default=256)
    d.add_argument("--prompt", type=int, default=16)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-generator", action="store_true")
    a = ap.parse_args()
    emit_result(cmd_eval(a) if a.cmd == "eval" else cmd_decode(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
