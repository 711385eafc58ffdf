"""Text generation with a KV cache: greedy by default, or temperature + nucleus sampling."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from exl2build.model.forward import KVCache, Model


@dataclass
class GenerationResult:
    ids: list[int]  # prompt + generated tokens (row 0 when batched)
    new_ids: list[int]  # generated tokens only
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    new_tokens: int
    stopped_at_eos: bool = False
    rows: list[list[int]] = field(default_factory=list)  # every row's new tokens, for batched calls
    graph_s: float = 0.0  # CUDA graph capture time (between prefill and decode; 0 when reused or eager)
    cuda_graph: bool = False  # decode steps replayed a captured CUDA graph
    # Decode steps run; past an EOS up to EOS_CHECK_EVERY - 1 more than new_tokens - 1 (their
    # tokens are cut), so the speed divides by this, not by the tokens kept. None: new_tokens - 1.
    decode_steps: int | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tps(self) -> float:
        # The first new token comes from prefill; decode steps produce the rest.
        steps = max(self.new_tokens - 1, 0) if self.decode_steps is None else self.decode_steps
        return steps / self.decode_s if self.decode_s > 0 else float("inf")


# Steps between host reads of the all-rows-finished flag (each read is a GPU sync).
EOS_CHECK_EVERY = 16


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None,
                top_k: int = 0) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature <= 0 is greedy; then, as transformers orders
    them, top_k (0: off) keeps the k most likely tokens and top_p the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        choice = torch.multinomial(sp.cpu(), 1, generator=gen).to(si.device)
        return si.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


class GraphDecoder:
    """One captured CUDA graph of a decode step (B tokens at the cache's current length).

    Batch-1 decode of a small model is bound by kernel launches and Python; replaying a
    captured step removes both. The cache runs in static mode (positions on the device, read
    there by the attention) so one graph serves every position.
    """

    def __init__(self, model: Model, cache: KVCache):
        self.model, self.cache = model, cache
        dev = model.device
        self.ids = torch.zeros(cache.k[0].shape[0], 1, dtype=torch.long, device=dev)
        model.rotary.ensure(cache.max_len)
        cache.pos_t = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        try:
            # Warm-up and capture write K/V at the current slot, which the first real step overwrites.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            # A host sync inside a step (e.g. a kernel wrapper reading a tensor value) would break
            # the capture; make it raise during warm-up instead, so we fall back to eager cleanly.
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.cuda.stream(side):
                    for _ in range(2):
                        model(self.ids, cache)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.ids, cache)[:, -1]
        finally:
            self.static_pos = cache.pos_t
            cache.pos_t = None  # eager until `step` is used

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.pos_t = self.static_pos
        self.ids.copy_(ids.view(-1, 1))
        c.pos_t.fill_(c.length)
        self.graph.replay()
        c.length += 1
        c.pos_t = None
        return self.logits


def _graph_key(model: Model, batch: int, max_len: int) -> tuple:
    # Module identities: a swapped linear must not replay a graph holding the old weights.
    return (batch, max_len, tuple(id(m) for m in model.modules()))


def _decoder_for(model: Model, batch: int, max_len: int) -> tuple[KVCache, GraphDecoder | None, float]:
    """A (cache, graph) pair for this shape, reused across calls; graph None means eager."""
    store = model.__dict__.setdefault("_decode_graphs", {})
    key = _graph_key(model, batch, max_len)
    if key in store:
        cache, dec = store[key]
        cache.length = 0
        return cache, dec, 0.0
    return model.new_cache(batch, max_len), None, 0.0


def _capture(model: Model, cache: KVCache, batch: int, max_len: int) -> tuple[GraphDecoder | None, float]:
    t = time.perf_counter()
    try:
        dec = GraphDecoder(model, cache)
    except RuntimeError:
        return None, 0.0  # capture unsupported here (e.g. a kernel that syncs): decode eagerly
    torch.cuda.synchronize(model.device)
    store = model.__dict__.setdefault("_decode_graphs", {})
    while len(store) >= 2:  # each entry keeps a KV cache alive
        store.pop(next(iter(store)))
    store[_graph_key(model, batch, max_len)] = (cache, dec)
    return dec, time.perf_counter() - t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_stop(t: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    # One compare for the usual single stop id; isin for a list.
    return t == stops[0] if stops.numel() == 1 else torch.isin(t, stops)


@torch.no_grad()
def generate(model: Model, tok, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             cuda_graph: bool | None = None, top_k: int = 0) -> GenerationResult:
    """Generate after `prompt_ids` (list of ints, or LongTensor [T] / [B, T] of equal-length rows).

    Sampling draws from a CPU generator seeded with `seed`, so results are deterministic.
    On CUDA, decode steps replay a captured graph (cuda_graph=None: on unless the
    environment sets EXL2BUILD_NO_CUDA_GRAPH=1); capture happens between the prefill and
    decode timers and is reported as graph_s.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate: the prompt is empty; pass at least one token (e.g. BOS)")
    device = model.device
    ids = ids.to(device)
    gen = torch.Generator().manual_seed(seed)
    stops = list(getattr(tok, "stop_ids", None) or [])  # tok may be None: no stop ids
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    if cuda_graph is None:
        cuda_graph = os.environ.get("EXL2BUILD_NO_CUDA_GRAPH", "") != "1"
    cuda_graph = cuda_graph and device.type == "cuda" and max_new_tokens > 2
    if cuda_graph:
        cache, dec, graph_s = _decoder_for(model, B, T + max_new_tokens)
    else:
        cache, dec, graph_s = model.new_cache(B, T + max_new_tokens), None, 0.0
    out: list[torch.Tensor] = []
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    _sync(device)
    t0 = time.perf_counter()
    logits = model(ids, cache)[:, -1]
    nxt = sample_next(logits, temperature, top_p, gen, top_k) if max_new_tokens else None
    _sync(device)
    t1 = time.perf_counter()
    if cuda_graph and dec is None:
        dec, graph_s = _capture(model, cache, B, T + max_new_tokens)
    decode = dec.step if dec is not None else (lambda col: model(col[:, None], cache)[:, -1])
    watch = bool(stops) and stop_at_eos
    t1d = time.perf_counter()
    for step in range(max_new_tokens):
        out.append(nxt)
        if watch:
            finished |= _is_stop(nxt, stop_t)
            # Reading the flag waits for the GPU; every EOS_CHECK_EVERY steps the host instead
            # queues steps ahead of the GPU (the output is cut at the first all-finished step below).
            if (step + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        nxt = sample_next(decode(nxt), temperature, top_p, gen, top_k)
    _sync(device)
    t2 = time.perf_counter()

    new = torch.stack(out, 1).cpu() if out else torch.zeros(B, 0, dtype=torch.long)
    if watch and new.shape[1]:
        hit = _is_stop(new, stop_t.cpu())
        done = hit.cummax(1).values.all(0)  # [steps]: every row has produced EOS by then
        if bool(done.any()):
            new = new[:, : int(done.int().argmax()) + 1]
    rows = [r.tolist() for r in new]
    return GenerationResult(
        ids=ids[0].cpu().tolist() + rows[0], new_ids=rows[0], prefill_s=t1 - t0, decode_s=t2 - t1d,
        prompt_tokens=T, new_tokens=new.shape[1], stopped_at_eos=watch and bool(_is_stop(new, stop_t.cpu()).any(1).all()), rows=rows,
        graph_s=graph_s, cuda_graph=dec is not None, decode_steps=max(len(out) - 1, 0),
    )
