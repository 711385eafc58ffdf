"""fetch_smollm2's checksum check (no network: the file is already in the destination)."""

from __future__ import annotations

import json

import pytest

from exl2build import fetch
from exl2build.dag.digest import sha256_file
from exl2build.errors import InputError


def test_corrupt_file_is_refused_and_a_good_one_stamped(tmp_path, monkeypatch):
    gguf = tmp_path / fetch.SMOLLM2_FILE
    gguf.write_bytes(b"not the model")
    with pytest.raises(InputError, match="pinned sha256"):
        fetch.fetch_smollm2(tmp_path)
    assert not (tmp_path / (fetch.SMOLLM2_FILE + ".verified")).exists()

    # Pretend the pinned digest is this file's: it is accepted and stamped by (size, mtime).
    monkeypatch.setattr(fetch, "SMOLLM2_SHA256", sha256_file(gguf))
    assert fetch.fetch_smollm2(tmp_path) == gguf
    stamp = json.loads((tmp_path / (fetch.SMOLLM2_FILE + ".verified")).read_text())
    assert stamp == {"size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
