"""The "kernopt" attention implementation for Hugging Face transformers models.

``install(model)`` registers a function under transformers' ``AttentionInterface`` (and the SDPA-style boolean
mask builder under ``AttentionMaskInterface``) and sets ``model.config._attn_implementation = "kernopt"``;
``model.generate`` then runs unchanged. What each attention call runs:

| cache                     | call                                   | kernel                                      |
|---------------------------|----------------------------------------|---------------------------------------------|
| `PagedKVCache`            | first step (prompt, any length)        | `kernopt.flash_attention` on the new K/V     |
| `PagedKVCache`            | later steps of <= 8 tokens             | `kernopt.paged_decode_attention` on the pages|
| `PagedKVCache`            | later steps of > 8 tokens (chunks)     | pages gathered, `kernopt.flash_attention`    |
| contiguous (dynamic/static)| <= 8 tokens, no mask                  | `kernopt.decode_attention`                   |
| contiguous                | otherwise                              | `kernopt.flash_attention` with HF's mask     |

Rows of padding queries are returned as zeros (HF never reads them; their keys are masked or not stored).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from kernopt import ops  # noqa: F401  (registers torch.ops.kernopt.*)
from kernopt.paged_cache import DEFAULT_PAGE_SIZE, PagedKVCache

NAME = "kernopt"
MAX_DECODE_QUERY = 8  # kernels/decode_attention.MAX_QUERY_LEN; not imported so this module loads without triton


def _scale(module, query: Tensor, scaling: Optional[float]) -> float:
    if scaling is not None:
        return float(scaling)
    return float(getattr(module, "scaling", query.shape[-1] ** -0.5))


def _bool_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF masks are bool (True = attend) from the SDPA builder, or additive floats: pass bool or float on."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _zero_padding_rows(out: Tensor, valid: Optional[Tensor]) -> Tensor:
    if valid is None:
        return out
    return out.masked_fill(~valid[:, None, :, None], 0.0)


def _gathered_prefill(query: Tensor, cache: PagedKVCache, layer_idx: int, step, scale: float) -> Tensor:
    """A long chunk after earlier tokens: gather each sequence's pages and attend with an explicit mask."""
    k_pages, v_pages, table, seq_lens = cache.view(layer_idx)
    b, _, sq, _ = query.shape
    ps = cache.page_size
    lens = torch.tensor(cache.lens, device=query.device)
    width = max(1, (max(cache.lens) + ps - 1) // ps)
    idx = table[:, :width].long()
    k = k_pages[idx].reshape(b, width * ps, *k_pages.shape[2:]).transpose(1, 2)
    v = v_pages[idx].reshape(b, width * ps, *v_pages.shape[2:]).transpose(1, 2)
    cols = torch.arange(width * ps, device=query.device)
    key_ok = cols[None, :] < lens[:, None]                                          # [B, S]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k = torch.where(key_ok[:, None, :, None], k, zero)  # unused slots hold garbage: never multiply it by 0
    v = torch.where(key_ok[:, None, :, None], v, zero)
    # The r-th real new token of sequence b sees keys j < prior_b + r + 1.
    if step.valid is None:
        rank = torch.arange(sq, device=query.device)[None, :].expand(b, sq)
    else:
        rank = step.valid.long().cumsum(-1) - 1
    prior = torch.tensor(step.prior_lens, device=query.device)
    limit = prior[:, None] + rank + 1                                                 # [B, Sq]
    mask = (cols[None, None, :] < limit[:, :, None]) & key_ok[:, None, :]
    if step.valid is not None:
        mask = mask & step.valid[:, :, None]
    return torch.ops.kernopt.flash_attention(query, k, v, mask[:, None], False, scale)


def kernopt_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers attention function: q [B, Hq, Sq, D], k/v [B, Hkv, S, D] (or paged pools); -> [B, Sq, Hq, D]."""
    scale = _scale(module, query, scaling)
    causal = getattr(module, "is_causal", True)
    mask = attention_mask if torch.is_tensor(attention_mask) else None
    paged = getattr(key, "_kernopt_paged", None)
    sq = query.shape[2]
    if paged is not None:
        cache, layer_idx = paged
        if not causal:
            raise ValueError("PagedKVCache with kernopt attention supports causal (decoder) attention only")
        step = cache.commit(layer_idx, mask)
        k_new, v_new = cache.take_pending(layer_idx)
        if step.hf_past == 0:
            # First step (the prompt): everything it needs is the new K/V; HF's mask covers the padding.
            out = torch.ops.kernopt.flash_attention(query, k_new, v_new, _bool_mask(mask), mask is None, scale)
        elif sq <= MAX_DECODE_QUERY and step.suffix:
            # Decode / speculative verification: left-padded real tokens are a suffix of the step, so the
            # kernel's bottom-right causal alignment per sequence length is exactly right.
            k_pages, v_pages, table, seq_lens = cache.view(layer_idx)
            out = torch.ops.kernopt.paged_decode_attention(query, k_pages, v_pages, table, seq_lens, scale)
        else:
            out = _gathered_prefill(query, cache, layer_idx, step, scale)
        out = _zero_padding_rows(out, step.valid)
    elif sq <= MAX_DECODE_QUERY and mask is None and causal and query.shape[2] <= key.shape[2]:
        out = torch.ops.kernopt.decode_attention(query, key, value, None, scale)
    else:
        out = torch.ops.kernopt.flash_attention(query, key, value, _bool_mask(mask), causal and mask is None
                                                and sq > 1, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "kernopt" a valid attn_implementation (attention function + SDPA-style boolean masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kernopt_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model) -> None:
    """Route the model's attention through kernopt (pass a `PagedKVCache` to generate for paged decode)."""
    register()
    if not hasattr(model, "_kernopt_previous_attn"):
        model._kernopt_previous_attn = model.config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        model.config._attn_implementation = NAME


def uninstall(model) -> None:
    """Put back the attention implementation the model had before `install`."""
    previous = getattr(model, "_kernopt_previous_attn", None)
    if previous is None:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(previous)
    if model.config._attn_implementation != previous:
        model.config._attn_implementation = previous
    del model._kernopt_previous_attn


def paged_cache(model, page_size: int = DEFAULT_PAGE_SIZE, max_pages: Optional[int] = None) -> PagedKVCache:
    """A `PagedKVCache` sized for the model's layers."""
    return PagedKVCache(model.config, page_size=page_size, max_pages=max_pages)


def cache_argument(model) -> str:
    """The keyword generate/forward take the cache by: "cache" (transformers >= 5.2x) or "past_key_values"."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
