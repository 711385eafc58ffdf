"""Generation speed: prefill tokens/s and batch-1 decode tokens/s through the real generate loop.

Each figure is the median of `runs` timed runs after `warmup` untimed ones (first calls pay
for allocation, kernel selection and caches). Token ids are random but seeded, so the work
is the same for every build. Sizes are parameters so CPU runs can stay short.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass

import torch

from exl2build.errors import ConfigError
from exl2build.model.generate import generate


# The sizes on a GPU; on CPU a 2048-token prefill of even a 135M model takes ~10 s
# per run, so CPU runs default to smaller sizes (the sizes used are part of the result).
GPU_DEFAULTS = {"prefill_tokens": 2048, "decode_tokens": 256, "decode_prompt": 16, "runs": 3, "warmup": 1}
CPU_DEFAULTS = {"prefill_tokens": 256, "decode_tokens": 32, "decode_prompt": 16, "runs": 3, "warmup": 1}


@dataclass
class SpeedParams:
    """Unset (None) sizes take GPU_DEFAULTS or CPU_DEFAULTS by device (see `resolve`)."""

    prefill_tokens: int | None = None
    decode_tokens: int | None = None
    decode_prompt: int | None = None  # decode runs after a short prompt, as chat-style generation does
    runs: int | None = None
    warmup: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SpeedParams":
        d = dict(d or {})
        d.pop("enabled", None)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"eval.speed: unknown key(s) {sorted(unknown)}. Known: {sorted(cls.__dataclass_fields__)}."
            )
        for k, v in d.items():
            low = 0 if k == "warmup" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ConfigError(f"eval.speed.{k} = {v!r}: must be an integer >= {low} (or null for the default).")
        return cls(**d)

    def resolve(self, device: torch.device | str) -> "SpeedParams":
        base = GPU_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS
        return SpeedParams(**{k: base[k] if v is None else v for k, v in asdict(self).items()})


def device_name(device: torch.device | str) -> str:
    """A human name for the device the figures were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads of {os.cpu_count()}"


def _median_run(fn, runs: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    rates = [fn() for _ in range(runs)]
    return statistics.median(rates), rates


def measure_speed(model, params: SpeedParams | dict | None = None, seed: int = 0) -> dict:
    """{'device', 'prefill_tokens', 'prefill_tps', 'decode_tokens', 'decode_tps', per-run lists}."""
    p = (params if isinstance(params, SpeedParams) else SpeedParams.from_dict(params)).resolve(model.device)
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    long_prompt = torch.randint(0, vocab, (p.prefill_tokens,), generator=g)
    short_prompt = torch.randint(0, vocab, (p.decode_prompt,), generator=g)

    def prefill() -> float:
        return generate(model, None, long_prompt, max_new_tokens=1, stop_at_eos=False).prefill_tps

    def decode() -> float:
        # One extra token: the first new token comes from prefill, the rest are decode steps.
        r = generate(model, None, short_prompt, max_new_tokens=p.decode_tokens + 1, stop_at_eos=False)
        return r.decode_tps

    prefill_tps, prefill_runs = _median_run(prefill, p.runs, p.warmup)
    decode_tps, decode_runs = _median_run(decode, p.runs, p.warmup)
    return {
        "device": device_name(model.device),
        "prefill_tokens": p.prefill_tokens,
        "prefill_tps": prefill_tps,
        "prefill_runs_tps": prefill_runs,
        "decode_tokens": p.decode_tokens,
        "decode_tps": decode_tps,
        "decode_runs_tps": decode_runs,
        "decode_prompt": p.decode_prompt,
        "runs": p.runs,
        "warmup": p.warmup,
    }
