"""Local preparation (no GPU, measures nothing): the Llama-2 tokenizer as tokenizer.json for sbs_big.py.

exllamav2 0.3.x reads only tokenizer.json (SentencePiece support was removed), and the 7B-shaped
model of STAGE=big uses the Llama-2 vocabulary (32000). This builds the BPE tokenizer.json from
../shared/tokenizers/llama2/tokenizer.model (vocab and merges via transformers' SentencePiece
extractor, legacy Llama normalizer/decoder) and checks that it encodes a slice of wiki.test.raw
exactly as sentencepiece does. Needs sentencepiece, protobuf, tokenizers and transformers here.

    python benchmarks/sbs_llama2_tokenizer.py [--spm ../shared/tokenizers/llama2/tokenizer.model] \
        [--out .assets/llama2-tokenizer.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spm", default=str(REPO.parent / "shared" / "tokenizers" / "llama2" / "tokenizer.model"))
    ap.add_argument("--check-text", default=str(REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--out", default=str(REPO / ".assets" / "llama2-tokenizer.json"))
    a = ap.parse_args()
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    kw = SentencePieceExtractor(a.spm).extract(None)
    tok = Tokenizer(models.BPE(kw["vocab"], kw["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    sp = spm.SentencePieceProcessor(model_file=a.spm)
    text = Path(a.check_text).read_text(encoding="utf-8")[:200_000]
    ours, ref = tok.encode(text, add_special_tokens=False).ids, sp.encode(text)
    if ours != ref or tok.get_vocab_size() != sp.get_piece_size():
        print(f"mismatch: {len(ours)} vs {len(ref)} tokens, vocab {tok.get_vocab_size()} vs {sp.get_piece_size()}", file=sys.stderr)
        return 1
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(a.out)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size} bytes); {len(ref)} tokens of the check text identical to sentencepiece")
    return 0


if __name__ == "__main__":
    sys.exit(main())
