"""exl2build: a declarative, cached build system for EXL2 quantized language models."""

__version__ = "0.1.0"
