"""The decoder forward pass (Llama/Mistral/Qwen2): RMSNorm, RoPE, GQA attention, SwiGLU.

Compute dtype is float32 on CPU and float16 on CUDA; weights rest in fp16. Norms and
rotary tables are computed in fp32 and cast, as the reference implementation does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exl2build import kernels, kernels_ref
from exl2build.errors import InputError
from exl2build.model.config import ModelConfig
from exl2build.model.linear import Linear, project, project_swiglu


def compute_dtype_for(device: torch.device | str) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# The fused CUDA forms of the small operations (native/cuda/forward.cu via kernels.py) run for
# f16 CUDA tensors; everything else runs the torch forms in kernels_ref.py. Tests turn FUSED off
# to compare the two.
FUSED = True
# The CUDA-graph decode step's attention through kernels.decode_attention (split over the
# sequence, reads only the keys stored so far) instead of SDPA with a mask over the whole cache.
# Off for the A/B in benchmarks/decode_ops.py --sdpa.
DECODE_ATTENTION = True


def _ops(x: torch.Tensor):
    return kernels if FUSED and kernels.forward_ops_available(x) else kernels_ref


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight in fp32, cast back to x's dtype.

    The fp32 weight copy is made once: a decode step runs two norms per layer, and a cast costs
    a kernel launch, about as much as the norm's work at batch 1.
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.float16), requires_grad=False)
        self.eps = eps
        self.register_buffer("weight_f32", self.weight.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops(x).rms_norm(x, self.weight_f32, self.eps)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a block's residual add fused with the next norm."""
        return _ops(x).rms_norm(x, self.weight_f32, self.eps, residual)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the SwiGLU MLP's middle (shared with the measurement's split block)."""
    return _ops(gate).silu_mul(gate, up)


# ---------------------------------------------------------------- rotary embeddings


def _rope_kind(cfg: ModelConfig) -> str | None:
    """The config's RoPE scaling type ("default" without rope_scaling)."""
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default")) if rs else "default"


def _rope_inv_freq(cfg: ModelConfig, dim: int, base: float) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention factor for cfg.rope_scaling (None/linear/llama3/yarn)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = _rope_kind(cfg)
    if kind in (None, "default"):
        return inv, 1.0
    if kind == "dynamic":
        # Dynamic NTK changes the base only past max_position_embeddings (RotaryEmbedding.limit
        # refuses those positions); up to it transformers computes exactly the default frequencies.
        return inv, 1.0
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old = float(rs.get("original_max_position_embeddings", 8192))
        lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, scaled)), 1.0
    if kind == "yarn":
        old = float(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn = rs.get("attention_factor")
        if attn is None:
            if rs.get("mscale") and rs.get("mscale_all_dim"):
                attn = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
            else:
                attn = mscale(factor)

        def corr_dim(rot: float) -> float:
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp  # 1 keeps the original (extrapolated) frequency
        return (inv / factor) * (1 - extrap) + inv * extrap, float(attn)
    raise InputError(
        f"config.json: rope_scaling type {kind!r} is not supported. Supported: linear, llama3, yarn, "
        "dynamic (within max_position_embeddings), or none. Remove rope_scaling or use a model with a supported scaling."
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (rotate-half convention), grown on demand.

    The sin table comes with its first half negated (see apply_rope), and a copy of both tables
    is kept per compute dtype, so a lookup casts nothing. `scale` divides positions (linear
    RoPE scaling on top of the config), `alpha` applies NTK-aware base scaling:
    base * alpha^(d/(d-2)). Both default to off.
    """

    def __init__(self, cfg: ModelConfig, device="cpu", scale: float = 1.0, alpha: float = 1.0):
        super().__init__()
        dim = cfg.head_dim
        base = cfg.rope_theta * (alpha ** (dim / (dim - 2)) if alpha != 1.0 else 1.0)
        inv, self.attention_factor = _rope_inv_freq(cfg, dim, base)
        self.register_buffer("inv_freq", (inv / scale).to(device), persistent=False)
        self.limit = cfg.max_position_embeddings if _rope_kind(cfg) == "dynamic" else None  # positions it may serve
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None  # first half negated
        self._by_dtype: dict = {}

    def _grow(self, n: int) -> None:
        n = max(n, 256, 2 * (0 if self._cos is None else self._cos.shape[0]))
        t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())
        self._cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_factor
        self._sin = torch.cat((-freqs, freqs), dim=-1).sin() * self.attention_factor  # sin(-f) = -sin(f)
        self._by_dtype = {}

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = (self._cos.to(dtype), self._sin.to(dtype))
        return self._by_dtype[dtype]

    def cos_sin(self, pos, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, D] for an int start position (a view of the table) or a LongTensor [T] of positions."""
        ref = self.inv_freq
        if isinstance(pos, torch.Tensor):
            need = int(pos.max()) + 1 if pos.numel() else 1
        else:
            need = int(pos) + T
        self.ensure(need)
        cos, sin = self._tables(dtype)
        if isinstance(pos, torch.Tensor):
            return cos[pos.to(ref.device)], sin[pos.to(ref.device)]
        return cos[int(pos) : int(pos) + T], sin[int(pos) : int(pos) + T]

    def gather(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for device positions, without a host sync; call `ensure(n)` beforehand."""
        cos, sin = self._tables(dtype)
        return cos.index_select(0, pos), sin.index_select(0, pos)

    def ensure(self, n: int) -> None:
        if self.limit is not None and n > self.limit:
            raise InputError(
                f"config.json: rope_scaling 'dynamic' changes RoPE past max_position_embeddings={self.limit}, and "
                f"{n} positions were asked for. exl2build runs dynamic RoPE only within it: lower eval.ctx, the "
                "calibration length or max_new_tokens to at most that."
            )
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != self.inv_freq.device:
            self._grow(n)

    def _apply(self, fn, recurse=True):
        self._cos = self._sin = None
        self._by_dtype = {}
        return super()._apply(fn, recurse)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] from RotaryEmbedding (sin with its first half negated).

    The rotate-half form x * cos + cat(-x2, x1) * sin, written as x * cos + roll(x, D/2) * sin'
    with sin' = cat(-sin, sin): three kernels instead of five (the fused path: one for q, k and
    the cache writes, kernels.rope_cache).
    """
    return kernels_ref.rope(x, cos, sin)


# ---------------------------------------------------------------- attention masks


def visible(kj: torch.Tensor, qi: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether the query at position qi sees the key at position kj: kj <= qi and, with a sliding
    window, only the last `window` of those (kj > qi - window, as transformers)."""
    allowed = kj <= qi
    return allowed & (kj > qi - window) if window is not None else allowed


def causal_mask(past: int, T: int, device, window: int | None = None) -> torch.Tensor:
    """bool [T, past + T]: for query i at absolute position past + i."""
    qi = torch.arange(T, device=device)[:, None] + past
    return visible(torch.arange(past + T, device=device)[None, :], qi, window)


def causal_attention(q, k, v, window: int | None = None) -> torch.Tensor:
    """SDPA of the T queries over the keys of the same T tokens (no history), [B, H, T, D]. A
    window shorter than T needs an explicit mask; otherwise SDPA's own causal mask serves."""
    T, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if window is not None and T > window:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(0, T, q.device, window), enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)


# ---------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys/values per layer, [B, Hkv, max_len, D]; all rows share one length."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored; advanced by Model.forward after all layers
        # Static mode (CUDA graph decode): positions live on the device and attention reads them
        # there (decode_attention over the keys stored so far, or SDPA with a mask over the
        # whole buffer), so one captured step serves every position.
        self.pos_t: torch.Tensor | None = None  # LongTensor [T] of the positions being written
        # additive [T, max_len] (0 / -inf) masks of this step, per sliding window (None: full), see step_mask
        self.masks: dict[int | None, torch.Tensor] = {}
        self._arange: torch.Tensor | None = None

    def static_mask(self, window: int | None = None) -> torch.Tensor:
        if self._arange is None or self._arange.device != self.pos_t.device:
            self._arange = torch.arange(self.max_len, device=self.pos_t.device)
        return visible(self._arange[None, :], self.pos_t[:, None], window)

    def step_mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """The additive attention mask of this static step, made by the first layer that needs it
        (Model.hidden clears them per call; with the decode-attention kernel no layer does)."""
        if window not in self.masks:
            allowed = self.static_mask(window)
            self.masks[window] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return self.masks[window]

    def store_static(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.pos_t, k)
        self.v[layer].index_copy_(2, self.pos_t, v)
        return self.k[layer], self.v[layer]

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} + {T} tokens > max_len {self.max_len}")

    def filled(self, layer: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the stored tokens plus the T being written."""
        n = self.length + T
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, T = self.length, k.shape[2]
        self.check_room(T)
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        return self.filled(layer, T)


# ---------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear,
                 rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.window = cfg.window_of(layer_idx)  # sliding attention window, or None
        # A plain attribute (not a submodule) so one table is shared by every layer.
        self.__dict__["rotary"] = rotary

    def forward(self, x: torch.Tensor, pos=0, cache: KVCache | None = None, rope=None) -> torch.Tensor:
        """rope: the (cos, sin) rows of these tokens when the caller looked them up once for all
        layers (Model.hidden); otherwise looked up here."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        # Static mode (CUDA-graph decode): positions on the device, no host syncs, fixed shapes.
        static = cache is not None and cache.pos_t is not None
        if rope is not None:
            cos, sin = rope
        elif static:
            cos, sin = self.rotary.gather(cache.pos_t, x.dtype)
        else:
            # `pos` is an int start position or a LongTensor [T] of absolute positions.
            cos, sin = self.rotary.cos_sin(cache.length if cache is not None else pos, T, x.dtype)
        past = cache.length if cache is not None and not static else 0
        # The CUDA-graph decode step's attention through kernels.decode_attention (where it applies).
        # It attends to every stored key: not for a sliding window the cache can outgrow.
        decode_kernel = (static and T == 1 and DECODE_ATTENTION and _ops(x) is kernels
                         and (self.window is None or cache.max_len <= self.window))
        if decode_kernel and kernels.decode_attention_rope_applies(q, cache.k[self.layer_idx]):
            # One kernel for RoPE, the cache stores and the attention over the keys stored so far.
            o = kernels.decode_attention(q, cache.k[self.layer_idx], cache.v[self.layer_idx], cache.pos_t,
                                         new=(k, v, cos, sin))
            return self.o_proj(o)
        if cache is not None and _ops(x) is kernels:
            # One kernel: RoPE of q in place, RoPE(k) and v into the cache.
            if not static:
                cache.check_room(T)
            kernels.rope_cache(q, k, v, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx],
                               cache.pos_t if static else past)
            q = q.view(B, T, H, D).transpose(1, 2)
            if static:
                k, v = cache.k[self.layer_idx], cache.v[self.layer_idx]
            else:
                k, v = cache.filled(self.layer_idx, T)
        else:
            q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            if static:
                k, v = cache.store_static(self.layer_idx, k, v)
            elif cache is not None:
                k, v = cache.store(self.layer_idx, k, v)
        gqa = H != Hkv
        if decode_kernel and kernels.decode_attention_applies(x, k):
            # One kernel over the keys stored so far, split over the sequence (CUDA-graph decode).
            o = kernels.decode_attention(q.transpose(1, 2).reshape(B, 1, H * D), k, v, cache.pos_t)
            return self.o_proj(o)
        if static:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.step_mask(x.dtype, self.window), enable_gqa=gqa)
        elif past == 0:
            # Square causal mask; SDPA aligns is_causal top-left, so only valid without history.
            o = causal_attention(q, k, v, self.window)
        elif T == 1 and (self.window is None or past < self.window):
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(past, T, x.device, self.window), enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        if _ops(gate) is kernels:  # decode on CUDA: silu(gate) * up inside the down projection's launch
            y = project_swiglu(self.down_proj, gate, up)
            if y is not None:
                return y
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def attn_block(self, x: torch.Tensor, pos=0, cache: KVCache | None = None, rope=None) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), pos, cache, rope)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, pos=0, cache: KVCache | None = None, rope=None) -> torch.Tensor:
        """attn_block then mlp_block."""
        x, pending = self.run(x, None, pos, cache, rope)
        return x + pending

    def run(self, x: torch.Tensor, pending: torch.Tensor | None, pos=0, cache: KVCache | None = None,
            rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer with its residual adds fused into the norms that follow them: the residual
        stream is x + pending (pending: the previous layer's MLP output, or None); returns this
        layer's (x, pending). Model.hidden hands each pending to the next layer's first norm."""
        if pending is None:
            z = self.input_layernorm(x)
        else:
            z, x = self.input_layernorm.add_norm(pending, x)
        z, x = self.post_attention_layernorm.add_norm(self.self_attn(z, pos, cache, rope), x)
        return x, self.mlp(z)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.float16), requires_grad=False)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(dtype)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: Embedding, layers: list[DecoderLayer], norm: RMSNorm,
                 head: Linear, rotary: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.head = head
        self.rotary = rotary

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_for(self.device)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.device, self.compute_dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids.to(self.device), self.compute_dtype)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] (or [T, hidden] for 1-D ids)."""
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids[None]
        x = self.embed(ids)
        pos = 0 if cache is None else cache.length
        static = cache is not None and cache.pos_t is not None
        # What every layer shares is made once per call: the rotary rows of these positions and,
        # in static mode, the additive attention mask (KVCache.step_mask, when a layer needs it;
        # a bool mask is converted inside every attention call otherwise).
        dtype = x.dtype
        if static:
            cache.masks = {}
            rope = self.rotary.gather(cache.pos_t, dtype)
        else:
            rope = self.rotary.cos_sin(pos, ids.shape[1], dtype)
        pending = None
        for layer in self.layers:
            x, pending = layer.run(x, pending, pos, cache, rope)
        if cache is not None and not static:  # in static mode the caller advances the length
            cache.length += ids.shape[1]
        x = self.norm(x) if pending is None else self.norm.add_norm(pending, x)[0]
        return x[0] if squeeze else x

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits in the compute dtype, [B, T, vocab] (or [T, vocab] for 1-D ids)."""
        return self.head(self.hidden(ids, cache))
