"""`exl2build eval | generate | chat` as functions: happy paths on a tiny model and error paths."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file, save_file

from exl2build.errors import ConfigError, InputError
from exl2build.eval.commands import (chat_session, eval_dir, generate_once, parse_overrides, render_chat, run_chat,
                                     run_eval, run_generate)


def test_parse_overrides():
    assert parse_overrides(["eval.ctx=512", "method=sliding", "speed.runs=5", "text=/x.parquet", "bos=true"]) == {
        "ctx": 512, "method": "sliding", "speed": {"runs": 5}, "text": "/x.parquet", "bos": True}
    assert parse_overrides({"eval.windows": 3}) == {"windows": 3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["ctx"])


def test_eval_on_wikitext_writes_results(tiny_llama, wiki_test, tmp_path):
    lines = []
    r = eval_dir(tiny_llama, [f"text={wiki_test}", "ctx=64", "windows=3", f"out={tmp_path / 'fp16'}", "device=cpu"],
                 echo=lines.append)
    assert r["method"]["windows"] == 3 and r["tokens_scored"] == 3 * 63 and math.isfinite(r["ppl"])
    assert r["text"]["path"] == str(wiki_test)
    assert (tmp_path / "fp16" / "eval.json").is_file() and (tmp_path / "fp16" / "reference.safetensors").is_file()
    assert any(ln.startswith("perplexity ") for ln in lines)
    # Against itself through the saved reference: KLD lines appear and are ~0.
    lines.clear()
    r2 = eval_dir(tiny_llama, {"text": str(wiki_test), "ctx": 64, "windows": 3, "ref": str(tmp_path / "fp16")},
                  echo=lines.append)
    assert abs(r2["kld_mean"]) < 1e-5 and any(ln.startswith("KLD mean") for ln in lines)


def test_eval_bad_model_dirs(tmp_path, tiny_llama, wiki_test):
    with pytest.raises(InputError, match="no such folder"):
        run_eval(tmp_path / "missing", [f"text={wiki_test}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        run_eval(tmp_path / "empty", [f"text={wiki_test}", "ctx=64", "windows=1"])
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 300}))
    with pytest.raises(InputError, match="shape"):
        run_eval(tiny_llama, [f"text={wiki_test}", "ctx=64", "windows=1"])
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(tiny_llama / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(tiny_llama / "model.safetensors"))
    with pytest.raises(InputError, match="up_proj"):
        run_eval(tiny_llama, [f"text={wiki_test}", "ctx=64", "windows=1"])
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="quant_method"):
        run_eval(tiny_llama, [f"text={wiki_test}", "ctx=64", "windows=1"])


def test_eval_bad_text_and_settings(tiny_llama, tmp_path, wiki_test):
    with pytest.raises(InputError, match="text=.*not found"):
        run_eval(tiny_llama, [f"text={tmp_path / 'none.txt'}"])
    with pytest.raises(ConfigError, match="unknown key"):
        run_eval(tiny_llama, [f"text={wiki_test}", "ctxx=64"])
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(InputError, match="no window of eval.ctx"):
        run_eval(tiny_llama, [f"text={short}", "ctx=64"])
    with pytest.raises(ConfigError, match="device="):
        run_eval(tiny_llama, [f"text={wiki_test}", "device=tpu!"])


def test_generate_prints_text_and_speed(tiny_llama):
    out = []
    r = generate_once(tiny_llama, "I have a dream", max_new_tokens=5, temperature=0.0, echo=out.append)
    assert out[0].startswith("I have a dream") and "tok/s" in out[1]
    assert 1 <= r.new_tokens <= 5
    assert r.ids[0] == 1 and r.prompt_tokens == 1 + len("I have a dream".split())  # Llama's tokenizer adds BOS
    (tiny_llama / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    r = generate_once(tiny_llama, "I have a dream", max_new_tokens=2, temperature=0.0, echo=out.append)
    assert r.ids[0] != 1  # this one does not
    r = generate_once(tiny_llama, "", max_new_tokens=2, temperature=0.0, echo=out.append)
    assert r.ids[:1] == [1] and r.prompt_tokens == 1  # an empty prompt starts from BOS
    with pytest.raises(ConfigError, match="max_new_tokens"):
        run_generate(tiny_llama, "x", max_new_tokens=0)
    with pytest.raises(InputError, match="no such folder"):
        run_generate(tiny_llama / "nope", "x")


def test_sampling_from_generation_config(tmp_path):
    from exl2build.eval.commands import CHAT_SAMPLING, sampling_for

    assert sampling_for(tmp_path, CHAT_SAMPLING) == (CHAT_SAMPLING, "exl2build's defaults")
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.8}))
    # Its values, transformers' default top_k 50 for what it leaves out.
    assert sampling_for(tmp_path, CHAT_SAMPLING) == ({"temperature": 0.6, "top_p": 0.8, "top_k": 50}, "generation_config.json")
    s, src = sampling_for(tmp_path, CHAT_SAMPLING, temperature=1.2, top_k=None)
    assert s == {"temperature": 1.2, "top_p": 0.8, "top_k": 50} and src == "command line and generation_config.json"
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert sampling_for(tmp_path, CHAT_SAMPLING)[0]["temperature"] == 0.0  # greedy, as transformers would
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(InputError, match="generation_config.json: cannot be read as JSON"):
        sampling_for(tmp_path, CHAT_SAMPLING)


def test_generate_names_its_sampling(tiny_llama):
    out = []
    (tiny_llama / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5, "top_k": 7}))
    generate_once(tiny_llama, "Hi", max_new_tokens=2, echo=out.append)
    assert "temperature 0.5, top_p 1, top_k 7 (generation_config.json)" in out[-1]
    generate_once(tiny_llama, "Hi", max_new_tokens=2, temperature=0.0, echo=out.append)
    assert "greedy (command line and generation_config.json)" in out[-1]


class _Tok:
    path, backend, bos_id, eos_id, adds_bos = "tok", "sentencepiece", 1, 2, True

    def __init__(self, template):
        self.chat_template = template

    def id_to_token(self, i):
        return {1: "<s>", 2: "</s>"}[i]


def test_render_chat_with_template_and_fallback():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tpl = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text, bos = render_chat(_Tok(tpl), msgs)
    assert text == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>" and bos is True
    text, bos = render_chat(_Tok(None), msgs)
    assert text == "System: Be brief.\nUser: Hi\nAssistant:" and bos is True
    with pytest.raises(InputError, match="refused"):
        render_chat(_Tok("{{ raise_exception('no system role') }}"), msgs)


def test_chat_session(tiny_llama):
    (tiny_llama / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"}))
    inputs = iter(["Hello there", "/reset", "/rest", "Again", "/exit", "never read"])
    out = []
    msgs = chat_session(tiny_llama, max_new_tokens=3, input_fn=lambda _: next(inputs), echo=out.append)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["content"] == "Again"
    assert "chat template" in out[0] and sum("tok/s" in ln for ln in out) == 2
    assert "unknown command /rest: /reset clears the conversation, /exit quits" in out
    for quit_word in ("/quit", "/bye"):
        words = iter([quit_word, "never read"])
        msgs = chat_session(tiny_llama, max_new_tokens=3, input_fn=lambda _: next(words), echo=out.append)
        assert msgs == []


def test_run_commands_return_exit_codes(tiny_llama, wiki_test):
    out = []
    assert run_eval(tiny_llama, [f"text={wiki_test}", "ctx=32", "windows=1"], echo=out.append) == 0
    assert run_generate(tiny_llama, "Hi", max_new_tokens=2, echo=out.append) == 0
    assert run_chat(tiny_llama, max_new_tokens=2, input_fn=lambda _: "/exit", echo=out.append) == 0
