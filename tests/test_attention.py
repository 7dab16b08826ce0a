"""joint_attention against a naive restatement of the paper's equations (eq. 3-4)."""

import math

import pytest
import torch
from torch.testing import assert_close

from longmem import joint_attention
from longmem.attention import causal_attention


def naive_joint(q, k, v, mem_k, mem_v, gate, mem_mask, mem_q):
    """Loop over rows, heads and queries; softmax written out; GQA by head index division."""
    B, H, T, Dh = q.shape
    G = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = torch.stack([q[b, h, t] @ k[b, h // G, u] for u in range(t + 1)]) / math.sqrt(Dh)
                A = (torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()) @ v[b, h // G, : t + 1]
                valid = mem_mask[b, h, t]
                if not valid.any():
                    out[b, h, t] = A
                    continue
                sm = (mem_k[b, h, t][valid] @ mem_q[b, h, t]) / math.sqrt(Dh)
                M = (torch.exp(sm - sm.max()) / torch.exp(sm - sm.max()).sum()) @ mem_v[b, h, t][valid]
                g = 1 / (1 + math.exp(-gate[h].item()))
                out[b, h, t] = (1 - g) * A + g * M
    return out


def _inputs(B=2, H=4, Hkv=4, T=5, K=6, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, T, Dh), r(B, Hkv, T, Dh), r(B, Hkv, T, Dh)
    mem_k, mem_v = r(B, H, T, K, Dh), r(B, H, T, K, Dh)
    mask = torch.rand(B, H, T, K, generator=g) > 0.3
    mask[0, 1, 2] = False  # a query with no memory at all
    gate = r(H)
    return q, k, v, mem_k, mem_v, gate, mask


@pytest.mark.parametrize("Hkv", [4, 2])
def test_joint_attention_matches_naive_equations(Hkv):
    q, k, v, mem_k, mem_v, gate, mask = _inputs(Hkv=Hkv)
    mem_q = q + 0.5  # a distinct pre-rotary query for the memory branch
    got = joint_attention(q, k, v, mem_k, mem_v, gate, mem_mask=mask, mem_q=mem_q)
    assert_close(got, naive_joint(q, k, v, mem_k, mem_v, gate, mask, mem_q))


def test_mem_q_defaults_to_q():
    q, k, v, mem_k, mem_v, gate, mask = _inputs()
    assert_close(joint_attention(q, k, v, mem_k, mem_v, gate, mask), naive_joint(q, k, v, mem_k, mem_v, gate, mask, q))


def test_empty_memory_and_closed_gate_are_plain_causal_attention():
    q, k, v, mem_k, mem_v, gate, mask = _inputs()
    plain = causal_attention(q, k, v)
    empty = torch.zeros_like(mask)
    assert_close(joint_attention(q, k, v, mem_k, mem_v, gate, mem_mask=empty), plain, rtol=0, atol=0)
    closed = torch.full_like(gate, float("-inf"))
    assert_close(joint_attention(q, k, v, mem_k, mem_v, closed, mem_mask=mask), plain, rtol=0, atol=0)
    assert_close(joint_attention(q, k, v, None, None, gate), plain, rtol=0, atol=0)


def test_open_gate_is_memory_attention_alone_where_memory_exists():
    q, k, v, mem_k, mem_v, gate, mask = _inputs()
    mask[:] = True
    opened = torch.full_like(gate, float("inf"))
    got = joint_attention(q, k, v, mem_k, mem_v, opened, mem_mask=mask)
    p = torch.softmax(torch.einsum("bhtd,bhtkd->bhtk", q, mem_k) / math.sqrt(q.shape[-1]), -1)
    assert_close(got, torch.einsum("bhtk,bhtkd->bhtd", p, mem_v))


def test_causal_attention_with_cache_equals_last_rows_of_full():
    q, k, v, *_ = _inputs(T=7)
    full = causal_attention(q, k, v)
    assert_close(causal_attention(q[:, :, -3:], k, v), full[:, :, -3:])


def test_large_keys_in_low_precision_stay_finite():
    q, k, v, mem_k, mem_v, gate, mask = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in _inputs())
    out = joint_attention(q * 300, k * 300, v, mem_k * 300, mem_v, gate, mem_mask=mask)
    assert torch.isfinite(out).all()
