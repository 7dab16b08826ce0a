"""A key/value cache for incremental decoding: the local window's keys and values, per layer.

One object per network (backbone or SideNet), passed explicitly into ``forward``; shapes
(B, Hkv, S, Dh) with S the tokens already in the local window. ``raw_keys`` keeps the pre-rotary
keys of the layers that need them (block m, whose keys go to memory when the window slides).

Each layer writes into a buffer allocated once for ``capacity`` tokens (the decoder's window) and
reused after ``reset``, so a decoding step copies only its own token's keys and values; ``keys``,
``values`` and ``raw_keys`` are views of the filled part. Without a capacity a buffer grows by doubling.
"""

from __future__ import annotations

import copy

import torch


class KVCache:
    def __init__(self, num_layers: int, capacity: int | None = None):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # views (B, Hkv, S, Dh) of the buffers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.raw_keys: list[torch.Tensor | None] = [None] * num_layers
        self._buffers: list[dict | None] = [None] * num_layers  # name -> (B, Hkv, cap, Dh)
        self._length = [0] * num_layers

    def __len__(self) -> int:
        """S: tokens in the window (0 when empty)."""
        return max(self._length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_raw: torch.Tensor | None = None):
        """Append this step's (B, Hkv, t, Dh) keys/values; return the whole window's."""
        S, t = self._length[layer], k.shape[2]
        new = {"k": k, "v": v} if k_raw is None else {"k": k, "v": v, "raw": k_raw}
        buf = self._buffers[layer]
        if buf is None or buf["k"].shape[2] < S + t or len(buf) < len(new):  # shapes are fixed per decoder
            buf = self._grow(layer, new, S + t)
        for name, x in new.items():
            buf[name][:, :, S:S + t].copy_(x)
        self._length[layer] = S + t
        self.keys[layer], self.values[layer] = buf["k"][:, :, :S + t], buf["v"][:, :, :S + t]
        if k_raw is not None:
            self.raw_keys[layer] = buf["raw"][:, :, :S + t]
        return self.keys[layer], self.values[layer]

    def _grow(self, layer: int, new: dict, needed: int) -> dict:
        old, S = self._buffers[layer], self._length[layer]
        cap = max(needed, self.capacity or 0, 2 * (old["k"].shape[2] if old else 0))
        buf = {}
        for name, x in new.items():
            B, H, _, D = x.shape
            buf[name] = torch.empty(B, H, cap, D, dtype=x.dtype, device=x.device)
            if S and old is not None and name in old:
                buf[name][:, :, :S].copy_(old[name][:, :, :S])
        self._buffers[layer] = buf
        return buf

    def clone(self) -> "KVCache":
        """An independent copy (its own buffers): extending it leaves this cache as it is."""
        return copy.deepcopy(self)

    def reset(self) -> None:
        """Empty the window; the buffers are kept for the next tokens."""
        n = len(self.keys)
        self.keys, self.values, self.raw_keys = [None] * n, [None] * n, [None] * n
        self._length = [0] * n


class WindowCache:
    """Both networks' KV caches for one local window: what ``LongMem.forward(..., cache=)`` extends.

    ``memory_kv()`` gives the window's block-m keys (pre-rotary) and values, (B, Hkv, S, Dh) each: what
    moves into the memory when the window slides.
    """

    def __init__(self, backbone_layers: int, sidenet_layers: int, capacity: int | None = None, memory_layer: int | None = None):
        self.backbone = KVCache(backbone_layers, capacity)
        self.sidenet = KVCache(sidenet_layers, capacity)
        self.memory_layer = memory_layer

    def __len__(self) -> int:
        """S: tokens in the window."""
        return len(self.backbone)

    def memory_kv(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        m = self.memory_layer
        return self.backbone.raw_keys[m], self.backbone.values[m]

    def clone(self) -> "WindowCache":
        return copy.deepcopy(self)

    def reset(self) -> None:
        self.backbone.reset()
        self.sidenet.reset()
