"""exl2build: a declarative, cached build system for EXL2 quantized language models."""

import os

# torch and our native module share one libgomp; its default spin-waiting threads make
# the many short parallel regions of GPTQ up to 20x slower on a small machine.
# Must be set before libgomp starts, i.e. before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
