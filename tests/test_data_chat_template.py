"""Chat templates render as transformers' apply_chat_template renders them."""

from __future__ import annotations

import json

import pytest

from exl2build.data.chat_template import render
from exl2build.data.tokenizer import Tokenizer
from exl2build.errors import InputError
from exl2build.eval.commands import render_chat

# What model templates use beyond plain jinja2: loop controls, transformers' generation blocks,
# its tojson (non-ASCII and "<" kept), strftime_now and raise_exception.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'stop' %}{% break %}{% endif %}"
    "{% if m['role'] == 'skip' %}{% continue %}{% endif %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{{ {'tool': 'ä<b>', 'n': 1} | tojson }}{% if strftime_now is defined %}{{ strftime_now('%Y') }}{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "skip", "content": "x"},
            {"role": "user", "content": "Grüße"}, {"role": "assistant", "content": "Hallo"},
            {"role": "stop", "content": ""}, {"role": "user", "content": "never shown"}]


@pytest.fixture
def tok_dir(tmp_path):
    from tokenizers import Tokenizer as HFTok, models

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2}
    HFTok(models.WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "[UNK]", "chat_template": TEMPLATE}))
    return tmp_path


def test_renders_like_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    want = transformers.AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    text, bos = render_chat(Tokenizer.from_dir(tok_dir), MESSAGES)
    assert text == want and not bos
    assert '{"tool": "ä<b>", "n": 1}' in text and "never shown" not in text and "<|skip|>" not in text


def test_refusal_and_broken_template_are_input_errors():
    with pytest.raises(InputError, match=r"tok: the chat template refused the conversation: no system role"):
        render("{{ raise_exception('no system role') }}", MESSAGES, "tok")
    with pytest.raises(InputError, match=r"tok: the chat template cannot be rendered \(TemplateSyntaxError"):
        render("{% for m in messages %}", MESSAGES, "tok")
