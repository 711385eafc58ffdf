"""Tokenizer over a model directory: sentencepiece `tokenizer.model` or HF `tokenizer.json`.

Special token ids come from generation_config.json, then config.json, then
tokenizer_config.json (token strings), then the tokenizer model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from exl2build.errors import InputError


def read_optional_json(path: Path) -> dict:
    """A model folder's optional JSON file ({} where it is absent or not an object)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e}). Fix or delete the file.") from None
    return data if isinstance(data, dict) else {}


def _token_str(v) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as {"content": ...}.
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _first(v) -> int | None:
    if isinstance(v, list):
        v = v[0] if v else None
    return None if v is None else int(v)


def _chat_template(path: Path, tcfg: dict) -> str | None:
    """The chat template where transformers looks for it: chat_template.jinja (what transformers
    4.43+ saves) before tokenizer_config.json's chat_template, which is a string or a list of
    named templates (the one named "default" is the chat template)."""
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    t = tcfg.get("chat_template")
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) else None


class Tokenizer:
    def __init__(self, backend: str, impl, path: Path, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None):
        self.backend = backend  # "sentencepiece" or "tokenizers"
        self._impl = impl
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.adds_bos = False  # whether the model's own tokenizer starts a text with BOS (from_dir)
        # Every id that ends generation, eos_id first: an instruct model's generation_config often
        # lists several (Llama-3.1: end of text, end of message, end of turn).
        self.stop_ids: list[int] = [] if eos_id is None else [eos_id]

    # -- construction

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tcfg = read_optional_json(path / "tokenizer_config.json")
        mcfg = read_optional_json(path / "config.json")
        gcfg = read_optional_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            backend, impl = "tokenizers", cls._open_tokenizers(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend, impl = "sentencepiece", cls._open_sentencepiece(path / "tokenizer.model")
        else:
            raise InputError(
                f"{path}: no tokenizer found (expected tokenizer.json or tokenizer.model). Copy the "
                "tokenizer files of the source model into this folder."
            )
        tok = cls(backend, impl, path, None, None, _chat_template(path, tcfg))
        tok.bos_id = tok._special(gcfg, mcfg, tcfg, "bos")
        tok.eos_id = tok._special(gcfg, mcfg, tcfg, "eos")
        tok.adds_bos = tok._adds_bos(tcfg)
        tok.stop_ids = tok._stop_ids(gcfg, mcfg, tcfg)
        return tok

    def _stop_ids(self, gcfg: dict, mcfg: dict, tcfg: dict) -> list[int]:
        """eos_id, then the other eos ids of generation_config.json and config.json (int or list)
        and tokenizer_config.json's eos_token, each once."""
        ids = [] if self.eos_id is None else [self.eos_id]
        for v in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id")):
            ids += [int(x) for x in (v if isinstance(v, list) else [v]) if x is not None]
        s = _token_str(tcfg.get("eos_token"))
        i = self.token_to_id(s) if s is not None else None
        return list(dict.fromkeys(ids + ([i] if i is not None else [])))

    def _adds_bos(self, tcfg: dict) -> bool:
        """As transformers encodes a prompt: tokenizer_config.json's add_bos_token where set, else what
        tokenizer.json's post-processor adds, else (a bare sentencepiece model) Llama's BOS."""
        if self.bos_id is None:
            return False
        if isinstance(tcfg.get("add_bos_token"), bool):
            return tcfg["add_bos_token"]
        if self.backend == "tokenizers":
            ids = self._impl.encode("a", add_special_tokens=True).ids
            return bool(ids) and ids[0] == self.bos_id
        return True

    @staticmethod
    def _open_tokenizers(f: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust side raises a plain Exception
            raise InputError(f"{f}: cannot be loaded by the tokenizers library ({e}). Re-download it.") from None

    @staticmethod
    def _open_sentencepiece(f: Path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(f))
        except (OSError, RuntimeError) as e:
            raise InputError(f"{f}: not a valid sentencepiece model ({e}). Re-download it.") from None
        return sp

    def _special(self, gcfg: dict, mcfg: dict, tcfg: dict, which: str) -> int | None:
        for cfg in (gcfg, mcfg):
            v = _first(cfg.get(f"{which}_token_id"))
            if v is not None:
                return v
        s = _token_str(tcfg.get(f"{which}_token"))
        if s is not None:
            i = self.token_to_id(s)
            if i is not None:
                return i
        if self.backend == "sentencepiece":
            i = self._impl.bos_id() if which == "bos" else self._impl.eos_id()
            return i if i >= 0 else None
        return None

    # -- use

    @property
    def vocab_size(self) -> int:
        if self.backend == "sentencepiece":
            return self._impl.get_piece_size()
        return self._impl.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, s: str) -> int | None:
        if self.backend == "sentencepiece":
            i = self._impl.piece_to_id(s)
            return None if i == self._impl.unk_id() and s != self._impl.id_to_piece(i) else i
        return self._impl.token_to_id(s)

    def id_to_token(self, i: int) -> str:
        return self._impl.id_to_piece(i) if self.backend == "sentencepiece" else self._impl.id_to_token(i)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self.backend == "sentencepiece":
            ids = list(self._impl.encode(text))
        else:
            ids = list(self._impl.encode(text, add_special_tokens=False).ids)
        if bos:
            if self.bos_id is None:
                raise InputError(
                    f"{self.path}: bos=True but the tokenizer defines no BOS token. Set bos: false "
                    "in the recipe, or add bos_token_id to config.json."
                )
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)
