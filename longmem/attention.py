"""Attention as pure functions: local causal attention and LongMem's joint attention (eq. 3-4).

Glossary (every tensor here uses one layout, (B, H, T, Dh)):
    B   batch rows (documents / memories)      H   query heads      Hkv  key/value heads (GQA)
    T   query tokens                           S   local key tokens (S >= T with a KV cache)
    Dh  head dimension                         K   retrieved memory tokens per query (k_c * csz)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal softmax attention; the T queries are the *last* T of the S key positions.

    Args:
        q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh) with H a multiple of Hkv (grouped-query attention).
        window: a sliding window (a query sees itself and the window - 1 keys before it), or None.
        softcap: scores become tanh(score / softcap) * softcap before the mask (Gemma 2), or None.
    Returns:
        (B, H, T, Dh)
    """
    T, S = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    windowed = window is not None and S > window
    if softcap is None and not windowed:
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if T == 1:  # one new token sees the whole window: no mask needed
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    # queries sit at positions S-T .. S-1: bottom-right aligned causal mask
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if windowed:
        mask = mask & ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T - window)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def memory_attention(
    mem_q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, mem_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to its own K retrieved tokens, without positions or causal mask.

    Args:
        mem_q: (B, H, T, Dh); mem_k, mem_v: (B, H, T, K, Dh); mem_mask: (B, H, T, K) bool, True = valid.
    Returns:
        out (B, H, T, Dh) and has_memory (B, H, T, 1) bool (False where no memory token was valid).
    """
    if mem_k.dtype != mem_q.dtype and not torch.is_autocast_enabled(mem_q.device.type):
        mem_k, mem_v = mem_k.to(mem_q.dtype), mem_v.to(mem_q.dtype)  # e.g. a bf16 memory read by an fp32 model
    acc = torch.promote_types(mem_q.dtype, torch.float32)  # softmax in at least fp32 (bf16/fp16 safe)
    scores = torch.einsum("bhtd,bhtkd->bhtk", mem_q, mem_k).to(acc) * scale  # (B, H, T, K)
    if mem_mask is None:
        has_memory = torch.ones(scores.shape[:-1] + (1,), dtype=torch.bool, device=scores.device)
    else:
        scores = scores.masked_fill(~mem_mask, float("-inf"))
        has_memory = mem_mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~has_memory, 0.0)  # all-masked rows: finite softmax, zeroed below
    probs = torch.softmax(scores, dim=-1).to(mem_v.dtype)  # stable: max-subtracted, computed in fp32
    out = torch.einsum("bhtk,bhtkd->bhtd", probs, mem_v)
    return out * has_memory, has_memory


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None,
    gate_logits: torch.Tensor,
    mem_mask: torch.Tensor | None = None,
    mem_q: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """LongMem's memory-augmented attention (paper eq. 3-4, gate as in the official code).

    out_h = (1 - sigmoid(g_h)) * A_h + sigmoid(g_h) * M_h, and out_h = A_h for a query with no memory.

    Args:
        q, k, v: (B, H, T, Dh) local queries/keys/values with the position scheme already applied
            (k, v may have fewer heads than q: grouped-query attention; k, v may be longer than q:
            a KV cache, the queries being the last T positions).
        mem_k, mem_v: (B, H, T, K, Dh) retrieved memory keys/values per query token (None: no memory).
        gate_logits: (H,) the learnable g, one scalar per head.
        mem_mask: (B, H, T, K) bool, True = a valid memory token. None: all valid.
        mem_q: (B, H, T, Dh) the query before any rotary embedding; defaults to q.
        scale: softmax temperature; defaults to 1 / sqrt(Dh).
        window, softcap: the local branch's sliding window and score soft-cap (see ``causal_attention``).
    Returns:
        (B, H, T, Dh)
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    local = causal_attention(q, k, v, scale=scale, window=window, softcap=softcap)  # eq (3), local branch A
    if mem_k is None or mem_k.shape[-2] == 0:
        return local
    mem, has_memory = memory_attention(q if mem_q is None else mem_q, mem_k, mem_v, mem_mask, scale)  # M
    gate = torch.sigmoid(gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32))).to(local.dtype).view(1, -1, 1, 1)  # (1, H, 1, 1)
    gate = gate * has_memory  # a query without memory keeps its local attention
    return local + gate * (mem - local)  # eq (4): (1 - g) * A + g * M
