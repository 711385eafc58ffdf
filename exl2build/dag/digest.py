"""Content digests of files and folders.

Source files (a 15 GB model, a calibration parquet) are hashed once and remembered by
(path, size, mtime) in cache_dir/digests.json, so later runs only stat them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(root: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under root (or root itself), sorted, relative names excluded."""
    root = Path(root)
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def combine(named: dict[str, str]) -> str:
    """One digest over (name, digest) pairs, independent of insertion order."""
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode() + b"\0" + named[name].encode() + b"\n")
    return h.hexdigest()


class DigestMemo:
    """sha256 of source paths, remembered by (size, mtime_ns) across runs."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "digests.json"
        self._memo: dict | None = None

    def _load(self) -> dict:
        if self._memo is None:
            try:
                self._memo = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                self._memo = {}
        return self._memo

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        memo = self._load()
        seen = memo.get(str(path))
        if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
            return seen["sha256"]
        digest = sha256_file(path)
        memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save(str(path), memo[str(path)])
        return digest

    def tree(self, root: Path) -> str:
        """A file's digest, or a folder's digest over its relative names and file digests."""
        root = Path(root)
        if root.is_file():
            return self.file(root)
        return combine({p.relative_to(root).as_posix(): self.file(p) for p in tree_files(root)})

    def _save(self, key: str, entry: dict) -> None:
        # Merge under a lock: concurrent builds share one digests.json.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            try:
                on_disk = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                on_disk = {}
            on_disk[key] = entry
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
