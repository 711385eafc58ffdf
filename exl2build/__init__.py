"""exl2build: a declarative, cached build system for EXL2 quantized language models."""

import os
import sys

# torch and our native module share one libgomp; its default spin-waiting threads make
# the many short parallel regions of GPTQ up to 20x slower on a small machine.
# Must be set before libgomp starts, i.e. before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _tune_malloc() -> None:
    """glibc: keep freed activation-sized blocks for reuse instead of handing them back.

    By default glibc returns freed memory above a moving threshold to the kernel, so the
    layer-by-layer passes (thousands of 1-30 MB tensors) page-fault on every fresh
    allocation: 1.76M minor faults and ~9% of the time in one SmolLM2 measurement layer on
    2 CPU cores. Blocks up to 32 MB (glibc's maximum) now come from the heap, which is trimmed
    only past 256 MB free; larger tensors are still mmapped and returned at once. Same
    results, same peak RSS. EXL2BUILD_MALLOC_TUNING=0 leaves glibc's defaults.
    """
    if os.environ.get("EXL2BUILD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


_tune_malloc()

__version__ = "0.1.0"
