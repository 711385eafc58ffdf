"""Tokenizer, text readers and token windows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import LLAMA2_TOKENIZER, _require
from exl2build.data.text import generate_text, read_text, tokens_from_text
from exl2build.data.tokenizer import Tokenizer
from exl2build.errors import InputError
from exl2build.model.load import load_model


@pytest.fixture
def llama_tok(tmp_path) -> Tokenizer:
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(_require(LLAMA2_TOKENIZER).read_bytes())
    return Tokenizer.from_dir(d)


def test_sentencepiece_round_trip(llama_tok, wiki_test):
    assert llama_tok.vocab_size == 32000 and llama_tok.bos_id == 1 and llama_tok.eos_id == 2
    text = wiki_test.read_text()[:20000]
    ids = llama_tok.encode(text)
    assert llama_tok.decode(ids) == text and llama_tok.decode(llama_tok.encode("Hi  there")) == "Hi  there"
    assert llama_tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert llama_tok.chat_template is None


def test_special_ids_and_template_from_configs(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(_require(LLAMA2_TOKENIZER).read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                          "chat_template": "{{ bos_token }}"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 1 and tok.eos_id == 7 and tok.chat_template == "{{ bos_token }}"


def test_chat_template_where_transformers_keeps_it(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(_require(LLAMA2_TOKENIZER).read_bytes())
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_dir(d).chat_template == "D"  # a list of named templates: "default"
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # transformers 4.43+ saves this
    assert Tokenizer.from_dir(d).chat_template == "{{ messages[0]['content'] }}"


def test_adds_bos_follows_the_model_tokenizer(tmp_path, llama_tok):
    """generate starts a prompt with BOS only where transformers would (add_bos_token, else
    tokenizer.json's post-processor, else sentencepiece's Llama convention)."""
    assert llama_tok.adds_bos is True  # a bare Llama-2 tokenizer.model
    (llama_tok.path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_dir(llama_tok.path).adds_bos is False
    from tokenizers import Tokenizer as HFTok, models, processors

    for post, want in ((None, False), (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)]), True)):
        hf = HFTok(models.WordLevel({"<s>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
        if post is not None:
            hf.post_processor = post
        d = tmp_path / f"bpe{want}"
        d.mkdir()
        hf.save(str(d / "tokenizer.json"))
        (d / "config.json").write_text(json.dumps({"bos_token_id": 0}))
        assert Tokenizer.from_dir(d).adds_bos is want


def test_missing_tokenizer(tmp_path):
    with pytest.raises(InputError, match="no tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_read_text_parquet_and_text(tmp_path):
    t = pa.table({"text": ["first row", None, "second row"], "n": [1, 2, 3], "title": ["A", "B", None]})
    pq.write_table(t, tmp_path / "d.parquet")
    assert read_text({"path": str(tmp_path / "d.parquet"), "column": "text"}) == "first row\nsecond row"
    # Without a column, every string column of a row is joined.
    assert read_text(tmp_path / "d.parquet") == "first row\nA\nB\nsecond row"
    (tmp_path / "t.txt").write_text("plain\ntext\n")
    assert read_text(str(tmp_path / "t.txt")) == "plain\ntext\n"


def test_read_text_errors(tmp_path):
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "nums.parquet")
    with pytest.raises(InputError, match="no string column"):
        read_text(tmp_path / "nums.parquet")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match="no column 'body'.*text"):
        read_text({"path": tmp_path / "d.parquet", "column": "body"})
    # Given the recipe setting the file came from, the fix names the key to change.
    with pytest.raises(InputError, match=r"Set `eval\.text\.column` to one of them"):
        read_text(tmp_path / "d.parquet", column="body", key="eval.text")
    pq.write_table(pa.table({"text": ["a"], "n": [1]}), tmp_path / "dn.parquet")
    with pytest.raises(InputError, match=r"column 'n' is int64, not text\. Set `calib\.column` to a string column"):
        read_text(tmp_path / "dn.parquet", column="n", key="calib")
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot be read as parquet"):
        read_text(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"for a plain text file use `calib=text`"):
        read_text(tmp_path / "bad.parquet", key="calib")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(InputError, match="no text"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="not found"):
        read_text(tmp_path / "missing.txt")


def test_tokens_from_text(llama_tok, wiki_test):
    text = wiki_test.read_text()[:30000]
    a = tokens_from_text(llama_tok, text, rows=4, length=256, bos=True, seed=1)
    b = tokens_from_text(llama_tok, text, rows=4, length=256, bos=True, seed=1)
    c = tokens_from_text(llama_tok, text, rows=4, length=256, bos=True, seed=2)
    assert a.shape == (4, 256) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    ids = llama_tok.encode(text)
    every = tokens_from_text(llama_tok, text, rows=None, length=100, bos=False, seed=0)
    assert every.shape[0] == len(ids) // 100 and every.flatten().tolist() == ids[: every.numel()]
    with pytest.raises(InputError, match=f"only {len(ids)} tokens"):
        tokens_from_text(llama_tok, text, rows=1000, length=100, bos=False, seed=0)
    with pytest.raises(InputError, match=r"Lower `calib\.measure_rows` or `calib\.measure_length`"):
        tokens_from_text(llama_tok, text, rows=1000, length=100, keys=("calib.measure_rows", "calib.measure_length"))


def test_generate_text_is_seeded(tiny_llama):
    model, _ = load_model(tiny_llama)
    tok = Tokenizer.from_dir(tiny_llama)
    a = generate_text(model, tok, rows=3, length=10, seed=5, batch=2)
    b = generate_text(model, tok, rows=3, length=10, seed=5, batch=2)
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_id).all() and not (a[:, 1:] == tok.eos_id).any()
    assert not torch.equal(a, generate_text(model, tok, rows=3, length=10, seed=6, batch=2))
