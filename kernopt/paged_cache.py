"""A paged KV cache that transformers models can generate with, and its memory accounting.

Every layer owns a page pool ``[num_pages, page_size, kv_heads, head_dim]`` for K and one for V (the layout
`kernels/decode_attention.py` reads; one token's heads are one contiguous row, so appending a token is one
row write). The pages themselves are bookkept once for all layers: each sequence holds a list of page ids
(the *block table*, shared by every layer, as in vLLM) and a length. A sequence takes a new page only when its
last one is full, so the memory it reserves but does not use is less than one page; a static cache reserves
``max_len`` slots for every sequence instead.

Padding is never stored: HF left-pads batched prompts and masks the pads; the kernopt attention function
(`kernopt/hf_attention.py`) reads which new tokens are real from that mask and commits only those, so each
sequence's pages hold exactly its own tokens (ragged lengths), while `get_seq_length()` keeps reporting HF's
padded position count, which HF uses to build positions and masks.

One model step is: ``update(k, v, layer)`` records the layer's new K/V (HF calls it before attention); the
attention function calls ``commit(layer, mask)``, which, for the first layer of the step, plans the step
(which new tokens are real, pages to allocate, the slot of every new token, one host->device copy) and then
writes the layer's tokens into its pool. Outside HF, ``append(layer, k, v, valid)`` does both.

Reuse across generate calls: ``reset()`` frees every page back to the pool (the pool's memory stays allocated
for the next call); ``free(b)`` frees one sequence. Beam search (reordering sequences) is not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - transformers is a dependency; keep the module importable without it
    Cache, CacheLayerMixin = object, object

DEFAULT_PAGE_SIZE = 64  # tokens: one decode tile (BLOCK_N=64 at head_dim 128) is one page


def static_cache_waste(lengths: Sequence[int], max_len: Optional[int] = None) -> float:
    """Reserved-but-unused fraction of a contiguous static cache that reserves `max_len` slots per sequence."""
    max_len = max(lengths) if max_len is None else max_len
    reserved = len(lengths) * max_len
    return 1.0 - sum(lengths) / reserved if reserved else 0.0


def paged_cache_waste(lengths: Sequence[int], page_size: int = DEFAULT_PAGE_SIZE) -> float:
    """Reserved-but-unused fraction of a paged cache holding `lengths` (each sequence rounds up to a page)."""
    reserved = sum(math.ceil(n / page_size) * page_size for n in lengths)
    return 1.0 - sum(lengths) / reserved if reserved else 0.0


@dataclass
class _Step:
    """What one model step writes: shared by all layers of the step."""
    q_len: int
    hf_past: int                    # HF (padded) positions before this step
    prior_lens: list[int]           # real tokens per sequence before this step
    valid: Optional[Tensor]         # bool [B, q_len] on the device (None: every new token is real)
    valid_host: Optional[list]      # same, as lists (None: all real)
    suffix: bool                    # real new tokens are a suffix of each row (left padding)
    src: Optional[Tensor]           # int64 indices into the flattened [B * q_len] new tokens (None: all)
    dest: Tensor                    # int64 flat slot (page * page_size + offset) of each written token


class PagedLayer(CacheLayerMixin):
    """One layer's page pools. The page bookkeeping lives in the owning `PagedKVCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "PagedKVCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.k_pages: Optional[Tensor] = None
        self.v_pages: Optional[Tensor] = None
        self.pending: Optional[tuple[Tensor, Tensor]] = None
        self.committed_step = -1

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.owner._init_layout(key_states, value_states)
        self.is_initialized = True

    def _ensure_pool(self) -> None:
        """Grow this layer's pools to the shared capacity (pages keep their ids, so a copy is enough)."""
        o = self.owner
        have = 0 if self.k_pages is None else self.k_pages.shape[0]
        if have >= o.num_pages and self.k_pages is not None:
            return
        shape = (o.num_pages, o.page_size, o.kv_heads, o.head_dim)
        k = torch.empty(shape, dtype=o.dtype, device=o.device)
        v = torch.empty((*shape[:3], o.head_dim_v), dtype=o.dtype, device=o.device)
        if have:
            k[:have].copy_(self.k_pages)
            v[:have].copy_(self.v_pages)
        self.k_pages, self.v_pages = k, v

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Record this step's K/V; return the page pools, tagged so kernopt attention finds this cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "PagedKVCache: the previous step's keys of layer {} were never committed. The paged cache needs "
                "the 'kernopt' attention implementation (kernopt.hf_attention.install(model)).".format(self.layer_idx))
        self.pending = (key_states, value_states)
        self._ensure_pool()
        tag = (self.owner, self.layer_idx)
        self.k_pages._kernopt_paged = tag
        self.v_pages._kernopt_paged = tag
        return self.k_pages, self.v_pages

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # transformers passes the query length (5.2x) or the cache_position tensor (earlier 5.x)
        q = query_length.shape[0] if torch.is_tensor(query_length) else int(query_length)
        return self.owner.hf_length + q, 0

    def get_seq_length(self, *args) -> int:
        return self.owner.hf_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.pending = None
        self.committed_step = -1

    def crop(self, tokens_to_remove: int) -> None:
        pass  # the owner crops the shared bookkeeping once

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search (reordering sequences)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedKVCache does not support repeating sequences (beam search / "
                                  "num_return_sequences > 1)")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting sequences")


class PagedKVCache(Cache):
    """Paged KV cache for a decoder-only transformers model (pass it to `generate` as its cache).

    config: the model config (layers, kv heads, head dim are read from it) or None with `num_layers`.
    page_size: tokens per page (default 64). max_pages: pool size per layer; None grows the pool on demand
    (by at least a quarter, so growth copies stay amortised); a fixed pool raises when it runs out.
    """

    def __init__(self, config=None, page_size: int = DEFAULT_PAGE_SIZE, max_pages: Optional[int] = None,
                 num_layers: Optional[int] = None):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
        if num_layers is None:
            raise ValueError("PagedKVCache needs a model config or num_layers")
        self.page_size = int(page_size)
        self.max_pages = max_pages
        self.num_pages = 0
        self.free_pages: list[int] = []
        self.kv_heads = self.head_dim = self.head_dim_v = None
        self.dtype, self.device = None, None
        layers = [PagedLayer(self, i) for i in range(num_layers)]
        if Cache is object:  # pragma: no cover
            self.layers = layers
        else:
            super().__init__(layers=layers)
        self._clear()

    # -------------------------------------------------------------------------------------------- bookkeeping
    def _clear(self) -> None:
        self.batch: Optional[int] = None
        self.seq_pages: list[list[int]] = []
        self.lens: list[int] = []
        self.hf_length = 0
        self.step_id = -1
        self.step: Optional[_Step] = None
        self.block_table: Optional[Tensor] = None
        self.seq_lens: Optional[Tensor] = None

    def _init_layout(self, key_states: Tensor, value_states: Tensor) -> None:
        if self.kv_heads is None:
            self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
            self.head_dim_v = value_states.shape[-1]
            self.dtype, self.device = key_states.dtype, key_states.device
            if self.max_pages is not None:
                self._grow(self.max_pages)
        elif (key_states.shape[1], key_states.shape[-1]) != (self.kv_heads, self.head_dim):
            raise ValueError(f"PagedKVCache: layers with different kv heads / head dims are not supported "
                             f"({tuple(key_states.shape)} vs heads {self.kv_heads}, dim {self.head_dim})")

    def _grow(self, pages: int) -> None:
        if pages <= self.num_pages:
            return
        self.free_pages.extend(range(pages - 1, self.num_pages - 1, -1))  # pop() hands out low ids first
        self.num_pages = pages

    def _take_page(self) -> int:
        if not self.free_pages:
            if self.max_pages is not None:
                raise RuntimeError(f"PagedKVCache: all {self.max_pages} pages are in use; pass a larger max_pages "
                                   "or max_pages=None to grow on demand")
            self._grow(max(self.num_pages + 1, self.num_pages + self.num_pages // 4, 16))
        return self.free_pages.pop()

    def _sync_tables(self) -> None:
        """Upload the block table and lengths (once per step, for all layers)."""
        width = max([len(p) for p in self.seq_pages] + [1])
        table = torch.tensor([p + [0] * (width - len(p)) for p in self.seq_pages], dtype=torch.int32)
        self.block_table = table.to(self.device, non_blocking=True)
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32).to(self.device, non_blocking=True)

    def begin_step(self, batch: int, q_len: int, valid: Optional[Tensor] = None) -> _Step:
        """Plan one step for all layers: allocate pages for the real new tokens and place each of them.

        valid: optional bool [batch, q_len], False for padding tokens (not stored).
        """
        if self.kv_heads is None:
            raise RuntimeError("PagedKVCache: begin_step before the first update (layout unknown)")
        if self.batch is None:
            self.batch = batch
            self.seq_pages = [[] for _ in range(batch)]
            self.lens = [0] * batch
        elif batch != self.batch:
            raise ValueError(f"PagedKVCache holds a batch of {self.batch} sequences, got {batch}; call reset() "
                             "before reusing it for another batch")
        valid_host = None
        if valid is not None:
            valid_host = valid.to("cpu", torch.bool).tolist()
            if all(all(row) for row in valid_host):
                valid, valid_host = None, None
        prior = list(self.lens)
        dest, src, suffix = [], [], True
        ps = self.page_size
        for b in range(batch):
            row = valid_host[b] if valid_host is not None else None
            count = q_len if row is None else sum(row)
            if row is not None and row != [False] * (q_len - count) + [True] * count:
                suffix = False
            pages = self.seq_pages[b]
            new_len = self.lens[b] + count
            while len(pages) * ps < new_len:
                pages.append(self._take_page())
            pos = self.lens[b]
            for i in range(q_len):
                if row is None or row[i]:
                    dest.append(pages[pos // ps] * ps + pos % ps)
                    src.append(b * q_len + i)
                    pos += 1
            self.lens[b] = new_len
        self.step_id += 1
        self.step = _Step(
            q_len=q_len, hf_past=self.hf_length, prior_lens=prior,
            valid=None if valid is None else valid.to(device=self.device, dtype=torch.bool),
            valid_host=valid_host, suffix=suffix,
            src=None if valid_host is None else torch.tensor(src, dtype=torch.int64).to(self.device),
            dest=torch.tensor(dest, dtype=torch.int64).to(self.device, non_blocking=True),
        )
        self.hf_length += q_len
        self._sync_tables()
        return self.step

    def write(self, layer_idx: int, key: Tensor, value: Tensor) -> None:
        """Write one layer's new tokens [B, Hkv, q_len, D] at the slots planned by the current step."""
        layer = self.layers[layer_idx]
        step = self.step
        layer._ensure_pool()
        b, h, q, d = key.shape
        rows_k = key.transpose(1, 2).reshape(b * q, h, d)
        rows_v = value.transpose(1, 2).reshape(b * q, h, value.shape[-1])
        if step.src is not None:
            rows_k, rows_v = rows_k.index_select(0, step.src), rows_v.index_select(0, step.src)
        flat_k = layer.k_pages.view(-1, h, d)
        flat_v = layer.v_pages.view(-1, h, value.shape[-1])
        flat_k.index_copy_(0, step.dest, rows_k.to(flat_k.dtype))
        flat_v.index_copy_(0, step.dest, rows_v.to(flat_v.dtype))
        layer.committed_step = self.step_id

    def append(self, layer_idx: int, key: Tensor, value: Tensor, valid: Optional[Tensor] = None) -> None:
        """Append new tokens of one layer outside HF. A layer appending again starts the next step (for all
        layers); the other layers of a step reuse its plan, so `valid` is read only when a step starts."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key, value)
        if self.step is None or layer.committed_step == self.step_id:
            self.begin_step(key.shape[0], key.shape[2], valid)
        self.write(layer_idx, key, value)

    def commit(self, layer_idx: int, attention_mask: Optional[Tensor]) -> _Step:
        """Called by the kernopt attention function: write the layer's pending K/V into its pages.

        The first layer of a step plans it, reading which new tokens are real from HF's mask.
        """
        layer = self.layers[layer_idx]
        if layer.pending is None:
            raise RuntimeError(f"PagedKVCache: layer {layer_idx} has nothing to commit (update() not called)")
        key, value = layer.pending
        if self.step is None or layer.committed_step == self.step_id:
            self.begin_step(key.shape[0], key.shape[2], _real_tokens(attention_mask, self.hf_length, key.shape[2]))
        self.write(layer_idx, key, value)
        return self.step

    def take_pending(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        layer = self.layers[layer_idx]
        kv, layer.pending = layer.pending, None
        return kv

    def view(self, layer_idx: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(k_pages, v_pages, block_table, seq_lens) of a layer: the paged_decode_attention arguments."""
        layer = self.layers[layer_idx]
        return layer.k_pages, layer.v_pages, self.block_table, self.seq_lens

    def free(self, b: int) -> None:
        """Return sequence b's pages to the pool (its length becomes 0)."""
        self.free_pages.extend(reversed(self.seq_pages[b]))
        self.seq_pages[b] = []
        self.lens[b] = 0
        self._sync_tables()

    # ------------------------------------------------------------------------------------------ HF Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.hf_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        """Free every page (the pools stay allocated for the next generate call)."""
        self.free_pages = list(range(self.num_pages - 1, -1, -1))
        for layer in self.layers:
            layer.reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens of every sequence, with transformers' (5.x) meaning of the argument: negative
        = remove that many (the deferred stop check undoes a step with ``crop(-1)``), 0 = nothing, positive =
        the legacy form, the length to keep (assisted decoding rolls rejected tokens back this way)."""
        if tokens_to_remove > 0:
            tokens_to_remove = self.hf_length - tokens_to_remove
        else:
            tokens_to_remove = -tokens_to_remove
        n = min(tokens_to_remove, self.hf_length)
        if n <= 0 or self.batch is None:
            return
        self.hf_length -= n
        for b in range(self.batch):
            self.lens[b] = max(0, self.lens[b] - n)
            keep = math.ceil(self.lens[b] / self.page_size)
            self.free_pages.extend(reversed(self.seq_pages[b][keep:]))
            del self.seq_pages[b][keep:]
        self.step = None
        self._sync_tables()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search (reordering sequences)")

    # ------------------------------------------------------------------------------------------------ memory
    def memory_waste(self) -> float:
        """Reserved-but-unused fraction of the pages the sequences hold (the pool's free pages not counted)."""
        held = sum(len(p) for p in self.seq_pages) * self.page_size
        return 1.0 - sum(self.lens) / held if held else 0.0

    def memory_report(self) -> dict:
        """Tokens, slots held by sequences, pool size, and the waste figures (pool-level included)."""
        held = sum(len(p) for p in self.seq_pages) * self.page_size
        pool = self.num_pages * self.page_size
        tokens = sum(self.lens)
        per_token = 0
        if self.kv_heads is not None:
            per_token = (self.head_dim + self.head_dim_v) * self.kv_heads * torch.finfo(self.dtype).bits // 8
        return {
            "tokens": tokens, "slots_held": held, "pool_slots": pool, "page_size": self.page_size,
            "waste": self.memory_waste(), "pool_waste": 1.0 - tokens / pool if pool else 0.0,
            "bytes_per_layer_held": held * per_token, "layers": len(self.layers),
        }


def _real_tokens(attention_mask: Optional[Tensor], hf_past: int, q_len: int) -> Optional[Tensor]:
    """bool [B, q_len]: which new tokens are real, read off HF's 4-D mask (a token sees itself iff it is real).

    None when the mask is None (no padding anywhere).
    """
    if attention_mask is None or not torch.is_tensor(attention_mask):
        return None
    m = attention_mask
    if m.dim() != 4 or m.shape[-2] != q_len or m.shape[-1] < hf_past + q_len:
        raise ValueError(f"PagedKVCache: unexpected attention mask shape {tuple(m.shape)} for {q_len} new tokens "
                         f"after {hf_past} positions")
    i = torch.arange(q_len, device=m.device)
    diag = m[:, 0, i, hf_past + i]
    if diag.dtype == torch.bool:
        return diag
    return diag > torch.finfo(diag.dtype).min / 2  # additive float masks: 0 = attend, very negative = masked
