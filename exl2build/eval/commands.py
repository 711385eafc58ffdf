"""The stand-alone commands: `exl2build eval`, `exl2build generate`, `exl2build chat`.

Each works on any model folder (FP16 HF or EXL2) without a recipe. cli.py parses the command
line and calls run_eval / run_generate / run_chat, which return the exit code (0); the
functions they wrap (eval_dir, generate_once, chat_session) return the results. Output goes
through `echo` (print by default) so tests can capture it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from exl2build.errors import ConfigError, InputError
from exl2build.eval.evaluate import evaluate_model

SHARED_WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# Keys of `exl2build eval` that are not evaluation settings.
EVAL_COMMAND_KEYS = ("text", "column", "ref", "out", "device")


def _check_model_dir(model_dir) -> Path:
    """Fail early, before any text is read: the folder, its config.json and its quant_method."""
    from exl2build.model.config import ModelConfig
    from exl2build.model.load import check_quant_method

    path = Path(str(model_dir)).expanduser()
    if not path.is_dir():
        raise InputError(f"model={model_dir}: no such folder. Pass the folder of an FP16 Hugging Face or EXL2 model.")
    check_quant_method(ModelConfig.from_dir(path))
    return path


def _device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(str(device))
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a torch device. Use cpu, cuda or cuda:N.") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine. Use device=cpu.")
    return d


def parse_overrides(overrides) -> dict:
    """A mapping, or Hydra-style "key=value" strings (values parsed as YAML); an "eval." prefix is dropped."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides:
            if "=" not in str(o):
                raise ConfigError(f"override {o!r}: expected key=value, e.g. ctx=512 or text=/data/eval.parquet.")
            k, v = str(o).split("=", 1)
            items.append((k, yaml.safe_load(v) if v else None))
    out: dict = {}
    for k, v in items:
        k = str(k).lstrip("+").removeprefix("eval.")
        if "." in k:  # nested, e.g. speed.runs=5
            head, tail = k.split(".", 1)
            sub = out.setdefault(head, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"override {k}: {head} is already set to {sub!r}, not a mapping.")
            sub[tail] = v
        else:
            out[k] = v
    return out


def _progress_printer(echo: Callable[[str], None]) -> Callable[[int, int, str], None]:
    # Ten lines at most, whatever the number of windows: nothing should scroll.
    last = [-1]

    def progress(done: int, total: int, what: str) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != last[0]:
            last[0] = tenth
            echo(f"  {what} ({100 * done // max(total, 1)}%)")

    return progress


def _fmt(v, spec=".4f") -> str:
    return "–" if v is None else format(v, spec)


def run_eval(model_dir, overrides=None, *, echo: Callable[[str], None] = print) -> int:
    """`exl2build eval model=DIR [overrides]`: see eval_dir. Returns the exit code."""
    eval_dir(model_dir, overrides, echo=echo)
    return 0


def run_generate(model_dir, prompt: str, max_new_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, seed: int = 0, device=None, top_k: int | None = None, *,
                 echo: Callable[[str], None] = print) -> int:
    """`exl2build generate model=DIR prompt=...`: see generate_once. Returns the exit code."""
    generate_once(model_dir, prompt, max_new_tokens, temperature, top_p, seed, device, top_k=top_k, echo=echo)
    return 0


def run_chat(model_dir, max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
             seed: int = 0, system: str | None = None, device=None, top_k: int | None = None, *,
             input_fn: Callable[[str], str] = input, echo: Callable[[str], None] = print) -> int:
    """`exl2build chat model=DIR`: see chat_session. Returns the exit code."""
    chat_session(model_dir, max_new_tokens, temperature, top_p, seed, system, device, top_k=top_k,
                 input_fn=input_fn, echo=echo)
    return 0


# Sampling where neither the command line nor the model's generation_config.json sets it.
GENERATE_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0}
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0}
# transformers' GenerationConfig defaults, for what a sampling generation_config.json leaves out.
_HF_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def sampling_for(model_dir, fallback: dict, **given) -> tuple[dict, str]:
    """({temperature, top_p, top_k}, where they came from): each value given on the command line
    (not None), else as the model's generation_config.json sets it (do_sample true: its values,
    transformers' defaults for the rest; do_sample false: greedy), else `fallback`."""
    from exl2build.data.tokenizer import read_optional_json

    f = Path(model_dir) / "generation_config.json"
    gcfg = read_optional_json(f)
    if gcfg.get("do_sample") is True:
        base, source = {k: gcfg.get(k) if gcfg.get(k) is not None else v for k, v in _HF_SAMPLING.items()}, f.name
    elif gcfg.get("do_sample") is False:
        base, source = {**fallback, "temperature": 0.0}, f"{f.name} (greedy)"
    else:
        base, source = dict(fallback), "exl2build's defaults"
    chosen = {k: given[k] if given.get(k) is not None else base[k] for k in fallback}
    if any(given.get(k) is not None for k in fallback):
        source = "command line" + (f" and {source}" if any(given.get(k) is None for k in fallback) else "")
    return {"temperature": float(chosen["temperature"]), "top_p": float(chosen["top_p"]),
            "top_k": int(chosen["top_k"])}, source


def describe_sampling(s: dict, source: str) -> str:
    if s["temperature"] <= 0:
        return f"greedy ({source})"
    k = f", top_k {s['top_k']}" if s["top_k"] > 0 else ""
    return f"temperature {s['temperature']:g}, top_p {s['top_p']:g}{k} ({source})"


def eval_dir(model_dir, overrides=None, *, echo: Callable[[str], None] = print) -> dict:
    """Evaluate one model folder on its own. Overrides: the `eval` settings (method, ctx, stride,
    windows, bos, chunk, top_k, speed) plus text=FILE (parquet or text; default the shared
    wikitext-2 test text), column=, ref=DIR (an FP16 evaluation folder, for KLD), out=DIR
    (writes eval.json there; an FP16 model also writes its reference) and device=."""
    from exl2build.data.text import read_text
    from exl2build.data.tokenizer import Tokenizer

    path = _check_model_dir(model_dir)
    opts = parse_overrides(overrides)
    extra = {k: opts.pop(k) for k in EVAL_COMMAND_KEYS if k in opts}
    text_path = extra.get("text") or SHARED_WIKITEXT
    if not Path(str(text_path)).is_file():
        raise InputError(
            f"text={text_path}: evaluation text not found. Pass text=FILE (a parquet or plain text file)"
            + ("; the default is ../shared/data/wikitext-2-raw/wiki.test.raw beside the checkout." if "text" not in extra else ".")
        )
    tok = Tokenizer.from_dir(path)
    text = read_text({"path": str(text_path), "column": extra.get("column")})
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    echo(f"evaluating {path} on {text_path} ({ids.numel():,} tokens)")
    r = evaluate_model(path, ids, opts, ref_dir=extra.get("ref"), out_dir=extra.get("out"),
                       progress=_progress_printer(echo), device=_device(extra.get("device")),
                       text_info={"path": str(text_path), "tokens": int(ids.numel())})
    m = r["method"]
    echo(f"method {m['method']}, ctx {m['ctx']}, {m['windows']} windows, {r['tokens_scored']:,} tokens scored on {r['device']}")
    echo(f"perplexity {_fmt(r['ppl'])} ± {_fmt(r['ppl_err'])}  ({_fmt(r.get('eval_tps'), ',.0f')} tok/s)")
    if r.get("kld_mean") is not None:
        echo(f"KLD mean {_fmt(r['kld_mean'], '.5f')} ± {_fmt(r['kld_err'], '.5f')}, median {_fmt(r['kld_median'], '.5f')}, "
             f"p99 {_fmt(r['kld_p99'])}, max {_fmt(r['kld_max'])}")
        echo(f"top-1 agreement {_fmt(100 * r['top1_agreement'], '.2f')} %, ln(PPL/PPL_fp16) {_fmt(r['ln_ppl_ratio'], '.5f')}, "
             f"delta-p mean {_fmt(r['dp_mean'], '.5f')} rms {_fmt(r['dp_rms'], '.5f')}")
    if r.get("decode_tps") is not None:
        echo(f"speed: prefill {_fmt(r['prefill_tps'], ',.0f')} tok/s, decode {_fmt(r['decode_tps'], ',.1f')} tok/s")
    if extra.get("out"):
        echo(f"wrote {Path(str(extra['out'])) / 'eval.json'}")
    return r


def _load(model_dir, device):
    from exl2build.data.tokenizer import Tokenizer
    from exl2build.model.load import load_model

    path = _check_model_dir(model_dir)
    tok = Tokenizer.from_dir(path)
    model, _ = load_model(path, _device(device))
    return model, tok


def generate_once(model_dir, prompt: str, max_new_tokens: int = 256, temperature: float | None = None,
                  top_p: float | None = None, seed: int = 0, device=None, *, top_k: int | None = None,
                  echo: Callable[[str], None] = print):
    """Print the prompt's continuation and its speed; returns the GenerationResult. Sampling
    settings left as None come from the model (sampling_for)."""
    from exl2build.model.generate import generate

    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1.")
    model, tok = _load(model_dir, device)
    sampling, source = sampling_for(tok.path, GENERATE_SAMPLING, temperature=temperature, top_p=top_p, top_k=top_k)
    # BOS where the model's tokenizer adds one, and to start an empty prompt from.
    ids = tok.encode(str(prompt), bos=tok.adds_bos or (not str(prompt) and tok.bos_id is not None))
    if not ids:
        raise ConfigError("prompt is empty and the tokenizer has no BOS token to start from. Pass prompt=\"...\".")
    r = generate(model, tok, ids, int(max_new_tokens), sampling["temperature"], sampling["top_p"], int(seed),
                 top_k=sampling["top_k"])
    echo(str(prompt) + tok.decode([i for i in r.new_ids if i not in tok.stop_ids]))
    echo(f"\n[{r.prompt_tokens} prompt tokens at {r.prefill_tps:,.0f} tok/s; {r.new_tokens} new tokens, "
         f"decode {r.decode_tps:,.1f} tok/s{'; stopped at EOS' if r.stopped_at_eos else ''}; {model.device}; "
         f"{describe_sampling(sampling, source)}]")
    return r


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, bool]:
    """(prompt text, whether to prepend the BOS id) from the tokenizer's chat template, rendered as
    transformers does (data/chat_template.py); without a template, a plain "Role: text" transcript."""
    from exl2build.data.chat_template import render

    template = getattr(tok, "chat_template", None)
    if not template:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else ""), tok.adds_bos
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    text = render(template, messages, str(tok.path), add_generation_prompt=add_generation_prompt,
                  bos_token=bos, eos_token=eos)
    # A sentencepiece encoder reads "<s>" as text, not as the BOS id: strip it and add the id instead.
    if bos and text.startswith(bos) and getattr(tok, "backend", "") == "sentencepiece":
        return text[len(bos):], True
    return text, False


CHAT_QUIT = ("/exit", "/quit", "/bye")


def chat_session(model_dir, max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
                 seed: int = 0, system: str | None = None, device=None, *, top_k: int | None = None,
                 input_fn: Callable[[str], str] = input, echo: Callable[[str], None] = print) -> list[dict]:
    """Interactive chat: /reset clears the conversation, /exit or /quit (or end of input) quits; another
    one-word /command is refused, not sent to the model. Sampling left as None comes from the
    model (sampling_for). Returns the messages."""
    from exl2build.model.generate import generate

    model, tok = _load(model_dir, device)
    sampling, source = sampling_for(tok.path, CHAT_SAMPLING, temperature=temperature, top_p=top_p, top_k=top_k)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    echo(f"chat with {model_dir} ({'chat template' if tok.chat_template else 'plain transcript, no chat template'}; "
         f"{describe_sampling(sampling, source)}); /reset clears, /exit quits")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            break
        word = line.strip()
        if word in CHAT_QUIT:
            break
        if word == "/reset":
            messages = list(start)
            continue
        if word.startswith("/") and len(word.split()) == 1:  # a mistyped command is not a message
            echo(f"unknown command {word}: /reset clears the conversation, /exit quits")
            continue
        if not word:
            continue
        messages.append({"role": "user", "content": line})
        text, bos = render_chat(tok, messages)
        ids = tok.encode(text, bos=bos)
        r = generate(model, tok, ids, int(max_new_tokens), sampling["temperature"], sampling["top_p"],
                     int(seed) + len(messages), top_k=sampling["top_k"])
        reply = tok.decode([i for i in r.new_ids if i not in tok.stop_ids])
        if not tok.chat_template:
            reply = reply.split("\nUser:")[0]  # the plain transcript has no stop token of its own
        reply = reply.strip()
        messages.append({"role": "assistant", "content": reply})
        echo(reply)
        echo(f"[{r.new_tokens} tokens, {r.decode_tps:,.1f} tok/s]")
    return messages
