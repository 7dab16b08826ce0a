"""The SideNet: the trainable network that reads the frozen backbone and the memory (paper section 3.2).

Glossary: B rows, T tokens, D hidden size, H query heads, Hkv key/value heads, Dh head dim,
L backbone layers, L_s = L // 2 SideNet layers, j = (m - 1) / 2 the memory-augmented layer.

    x_0     = Hb[0]                                          (embeddings, frozen)
    x_{i+1} = Block_i(x_i) + (Hb[2i+2] - Hb[2i])              eq (2): cross-network residual
    logits  = lm_head(norm(x_{L_s}))                         (LM head frozen, norm trainable)

Block_i is a copy of backbone block 2i+1. The last residual uses the raw output of the last
backbone block Hb[L] (the official code used the final-normed state), which
for an odd L also covers block L-1.

Identity start (``LongMemConfig.sidenet_init="identity"``, not in the paper): block i gets a residual
scale alpha_i, initialised to 0, and computes ``x + alpha_i * (Block_i(x) - x)``. With every alpha at 0,
x_i = Hb[2i] by induction and the logits are the backbone's own, so adaptation starts from the
backbone's language instead of relearning it. A block whose alpha is 0 and not trained is skipped.

Memory-delta start (``sidenet_init="memory-delta"``, not in the paper): the identity start, where the memory block j
adds only what reading memory changes, ``x + alpha_j * (Block_j(x, memory) - Block_j(x, no memory))``; block j runs
twice (the second time on the same window keys, without memory). Without memory, or with an empty one, the
SideNet is the backbone whatever was trained, so training for recall cannot cost the language that memory
does not touch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longmem.attention import causal_attention, joint_attention
from longmem.backbone import Backbone, LayerInputs
from longmem.config import IDENTITY_INITS


class SideNet(nn.Module):
    def __init__(self, backbone: Backbone, memory_layer: int, init: str = "paper"):
        super().__init__()
        L = backbone.num_layers
        self.num_layers = L // 2
        self.memory_index = (memory_layer - 1) // 2  # j
        # deep copies, never aliases: training the SideNet must not touch the backbone
        self.blocks = nn.ModuleList(backbone.copy_block(2 * i + 1) for i in range(self.num_layers))
        self.norm = backbone.copy_norm()
        self.gate = nn.Parameter(torch.zeros(backbone.num_heads))  # g, one per head; sigmoid(0) = 0.5
        # alpha_i, one scalar per block (identity start only): each its own parameter, so one block's can train alone
        self.scales = (nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(self.num_layers))
                       if init in IDENTITY_INITS else None)
        self.memory_delta = init == "memory-delta"
        self.requires_grad_(True)
        # recompute block activations in the backward pass instead of keeping them (training only)
        self.grad_checkpointing = False
        self._residual_from = [(2 * i, 2 * i + 2) for i in range(self.num_layers)]
        self._residual_from[-1] = (2 * (self.num_layers - 1), L)

    def forward(self, backbone: Backbone, hidden: list[torch.Tensor], layer_inputs: list[LayerInputs], retrieve=None,
                cache=None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Run the SideNet over one segment (or the newest tokens of one, with a cache).

        Args:
            backbone: the frozen backbone (it runs the copied blocks through transformers; its LM head is used).
            hidden: Hb[0..L] for the new tokens, each (B, T, D).
            layer_inputs: what each backbone block was called with for the same tokens (positions, masks):
                block i runs with those of backbone block 2i+1, the block it copies.
            retrieve: callable(mem_q (B, H, T, Dh)) -> Retrieved or None; None runs without memory.
            cache: a ``KVCache`` with the window's earlier tokens (incremental decoding), updated in place.
            logits_at: (B, T) bool, the positions whose logits are wanted (training that scores a few tokens skips
                the LM head elsewhere); None: every position.
        Returns:
            logits (B, T, V), or (1, N, V) for the N positions of ``logits_at`` in row-major order
        """
        window = {}  # memory-delta: block j's whole-window keys/values, for its second pass without memory

        def core_for(i):
            use_memory = i == self.memory_index and retrieve is not None

            def core(q, k, v, q_raw, k_raw, **local):
                if cache is not None:
                    k, v = cache.update(i, k, v)
                if use_memory:
                    window[i] = (k, v)
                if not use_memory:
                    return causal_attention(q, k, v, **local)
                mem = retrieve(q_raw)  # retrieval query: this layer's query projection, before rotary
                return joint_attention(q, k, v, mem.keys, mem.values, self.gate, mem.mask, mem_q=q_raw, **local)

            return core

        def without_memory(q, k, v, q_raw, k_raw, **local):  # block j again, on the keys its first pass cached
            return causal_attention(q, *window[self.memory_index], **local)

        dtype = self.gate.dtype  # the SideNet's own (fp32 over a bf16 backbone, say); a no-op when they agree
        skipped = self.skipped_blocks()
        x = hidden[0].to(dtype)
        for i, block in enumerate(self.blocks):
            lo, hi = self._residual_from[i]
            use_memory = i == self.memory_index and retrieve is not None
            if self.memory_delta and i == self.memory_index:
                if use_memory and i not in skipped:  # without memory block j adds nothing
                    y = backbone.block_forward(block, x, layer_inputs[2 * i + 1], core_for(i), raw=True)
                    y0 = backbone.block_forward(block, x, layer_inputs[2 * i + 1], without_memory)
                    x = x + self.scales[i].to(dtype) * (y - y0)
            elif i not in skipped:
                # the memory layer is never recomputed: by the backward pass this segment is in the memory it read
                if self.grad_checkpointing and torch.is_grad_enabled() and not use_memory:
                    y = checkpoint(backbone.block_forward, block, x, layer_inputs[2 * i + 1], core_for(i), use_reentrant=False)
                else:
                    y = backbone.block_forward(block, x, layer_inputs[2 * i + 1], core_for(i), raw=use_memory)
                x = y if self.scales is None else x + self.scales[i].to(dtype) * (y - x)  # identity start: alpha_i
            x = x + (hidden[hi] - hidden[lo]).to(dtype)  # eq (2)
        if logits_at is not None:
            x = x[logits_at][None]
        return backbone.logits(x, norm=self.norm)

    def skipped_blocks(self) -> set[int]:
        """Identity start: the blocks whose alpha is exactly 0 and not being trained (they add nothing)."""
        if self.scales is None:
            return set()
        training = torch.is_grad_enabled()
        values = torch.stack([a.detach() for a in self.scales]).tolist()  # one device sync per forward
        return {i for i, (a, v) in enumerate(zip(self.scales, values)) if v == 0.0 and not (training and a.requires_grad)}
