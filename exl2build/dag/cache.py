"""The content-addressed artifact store.

Layout under cache_dir:
  <step>/<key>/            a published artifact; trusted only if manifest.json is in it
  <step>/.tmp-<key>-...    a build in progress (renamed into place when complete)
  <step>/<key>.work/       per-layer checkpoints of an unfinished build (resume)
  <step>/<key>.lock        the file lock that makes a second process wait and reuse
  index.json               the last key built for each (out_dir, step label): plan reasons
  refs/<hash>.json         the keys an out_dir's last build used: what gc keeps
  digests.json             source file digests by (path, size, mtime)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from pathlib import Path

from filelock import FileLock

from exl2build.dag.digest import DigestMemo, combine, sha256_file, tree_files

MANIFEST = "manifest.json"


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def step_key(name: str, version: int, params: dict, inputs: dict[str, str], files: dict[str, str]) -> str:
    """sha256 over everything that can change a step's result."""
    payload = {"name": name, "version": version, "params": params, "inputs": inputs, "files": files}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    try:
        import exl2build

        versions["exl2build"] = exl2build.__version__
    except Exception:  # pragma: no cover - package always importable here
        pass
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)  # created on first write: planning leaves no trace
        self.digests = DigestMemo(self.root)

    # ------------------------------------------------------------ entries
    def entry(self, name: str, key: str) -> Path:
        return self.root / name / key

    def is_published(self, name: str, key: str) -> bool:
        return (self.entry(name, key) / MANIFEST).is_file()

    def manifest(self, name: str, key: str) -> dict:
        return json.loads((self.entry(name, key) / MANIFEST).read_text())

    def lock(self, name: str, key: str) -> FileLock:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / name / f"{key}.lock"))

    def work_dir(self, name: str, key: str) -> Path:
        work = self.root / name / f"{key}.work"
        work.mkdir(parents=True, exist_ok=True)
        return work

    def new_tmp(self, name: str, key: str) -> Path:
        tmp = self.root / name / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, tmp: Path, name: str, key: str, manifest: dict) -> dict:
        """Digest the outputs, write manifest.json last, then rename into place.

        Until the rename, nothing under <step>/<key>/ exists, so a kill at any moment leaves
        at most a .tmp folder that no run trusts (gc removes it).
        """
        outputs = {}
        for p in tree_files(tmp, exclude=(MANIFEST,)):
            rel = p.relative_to(tmp).as_posix()
            outputs[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = dict(manifest, outputs=outputs, digest=combine({k: v["sha256"] for k, v in outputs.items()}))
        manifest["published_at"] = time.time()
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        final = self.entry(name, key)
        if final.exists():  # a folder without a manifest was never trusted; we hold the lock
            shutil.rmtree(final)
        os.rename(tmp, final)
        return manifest

    def content_digest(self, name: str, key: str) -> str:
        return self.manifest(name, key)["digest"]

    # ------------------------------------------------------------ index (plan reasons)
    def _index_path(self) -> Path:
        return self.root / "index.json"

    def record(self, scope: str, label: str, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self._index_path()) + ".lock"):
            try:
                index = json.loads(self._index_path().read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                index = {}
            index.setdefault(scope, {})[label] = info
            _write_json(self._index_path(), index)

    def last(self, scope: str, label: str) -> dict | None:
        try:
            return json.loads(self._index_path().read_text()).get(scope, {}).get(label)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # ------------------------------------------------------------ refs and gc
    def set_refs(self, out_dir: str, entries: list[tuple[str, str]]) -> None:
        ref = self._ref_path(out_dir)
        ref.parent.mkdir(parents=True, exist_ok=True)
        _write_json(ref, {"out_dir": out_dir, "entries": sorted(f"{n}/{k}" for n, k in entries)})

    def _ref_path(self, out_dir: str) -> Path:
        """Where the entries referenced by the last build into out_dir are recorded."""
        return self.root / "refs" / (hashlib.sha256(out_dir.encode()).hexdigest()[:16] + ".json")

    def add_refs(self, out_dir: str, entries: list[tuple[str, str]]) -> None:
        """Reference entries while a build runs, so gc spares a killed build's resumable work."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / "refs.lock")):
            old = {tuple(e.split("/", 1)) for e in self.live_refs_of(out_dir)}
            self.set_refs(out_dir, sorted(old | set(entries)))

    def live_refs_of(self, out_dir: str) -> list[str]:
        ref = self._ref_path(out_dir)
        return json.loads(ref.read_text())["entries"] if ref.is_file() else []

    def live_refs(self) -> set[str]:
        """Entries referenced by the last build of every out_dir that still exists."""
        live: set[str] = set()
        for ref in (self.root / "refs").glob("*.json") if (self.root / "refs").is_dir() else []:
            data = json.loads(ref.read_text())
            if Path(data["out_dir"]).exists():
                live.update(data["entries"])
        return live

    def garbage(self) -> list[Path]:
        """Entries no live out_dir references, plus leftovers of killed builds not in use."""
        live = self.live_refs()
        found = []
        for step_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != "refs"):
            for p in sorted(step_dir.iterdir()):
                if p.suffix == ".lock":
                    continue
                if p.name.startswith(".tmp-"):  # a dead build's partial output: never resumed
                    if not self._busy(step_dir.name, p.name[5:].split("-")[0]):
                        found.append(p)
                elif p.name.endswith(".work"):  # checkpoints: kept while an out_dir refers to them
                    key = p.name[: -len(".work")]
                    if f"{step_dir.name}/{key}" not in live and not self._busy(step_dir.name, key):
                        found.append(p)
                elif p.is_dir() and f"{step_dir.name}/{p.name}" not in live:
                    found.append(p)
        return found

    def _busy(self, name: str, key: str) -> bool:
        lock = self.lock(name, key)
        try:
            lock.acquire(timeout=0)
        except Exception:
            return True
        lock.release()
        return False

    def remove(self, paths: list[Path]) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
            lock = p.parent / f"{p.name}.lock"
            if lock.exists() and not p.name.startswith(".tmp-"):
                lock.unlink(missing_ok=True)
